//! Training across processes (`switch train --distributed` under `mpirun` or `srun`): one
//! process per rank, each running one replica of the model on its share of every batch.
//!
//! ```text
//! rank r:   windows r*B/N .. (r+1)*B/N of every batch -> forward -> loss_r / N -> backward
//! all:      g = Allreduce_sum(g_r)                    every rank the same gradient
//!           losses, routing statistics: Allreduce_sum of each rank's share
//!           clip g to its global norm; the same Adam step on every rank
//! global routing: rank 0 gathers every rank's router probabilities, decides the whole batch's
//!           plan (capacity, drops, f_i over all tokens), broadcasts it: one model's step
//! every K steps: parameter checksums compared; a mismatch names the step
//! ```
//! The exchanges go through [`Collective`]: MPI between processes (`mpi.rs`, cargo feature
//! `mpi`) or threads of one process ([`Threads`], which the tests use to run several ranks
//! without an MPI launcher). Rank 0 alone writes the run directory.

mod expert_exchange;
mod threads;
#[cfg(feature = "mpi")]
mod world;

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use anyhow::Result;

pub(crate) use expert_exchange::ExpertExchange;
pub use threads::Threads;
#[cfg(feature = "mpi")]
pub use world::MpiWorld;

/// The exchanges between the ranks of a job. Every rank calls the same operations in the same
/// order; each call returns when every rank has made it (or fails: a rank that waited longer
/// than the job's time-out, or a rank that failed, ends the exchange with an error).
pub trait Collective: Send + Sync {
    /// This process's rank, `0..size`.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn size(&self) -> usize;
    /// Element-wise sum over the ranks, in place; afterwards every rank holds the same values.
    /// `what` names the exchange in errors.
    fn all_reduce_sum(&self, what: &str, values: &mut [f32]) -> Result<()>;
    /// The same for f64 values (losses, statistics, checksums).
    fn all_reduce_sum_f64(&self, what: &str, values: &mut [f64]) -> Result<()>;
    /// Every rank's `mine` (the same length on every rank), in rank order.
    fn all_gather(&self, what: &str, mine: &[f32]) -> Result<Vec<f32>>;
    /// `root`'s bytes on every rank (`bytes` is replaced on the others; its length may differ).
    fn broadcast(&self, what: &str, root: usize, bytes: &mut Vec<u8>) -> Result<()>;
    /// Every rank's `mine` (the same length on every rank) at `root`, in rank order; `None` on
    /// the other ranks.
    fn gather(&self, what: &str, root: usize, mine: &[f32]) -> Result<Option<Vec<f32>>>;
    /// All-to-all with counts per rank (MPI_Alltoallv): `send` holds `send_counts[q]` values
    /// for each rank `q`, in rank order; the result holds `recv_counts[p]` values from each
    /// rank `p`, in rank order. What rank `p` sends to rank `q` must be what `q` expects from
    /// `p` (the counts are not exchanged).
    fn all_to_all_v(
        &self,
        what: &str,
        send: &[f32],
        send_counts: &[usize],
        recv_counts: &[usize],
    ) -> Result<Vec<f32>>;
    /// Tells the time-out messages which training step the exchanges belong to.
    fn set_step(&self, step: u64);
    /// Seconds this rank has spent in exchanges so far (waiting for the others included).
    fn exchange_seconds(&self) -> f64 {
        self.exchange_tally().values().map(|t| t.seconds).sum()
    }
    /// Time and bytes per exchange name (`what`: "gradients", "tokens to their experts", ...)
    /// so far.
    fn exchange_tally(&self) -> BTreeMap<String, Tally>;
    /// Whether the ranks are threads of this process: then a rank must not wait for the
    /// others on a worker of the shared thread pool, which the others may need to get there.
    fn in_process(&self) -> bool {
        false
    }
}

/// The first failed exchange of a forward or backward pass. Those passes cannot return an
/// error (a module's forward and an autodiff node's backward return tensors), so an exchange
/// that fails inside one records its error here; the pass goes on with stand-in values of the
/// right shapes and no further exchange, and the step returns the error once the pass is over
/// (`train::replicas`): the run ends with the message instead of a panic.
#[derive(Default)]
pub(crate) struct Fault(Mutex<Option<anyhow::Error>>);

impl Fault {
    /// Keeps `e` unless an earlier failure is already kept.
    pub(crate) fn record(&self, e: anyhow::Error) {
        let mut first = self.0.lock().unwrap_or_else(|p| p.into_inner());
        first.get_or_insert(e);
    }

    /// Whether an exchange of this pass has failed: the later ones are not attempted.
    pub(crate) fn is_set(&self) -> bool {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    /// The failure, if any, taken out.
    pub(crate) fn take(&self) -> Option<anyhow::Error> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// What one kind of exchange has cost a rank.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Tally {
    /// Seconds in the exchange calls (waiting for the other ranks included).
    pub seconds: f64,
    /// Bytes this rank handed over for other ranks: its whole buffer for reductions and
    /// gathers, the values addressed to other ranks in an all-to-all, the root's bytes in a
    /// broadcast.
    pub bytes: u64,
}

/// Time and bytes of exchanges, per exchange name.
#[derive(Default)]
pub(crate) struct ExchangeClock(Mutex<BTreeMap<String, Tally>>);

impl ExchangeClock {
    /// `f()`, its time and `bytes` added to exchange `what`'s.
    pub(crate) fn time<R>(&self, what: &str, bytes: usize, f: impl FnOnce() -> R) -> R {
        let start = Instant::now();
        let out = f();
        let seconds = start.elapsed().as_secs_f64();
        if let Ok(mut m) = self.0.lock() {
            let t = m.entry(what.to_string()).or_default();
            t.seconds += seconds;
            t.bytes += bytes as u64;
        }
        out
    }

    /// The tally per exchange name so far.
    pub(crate) fn tally(&self) -> BTreeMap<String, Tally> {
        self.0.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

/// The bytes an all-to-all of `len` values sends from rank `rank` to the other ranks; an
/// error unless `counts` has one entry per rank (of `ranks`) and they add up to `len`.
fn check_counts(
    what: &str,
    len: usize,
    counts: &[usize],
    rank: usize,
    ranks: usize,
) -> Result<usize> {
    if counts.len() != ranks || counts.iter().sum::<usize>() != len {
        anyhow::bail!(
            "{what}: {} counts adding up to {} for {ranks} ranks and {len} values",
            counts.len(),
            counts.iter().sum::<usize>()
        );
    }
    Ok(4 * (len - counts[rank]))
}

/// An agreed start: every rank hands in how its own start-up went, and all of them continue
/// only if every one succeeded. Otherwise every rank returns an error carrying the first failed
/// rank's message (that rank returns its own error), so a job whose rank 0 refuses to start
/// (`--name` of an existing run, a run another process holds) ends within one exchange with the
/// reason instead of ranks waiting in their first collective until the time-out. Call it on
/// every rank at the same points, before the collectives that the failure would skip. Without
/// a `world` (one process) `mine` is the answer.
pub fn agree<T>(world: Option<&dyn Collective>, what: &str, mine: Result<T>) -> Result<T> {
    let Some(world) = world else {
        return mine;
    };
    let failed = world.all_gather(what, &[if mine.is_err() { 1.0 } else { 0.0 }])?;
    let Some(first) = failed.iter().position(|&f| f != 0.0) else {
        return mine;
    };
    let mut message = match &mine {
        Err(e) if world.rank() == first => format!("{e:#}").into_bytes(),
        _ => Vec::new(),
    };
    world.broadcast(what, first, &mut message)?;
    match mine {
        Err(e) if world.rank() == first => Err(e),
        _ => Err(anyhow::anyhow!(
            "rank {first} of the job could not start ({what}): {}",
            String::from_utf8_lossy(&message)
        )),
    }
}

/// Checks that every rank starts the same job: each rank's `fields` (name, value: the
/// configuration's keys, the data's SHA-256, ...) against rank 0's, which rank 0 broadcasts.
/// Any difference is an error on every rank ([`agree`]) naming each field that differs, its
/// value on the differing rank and on rank 0: ranks that would drift apart (another `train.lr`,
/// another text with the same characters) are stopped before the first step.
pub fn check_same_start(world: &dyn Collective, fields: &[(String, String)]) -> Result<()> {
    let what = "checking that every rank starts the same job";
    let mut bytes = serde_json::to_vec(fields)?;
    world.broadcast(what, 0, &mut bytes)?;
    let rank0: Vec<(String, String)> = serde_json::from_slice(&bytes)?;
    let mut differ: Vec<String> = fields
        .iter()
        .zip(&rank0)
        .filter(|(mine, theirs)| mine != theirs)
        .map(|((name, mine), (_, theirs))| format!("{name} = {mine} here, {theirs} on rank 0"))
        .collect();
    if fields.len() != rank0.len() {
        differ.push(format!(
            "{} fields here, {} on rank 0",
            fields.len(),
            rank0.len()
        ));
    }
    let mine = if differ.is_empty() {
        Ok(())
    } else {
        Err(anyhow::anyhow!(
            "rank {} does not start the job rank 0 starts: {}; give every rank the same \
             configuration and --data",
            world.rank(),
            differ.join("; ")
        ))
    };
    agree(Some(world), what, mine)
}

/// An error unless a batch of `batch_size` windows splits evenly over `ranks` ranks.
pub fn check_batch(batch_size: usize, ranks: usize) -> Result<()> {
    if ranks == 0 || !batch_size.is_multiple_of(ranks) {
        anyhow::bail!(
            "train.batch_size = {batch_size} cannot be split over {ranks} ranks: every rank takes \
             batch_size / ranks windows; use a batch size that is a multiple of {ranks}, or a \
             number of ranks that divides {batch_size}"
        );
    }
    Ok(())
}

/// Whether the parameters of every rank are the same: compares each rank's `checksum`
/// (bit for bit) and names the step and the ranks that differ.
pub(crate) fn check_same(world: &dyn Collective, step: u64, checksum: f64) -> Result<()> {
    let n = world.size();
    let mut all = vec![0.0; n];
    all[world.rank()] = checksum;
    world.all_reduce_sum_f64("parameter checksum", &mut all)?;
    if let Some((r, c)) = all
        .iter()
        .enumerate()
        .find(|(_, c)| c.to_bits() != all[0].to_bits())
    {
        anyhow::bail!(
            "step {step}: the ranks' parameters differ (checksum of rank 0: {:e}, of rank {r}: \
             {c:e}): the ranks no longer compute the same model; resume from the last checkpoint",
            all[0]
        );
    }
    Ok(())
}
