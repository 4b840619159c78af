//! `switch eval`: loss, perplexity and routing over a run's whole validation split.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Result, bail};
use burn::tensor::Device;
use rand::SeedableRng;
use switch_transformer::RoutingRng;
use switch_transformer::data::{TextData, valid_batches};
use switch_transformer::train::eval::evaluate;
use switch_transformer::train::{RunDir, load_run_model};

use super::DEFAULT_DATA;

/// Loss and perplexity over the whole validation split of a run's data.
#[derive(clap::Args)]
pub struct EvalArgs {
    #[arg(long)]
    pub run: PathBuf,
    /// The text to evaluate on [default: the text the run recorded, else
    /// data/tinyshakespeare.txt].
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Drop over-capacity tokens as in training (labml's validation); off by default.
    #[arg(long)]
    pub drop_tokens: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Runs the command.
pub fn run(args: EvalArgs, device: &Device) -> Result<ExitCode> {
    let EvalArgs {
        run,
        data,
        drop_tokens,
        seed,
    } = args;

    let data = RunDir::new(&run)
        .resolve_data(data.as_deref())?
        .unwrap_or_else(|| DEFAULT_DATA.into());
    let (config, vocab, mut model) = load_run_model(&run, device)?;
    model.set_drop_tokens(drop_tokens);
    let text = TextData::load(&data, config.train.seq_len + 1)?;
    if text.vocab != vocab {
        bail!(
            "{} has other characters than the run's data: evaluate on the data the run \
             was trained on",
            data.display()
        );
    }
    let t = &config.train;
    let batches = valid_batches(&text.valid, t.seq_len, t.batch_size, None);
    let m = evaluate(&model, &batches, &mut RoutingRng::seed_from_u64(seed));
    println!(
        "validation split: {} tokens, token dropping {}",
        m.tokens,
        if drop_tokens { "on" } else { "off" }
    );
    println!(
        "loss {:.4}  perplexity {:.3}  accuracy {:.4}",
        m.loss,
        m.perplexity(),
        m.accuracy
    );
    println!(
        "load-balancing loss {:.3}  dropped {:.4}",
        m.lb_loss, m.dropped_frac
    );
    Ok(ExitCode::SUCCESS)
}
