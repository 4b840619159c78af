//! Diagnostics through `tracing`, selected with `RUST_LOG` as in Burn, cubecl and wgpu (whose
//! `log` records arrive through the same subscriber).
//!
//! ```text
//! RUST_LOG unset            this program's notes and warnings, as `note: ...` / `warning: ...`
//! RUST_LOG=debug            everything at debug and above, with time, level and module
//! RUST_LOG=wgpu_core=warn,switch_transformer=debug   per-module levels (EnvFilter syntax)
//! ```
//! Results (tables, samples, the interrupted-run hint, the final `error: ...`) are the program's
//! output and stay plain prints.

use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The filter when `RUST_LOG` is unset: this crate's and the binary's events at `info`,
/// nothing from dependencies.
const DEFAULT_FILTER: &str = "switch_transformer=info,switch=info";

/// Installs the subscriber (stderr). An invalid `RUST_LOG` falls back to the default with a
/// warning instead of failing the command.
pub fn init() {
    let colour = crate::cli::colour_allowed(&std::io::stderr());
    match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => match EnvFilter::try_new(&spec) {
            Ok(filter) => tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                .with_ansi(colour)
                .init(),
            Err(e) => {
                plain(colour);
                tracing::warn!("RUST_LOG={spec:?} is not a valid filter ({e}): using the default");
            }
        },
        _ => plain(colour),
    }
}

/// The default: short `note: ...` lines, the way command-line tools print diagnostics.
fn plain(colour: bool) {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(DEFAULT_FILTER))
        .with_writer(std::io::stderr)
        .with_ansi(colour)
        .event_format(Plain)
        .init();
}

/// `warning: message key=value`, without time or module.
struct Plain;

impl<S, N> FormatEvent<S, N> for Plain
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let label = match *event.metadata().level() {
            Level::ERROR => "error",
            Level::WARN => "warning",
            Level::INFO => "note",
            Level::DEBUG => "debug",
            Level::TRACE => "trace",
        };
        write!(writer, "{label}: ")?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}
