//! [`Collective`] between threads of one process: each exchange is an all-gather of every
//! rank's bytes, from which each rank computes the result in rank order (so every rank gets
//! the same bits). The tests run several ranks this way without an MPI launcher.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use super::{Collective, ExchangeClock, Tally, check_counts};

/// One rank's handle on a group of threads.
pub struct Threads {
    rank: usize,
    shared: Arc<Shared>,
    step: AtomicU64,
    /// Time spent in exchanges.
    clock: ExchangeClock,
}

struct Shared {
    n: usize,
    timeout: Duration,
    state: Mutex<Round>,
    turn: Condvar,
}

#[derive(Default)]
struct Round {
    number: u64,
    deposits: Vec<Option<Vec<u8>>>,
    arrived: usize,
    result: Option<Arc<Vec<Vec<u8>>>>,
    /// A rank left the job (its handle dropped while panicking): the others stop waiting.
    failed: Option<usize>,
}

impl Threads {
    /// Handles for `n` ranks, one per thread; an exchange that waits longer than `timeout` for
    /// the others fails.
    pub fn group(n: usize, timeout: Duration) -> Vec<Threads> {
        let shared = Arc::new(Shared {
            n,
            timeout,
            state: Mutex::new(Round {
                deposits: vec![None; n],
                ..Round::default()
            }),
            turn: Condvar::new(),
        });
        (0..n)
            .map(|rank| Threads {
                rank,
                shared: Arc::clone(&shared),
                step: AtomicU64::new(0),
                clock: ExchangeClock::default(),
            })
            .collect()
    }

    /// Every rank's `mine`, in rank order.
    /// Every rank's `mine`, in rank order; `bytes`: what this rank's part counts as sent.
    fn exchange(&self, what: &str, bytes: usize, mine: Vec<u8>) -> Result<Arc<Vec<Vec<u8>>>> {
        self.clock
            .time(what, bytes, || self.exchange_untimed(what, mine))
    }

    fn exchange_untimed(&self, what: &str, mine: Vec<u8>) -> Result<Arc<Vec<Vec<u8>>>> {
        let s = &self.shared;
        let mut round = s.state.lock().expect("exchange lock");
        let number = round.number;
        round.deposits[self.rank] = Some(mine);
        round.arrived += 1;
        if round.arrived == s.n {
            let all = round
                .deposits
                .iter_mut()
                .map(|d| d.take().unwrap())
                .collect();
            round.result = Some(Arc::new(all));
            round.arrived = 0;
            round.number += 1;
            s.turn.notify_all();
        } else {
            round = self.wait(round, number, what)?;
        }
        Ok(Arc::clone(round.result.as_ref().expect("decided")))
    }

    fn wait<'a>(
        &self,
        mut round: MutexGuard<'a, Round>,
        number: u64,
        what: &str,
    ) -> Result<MutexGuard<'a, Round>> {
        let s = &self.shared;
        let deadline = Instant::now() + s.timeout;
        while round.number == number {
            if let Some(r) = round.failed {
                bail!(
                    "step {}: {what}: rank {r} failed; rank {} stops",
                    self.step.load(Ordering::Relaxed),
                    self.rank
                );
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "step {}: rank {} waited more than {} s for the other ranks in {what} \
                     (a rank died or hangs; train.exchange_timeout_s sets the limit)",
                    self.step.load(Ordering::Relaxed),
                    self.rank,
                    s.timeout.as_secs_f64()
                );
            }
            round = s.turn.wait_timeout(round, left).expect("exchange lock").0;
        }
        Ok(round)
    }
}

impl Drop for Threads {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Ok(mut round) = self.shared.state.lock()
        {
            round.failed = Some(self.rank);
            self.shared.turn.notify_all();
        }
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f32_values(b: &[u8]) -> impl Iterator<Item = f32> + '_ {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
}

impl Collective for Threads {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.shared.n
    }

    fn all_reduce_sum(&self, what: &str, values: &mut [f32]) -> Result<()> {
        let all = self.exchange(what, 4 * values.len(), f32_bytes(values))?;
        values.fill(0.0);
        for bytes in all.iter() {
            for (v, x) in values.iter_mut().zip(f32_values(bytes)) {
                *v += x;
            }
        }
        Ok(())
    }

    fn all_reduce_sum_f64(&self, what: &str, values: &mut [f64]) -> Result<()> {
        let mine = values.iter().flat_map(|x| x.to_le_bytes()).collect();
        let all = self.exchange(what, 8 * values.len(), mine)?;
        values.fill(0.0);
        for bytes in all.iter() {
            for (v, c) in values.iter_mut().zip(bytes.chunks_exact(8)) {
                *v += f64::from_le_bytes(c.try_into().expect("8 bytes"));
            }
        }
        Ok(())
    }

    fn all_gather(&self, what: &str, mine: &[f32]) -> Result<Vec<f32>> {
        let all = self.exchange(what, 4 * mine.len(), f32_bytes(mine))?;
        Ok(all.iter().flat_map(|b| f32_values(b)).collect())
    }

    fn broadcast(&self, what: &str, root: usize, bytes: &mut Vec<u8>) -> Result<()> {
        let mine = if self.rank == root {
            bytes.clone()
        } else {
            vec![]
        };
        let all = self.exchange(what, mine.len(), mine)?;
        *bytes = all[root].clone();
        Ok(())
    }

    fn gather(&self, what: &str, root: usize, mine: &[f32]) -> Result<Option<Vec<f32>>> {
        let sent = if self.rank == root { 0 } else { 4 * mine.len() };
        let all = self.exchange(what, sent, f32_bytes(mine))?;
        Ok((self.rank == root).then(|| all.iter().flat_map(|b| f32_values(b)).collect()))
    }

    fn all_to_all_v(
        &self,
        what: &str,
        send: &[f32],
        send_counts: &[usize],
        recv_counts: &[usize],
    ) -> Result<Vec<f32>> {
        let sent = check_counts(what, send.len(), send_counts, self.rank, self.shared.n)?;
        // Each rank deposits its counts (u64) followed by its values; each takes its part.
        let mut mine: Vec<u8> = send_counts
            .iter()
            .flat_map(|&c| (c as u64).to_le_bytes())
            .collect();
        mine.extend(f32_bytes(send));
        let all = self.exchange(what, sent, mine)?;
        let n = self.shared.n;
        let mut out = Vec::with_capacity(recv_counts.iter().sum());
        for (p, bytes) in all.iter().enumerate() {
            let (counts, values) = bytes.split_at(8 * n);
            let count = |q: usize| {
                u64::from_le_bytes(counts[8 * q..8 * q + 8].try_into().expect("8 bytes")) as usize
            };
            let start: usize = (0..self.rank).map(count).sum();
            let len = count(self.rank);
            if len != recv_counts[p] {
                bail!(
                    "{what}: rank {p} sends {len} values to rank {}, which expects {}",
                    self.rank,
                    recv_counts[p]
                );
            }
            out.extend(f32_values(&values[4 * start..4 * (start + len)]));
        }
        Ok(out)
    }

    fn set_step(&self, step: u64) {
        self.step.store(step, Ordering::Relaxed);
    }

    fn exchange_tally(&self) -> BTreeMap<String, Tally> {
        self.clock.tally()
    }

    fn in_process(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on_ranks<R: Send>(n: usize, f: impl Fn(&Threads) -> R + Sync) -> Vec<R> {
        let handles = Threads::group(n, Duration::from_secs(10));
        std::thread::scope(|scope| {
            let f = &f;
            let running: Vec<_> = handles
                .into_iter()
                .map(|h| scope.spawn(move || f(&h)))
                .collect();
            running.into_iter().map(|r| r.join().unwrap()).collect()
        })
    }

    #[test]
    fn every_rank_gets_the_same_sums_gathers_and_broadcasts() {
        let out = on_ranks(3, |w| {
            let r = w.rank() as f32;
            let mut sum = vec![r, 10.0 * r];
            w.all_reduce_sum("sum", &mut sum).unwrap();
            let gathered = w.all_gather("gather", &[r, r]).unwrap();
            let mut bytes = if w.rank() == 1 {
                b"one".to_vec()
            } else {
                vec![]
            };
            w.broadcast("broadcast", 1, &mut bytes).unwrap();
            let mut f = [w.rank() as f64 * 0.5];
            w.all_reduce_sum_f64("f64", &mut f).unwrap();
            (sum, gathered, bytes, f[0])
        });
        for (sum, gathered, bytes, f) in out {
            assert_eq!(sum, vec![3.0, 30.0]);
            assert_eq!(gathered, vec![0.0, 0.0, 1.0, 1.0, 2.0, 2.0]);
            assert_eq!(bytes, b"one");
            assert_eq!(f, 1.5);
        }
    }

    #[test]
    fn a_rank_that_never_comes_is_a_time_out_naming_the_step() {
        let mut handles = Threads::group(2, Duration::from_millis(200));
        let alone = handles.remove(0);
        alone.set_step(7);
        let err = alone.all_reduce_sum("gradients", &mut [1.0]).unwrap_err();
        let err = err.to_string();
        assert!(
            err.contains("step 7") && err.contains("gradients") && err.contains("waited"),
            "{err}"
        );
    }

    #[test]
    fn a_failed_rank_releases_the_others() {
        let handles = Threads::group(2, Duration::from_secs(30));
        let results: Vec<bool> = std::thread::scope(|scope| {
            let mut it = handles.into_iter();
            let (a, b) = (it.next().unwrap(), it.next().unwrap());
            let waiting = scope.spawn(move || a.all_reduce_sum("sum", &mut [1.0]).is_err());
            let failing = scope.spawn(move || {
                let _b = b;
                panic!("rank 1 fails")
            });
            vec![waiting.join().unwrap(), failing.join().is_err()]
        });
        assert_eq!(results, vec![true, true]);
    }
}
