//! Group normalisation in one pass over the output (statistics in f64, then the affine map and
//! optionally SiLU fused into the same loop), one rayon task per (image, group). candle's
//! `GroupNorm` takes eight single-threaded tensor ops and as many full-size temporaries.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::conv::contiguous;
use super::simd;

/// The op: affine parameters borrowed from the layer.
struct GroupNormOp<'a> {
    groups: usize,
    eps: f64,
    gamma: &'a [f32],
    beta: &'a [f32],
    silu: bool,
}

impl CustomOp1 for GroupNormOp<'_> {
    fn name(&self) -> &'static str {
        "sd-run-group-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = l.shape().dims();
        if dims.len() < 2 {
            candle_core::bail!("group_norm: expected (B, C, ...), got {:?}", dims);
        }
        let (b, c) = (dims[0], dims[1]);
        if c != self.gamma.len() || c % self.groups != 0 {
            candle_core::bail!(
                "group_norm: {c} channels for {} channels in {} groups",
                self.gamma.len(),
                self.groups
            );
        }
        let spatial: usize = dims[2..].iter().product();
        let x = contiguous(s, l)?;
        let cpg = c / self.groups;
        let group_len = cpg * spatial;
        let mut dst = vec![0f32; b * c * spatial];
        if group_len == 0 {
            return Ok((CpuStorage::F32(dst), l.shape().clone()));
        }
        dst.par_chunks_mut(group_len)
            .zip(x.par_chunks(group_len))
            .enumerate()
            .for_each(|(i, (d, src))| {
                let g = i % self.groups;
                let n = group_len as f64;
                let mean = simd::sum(src) / n;
                let var = simd::sq_dev(src, mean) / n;
                let inv = 1.0 / (var + self.eps).sqrt();
                for j in 0..cpg {
                    let ch = g * cpg + j;
                    let scale = inv * self.gamma[ch] as f64;
                    let shift = self.beta[ch] as f64 - mean * scale;
                    let r = j * spatial..(j + 1) * spatial;
                    simd::norm_channel(
                        &src[r.clone()],
                        &mut d[r],
                        scale as f32,
                        shift as f32,
                        self.silu,
                    );
                }
            });
        Ok((CpuStorage::F32(dst), l.shape().clone()))
    }
}

/// A group norm layer: candle's `GroupNorm` everywhere, the fused kernel for f32 on the CPU.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    inner: candle_nn::GroupNorm,
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

/// Builds a [`GroupNorm`] from `vb` (`weight`, `bias`), as `candle_nn::group_norm`.
pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<GroupNorm> {
    let weight = vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.))?;
    let bias = vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.))?;
    GroupNorm::new(weight, bias, channels, groups, eps)
}

impl GroupNorm {
    /// From its affine parameters (`channels` each).
    pub fn new(
        weight: Tensor,
        bias: Tensor,
        channels: usize,
        groups: usize,
        eps: f64,
    ) -> Result<Self> {
        let inner = candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?;
        Ok(Self {
            inner,
            weight,
            bias,
            groups,
            eps,
        })
    }

    fn fast(&self, x: &Tensor, silu: bool) -> Result<Option<Tensor>> {
        if !x.device().is_cpu()
            || x.dtype() != DType::F32
            || self.weight.dtype() != DType::F32
            || self.bias.dtype() != DType::F32
        {
            return Ok(None);
        }
        let gamma = self.weight.to_vec1::<f32>()?;
        let beta = self.bias.to_vec1::<f32>()?;
        let op = GroupNormOp {
            groups: self.groups,
            eps: self.eps,
            gamma: &gamma,
            beta: &beta,
            silu,
        };
        Ok(Some(x.apply_op1_no_bwd(&op)?))
    }

    /// `silu(group_norm(x))` in one pass.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        match self.fast(x, true)? {
            Some(y) => Ok(y),
            None => candle_nn::ops::silu(&self.inner.forward(x)?),
        }
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self.fast(x, false)? {
            Some(y) => Ok(y),
            None => self.inner.forward(x),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_candle_with_and_without_silu() {
        let dev = Device::Cpu;
        for (b, c, h, w, groups) in [(2, 8, 5, 7, 4), (1, 6, 3, 3, 6), (3, 12, 16, 16, 1)] {
            let weight = Tensor::randn(0f32, 1.0, c, &dev).unwrap();
            let bias = Tensor::randn(0f32, 1.0, c, &dev).unwrap();
            let gn = GroupNorm::new(weight, bias, c, groups, 1e-6).unwrap();
            let x = (Tensor::randn(0f32, 3.0, (b, c, h, w), &dev).unwrap() + 5.0).unwrap();
            let want = gn.inner.forward(&x).unwrap();
            let got = gn.forward(&x).unwrap();
            let d = crate::engine::max_abs_diff(&want, &got);
            assert!(d < 1e-5, "{d}");
            let want = candle_nn::ops::silu(&want).unwrap();
            let got = gn
                .forward_silu(
                    &x.transpose(2, 3)
                        .unwrap()
                        .contiguous()
                        .unwrap()
                        .transpose(2, 3)
                        .unwrap(),
                )
                .unwrap();
            let d = crate::engine::max_abs_diff(&want, &got);
            assert!(d < 1e-5, "{d}");
        }
    }

    #[test]
    fn wrong_channels_is_an_error() {
        let dev = Device::Cpu;
        let gn = GroupNorm::new(
            Tensor::ones(4, DType::F32, &dev).unwrap(),
            Tensor::zeros(4, DType::F32, &dev).unwrap(),
            4,
            2,
            1e-5,
        )
        .unwrap();
        assert!(gn
            .forward(&Tensor::zeros((1, 6, 2, 2), DType::F32, &dev).unwrap())
            .is_err());
    }
}
