//! Interoperability with labml's PyTorch code: labml's parameter `names`, spelled once; the
//! model as a PyTorch `state_dict` ([`weights`]: names and layouts), labml's initialisation drawn as one ([`init`]), and the
//! parity check against tensors recorded from the PyTorch code ([`parity`]).

pub mod init;
pub(crate) mod names;
pub mod parity;
pub mod weights;
