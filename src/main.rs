//! `switch`: the command-line interface, a thin layer over the library: one file per
//! subcommand in `src/cli/`.

mod cli;
/// The integration tests' helpers, for the tests of the commands that live in the binary.
#[cfg(test)]
#[path = "../tests/suite/common.rs"]
mod common;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use switch_transformer::device::parse_device;

/// mimalloc reuses freed blocks instead of returning them to the OS: fewer page faults and
/// zero-fills for the many same-sized tensors a training step allocates.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Indices in mimalloc v3's `mi_option_e` (mimalloc.h; libmimalloc-sys names no constants for
/// them) of `mi_option_purge_delay` (documented default 1000 ms) and
/// `mi_option_arena_eager_commit` (default 2: arenas committed eagerly where the OS overcommits,
/// as Linux does).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;

/// Sets mimalloc's options for this program's pattern, each unless its environment variable is
/// set, and only where the option's index holds its documented default (else this is another
/// mimalloc version, and nothing is changed):
/// - Freed memory is kept instead of returned to the OS a second later: a training step frees
///   and reallocates the same large tensors every ~100 ms, and each return meant fresh
///   (kernel-zeroed) pages on the next step: 52,000 page faults in a 25-step bench, 476
///   without.
/// - For `finetune` (`large`: a model of hundreds of millions of parameters with its
///   gradients and moments), arenas reserved from then on are committed as they are used
///   instead of eagerly: fine-tuning a switch-base-8-shaped model (`benchmarks/finetune.sh`,
///   2-core AMD EPYC with AVX-512) peaked at 10.9 GB resident instead of 11.7, at the same
///   speed. The small tensors of the char-level trainer ran 2-3% slower so (`switch bench`,
///   fastest steps 93-96 ms against 91), and keep the default.
fn configure_allocator(large: bool) {
    let set = |env: &str, option, default, value| {
        if std::env::var_os(env).is_some() {
            return;
        }
        // SAFETY: reading and setting a mimalloc option has no preconditions.
        unsafe {
            if libmimalloc_sys::mi_option_get(option) == default {
                libmimalloc_sys::mi_option_set(option, value);
            }
        }
    };
    set("MIMALLOC_PURGE_DELAY", MI_OPTION_PURGE_DELAY, 1000, -1);
    if large {
        set(
            "MIMALLOC_ARENA_EAGER_COMMIT",
            MI_OPTION_ARENA_EAGER_COMMIT,
            2,
            0,
        );
    }
}

#[cfg(test)]
mod allocator_tests {
    /// `finetune` commits mimalloc's arenas on demand, other commands keep the default, and
    /// freed memory is kept (unless the environment sets these).
    #[test]
    fn finetune_commits_arenas_on_demand() {
        let get = |o| unsafe { libmimalloc_sys::mi_option_get(o) };
        if std::env::var_os("MIMALLOC_ARENA_EAGER_COMMIT").is_none() {
            super::configure_allocator(false);
            assert_eq!(get(super::MI_OPTION_ARENA_EAGER_COMMIT), 2);
            super::configure_allocator(true);
            assert_eq!(get(super::MI_OPTION_ARENA_EAGER_COMMIT), 0);
        }
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            assert_eq!(get(super::MI_OPTION_PURGE_DELAY), -1);
        }
    }
}

#[derive(Parser)]
#[command(
    name = "switch",
    version,
    about = "Switch Transformer on Burn: train, sample, evaluate, and check parity with labml's PyTorch code"
)]
struct Cli {
    /// Compute device: cpu | cuda[:N] | rocm[:N] | wgpu | vulkan | metal (GPU backends need
    /// the cargo feature of the same name).
    #[arg(long, global = true, default_value = "cpu")]
    device: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model (by default labml's Tiny Shakespeare experiment) in runs/NAME/.
    #[command(after_help = switch_transformer::train::config::keys_help())]
    Train(cli::train::TrainArgs),
    /// Generate text from a trained run.
    Sample(cli::sample::SampleArgs),
    /// Loss and perplexity over the whole validation split of a run's data.
    Eval(cli::eval::EvalArgs),
    /// Time training steps (default: the reference configuration) or generation.
    Bench(cli::bench::BenchArgs),
    /// Train a dense baseline and Switch models with more and more experts at equal compute
    /// per token (same steps, same seed); write a table and a plot of validation loss.
    Compare(cli::compare::CompareArgs),
    /// Turn a dense run into a Switch run that `train --resume` continues, or a dense Hugging
    /// Face T5 into a Switch Transformers model (sparse upcycling: every expert a copy of its
    /// block's FFN).
    Upcycle(cli::upcycle::UpcycleArgs),
    /// Write an HTML report (plus SVG charts) of one or more training or fine-tuning runs.
    Report(cli::report::ReportArgs),
    /// Show which expert each token of a text goes to, in every layer (a run, or a Hugging
    /// Face Switch Transformers checkpoint).
    Route(cli::route::RouteArgs),
    /// Fill in text with a Hugging Face Switch Transformers checkpoint (`google/switch-base-8`
    /// and up): greedy or sampled decoding with a key/value cache.
    Seq2seq(cli::seq2seq::Seq2seqArgs),
    /// Fine-tune a Hugging Face Switch Transformers checkpoint on JSON lines of
    /// {"input", "target"}, as transformers' Trainer does; the model is written in Hugging
    /// Face's layout.
    Finetune(cli::finetune::FinetuneArgs),
    /// Load a Hugging Face Switch Transformers checkpoint and save it again (f32, bf16, f16).
    Convert(cli::seq2seq::ConvertArgs),
    /// Replay fixtures recorded from labml's PyTorch code and compare every tensor.
    ///
    /// Prints one row per tensor (max abs error, max error relative to the tensor's largest
    /// magnitude) and ends with `parity: PASS` or `parity: FAIL`; exits 0 only on PASS.
    Parity(cli::parity::ParityArgs),
}

fn main() -> ExitCode {
    // Writing to a closed pipe (`switch eval ... | head -1`) ends the process quietly, as it does
    // for other command-line tools, instead of a panic in println!.
    #[cfg(unix)]
    // SAFETY: setting a signal's disposition to its default has no preconditions.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    configure_allocator(matches!(cli.command, Command::Finetune(_)));
    cli::logging::init();
    let gpu = switch_transformer::device::names_gpu(&cli.device);
    let code = match switch_transformer::cpu::check_env().and_then(|()| run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    };
    if gpu { exit_now(code) } else { code }
}

/// Ends a process that used a GPU backend here, once everything it wrote is flushed and closed
/// (`run` has returned, so every file, lock and checkpoint writer is dropped), without C's
/// exit handlers and the GPU libraries' destructors: NVIDIA's Vulkan driver crashed in that
/// teardown, after the results were printed (exit status 139 for every command on an H200 with
/// driver 580). cubecl writes its kernel and autotune caches through at insertion, so nothing
/// is lost.
fn exit_now(code: ExitCode) -> ExitCode {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    #[cfg(unix)]
    {
        let status = if code == ExitCode::SUCCESS {
            0
        } else if code == ExitCode::from(130) {
            130
        } else {
            1
        };
        // SAFETY: `_exit` has no preconditions; nothing below this frame needs to run.
        unsafe { libc::_exit(status) }
    }
    #[cfg(not(unix))]
    code
}

fn run(cli: Cli) -> Result<ExitCode> {
    let device = parse_device(&cli.device)?;
    match cli.command {
        Command::Train(args) => cli::train::run(args, &device),
        Command::Sample(args) => cli::sample::run(args, &device),
        Command::Eval(args) => cli::eval::run(args, &device),
        Command::Bench(args) => cli::bench::run(args, &device, &cli.device),
        Command::Compare(args) => cli::compare::run(args, &device),
        Command::Report(args) => cli::report::run(args, &device),
        Command::Upcycle(args) => cli::upcycle::run(args, &device),
        Command::Route(args) => cli::route::run(args, &device),
        Command::Parity(args) => cli::parity::run(args, &device),
        Command::Seq2seq(args) => cli::seq2seq::run(args, &device),
        Command::Convert(args) => cli::seq2seq::convert(args, &device),
        Command::Finetune(args) => cli::finetune::run(args, &device),
    }
}
