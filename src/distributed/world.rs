//! [`Collective`] over MPI (rsmpi on the system's MPI library): the ranks of `mpirun -np N` or
//! `srun`. Sums are MPI_Allreduce (MPI_SUM), whose reduction order is fixed for a given number
//! of ranks and message size, so every rank gets the same bits (the trainer's parameter
//! checksums confirm it).
//!
//! MPI collectives have no time-out: a watchdog thread ends this process when one exchange has
//! waited longer than the job's limit (a rank hangs), with an error naming the step and the
//! exchange; the launcher then ends the other ranks. A rank that dies ends the job the same way.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use mpi::Count;
use mpi::collective::SystemOperation;
use mpi::datatype::{Partition, PartitionMut};
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;

use super::{Collective, ExchangeClock, Tally, check_counts};

/// The environment variables by which MPI launchers tell a process its rank (OpenMPI, MPICH
/// and Slurm's PMI, PMIx).
const LAUNCHER_VARS: [&str; 4] = [
    "OMPI_COMM_WORLD_SIZE",
    "PMI_SIZE",
    "PMIX_RANK",
    "SLURM_NTASKS",
];

/// Whether this process was started by an MPI launcher.
pub(crate) fn launched_by_mpi() -> bool {
    LAUNCHER_VARS.iter().any(|v| std::env::var_os(v).is_some())
}

/// This process's place in an MPI job.
pub struct MpiWorld {
    world: Mutex<SimpleCommunicator>,
    rank: usize,
    size: usize,
    step: Arc<AtomicU64>,
    /// Time spent in exchanges.
    clock: ExchangeClock,
    /// The exchange in progress and when it started, for the watchdog.
    waiting: Arc<Mutex<Option<(String, Instant)>>>,
    // Dropped last: finalizes MPI.
    _universe: Universe,
}

// SAFETY: MPI is initialised with at least MPI_THREAD_SERIALIZED (checked in `init`), and every
// call on the communicator goes through the `world` mutex, so no two threads call MPI at once.
unsafe impl Send for MpiWorld {}
// SAFETY: as above.
unsafe impl Sync for MpiWorld {}

impl MpiWorld {
    /// Initialises MPI; an exchange that waits longer than `timeout` ends the job.
    pub fn init(timeout: Duration) -> Result<Self> {
        if !launched_by_mpi() {
            bail!(
                "--distributed needs an MPI launcher: start the ranks with `mpirun -np N switch \
                 train --distributed ...` (or srun under Slurm)"
            );
        }
        let Some((universe, threading)) = mpi::initialize_with_threading(mpi::Threading::Multiple)
        else {
            bail!("MPI was already initialised in this process");
        };
        if threading < mpi::Threading::Serialized {
            bail!(
                "the MPI library offers thread support {threading:?}; switch needs at least \
                 Serialized (calls from the compute threads, one at a time)"
            );
        }
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        let step = Arc::new(AtomicU64::new(0));
        let waiting: Arc<Mutex<Option<(String, Instant)>>> = Arc::new(Mutex::new(None));
        {
            let (step, waiting) = (Arc::clone(&step), Arc::clone(&waiting));
            std::thread::Builder::new()
                .name("exchange watchdog".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(Duration::from_millis(200));
                        let late = waiting
                            .lock()
                            .ok()
                            .and_then(|w| w.as_ref().map(|(what, t)| (what.clone(), t.elapsed())))
                            .filter(|(_, waited)| *waited > timeout);
                        if let Some((what, waited)) = late {
                            eprintln!(
                                "error: rank {rank}: step {}: {what} has waited {:.0} s for the \
                                 other ranks (train.exchange_timeout_s = {}): a rank died or \
                                 hangs; ending the job (continue with --resume)",
                                step.load(Ordering::Relaxed),
                                waited.as_secs_f64(),
                                timeout.as_secs()
                            );
                            // Ends this process at once (the thread in MPI never returns); the
                            // launcher ends the others.
                            // SAFETY: _exit has no preconditions.
                            unsafe { libc::_exit(3) };
                        }
                    }
                })?;
        }
        Ok(Self {
            world: Mutex::new(world),
            rank,
            size,
            step,
            clock: ExchangeClock::default(),
            waiting,
            _universe: universe,
        })
    }

    /// `f` on the communicator, watched by the watchdog as exchange `what`.
    /// `bytes`: what this rank's part counts as sent (see [`Tally`]).
    fn exchange<R>(
        &self,
        what: &str,
        bytes: usize,
        f: impl FnOnce(&SimpleCommunicator) -> R,
    ) -> Result<R> {
        let world = self
            .world
            .lock()
            .map_err(|_| anyhow::anyhow!("{what}: an earlier exchange failed"))?;
        let out = self.clock.time(what, bytes, || {
            *self.waiting.lock().expect("watchdog lock") = Some((what.to_string(), Instant::now()));
            let out = f(&world);
            *self.waiting.lock().expect("watchdog lock") = None;
            out
        });
        Ok(out)
    }
}

impl Collective for MpiWorld {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce_sum(&self, what: &str, values: &mut [f32]) -> Result<()> {
        let send = values.to_vec();
        self.exchange(what, 4 * send.len(), |w| {
            w.all_reduce_into(&send[..], values, SystemOperation::sum())
        })
    }

    fn all_reduce_sum_f64(&self, what: &str, values: &mut [f64]) -> Result<()> {
        let send = values.to_vec();
        self.exchange(what, 8 * send.len(), |w| {
            w.all_reduce_into(&send[..], values, SystemOperation::sum())
        })
    }

    fn all_gather(&self, what: &str, mine: &[f32]) -> Result<Vec<f32>> {
        let mut all = vec![0f32; mine.len() * self.size];
        self.exchange(what, 4 * mine.len(), |w| {
            w.all_gather_into(mine, &mut all[..])
        })?;
        Ok(all)
    }

    fn broadcast(&self, what: &str, root: usize, bytes: &mut Vec<u8>) -> Result<()> {
        let sent = if self.rank == root { bytes.len() } else { 0 };
        self.exchange(what, sent, |w| {
            let root = w.process_at_rank(root as i32);
            let mut len = bytes.len() as u64;
            root.broadcast_into(&mut len);
            bytes.resize(len as usize, 0);
            root.broadcast_into(&mut bytes[..]);
        })
    }

    fn gather(&self, what: &str, root: usize, mine: &[f32]) -> Result<Option<Vec<f32>>> {
        if self.rank == root {
            let mut all = vec![0f32; mine.len() * self.size];
            self.exchange(what, 0, |w| {
                w.process_at_rank(root as i32)
                    .gather_into_root(mine, &mut all[..])
            })?;
            Ok(Some(all))
        } else {
            self.exchange(what, 4 * mine.len(), |w| {
                w.process_at_rank(root as i32).gather_into(mine)
            })?;
            Ok(None)
        }
    }

    fn all_to_all_v(
        &self,
        what: &str,
        send: &[f32],
        send_counts: &[usize],
        recv_counts: &[usize],
    ) -> Result<Vec<f32>> {
        let sent = check_counts(what, send.len(), send_counts, self.rank, self.size)?;
        let counts = |c: &[usize]| -> Result<(Vec<Count>, Vec<Count>)> {
            let mut displs = Vec::with_capacity(c.len());
            let mut at: usize = 0;
            for &n in c {
                displs.push(Count::try_from(at)?);
                at += n;
            }
            Count::try_from(at)?; // the whole buffer's offsets fit MPI's int
            let c = c
                .iter()
                .map(|&n| Count::try_from(n))
                .collect::<Result<_, _>>()?;
            Ok((c, displs))
        };
        let (sc, sd) = counts(send_counts)
            .map_err(|e| anyhow::anyhow!("{what}: more values than MPI counts: {e}"))?;
        let (rc, rd) = counts(recv_counts)
            .map_err(|e| anyhow::anyhow!("{what}: more values than MPI counts: {e}"))?;
        let mut recv = vec![0f32; recv_counts.iter().sum()];
        self.exchange(what, sent, |w| {
            let s = Partition::new(send, &sc[..], &sd[..]);
            let mut r = PartitionMut::new(&mut recv[..], &rc[..], &rd[..]);
            w.all_to_all_varcount_into(&s, &mut r);
        })?;
        Ok(recv)
    }

    fn set_step(&self, step: u64) {
        self.step.store(step, Ordering::Relaxed);
    }

    fn exchange_tally(&self) -> BTreeMap<String, Tally> {
        self.clock.tally()
    }
}
