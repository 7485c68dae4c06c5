//! The engine's own CPU kernels for the hot paths of the UNet and the VAE, as candle custom ops:
//! convolution (banded im2col straight into a gemm, bias and residual fused), group norm with
//! an optional fused SiLU, and attention that never holds the full score matrix. Each layer
//! falls back to candle's own op off the CPU or in another dtype, so CUDA and Metal builds run
//! exactly what they ran before.

pub mod attention;
pub mod conv;
pub mod linear;
pub mod norm;
pub mod simd;
mod winograd;

pub use attention::attention;
pub use conv::{conv2d, Conv2d};
pub use linear::{geglu, linear, linear_b, Linear};
pub use norm::{group_norm, GroupNorm};

/// Keeps freed memory in the process (glibc): the engine allocates and frees tensors of the
/// same few sizes every step, and without this each large one is a fresh `mmap` whose pages the
/// kernel zeroes again (a sixth of the step time at SD 1.5 sizes). Peak memory is unchanged;
/// called once, on the first fast op.
pub(crate) fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            extern "C" {
                fn mallopt(param: i32, value: i32) -> i32;
            }
            const M_TRIM_THRESHOLD: i32 = -1;
            const M_MMAP_THRESHOLD: i32 = -3;
            // SAFETY: mallopt only changes allocator thresholds; both values are valid.
            unsafe {
                mallopt(M_MMAP_THRESHOLD, i32::MAX);
                mallopt(M_TRIM_THRESHOLD, i32::MAX);
            }
        });
    }
}
