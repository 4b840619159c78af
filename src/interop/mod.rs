//! Interoperability with labml's PyTorch code: the model as a PyTorch `state_dict`
//! ([`weights`]: names and layouts), labml's initialisation drawn as one ([`init`]), and the
//! parity check against tensors recorded from the PyTorch code ([`parity`]).

pub mod init;
pub mod parity;
pub mod weights;
