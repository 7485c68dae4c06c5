//! Linear layers on the CPU as one gemm whose output starts as the bias (or the residual plus
//! the bias), so neither is a separate pass; and GEGLU (`a * gelu(gate)`) fused in one pass
//! with a vectorised erf.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, DType, Layout, Module, Result, Shape, Storage, Tensor,
};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::conv::{contiguous, parallelism};
use super::simd;

struct LinearOp<'a> {
    weight: &'a [f32],
    bias: Option<&'a [f32]>,
    out_dim: usize,
    in_dim: usize,
}

impl LinearOp<'_> {
    fn run(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        residual: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = xl.shape().dims();
        let Some((&k, lead)) = dims.split_last() else {
            candle_core::bail!("linear: a scalar input");
        };
        if k != self.in_dim {
            candle_core::bail!("linear: input width {k}, the layer takes {}", self.in_dim);
        }
        let rows: usize = lead.iter().product();
        let mut out_dims = lead.to_vec();
        out_dims.push(self.out_dim);
        let x = contiguous(x, xl)?;
        let mut dst = match residual {
            Some((r, rl)) => {
                if rl.shape().dims() != out_dims.as_slice() {
                    candle_core::bail!(
                        "linear: residual {:?} is not the output's shape {:?}",
                        rl.shape(),
                        out_dims
                    );
                }
                contiguous(r, rl)?.into_owned()
            }
            None => vec![0f32; rows * self.out_dim],
        };
        if let Some(bias) = self.bias {
            let add = residual.is_some();
            dst.par_chunks_mut(self.out_dim.max(1) * 64)
                .for_each(|block| {
                    for row in block.chunks_mut(self.out_dim) {
                        if add {
                            row.iter_mut().zip(bias).for_each(|(d, b)| *d += b);
                        } else {
                            row.copy_from_slice(bias);
                        }
                    }
                });
        }
        let accumulate = residual.is_some() || self.bias.is_some();
        if rows > 0 && self.out_dim > 0 {
            // SAFETY: dst (rows, out) row-major; x (rows, k) row-major; W^T (k, out) read from W
            // (out, k) row-major with column stride k.
            unsafe {
                gemm::gemm(
                    rows,
                    self.out_dim,
                    k,
                    dst.as_mut_ptr(),
                    1,
                    self.out_dim as isize,
                    accumulate,
                    x.as_ptr(),
                    1,
                    k as isize,
                    self.weight.as_ptr(),
                    k as isize,
                    1,
                    if accumulate { 1.0 } else { 0.0 },
                    1.0,
                    false,
                    false,
                    false,
                    parallelism(),
                );
            }
        }
        Ok((CpuStorage::F32(dst), Shape::from_dims(&out_dims)))
    }
}

impl CustomOp1 for LinearOp<'_> {
    fn name(&self) -> &'static str {
        "sd-run-linear"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run(s, l, None)
    }
}

impl CustomOp2 for LinearOp<'_> {
    fn name(&self) -> &'static str {
        "sd-run-linear-add"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run(s1, l1, Some((s2, l2)))
    }
}

/// A linear layer: candle's `Linear` everywhere, one fused gemm for f32 on the CPU.
#[derive(Debug, Clone)]
pub struct Linear {
    inner: candle_nn::Linear,
}

/// Builds a [`Linear`] with a bias from `vb`, as `candle_nn::linear`.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear {
        inner: candle_nn::linear(in_dim, out_dim, vb)?,
    })
}

/// Builds a [`Linear`] with or without a bias from `vb`, as `candle_nn::linear_b`.
pub fn linear_b(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear {
        inner: candle_nn::linear_b(in_dim, out_dim, bias, vb)?,
    })
}

fn cpu_f32<R>(t: &Tensor, f: impl FnOnce(Option<&[f32]>) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(data)), Some((a, b))) => f(Some(&data[a..b])),
        _ => f(None),
    }
}

impl Linear {
    fn fast(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Option<Tensor>> {
        if !x.device().is_cpu()
            || x.dtype() != DType::F32
            || residual.is_some_and(|r| r.dtype() != DType::F32)
        {
            return Ok(None);
        }
        let (out_dim, in_dim) = self.inner.weight().dims2()?;
        cpu_f32(self.inner.weight(), |weight| {
            let Some(weight) = weight else {
                return Ok(None);
            };
            let run = |bias: Option<&[f32]>| -> Result<Option<Tensor>> {
                let op = LinearOp {
                    weight,
                    bias,
                    out_dim,
                    in_dim,
                };
                Ok(Some(match residual {
                    Some(r) => x.apply_op2_no_bwd(r, &op)?,
                    None => x.apply_op1_no_bwd(&op)?,
                }))
            };
            match self.inner.bias() {
                None => run(None),
                Some(b) => cpu_f32(b, |b| match b {
                    Some(b) => run(Some(b)),
                    None => Ok(None),
                }),
            }
        })
    }

    /// `linear(x) + residual` in one pass over the output.
    pub fn forward_add(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        match self.fast(x, Some(residual))? {
            Some(y) => Ok(y),
            None => self.inner.forward(x)? + residual,
        }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self.fast(x, None)? {
            Some(y) => Ok(y),
            None => self.inner.forward(x),
        }
    }
}

struct GegluOp;

impl CustomOp1 for GegluOp {
    fn name(&self) -> &'static str {
        "sd-run-geglu"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = l.shape().dims();
        let Some((&two, lead)) = dims.split_last() else {
            candle_core::bail!("geglu: a scalar input");
        };
        if two % 2 != 0 {
            candle_core::bail!("geglu: odd last dimension {two}");
        }
        let half = two / 2;
        let x = contiguous(s, l)?;
        let rows: usize = lead.iter().product();
        let mut dst = vec![0f32; rows * half];
        if half > 0 {
            dst.par_chunks_mut(half)
                .zip(x.par_chunks(two))
                .for_each(|(d, src)| {
                    simd::geglu_row(&src[..half], &src[half..], d);
                });
        }
        let mut out = lead.to_vec();
        out.push(half);
        Ok((CpuStorage::F32(dst), Shape::from_dims(&out)))
    }
}

/// GEGLU: for `h` (..., 2n), `h[..., :n] * gelu(h[..., n:])` with the exact (erf) GELU.
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    if h.device().is_cpu() && h.dtype() == DType::F32 {
        return h.apply_op1_no_bwd(&GegluOp);
    }
    let half = h.dim(candle_core::D::Minus1)? / 2;
    let a = h.narrow(candle_core::D::Minus1, 0, half)?;
    let gate = h.narrow(candle_core::D::Minus1, half, half)?;
    a * gate.gelu_erf()?
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn linear_matches_candle_with_bias_and_residual() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (7, 5), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 7, &dev).unwrap();
        for bias in [None, Some(b)] {
            let l = Linear {
                inner: candle_nn::Linear::new(w.clone(), bias),
            };
            let x = Tensor::randn(0f32, 1.0, (2, 3, 5), &dev).unwrap();
            let want = l.inner.forward(&x).unwrap();
            assert!(crate::engine::max_abs_diff(&l.forward(&x).unwrap(), &want) < 1e-5);
            let xt = x
                .transpose(0, 1)
                .unwrap()
                .contiguous()
                .unwrap()
                .transpose(0, 1)
                .unwrap();
            assert!(crate::engine::max_abs_diff(&l.forward(&xt).unwrap(), &want) < 1e-5);
            let r = Tensor::randn(0f32, 1.0, (2, 3, 7), &dev).unwrap();
            assert!(
                crate::engine::max_abs_diff(
                    &l.forward_add(&x, &r).unwrap(),
                    &(&want + &r).unwrap()
                ) < 1e-5
            );
        }
        let l = Linear {
            inner: candle_nn::Linear::new(w, None),
        };
        assert!(l
            .forward(&Tensor::zeros((2, 4), DType::F32, &dev).unwrap())
            .is_err());
    }

    #[test]
    fn geglu_matches_the_definition() {
        let dev = Device::Cpu;
        let h = (Tensor::randn(0f32, 2.0, (3, 4, 38), &dev).unwrap() * 1.5).unwrap();
        let a = h.narrow(2, 0, 19).unwrap();
        let gate = h.narrow(2, 19, 19).unwrap();
        let want = (a * gate.gelu_erf().unwrap()).unwrap();
        let d = crate::engine::max_abs_diff(&geglu(&h).unwrap(), &want);
        assert!(d < 1e-5, "{d}");
        assert!(geglu(&Tensor::zeros((2, 3), DType::F32, &dev).unwrap()).is_err());
    }
}
