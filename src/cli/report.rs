//! `switch report`: an HTML report with SVG charts of one or more runs.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use burn::tensor::Device;
pub mod charts;
pub mod finetune;
mod svg;
#[cfg(test)]
mod tests;

use charts::{RouteTable, RunMetrics, write_hf_routes, write_report};
use switch_transformer::train::eval::route_tokens;
use switch_transformer::train::load_run_model;

/// Write an HTML report (plus SVG charts) of one or more training or `switch finetune` runs,
/// or the routing table of a Hugging Face Switch Transformers checkpoint (--model).
#[derive(clap::Args)]
pub struct ReportArgs {
    /// Run directories (several are overlaid).
    #[arg(required_unless_present = "model", conflicts_with = "model")]
    pub runs: Vec<PathBuf>,
    /// A Hugging Face checkpoint directory: an HTML table of its routing of --route-text
    /// (written to --out, default DIR/report).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// With --model: output tokens generated and routed through the decoder.
    #[arg(long, default_value_t = 8)]
    pub max_tokens: usize,
    /// Output directory (default: RUN_DIR/report of the first run).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Text whose routing the report shows, through the first run's model.
    #[arg(
        long,
        default_value = "ROMEO:\nBut, soft! what light through yonder window breaks?"
    )]
    pub route_text: String,
}

/// Runs the command.
pub fn run(args: ReportArgs, device: &Device) -> Result<ExitCode> {
    let ReportArgs {
        runs,
        model,
        max_tokens,
        out,
        route_text,
    } = args;
    if let Some(dir) = model {
        use switch_transformer::hf::HfSwitchTransformer;
        use switch_transformer::hf::routes::route_text as route_hf;
        use switch_transformer::hf::tokenize::HfTokenizer;
        let m = HfSwitchTransformer::load(&dir, device)?;
        let tok = HfTokenizer::load(&dir, m.config.pad())?;
        let (layers, output) = route_hf(&m, &tok, &route_text, max_tokens)?;
        let out = out.unwrap_or_else(|| dir.join("report"));
        let name = dir.display().to_string();
        let html = write_hf_routes(&name, &route_text, &output, &layers, &out)?;
        println!("wrote {}", html.display());
        return Ok(ExitCode::SUCCESS);
    }

    if runs.iter().any(|r| finetune::is_finetune_run(r)) {
        if !runs.iter().all(|r| finetune::is_finetune_run(r)) {
            anyhow::bail!(
                "the runs mix `switch finetune` runs and training runs: report them separately"
            );
        }
        let metrics = runs
            .iter()
            .map(|r| finetune::FinetuneMetrics::read(r))
            .collect::<Result<Vec<_>>>()?;
        let (lines, heatmaps) = finetune::charts(&metrics);
        let names: Vec<&str> = metrics.iter().map(|m| m.name.as_str()).collect();
        let out = out.unwrap_or_else(|| runs[0].join("report"));
        let html = charts::write_page(&names, &lines, &heatmaps, None, &out)?;
        println!("wrote {}", html.display());
        return Ok(ExitCode::SUCCESS);
    }
    let metrics = runs
        .iter()
        .map(|r| RunMetrics::read(r))
        .collect::<Result<Vec<_>>>()?;
    let route = match load_run_model(&runs[0], device) {
        Ok((config, vocab, model)) => match vocab.encode(&route_text) {
            Ok(ids) => Some(RouteTable {
                text: route_text.chars().collect(),
                layers: route_tokens(&model, &ids, config.train.seq_len),
            }),
            Err(e) => {
                tracing::info!("no routing table: --route-text: {e}");
                None
            }
        },
        Err(e) => {
            tracing::info!("no routing table: {e:#}");
            None
        }
    };
    let out = out.unwrap_or_else(|| runs[0].join("report"));
    let html = write_report(&metrics, route.as_ref(), &out)?;
    println!("wrote {}", html.display());
    Ok(ExitCode::SUCCESS)
}
