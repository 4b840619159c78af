//! The library's trainer driven from code: a small character-level Switch Transformer trained
//! for a few hundred steps, with validation, a checkpoint, and text sampled from the result.
//!
//! `cargo run --release --example train_char_lm [TEXT_FILE]` (default: Tiny Shakespeare at
//! `../shared/data/tinyshakespeare.txt` or `data/tinyshakespeare.txt` when present, else a
//! small generated text). The run goes to a temporary directory, removed at the end.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use anyhow::{Context, Result};
use burn::module::Module;
use burn::tensor::Device;
use rand::SeedableRng;
use switch_transformer::RoutingRng;
use switch_transformer::data::TextData;
use switch_transformer::infer::generate::{SampleOptions, generate_cached};
use switch_transformer::train::{Event, RunConfig, Trainer};

fn main() -> Result<()> {
    let mut config = RunConfig::default();
    for key in [
        "model.d_model=64",
        "model.heads=4",
        "model.d_ff=128",
        "model.n_layers=2",
        "model.n_experts=4",
        "train.batch_size=16",
        "train.seq_len=32",
        "train.steps=300",
        "train.warmup=100",
        "train.eval_interval=100",
        "train.checkpoint_interval=300",
        "train.sample_prompt=The ",
    ] {
        config.set(key)?;
    }
    let data = text(config.train.seq_len)?;
    let dir = std::env::temp_dir().join(format!("switch-example-{}", std::process::id()));
    let mut trainer = Trainer::create(config, data, &dir, &Device::default())?;
    let stop = AtomicBool::new(false);
    let mut first_valid = None;
    trainer.run(&stop, &mut |event| {
        if let Event::Validation {
            step,
            metrics,
            sample,
        } = event
        {
            first_valid.get_or_insert(metrics.loss);
            println!(
                "step {step}: validation loss {:.3} | {sample:?}",
                metrics.loss
            );
        }
    })?;

    // Sample from the trained model (replica 0), with the key/value cache.
    let mut model = trainer.model().valid();
    model.set_training(false);
    let prompt = trainer.data.vocab.encode("The ")?;
    let opts = SampleOptions {
        max_tokens: 80,
        temperature: 0.8,
        top_k: Some(10),
        context: trainer.config.train.seq_len,
    };
    let mut rng = RoutingRng::seed_from_u64(1);
    let new = generate_cached(&model, &prompt, &opts, &mut rng.clone(), &mut rng);
    println!("sample: The {}", trainer.data.vocab.decode(&new));
    std::fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    let first = first_valid.context("no validation ran")?;
    anyhow::ensure!(first.is_finite(), "validation loss is not finite");
    Ok(())
}

/// The training text: the file named on the command line, Tiny Shakespeare if present, else
/// a generated text.
fn text(seq_len: usize) -> Result<TextData> {
    let candidates = [
        std::env::args().nth(1).map(PathBuf::from),
        Some(PathBuf::from("../shared/data/tinyshakespeare.txt")),
        Some(PathBuf::from("data/tinyshakespeare.txt")),
    ];
    if let Some(path) = candidates.into_iter().flatten().find(|p| p.is_file()) {
        println!("training on {}", path.display());
        return TextData::load(&path, seq_len + 1);
    }
    println!("no text file found: training on a generated text");
    let words = [
        "The", "king", "shall", "speak", "of", "love", "and", "night", "my", "lord",
    ];
    let mut rng = RoutingRng::seed_from_u64(0);
    let text: Vec<&str> = (0..40_000)
        .map(|_| words[rand::Rng::random_range(&mut rng, 0..words.len())])
        .collect();
    TextData::from_text(&text.join(" "), seq_len + 1)
}
