//! `switch route`: which expert each character of a text goes to, in every layer.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use switch_transformer::train::eval::route_tokens;
use switch_transformer::train::load_run_model;

/// Show which expert each character of a text goes to, in every layer.
#[derive(clap::Args)]
pub struct RouteArgs {
    #[arg(long)]
    pub run: PathBuf,
    #[arg(long)]
    pub text: String,
}

/// Runs the command.
pub fn run(args: RouteArgs, device: &Device) -> Result<ExitCode> {
    let RouteArgs { run, text } = args;

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
