//! 3x3 convolutions (stride 1, padding 1) by Winograd's minimal filtering F(2x2, 3x3): each
//! 2x2 output tile is computed from a 4x4 input tile with 16 multiplications per channel pair
//! instead of 36, as 16 independent gemms over the transformed tiles. The transforms only add,
//! subtract and halve, so results stay within a few ulp of the direct convolution.
//!
//! Layouts per band of tile rows: `V[e][c_in][tile]` (input tiles, e = 0..16 the transformed
//! element), `U[e][c_out][c_in]` (the kernel), `M[e][c_out][tile]` (their products).

use rayon::prelude::*;

/// Bytes of the V and M buffers of one band (both together).
const BAND_BYTES: usize = 48 << 20;

/// Padding (floats) after each of the 16 planes of U, V and M: without it the 16 planes of a
/// tile sit a multiple of 4 KiB apart, map to the same cache sets and evict each other.
const PAD: usize = 32;

/// Whether a 3x3 convolution with these sizes is worth doing this way: enough tiles for the
/// 16 gemms to run at speed and for the kernel transform to pay off.
pub(crate) fn worthwhile(b: usize, h: usize, w: usize) -> bool {
    b * h.div_ceil(2) * w.div_ceil(2) >= 64
}

/// `U = G g G^T` for every (c_out, c_in) pair of a (c_out, c_in, 3, 3) kernel.
fn transform_kernel(weight: &[f32], c_out: usize, c_in: usize) -> Vec<f32> {
    let plane = c_out * c_in + PAD;
    let mut u = vec![0f32; 16 * plane];
    let up = crate::engine::ops::conv::SendPtr(u.as_mut_ptr());
    (0..c_out)
        .into_par_iter()
        .for_each(|co| kernel_row(weight, c_in, plane, co, up));
    u
}

#[inline(never)]
fn kernel_row(
    weight: &[f32],
    c_in: usize,
    plane: usize,
    co: usize,
    up: crate::engine::ops::conv::SendPtr,
) {
    {
        for ci in 0..c_in {
            let g = &weight[(co * c_in + ci) * 9..(co * c_in + ci) * 9 + 9];
            // G g: 4x3, rows (g0, (g0+g1+g2)/2, (g0-g1+g2)/2, g2) of the kernel rows.
            let mut t = [[0f32; 3]; 4];
            for j in 0..3 {
                let (a, b, c) = (g[j], g[3 + j], g[6 + j]);
                t[0][j] = a;
                t[1][j] = 0.5 * (a + b + c);
                t[2][j] = 0.5 * (a - b + c);
                t[3][j] = c;
            }
            for (i, row) in t.iter().enumerate() {
                let (a, b, c) = (row[0], row[1], row[2]);
                let vals = [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c];
                for (j, v) in vals.iter().enumerate() {
                    // SAFETY: index (e, co, ci) is written by this co's task only.
                    unsafe { *up.0.add((i * 4 + j) * plane + co * c_in + ci) = *v };
                }
            }
        }
    }
}

/// Convolves `x` (b, c_in, h, w) with a 3x3 kernel, stride 1, padding 1, adding into `dst`
/// (b, c_out, h, w), which the caller filled with the bias (and residual) or zeros.
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv3x3(
    x: &[f32],
    b: usize,
    c_in: usize,
    h: usize,
    w: usize,
    weight: &[f32],
    c_out: usize,
    dst: &mut [f32],
) {
    let u = transform_kernel(weight, c_out, c_in);
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    let per_tile = 16 * (c_in + c_out) * 4;
    let band_rows = (BAND_BYTES / (per_tile * tw)).clamp(1, th);
    let mut v = vec![0f32; 16 * (c_in * band_rows * tw + PAD)];
    let mut m = vec![0f32; 16 * (c_out * band_rows * tw + PAD)];
    let plane_u = c_out * c_in + PAD;
    for bi in 0..b {
        let xb = &x[bi * c_in * h * w..(bi + 1) * c_in * h * w];
        let db = &mut dst[bi * c_out * h * w..(bi + 1) * c_out * h * w];
        let mut ty0 = 0;
        while ty0 < th {
            let rows = band_rows.min(th - ty0);
            let n = rows * tw;
            let (sv, sm) = (c_in * n + PAD, c_out * n + PAD);
            input_tiles(xb, c_in, h, w, ty0, rows, tw, sv, &mut v[..16 * sv]);
            // The 16 products, one task each.
            let (vs, ms) = (&v[..16 * sv], &mut m[..16 * sm]);
            ms.par_chunks_mut(sm).enumerate().for_each(|(e, me)| {
                // SAFETY: me is (c_out, n) row-major, U[e] is (c_out, c_in), V[e] is (c_in, n).
                unsafe {
                    gemm::gemm(
                        c_out,
                        n,
                        c_in,
                        me.as_mut_ptr(),
                        1,
                        n as isize,
                        false,
                        u[e * plane_u..].as_ptr(),
                        1,
                        c_in as isize,
                        vs[e * sv..].as_ptr(),
                        1,
                        n as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            });
            output_tiles(&m[..16 * sm], sm, h, w, ty0, rows, tw, db);
            ty0 += rows;
        }
    }
}

/// `V = B^T d B` for the 4x4 input tile of every output tile in rows `ty0..ty0 + rows`.
#[allow(clippy::too_many_arguments)]
fn input_tiles(
    x: &[f32],
    c_in: usize,
    h: usize,
    w: usize,
    ty0: usize,
    rows: usize,
    tw: usize,
    stride_e: usize,
    v: &mut [f32],
) {
    let n = rows * tw;
    let vp = crate::engine::ops::conv::SendPtr(v.as_mut_ptr());
    (0..c_in)
        .into_par_iter()
        .for_each(|ci| input_channel(x, h, w, ty0, rows, tw, n, stride_e, ci, vp));
}

#[allow(clippy::too_many_arguments)]
#[inline(never)]
fn input_channel(
    x: &[f32],
    h: usize,
    w: usize,
    ty0: usize,
    rows: usize,
    tw: usize,
    n: usize,
    stride_e: usize,
    ci: usize,
    vp: crate::engine::ops::conv::SendPtr,
) {
    {
        let plane = &x[ci * h * w..(ci + 1) * h * w];
        let at = |y: isize, xx: isize| -> f32 {
            if y >= 0 && (y as usize) < h && xx >= 0 && (xx as usize) < w {
                plane[y as usize * w + xx as usize]
            } else {
                0.0
            }
        };
        for r in 0..rows {
            let y0 = 2 * (ty0 + r) as isize - 1;
            for tx in 0..tw {
                let x0 = 2 * tx as isize - 1;
                let mut d = [[0f32; 4]; 4];
                let interior = y0 >= 0 && y0 + 4 <= h as isize && x0 >= 0 && x0 + 4 <= w as isize;
                for (i, row) in d.iter_mut().enumerate() {
                    if interior {
                        let off = (y0 as usize + i) * w + x0 as usize;
                        row.copy_from_slice(&plane[off..off + 4]);
                    } else {
                        for (j, val) in row.iter_mut().enumerate() {
                            *val = at(y0 + i as isize, x0 + j as isize);
                        }
                    }
                }
                // B^T d (rows), then (B^T d) B (columns).
                let mut t = [[0f32; 4]; 4];
                for j in 0..4 {
                    t[0][j] = d[0][j] - d[2][j];
                    t[1][j] = d[1][j] + d[2][j];
                    t[2][j] = d[2][j] - d[1][j];
                    t[3][j] = d[1][j] - d[3][j];
                }
                let t_idx = r * tw + tx;
                for (i, row) in t.iter().enumerate() {
                    let vals = [
                        row[0] - row[2],
                        row[1] + row[2],
                        row[2] - row[1],
                        row[1] - row[3],
                    ];
                    for (j, val) in vals.iter().enumerate() {
                        // SAFETY: (e, ci, tile) is written by this ci's task only.
                        unsafe { *vp.0.add((i * 4 + j) * stride_e + ci * n + t_idx) = *val };
                    }
                }
            }
        }
    }
}

/// `Y = A^T M A` for every tile, added into `dst` (c_out, h, w).
#[allow(clippy::too_many_arguments)]
fn output_tiles(
    m: &[f32],
    stride_e: usize,
    h: usize,
    w: usize,
    ty0: usize,
    rows: usize,
    tw: usize,
    dst: &mut [f32],
) {
    let n = rows * tw;
    dst.par_chunks_mut(h * w)
        .enumerate()
        .for_each(|(co, plane)| output_channel(m, h, w, ty0, rows, tw, n, stride_e, co, plane));
}

#[allow(clippy::too_many_arguments)]
#[inline(never)]
fn output_channel(
    m: &[f32],
    h: usize,
    w: usize,
    ty0: usize,
    rows: usize,
    tw: usize,
    n: usize,
    stride_e: usize,
    co: usize,
    plane: &mut [f32],
) {
    {
        for r in 0..rows {
            let oy = 2 * (ty0 + r);
            for tx in 0..tw {
                let ox = 2 * tx;
                let t_idx = co * n + r * tw + tx;
                let mut mm = [[0f32; 4]; 4];
                for (i, row) in mm.iter_mut().enumerate() {
                    for (j, val) in row.iter_mut().enumerate() {
                        *val = m[(i * 4 + j) * stride_e + t_idx];
                    }
                }
                // A^T M (rows: m0 + m1 + m2, m1 - m2 - m3), then columns.
                let mut t = [[0f32; 4]; 2];
                for j in 0..4 {
                    t[0][j] = mm[0][j] + mm[1][j] + mm[2][j];
                    t[1][j] = mm[1][j] - mm[2][j] - mm[3][j];
                }
                for (i, row) in t.iter().enumerate() {
                    let y = oy + i;
                    if y >= h {
                        continue;
                    }
                    let out = [row[0] + row[1] + row[2], row[1] - row[2] - row[3]];
                    for (j, val) in out.iter().enumerate() {
                        if ox + j < w {
                            plane[y * w + ox + j] += *val;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Direct 3x3 convolution, stride 1, padding 1, in f64.
    fn direct(
        x: &[f32],
        b: usize,
        c_in: usize,
        h: usize,
        w: usize,
        k: &[f32],
        c_out: usize,
    ) -> Vec<f64> {
        let mut out = vec![0f64; b * c_out * h * w];
        for bi in 0..b {
            for co in 0..c_out {
                for y in 0..h {
                    for xx in 0..w {
                        let mut s = 0f64;
                        for ci in 0..c_in {
                            for ky in 0..3 {
                                for kx in 0..3 {
                                    let (iy, ix) = (
                                        y as isize + ky as isize - 1,
                                        xx as isize + kx as isize - 1,
                                    );
                                    if iy >= 0 && iy < h as isize && ix >= 0 && ix < w as isize {
                                        s += x
                                            [((bi * c_in + ci) * h + iy as usize) * w + ix as usize]
                                            as f64
                                            * k[((co * c_in + ci) * 3 + ky) * 3 + kx] as f64;
                                    }
                                }
                            }
                        }
                        out[((bi * c_out + co) * h + y) * w + xx] = s;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn equals_the_direct_convolution() {
        let mut state = 12345u32;
        let mut rnd = || {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (state >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        for (b, c_in, c_out, h, w) in [
            (1, 3, 4, 7, 9),
            (2, 5, 3, 8, 8),
            (1, 2, 2, 1, 1),
            (1, 4, 4, 2, 5),
        ] {
            let x: Vec<f32> = (0..b * c_in * h * w).map(|_| rnd()).collect();
            let k: Vec<f32> = (0..c_out * c_in * 9).map(|_| rnd()).collect();
            let mut got = vec![0.25f32; b * c_out * h * w];
            conv3x3(&x, b, c_in, h, w, &k, c_out, &mut got);
            let want = direct(&x, b, c_in, h, w, &k, c_out);
            for (g, w) in got.iter().zip(&want) {
                assert!((*g as f64 - 0.25 - w).abs() < 1e-5, "{g} vs {w} + 0.25");
            }
        }
    }
}
