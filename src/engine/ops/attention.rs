//! Multi-head scaled dot-product attention on the CPU without the full score matrix: one rayon
//! task per (image, head, block of query rows) computes its scores with a gemm, a vectorised
//! softmax and a second gemm straight into the output. Heads are read and written with strides
//! in the (B, N, heads * d) layout of the projections, so nothing is transposed or copied.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::conv::contiguous;
use super::simd;

/// Query rows per task: the scores of one task are `QUERY_BLOCK * M` floats (1 MiB at M = 4096).
const QUERY_BLOCK: usize = 64;

struct AttentionOp {
    heads: usize,
    scale: f32,
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: each task writes its own (image, query rows, head) block of the output.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer (a method, so closures capture the whole `Send` wrapper).
    fn get(self) -> *mut f32 {
        self.0
    }
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "sd-run-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, n, c) = ql.shape().dims3()?;
        let (kb, m, kc) = kl.shape().dims3()?;
        let (vb, vm, vc) = vl.shape().dims3()?;
        if kb != b || vb != b || vm != m || kc != c || vc != c || c % self.heads != 0 || m == 0 {
            candle_core::bail!(
                "attention: q {:?}, k {:?}, v {:?} with {} heads do not fit",
                ql.shape(),
                kl.shape(),
                vl.shape(),
                self.heads
            );
        }
        let d = c / self.heads;
        let (q, k, v) = (
            contiguous(qs, ql)?,
            contiguous(ks, kl)?,
            contiguous(vs, vl)?,
        );
        let mut out = vec![0f32; b * n * c];
        let dst = SendPtr(out.as_mut_ptr());
        let blocks = n.div_ceil(QUERY_BLOCK);
        (0..b * self.heads * blocks).into_par_iter().for_each_init(
            Vec::new,
            |scores: &mut Vec<f32>, task| {
                let bi = task / (self.heads * blocks);
                let h = (task / blocks) % self.heads;
                let q0 = (task % blocks) * QUERY_BLOCK;
                let rows = QUERY_BLOCK.min(n - q0);
                scores.resize(rows * m, 0.0);
                let q_ptr = q[(bi * n + q0) * c + h * d..].as_ptr();
                let k_ptr = k[bi * m * c + h * d..].as_ptr();
                let v_ptr = v[bi * m * c + h * d..].as_ptr();
                // SAFETY: q block (rows, d) with row stride c; k^T (d, m) with column stride c;
                // scores (rows, m) row-major; v (m, d) with row stride c; the output block
                // (rows, d) at row stride c is this task's alone. All in bounds by the shape checks.
                unsafe {
                    gemm::gemm(
                        rows,
                        m,
                        d,
                        scores.as_mut_ptr(),
                        1,
                        m as isize,
                        false,
                        q_ptr,
                        1,
                        c as isize,
                        k_ptr,
                        c as isize,
                        1,
                        0.0,
                        self.scale,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
                for row in scores.chunks_exact_mut(m) {
                    simd::softmax_row(row);
                }
                unsafe {
                    let o_ptr = dst.get().add((bi * n + q0) * c + h * d);
                    gemm::gemm(
                        rows,
                        d,
                        m,
                        o_ptr,
                        1,
                        c as isize,
                        false,
                        scores.as_ptr(),
                        1,
                        m as isize,
                        v_ptr,
                        1,
                        c as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            },
        );
        Ok((CpuStorage::F32(out), Shape::from_dims(&[b, n, c])))
    }
}

/// `softmax(q k^T * scale) v` per head for q (B, N, heads * d), k and v (B, M, heads * d);
/// returns (B, N, heads * d), or `None` when the inputs are not f32 on the CPU (the caller then
/// runs its own path).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
) -> Result<Option<Tensor>> {
    let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    if !(cpu_f32(q) && cpu_f32(k) && cpu_f32(v)) || heads == 0 {
        return Ok(None);
    }
    let op = AttentionOp {
        heads,
        scale: scale as f32,
    };
    Ok(Some(q.apply_op3_no_bwd(k, v, &op)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Tensor {
        let split = |t: &Tensor| {
            let (b, n, c) = t.dims3().unwrap();
            t.reshape((b, n, heads, c / heads))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let (q, k, v) = (split(q), split(k), split(v));
        let s = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
        let p = candle_nn::ops::softmax_last_dim(&s).unwrap();
        let o = p.matmul(&v).unwrap();
        let (b, h, n, d) = o.dims4().unwrap();
        o.transpose(1, 2).unwrap().reshape((b, n, h * d)).unwrap()
    }

    #[test]
    fn matches_the_materialised_computation() {
        let dev = Device::Cpu;
        for (b, n, m, heads, d) in [(2, 130, 77, 3, 8), (1, 64, 64, 1, 16), (2, 5, 200, 2, 4)] {
            let q = Tensor::randn(0f32, 1.0, (b, n, heads * d), &dev).unwrap();
            let k = Tensor::randn(0f32, 1.0, (b, m, heads * d), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (b, m, heads * d), &dev).unwrap();
            let scale = 1.0 / (d as f64).sqrt();
            let want = reference(&q, &k, &v, heads, scale);
            // A transposed (strided) query works too.
            let qt = q
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
                .transpose(1, 2)
                .unwrap();
            let got = attention(&qt, &k, &v, heads, scale).unwrap().unwrap();
            let diff = crate::engine::max_abs_diff(&want, &got);
            assert!(diff < 1e-5, "{diff}");
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let dev = Device::Cpu;
        let q = Tensor::zeros((1, 4, 6), DType::F32, &dev).unwrap();
        let k = Tensor::zeros((1, 3, 8), DType::F32, &dev).unwrap();
        assert!(attention(&q, &k, &k, 2, 1.0).is_err());
        assert!(attention(&q, &q, &q, 4, 1.0).is_err());
    }
}
