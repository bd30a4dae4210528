//! Compute kernels on plain row-major f32 buffers.
//!
//! Every kernel is an explicit `*_forward` function with its shapes in the doc comment. The
//! training code adds the matching `*_backward` beside each one (see `docs/ARCHITECTURE.md`):
//! there is no general autograd, so each forward keeps exactly what its backward will need.

pub mod attention;
pub mod batched;
pub mod bf16;
pub mod matmul;
pub mod ops;
pub mod quant;

pub use matmul::{matmul, matmul_nt, matvec_rows};
