//! Expert parallelism's two token exchanges ([`ExpertExchange`]) as autodiff nodes on the
//! `flex` backend: `to_experts` forward is `from_experts` backward and the other way round,
//! so the gradient of every token travels back along the path its values took.
//!
//! Every rank of the job runs the same exchanges in the same order, in the forward pass and
//! in the backward pass (Burn's tape replays a chain of nodes in reverse on every rank), even
//! when it sends or receives no rows.

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::flex::Flex;
use burn::tensor::{Shape, Tensor};

use super::{Kernel, flex_input, new_tensor, run_kernel, values};
use crate::distributed::ExpertExchange;

/// Which way rows travel.
#[derive(Debug, Clone, Copy)]
enum Direction {
    /// From the tokens' ranks to their experts' ranks.
    ToExperts,
    /// Back.
    FromExperts,
}

impl Direction {
    fn reverse(self) -> Self {
        match self {
            Self::ToExperts => Self::FromExperts,
            Self::FromExperts => Self::ToExperts,
        }
    }

    /// `rows` (`[n, d]` values) moved this way. A failed exchange does not end the pass: it is
    /// recorded for the step to return, and the rows are zeros ([`ExpertExchange::attempt`]).
    fn apply(self, ex: &ExpertExchange, rows: &[f32], d: usize) -> Vec<f32> {
        ex.attempt(|| match self {
            Self::ToExperts => ex.to_experts(rows, d),
            Self::FromExperts => ex.back_from_experts(rows, d),
        })
        .unwrap_or_else(|| vec![0.0; self.rows_out(ex) * d])
    }

    fn rows_out(self, ex: &ExpertExchange) -> usize {
        match self {
            Self::ToExperts => ex.expert_rows(),
            Self::FromExperts => ex.sent_rows(),
        }
    }
}

/// `x` (`[sent_rows, d]`, this rank's kept rows grouped by expert) to its experts' ranks:
/// this rank's experts' input `[expert_rows, d]`. `None` unless `x` is f32 on the CPU.
pub(crate) fn to_experts(x: &Tensor<2>, ex: &Arc<ExpertExchange>) -> Option<Tensor<2>> {
    exchange(x, ex, Direction::ToExperts)
}

/// The experts' output `y` (`[expert_rows, d]`) back to the tokens' ranks: `[sent_rows, d]`
/// in the order [`to_experts`] took them. `None` unless `y` is f32 on the CPU.
pub(crate) fn from_experts(y: &Tensor<2>, ex: &Arc<ExpertExchange>) -> Option<Tensor<2>> {
    exchange(y, ex, Direction::FromExperts)
}

fn exchange(x: &Tensor<2>, ex: &Arc<ExpertExchange>, dir: Direction) -> Option<Tensor<2>> {
    let d = x.dims()[1];
    run_kernel(
        Kernel::ExpertExchange,
        Exchange(dir),
        [flex_input(x)],
        |[x]| {
            let y = dir.apply(ex, &values(&x), d);
            let shape = Shape::from(vec![dir.rows_out(ex), d]);
            (new_tensor(y, shape), ExchangeState(Arc::clone(ex), d))
        },
    )
}

#[derive(Debug)]
struct Exchange(Direction);

#[derive(Debug, Clone)]
struct ExchangeState(Arc<ExpertExchange>, usize);

impl Backward<Flex, 1> for Exchange {
    type State = ExchangeState;

    /// The gradient goes back the way the rows came.
    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let ExchangeState(ex, d) = ops.state;
        let dy = grads.consume::<Flex>(&ops.node);
        let back = self.0.reverse();
        // Always exchanged: the other ranks wait for this rank's part.
        let dx = back.apply(&ex, &values(&dy), d);
        let [parent] = ops.parents;
        if let Some(p) = parent {
            let shape = Shape::from(vec![back.rows_out(&ex), d]);
            grads.register::<Flex>(p.id, new_tensor(dx, shape));
        }
    }
}
