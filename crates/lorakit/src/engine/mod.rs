//! Compute kernels on plain row-major f32 buffers.
//!
//! Every kernel is an explicit `*_forward` function with its shapes in the doc comment. The
//! training code adds the matching `*_backward` beside each one (see `docs/ARCHITECTURE.md`):
//! there is no general autograd, so each forward keeps exactly what its backward will need.

/// `fn name(args) -> R { body }` defines `name`, whose body runs inlined into a copy compiled for
/// AVX-512F where the CPU has it, so that the plain loops of an element-wise or row-wise kernel
/// vectorize 16 lanes wide instead of the baseline's 4. Rust neither contracts nor reorders float
/// operations, so both copies compute the same bits.
macro_rules! avx512_variant {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                if $crate::engine::has_avx512f() {
                    // SAFETY: the CPU has AVX-512F.
                    return unsafe { avx512($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

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

/// Whether this CPU has AVX-512F (detected once).
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx512f() -> bool {
    static AVX512: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVX512.get_or_init(|| std::arch::is_x86_feature_detected!("avx512f"))
}
