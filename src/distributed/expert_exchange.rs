//! Expert parallelism's token exchange: each rank holds `E / N` experts of a Switch layer
//! (rank `q` the experts `q*E/N .. (q+1)*E/N`); a token kept for expert `e` travels to the
//! rank that holds `e`, through the expert, and back.
//!
//! ```text
//! rank r: packed rows grouped by expert 0..E  (kept[r][e] rows of expert e)
//!         rows of experts q*E/N.. -> rank q                        Alltoallv #1 (to_experts)
//! rank q: from each rank p, kept[p][e] rows per own expert e; regrouped expert-major,
//!         rank order inside an expert: its grouped FFN input
//!         expert outputs, the same way back                      Alltoallv #2 (back_from_experts)
//! ```
//! `kept[p][e]` is known on every rank (the routing decision is shared), so no counts travel.
//! The two directions are each other's transpose: the backward pass of `to_experts` is
//! `back_from_experts` on the gradient, and the other way round.

use std::sync::Arc;

use anyhow::Result;

use super::{Collective, Fault};

/// The two exchanges of one Switch layer on one rank.
pub(crate) struct ExpertExchange {
    world: Arc<dyn Collective>,
    /// Where a failed exchange of this pass is recorded ([`Self::attempt`]).
    fault: Arc<Fault>,
    /// Rows this rank sends to each rank (and receives back).
    send_rows: Vec<usize>,
    /// Rows this rank receives from each rank (and sends back).
    recv_rows: Vec<usize>,
    /// Row `i` of the experts' input is row `order[i]` of the received rows.
    order: Vec<usize>,
    /// `[E / N + 1]` row offsets of this rank's experts in the experts' input.
    offsets: Vec<usize>,
}

impl std::fmt::Debug for ExpertExchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExpertExchange")
            .field("rank", &self.world.rank())
            .field("send_rows", &self.send_rows)
            .field("recv_rows", &self.recv_rows)
            .finish()
    }
}

impl ExpertExchange {
    /// The exchange for `kept[p][e]`: rows of rank `p` kept for expert `e`, every rank's; a
    /// failure is recorded in `fault`.
    ///
    /// # Panics
    /// If `kept` does not have one row per rank, each with a number of experts divisible by
    /// the number of ranks (the caller checks the configuration before any work).
    pub(crate) fn new(world: Arc<dyn Collective>, kept: &[Vec<usize>], fault: Arc<Fault>) -> Self {
        let (n, r) = (world.size(), world.rank());
        assert_eq!(kept.len(), n, "kept rows of every rank");
        let n_experts = kept[0].len();
        assert!(n_experts.is_multiple_of(n), "experts divisible by ranks");
        let local = n_experts / n;
        let mine = |e: usize| r * local + e;
        let send_rows = (0..n)
            .map(|q| kept[r][q * local..(q + 1) * local].iter().sum())
            .collect();
        let recv_rows: Vec<usize> = (0..n)
            .map(|p| (0..local).map(|e| kept[p][mine(e)]).sum())
            .collect();
        // Where block (rank p, expert e) starts in the received rows.
        let mut start = vec![vec![0; local]; n];
        let mut at = 0;
        for p in 0..n {
            for e in 0..local {
                start[p][e] = at;
                at += kept[p][mine(e)];
            }
        }
        let mut order = Vec::with_capacity(at);
        let mut offsets = vec![0];
        for e in 0..local {
            for p in 0..n {
                order.extend(start[p][e]..start[p][e] + kept[p][mine(e)]);
            }
            offsets.push(order.len());
        }
        Self {
            world,
            fault,
            send_rows,
            recv_rows,
            order,
            offsets,
        }
    }

    /// Row offsets of this rank's experts in the experts' input (`E / N + 1` entries).
    pub(crate) fn offsets(&self) -> &[usize] {
        &self.offsets
    }

    /// Rows this rank sends (its kept rows, grouped by expert).
    pub(crate) fn sent_rows(&self) -> usize {
        self.send_rows.iter().sum()
    }

    /// Rows of the experts' input on this rank.
    pub(crate) fn expert_rows(&self) -> usize {
        self.order.len()
    }

    /// `exchange()` (one of this layer's exchanges) inside a forward or backward pass, which
    /// cannot return an error: `None` when it fails, or when an earlier exchange of this pass
    /// failed (then it is not attempted); the failure is recorded in the pass's [`Fault`].
    pub(crate) fn attempt(&self, exchange: impl FnOnce() -> Result<Vec<f32>>) -> Option<Vec<f32>> {
        if self.fault.is_set() {
            return None;
        }
        exchange().map_err(|e| self.fault.record(e)).ok()
    }

    /// `rows` (`[sent_rows, d]`, grouped by expert 0..E) to the experts' ranks: this rank's
    /// experts' input `[expert_rows, d]`, grouped by its experts.
    pub(crate) fn to_experts(&self, rows: &[f32], d: usize) -> Result<Vec<f32>> {
        let counts = |r: &[usize]| r.iter().map(|&n| n * d).collect::<Vec<_>>();
        let received = self.world.all_to_all_v(
            "tokens to their experts",
            rows,
            &counts(&self.send_rows),
            &counts(&self.recv_rows),
        )?;
        let mut out = Vec::with_capacity(received.len());
        for &i in &self.order {
            out.extend_from_slice(&received[i * d..(i + 1) * d]);
        }
        Ok(out)
    }

    /// The transpose of [`to_experts`](Self::to_experts): rows of this rank's experts
    /// (`[expert_rows, d]`) back to the ranks they came from, in their packed order.
    pub(crate) fn back_from_experts(&self, rows: &[f32], d: usize) -> Result<Vec<f32>> {
        let mut back = vec![0f32; rows.len()];
        for (j, &i) in self.order.iter().enumerate() {
            back[i * d..(i + 1) * d].copy_from_slice(&rows[j * d..(j + 1) * d]);
        }
        let counts = |r: &[usize]| r.iter().map(|&n| n * d).collect::<Vec<_>>();
        self.world.all_to_all_v(
            "expert outputs back to their tokens",
            &back,
            &counts(&self.recv_rows),
            &counts(&self.send_rows),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distributed::Threads;
    use std::time::Duration;

    /// What a rank got: its experts' input, their offsets, the round trip, the rows it sent.
    type Got = (Vec<f32>, Vec<usize>, Vec<f32>, Vec<f32>);

    /// Three ranks, six experts: each row tagged (rank, expert, index) reaches the rank of its
    /// expert grouped by expert, and comes back to its place.
    #[test]
    fn rows_reach_their_experts_rank_and_come_back() {
        let kept = vec![
            vec![2, 0, 1, 3, 0, 1],
            vec![0, 1, 0, 2, 2, 0],
            vec![1, 1, 1, 0, 0, 4],
        ];
        let d = 2;
        let worlds = Threads::group(3, Duration::from_secs(30));
        let results: Vec<Got> = std::thread::scope(|s| {
            let kept = &kept;
            let handles: Vec<_> = worlds
                .into_iter()
                .map(|w| {
                    s.spawn(move || {
                        let r = w.rank();
                        let ex = ExpertExchange::new(Arc::new(w), kept, Arc::default());
                        let mut rows = vec![];
                        for (e, &k) in kept[r].iter().enumerate() {
                            for i in 0..k {
                                rows.extend([(r * 100 + e * 10 + i) as f32, -1.0]);
                            }
                        }
                        let got = ex.to_experts(&rows, d).unwrap();
                        let back = ex.back_from_experts(&got, d).unwrap();
                        (got, ex.offsets().to_vec(), back, rows)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (q, (got, offsets, back, rows)) in results.iter().enumerate() {
            assert_eq!(back, rows, "rank {q}: the round trip restores the rows");
            let mut want = vec![];
            let mut want_offsets = vec![0];
            for e in 2 * q..2 * q + 2 {
                for (p, k) in kept.iter().enumerate() {
                    for i in 0..k[e] {
                        want.extend([(p * 100 + e * 10 + i) as f32, -1.0]);
                    }
                }
                want_offsets.push(want.len() / d);
            }
            assert_eq!(got, &want, "rank {q}: its experts' rows, expert-major");
            assert_eq!(offsets, &want_offsets);
        }
    }
}
