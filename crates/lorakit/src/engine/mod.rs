//! Compute kernels on plain row-major f32 buffers.
//!
//! Every kernel is an explicit `*_forward` function with its shapes in the doc comment. The
//! training code adds the matching `*_backward` beside each one (see `docs/ARCHITECTURE.md`):
//! there is no general autograd, so each forward keeps exactly what its backward will need.

pub mod aligned_alloc;
pub mod amx;
pub mod attention;
pub mod batched;
pub mod bf16;
pub mod int8;
pub mod int8_rows;
pub mod matmul;
pub mod ops;
pub mod quant;

pub use matmul::{matmul, matmul_nt, matvec_rows};

/// A raw pointer that rayon tasks may share; each task writes a disjoint set of elements.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut(*mut f32);
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// A method (not field access) so that closures capture the whole Send + Sync wrapper.
    pub(crate) fn at(&self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}
