//! `switch route`: which expert each character of a text goes to, in every layer; or, for a
//! Hugging Face checkpoint (`--model`), each token in every sparse layer of the encoder and
//! (on the generated output) the decoder.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use switch_transformer::train::eval::route_tokens;
use switch_transformer::train::load_run_model;

/// Show which expert each token of a text goes to, in every layer.
#[derive(clap::Args)]
pub struct RouteArgs {
    /// A training run (character-level model).
    #[arg(long, required_unless_present = "model", conflicts_with = "model")]
    pub run: Option<PathBuf>,
    /// A Hugging Face Switch Transformers checkpoint directory (with tokenizer.json).
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long)]
    pub text: String,
    /// With --model: output tokens to generate and route through the decoder.
    #[arg(long, default_value_t = 8)]
    pub max_tokens: usize,
}

/// Runs the command.
pub fn run(args: RouteArgs, device: &Device) -> Result<ExitCode> {
    let RouteArgs {
        run,
        model,
        text,
        max_tokens,
    } = args;
    if let Some(dir) = model {
        return route_hf(&dir, &text, max_tokens, device);
    }
    let run = run.expect("clap requires --run or --model");

    let (config, vocab, model) = load_run_model(&run, device)?;
    if text.is_empty() {
        bail!("--text must not be empty");
    }
    let ids = vocab.encode(&text).context("--text")?;
    let layers = route_tokens(&model, &ids, config.train.seq_len);
    let colour = super::colour_allowed(&std::io::stdout());
    print_routes(&text, &layers, config.model.n_experts, colour);
    Ok(ExitCode::SUCCESS)
}

/// Prints each layer's routing of `text`: every character on the background colour of its
/// expert, then a table of expert and probability per character.
fn print_routes(text: &str, layers: &[Vec<(usize, f32)>], n_experts: usize, colour: bool) {
    const BG: [u8; 8] = [41, 42, 43, 44, 45, 46, 47, 100];
    let show = |c: char| match c {
        '\n' => '⏎',
        ' ' => '␣',
        c => c,
    };
    if colour {
        print!("experts:");
        for e in 0..n_experts {
            print!(" \x1b[{};30m {e} \x1b[0m", BG[e % BG.len()]);
        }
        println!();
        for (l, row) in layers.iter().enumerate() {
            print!("layer {l}: ");
            for (c, &(e, _)) in text.chars().zip(row) {
                print!("\x1b[{};30m{}\x1b[0m", BG[e % BG.len()], show(c));
            }
            println!();
        }
        println!();
    }
    print!("char");
    for l in 0..layers.len() {
        print!("  layer {l:<6}");
    }
    println!();
    for (i, c) in text.chars().enumerate() {
        print!("{:<4}", show(c));
        for row in layers {
            let (e, p) = row[i];
            print!("  e{e:<2} p={p:.2} ");
        }
        println!();
    }
}

/// `switch route --model DIR`: per sparse layer, every token's expert and probability (`x`
/// marks a token capacity dropped), then each expert's load and drops.
fn route_hf(
    dir: &std::path::Path,
    text: &str,
    max_tokens: usize,
    device: &Device,
) -> Result<ExitCode> {
    use switch_transformer::hf::HfSwitchTransformer;
    use switch_transformer::hf::routes::route_text;
    use switch_transformer::hf::tokenize::HfTokenizer;

    if text.is_empty() {
        bail!("--text must not be empty");
    }
    let model = HfSwitchTransformer::load(dir, device)?;
    let tok = HfTokenizer::load(dir, model.config.pad())?;
    let (layers, output) = route_text(&model, &tok, text, max_tokens)?;
    println!("input:  {text}");
    println!("output: {output}");
    for l in &layers {
        println!();
        if l.name.starts_with("decoder") {
            println!(
                "{} (one token per step, as cached generation routes it)",
                l.name
            );
        } else {
            let cap = model.config.expert_capacity;
            println!("{} (capacity {cap} tokens per expert per sequence)", l.name);
        }
        for (w, e, p, dropped) in &l.tokens {
            let mark = if *dropped { "  x dropped" } else { "" };
            println!("  {w:<16} e{e:<3} p={p:.3}{mark}");
        }
        let cells: Vec<String> = l
            .load
            .iter()
            .zip(&l.dropped)
            .enumerate()
            .map(|(e, (n, d))| format!("e{e}:{n}/{d}"))
            .collect();
        println!("  load/dropped: {}", cells.join(" "));
    }
    Ok(ExitCode::SUCCESS)
}
