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
