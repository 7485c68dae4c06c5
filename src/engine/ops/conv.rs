//! 2-D convolution on the CPU: im2col in bands of output rows, straight into a gemm that writes
//! NCHW output in place (no transposes, no scatter), with the bias (and optionally a residual)
//! loaded into the output first so the gemm accumulates onto them. The kernel is read in its
//! stored `(c_out, c_in, kh, kw)` layout, which is already the gemm's left operand.
//!
//! candle 0.11's CPU conv2d re-flattens the kernel, converts the input to NHWC on one thread
//! and scatters the result element by element on every call; at SD 1.5 dimensions that costs
//! more than the multiplications.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, DType, Layout, Module, Result, Shape, Storage, Tensor,
};
use candle_nn::{Conv2dConfig, VarBuilder};
use rayon::prelude::*;

/// Elements of one im2col band (16 MiB of f32): large enough for the gemm to run at speed,
/// small enough to stay out of the way of the caches and the memory budget.
const BAND_ELEMS: usize = 4 << 20;

/// Geometry of a convolution.
#[derive(Debug, Clone, Copy)]
struct Geom {
    c_in: usize,
    c_out: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    pad: usize,
    dil: usize,
}

impl Geom {
    fn out_size(&self, h: usize, w: usize) -> Option<(usize, usize)> {
        let eff_h = self.dil * (self.kh - 1) + 1;
        let eff_w = self.dil * (self.kw - 1) + 1;
        if h + 2 * self.pad < eff_h || w + 2 * self.pad < eff_w {
            return None;
        }
        Some((
            (h + 2 * self.pad - eff_h) / self.stride + 1,
            (w + 2 * self.pad - eff_w) / self.stride + 1,
        ))
    }
}

/// A raw pointer that rayon tasks writing disjoint parts of one buffer may share.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);
// SAFETY: every user writes a region no other task touches.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

pub(crate) fn parallelism() -> gemm::Parallelism {
    match candle_core::utils::get_num_threads() {
        0 | 1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    }
}

/// Fills `col` (rows `(ci, ki, kj)`, each `rows * ow` long) for output rows `oy0..oy0 + rows`.
#[allow(clippy::too_many_arguments)]
fn im2col_band(
    x: &[f32],
    h: usize,
    w: usize,
    g: &Geom,
    ow: usize,
    oy0: usize,
    rows: usize,
    col: &mut [f32],
) {
    let n = rows * ow;
    let per_channel = g.kh * g.kw * n;
    col[..g.c_in * per_channel]
        .par_chunks_mut(per_channel)
        .enumerate()
        .for_each(|(ci, chunk)| {
            let plane = &x[ci * h * w..(ci + 1) * h * w];
            for ki in 0..g.kh {
                for kj in 0..g.kw {
                    let row = &mut chunk[(ki * g.kw + kj) * n..(ki * g.kw + kj + 1) * n];
                    for r in 0..rows {
                        let dst = &mut row[r * ow..(r + 1) * ow];
                        let iy = ((oy0 + r) * g.stride + ki * g.dil) as isize - g.pad as isize;
                        if iy < 0 || iy >= h as isize {
                            dst.fill(0.0);
                            continue;
                        }
                        let src = &plane[iy as usize * w..(iy as usize + 1) * w];
                        let shift = (kj * g.dil) as isize - g.pad as isize;
                        if g.stride == 1 {
                            // ix = ox + shift: one contiguous copy with zeros at the borders.
                            let lo = (-shift).clamp(0, ow as isize) as usize;
                            let hi = (w as isize - shift).clamp(lo as isize, ow as isize) as usize;
                            dst[..lo].fill(0.0);
                            dst[lo..hi].copy_from_slice(
                                &src[(lo as isize + shift) as usize
                                    ..(hi as isize + shift) as usize],
                            );
                            dst[hi..].fill(0.0);
                        } else {
                            for (ox, d) in dst.iter_mut().enumerate() {
                                let ix = (ox * g.stride) as isize + shift;
                                *d = if ix >= 0 && ix < w as isize {
                                    src[ix as usize]
                                } else {
                                    0.0
                                };
                            }
                        }
                    }
                }
            }
        });
}

/// Runs the convolution of `x` (contiguous NCHW, batch `b`) into `dst` (B, c_out, oh, ow),
/// accumulating onto what `dst` holds when `accumulate`.
#[allow(clippy::too_many_arguments)]
fn conv_into(
    x: &[f32],
    b: usize,
    h: usize,
    w: usize,
    g: &Geom,
    weight: &[f32],
    dst: &mut [f32],
    accumulate: bool,
) {
    let Some((oh, ow)) = g.out_size(h, w) else {
        return;
    };
    let winograd = g.kh == 3 && g.kw == 3 && g.stride == 1 && g.pad == 1 && g.dil == 1;
    if winograd && super::winograd::worthwhile(b, h, w) {
        if !accumulate {
            dst.fill(0.0);
        }
        super::winograd::conv3x3(x, b, g.c_in, h, w, weight, g.c_out, dst);
        return;
    }
    let k = g.c_in * g.kh * g.kw;
    let par = parallelism();
    let (alpha, read_dst) = if accumulate {
        (1.0f32, true)
    } else {
        (0.0f32, false)
    };
    let pointwise = g.kh == 1 && g.kw == 1 && g.stride == 1 && g.pad == 0;
    let band_rows = if pointwise {
        oh
    } else {
        (BAND_ELEMS / (k * ow).max(1)).clamp(1, oh)
    };
    let mut col = if pointwise {
        Vec::new()
    } else {
        vec![0f32; k * band_rows * ow]
    };
    for bi in 0..b {
        let xb = &x[bi * g.c_in * h * w..(bi + 1) * g.c_in * h * w];
        let db = &mut dst[bi * g.c_out * oh * ow..(bi + 1) * g.c_out * oh * ow];
        let mut oy0 = 0;
        while oy0 < oh {
            let rows = band_rows.min(oh - oy0);
            let n = rows * ow;
            let rhs: &[f32] = if pointwise {
                xb
            } else {
                im2col_band(xb, h, w, g, ow, oy0, rows, &mut col);
                &col
            };
            // SAFETY: dst has c_out rows of oh*ow with this band's columns at oy0*ow..+n; lhs is
            // (c_out, k) row-major; rhs is (k, n) row-major; all in bounds.
            unsafe {
                gemm::gemm(
                    g.c_out,
                    n,
                    k,
                    db.as_mut_ptr().add(oy0 * ow),
                    1,
                    (oh * ow) as isize,
                    read_dst,
                    weight.as_ptr(),
                    1,
                    k as isize,
                    rhs.as_ptr(),
                    1,
                    n as isize,
                    alpha,
                    1.0,
                    false,
                    false,
                    false,
                    par,
                );
            }
            oy0 += rows;
        }
    }
}

/// The conv op: x in, the kernel and bias borrowed from the layer.
struct ConvOp<'a> {
    g: Geom,
    weight: &'a [f32],
    bias: Option<&'a [f32]>,
}

impl ConvOp<'_> {
    fn run(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        residual: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = xl.shape().dims4()?;
        if c != self.g.c_in {
            candle_core::bail!(
                "conv2d: input has {c} channels, the kernel expects {}",
                self.g.c_in
            );
        }
        let Some((oh, ow)) = self.g.out_size(h, w) else {
            candle_core::bail!("conv2d: input {h}x{w} is smaller than the kernel");
        };
        let x = contiguous(x, xl)?;
        let plane = oh * ow;
        let mut dst: Vec<f32> = match residual {
            Some((r, rl)) => {
                if rl.shape().dims() != [b, self.g.c_out, oh, ow] {
                    candle_core::bail!(
                        "conv2d: residual shape {:?} is not the output's {:?}",
                        rl.shape(),
                        (b, self.g.c_out, oh, ow)
                    );
                }
                contiguous(r, rl)?.into_owned()
            }
            None => vec![0f32; b * self.g.c_out * plane],
        };
        if let Some(bias) = self.bias {
            let add = residual.is_some();
            dst.par_chunks_mut(plane).enumerate().for_each(|(i, ch)| {
                let v = bias[i % self.g.c_out];
                if add {
                    ch.iter_mut().for_each(|d| *d += v);
                } else {
                    ch.fill(v);
                }
            });
        }
        let accumulate = residual.is_some() || self.bias.is_some();
        conv_into(&x, b, h, w, &self.g, self.weight, &mut dst, accumulate);
        Ok((
            CpuStorage::F32(dst),
            Shape::from_dims(&[b, self.g.c_out, oh, ow]),
        ))
    }
}

/// The f32 values of a CPU tensor's storage in row-major order (borrowed when contiguous).
pub(crate) fn contiguous<'a>(s: &'a CpuStorage, l: &Layout) -> Result<std::borrow::Cow<'a, [f32]>> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(std::borrow::Cow::Borrowed(&data[a..b])),
        None => {
            let dims = l.shape().dims();
            let strides = l.stride();
            let mut out = Vec::with_capacity(l.shape().elem_count());
            if out.capacity() == 0 {
                return Ok(std::borrow::Cow::Owned(out));
            }
            // An odometer over every index but the last, copying the last dimension's run.
            let last = dims.len() - 1;
            let mut idx = vec![0usize; dims.len()];
            loop {
                let base =
                    l.start_offset() + idx.iter().zip(strides).map(|(i, s)| i * s).sum::<usize>();
                out.extend((0..dims[last]).map(|j| data[base + j * strides[last]]));
                let mut axis = last;
                loop {
                    if axis == 0 {
                        return Ok(std::borrow::Cow::Owned(out));
                    }
                    axis -= 1;
                    idx[axis] += 1;
                    if idx[axis] < dims[axis] {
                        break;
                    }
                    idx[axis] = 0;
                }
            }
        }
    }
}

impl CustomOp1 for ConvOp<'_> {
    fn name(&self) -> &'static str {
        "sd-run-conv2d"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run(s, l, None)
    }
}

impl CustomOp2 for ConvOp<'_> {
    fn name(&self) -> &'static str {
        "sd-run-conv2d-add"
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

/// A 2-D convolution layer: candle's `Conv2d` everywhere, the banded im2col + gemm kernel for
/// f32 on the CPU.
#[derive(Debug, Clone)]
pub struct Conv2d {
    inner: candle_nn::Conv2d,
}

/// Builds a [`Conv2d`] from `vb` (`weight` (out, in, k, k), `bias` (out,)), as `candle_nn::conv2d`.
pub fn conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    cfg: Conv2dConfig,
    vb: VarBuilder,
) -> Result<Conv2d> {
    Ok(Conv2d {
        inner: candle_nn::conv2d(in_channels, out_channels, kernel, cfg, vb)?,
    })
}

/// A borrowed CPU f32 slice of a tensor (whole storage from the layout's start), if it is one.
fn with_cpu_f32<R>(t: &Tensor, f: impl FnOnce(Option<&[f32]>) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(data)), Some((a, b))) => f(Some(&data[a..b])),
        _ => f(None),
    }
}

impl Conv2d {
    /// The candle layer this wraps.
    pub fn inner(&self) -> &candle_nn::Conv2d {
        &self.inner
    }

    fn geom(&self) -> Option<Geom> {
        let cfg = self.inner.config();
        let (c_out, c_in, kh, kw) = self.inner.weight().dims4().ok()?;
        if cfg.groups != 1 || cfg.cudnn_fwd_algo.is_some() {
            return None;
        }
        Some(Geom {
            c_in,
            c_out,
            kh,
            kw,
            stride: cfg.stride,
            pad: cfg.padding,
            dil: cfg.dilation,
        })
    }

    /// Runs the fast kernel when it applies: `Ok(None)` means "use candle's".
    fn fast(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Option<Tensor>> {
        super::tune_allocator();
        let Some(g) = self.geom() else {
            return Ok(None);
        };
        if !x.device().is_cpu()
            || x.dtype() != DType::F32
            || residual.is_some_and(|r| r.dtype() != DType::F32)
        {
            return Ok(None);
        }
        with_cpu_f32(self.inner.weight(), |weight| {
            let Some(weight) = weight else {
                return Ok(None);
            };
            let run = |bias: Option<&[f32]>| -> Result<Option<Tensor>> {
                let op = ConvOp { g, weight, bias };
                Ok(Some(match residual {
                    Some(r) => x.apply_op2_no_bwd(r, &op)?,
                    None => x.apply_op1_no_bwd(&op)?,
                }))
            };
            match self.inner.bias() {
                None => run(None),
                Some(bias) => with_cpu_f32(bias, |b| match b {
                    Some(b) => run(Some(b)),
                    None => Ok(None),
                }),
            }
        })
    }

    /// `conv(x) + residual` in one pass over the output.
    pub fn forward_add(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        match self.fast(x, Some(residual))? {
            Some(y) => Ok(y),
            None => self.inner.forward(x)? + residual,
        }
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self.fast(x, None)? {
            Some(y) => Ok(y),
            None => self.inner.forward(x),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::VarMap;

    fn layer(c_in: usize, c_out: usize, k: usize, cfg: Conv2dConfig) -> Conv2d {
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
        let c = conv2d(c_in, c_out, k, cfg, vb).unwrap();
        // Random bias too (the default init is zero-free only for the weight).
        let bias = Tensor::randn(0f32, 1.0, c_out, &Device::Cpu).unwrap();
        Conv2d {
            inner: candle_nn::Conv2d::new(c.inner.weight().clone(), Some(bias), cfg),
        }
    }

    #[test]
    fn matches_candle_on_every_geometry() {
        let cases = [
            (3, 5, 3, 1, 1, 1, 9, 7),
            (4, 6, 3, 2, 1, 1, 10, 11),
            (4, 6, 3, 2, 0, 1, 9, 9),
            (8, 3, 1, 1, 0, 1, 5, 6),
            (5, 4, 1, 2, 0, 1, 7, 7),
            (3, 2, 3, 1, 2, 2, 8, 8),
            (2, 3, 5, 1, 0, 1, 5, 5),
            // Winograd F(2x2, 3x3): enough tiles, odd sizes (partial tiles at the borders).
            (4, 6, 3, 1, 1, 1, 17, 15),
            (7, 5, 3, 1, 1, 1, 16, 16),
        ];
        for (c_in, c_out, k, stride, padding, dilation, h, w) in cases {
            let cfg = Conv2dConfig {
                padding,
                stride,
                dilation,
                ..Default::default()
            };
            let l = layer(c_in, c_out, k, cfg);
            let x = Tensor::randn(0f32, 1.0, (2, c_in, h, w), &Device::Cpu).unwrap();
            let want = l.inner.forward(&x).unwrap();
            let got = l.forward(&x).unwrap();
            assert_eq!(got.dims(), want.dims());
            assert!(
                crate::engine::max_abs_diff(&got, &want) < 1e-5,
                "{:?}",
                (c_in, c_out, k, stride, padding, dilation)
            );
            let r = Tensor::randn(0f32, 1.0, want.dims(), &Device::Cpu).unwrap();
            let fused = l.forward_add(&x, &r).unwrap();
            assert!(crate::engine::max_abs_diff(&fused, &(want + &r).unwrap()) < 1e-5);
            // A strided (transposed) input gives the same result.
            let xt = x
                .transpose(2, 3)
                .unwrap()
                .contiguous()
                .unwrap()
                .transpose(2, 3)
                .unwrap();
            assert!(
                crate::engine::max_abs_diff(&l.forward(&xt).unwrap(), &l.forward(&x).unwrap())
                    == 0.0
            );
        }
    }

    #[test]
    fn bands_split_large_outputs() {
        // k * ow large enough that BAND_ELEMS covers only a few rows.
        let cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let l = layer(64, 8, 3, cfg);
        let x = Tensor::randn(0f32, 1.0, (1, 64, 300, 256), &Device::Cpu).unwrap();
        const { assert!(BAND_ELEMS / (64 * 9 * 256) < 300) };
        let d = crate::engine::max_abs_diff(&l.forward(&x).unwrap(), &l.inner.forward(&x).unwrap());
        assert!(d < 1e-4, "{d}");
    }

    #[test]
    fn wrong_channel_count_is_an_error() {
        let l = layer(3, 4, 3, Conv2dConfig::default());
        let x = Tensor::zeros((1, 5, 8, 8), DType::F32, &Device::Cpu).unwrap();
        assert!(l.forward(&x).is_err());
        let tiny = Tensor::zeros((1, 3, 2, 2), DType::F32, &Device::Cpu).unwrap();
        assert!(l.forward(&tiny).is_err());
    }
}
