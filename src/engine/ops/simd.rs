//! Vectorised f32 kernels for the CPU ops: `exp` (Cephes' single-precision algorithm, within
//! 2 ulp of the exact value over the whole range), softmax rows, SiLU. Each kernel is written once
//! as plain loops that LLVM vectorises, and compiled three times: for AVX-512, for AVX2 + FMA, and
//! for the baseline target; the best one the CPU supports is chosen at run time.

const EXP_HI: f32 = 88.0;
const EXP_LO: f32 = -87.336_55;
const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;

/// `e^x` for one value, as the vectorised loops compute it (no libm call, no branch).
#[inline(always)]
pub fn exp1(x: f32) -> f32 {
    let x = x.clamp(EXP_LO, EXP_HI);
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let r2 = r * r;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r2 + r + 1.0;
    // 2^n by building the exponent bits; n + 127 is in [1, 254] after the clamp. Adding
    // 1.5 * 2^23 puts it in the low mantissa bits (a float-to-int cast would not vectorise).
    let biased = (n + (127.0 + 12_582_912.0)).to_bits();
    let pow2 = f32::from_bits(biased << 23);
    y * pow2
}

/// Lanes of the running sums (independent accumulators vectorise; a single one does not).
const LANES: usize = 16;

#[inline(always)]
fn softmax_body(row: &mut [f32]) {
    // Lane-wise maxima with compare-and-select (`f32::max` keeps a scalar loop for NaN rules).
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            lanes[i] = if c[i] > lanes[i] { c[i] } else { lanes[i] };
        }
    }
    let mut max = f32::NEG_INFINITY;
    for &v in lanes.iter().chain(chunks.remainder()) {
        max = if v > max { v } else { max };
    }
    let mut acc = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            let e = exp1(c[i] - max);
            c[i] = e;
            acc[i] += e;
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for v in chunks.into_remainder() {
        *v = exp1(*v - max);
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in row.iter_mut() {
        *v *= inv;
    }
}

#[inline(always)]
fn silu_body(xs: &mut [f32]) {
    for v in xs.iter_mut() {
        *v /= 1.0 + exp1(-*v);
    }
}

#[inline(always)]
fn exp_body(xs: &mut [f32]) {
    for v in xs.iter_mut() {
        *v = exp1(*v);
    }
}

/// `y = (x - mean) * inv_std * gamma + beta`, then SiLU when `silu`, over one channel's values.
#[inline(always)]
fn norm_body(src: &[f32], dst: &mut [f32], scale: f32, shift: f32, silu: bool) {
    if silu {
        for (d, &s) in dst.iter_mut().zip(src) {
            let y = s * scale + shift;
            *d = y / (1.0 + exp1(-y));
        }
    } else {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = s * scale + shift;
        }
    }
}

/// Sum and sum of squared deviations in f64 lanes (group norm statistics over up to millions of
/// values; f32 accumulators would drift by 1e-6 relative).
#[inline(always)]
fn sum_body(xs: &[f32]) -> f64 {
    let mut acc = [0f64; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            acc[i] += c[i] as f64;
        }
    }
    acc.iter().sum::<f64>() + chunks.remainder().iter().map(|&v| v as f64).sum::<f64>()
}

#[inline(always)]
fn sq_dev_body(xs: &[f32], mean: f64) -> f64 {
    let mut acc = [0f64; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            let d = c[i] as f64 - mean;
            acc[i] += d * d;
        }
    }
    acc.iter().sum::<f64>()
        + chunks
            .remainder()
            .iter()
            .map(|&v| (v as f64 - mean) * (v as f64 - mean))
            .sum::<f64>()
}

/// `erf(x)` as a rational function of x (odd numerator of degree 13, even denominator of
/// degree 8) on [-4, 4], saturating outside: within 4e-7 of the exact value.
#[inline(always)]
pub fn erf1(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10f32;
    p = p * x2 + 2.770_681_4e-8;
    p = p * x2 - 2.101_024e-6;
    p = p * x2 - 5.692_506_4e-5;
    p = p * x2 - 7.349_906_3e-4;
    p = p * x2 - 2.954_600_1e-3;
    p = p * x2 - 1.609_603_3e-2;
    let mut q = -1.456_607_2e-5f32;
    q = q * x2 - 2.133_740_6e-4;
    q = q * x2 - 1.682_827e-3;
    q = q * x2 - 7.373_329e-3;
    q = q * x2 - 1.426_474e-2;
    x * p / q
}

#[inline(always)]
fn geglu_body(a: &[f32], gate: &[f32], dst: &mut [f32]) {
    for ((d, &x), &g) in dst.iter_mut().zip(a).zip(gate) {
        *d = x * (0.5 * g * (1.0 + erf1(g * std::f32::consts::FRAC_1_SQRT_2)));
    }
}

macro_rules! dispatch {
    ($(#[$doc:meta])* $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty, $body:ident) => {
        $(#[$doc])*
        pub fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn v4($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU supports the features the function was compiled for.
                    return unsafe { v4($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: as above.
                    return unsafe { v3($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

dispatch!(
    /// GEGLU of one row: `a * gelu(gate)` with the exact (erf) GELU.
    geglu_row(a: &[f32], gate: &[f32], dst: &mut [f32]) -> (),
    geglu_body
);
dispatch!(
    /// Softmax of one row, in place.
    softmax_row(row: &mut [f32]) -> (),
    softmax_body
);
dispatch!(
    /// SiLU (`x * sigmoid(x)`) in place.
    silu_inplace(xs: &mut [f32]) -> (),
    silu_body
);
dispatch!(
    /// `e^x` in place.
    exp_inplace(xs: &mut [f32]) -> (),
    exp_body
);
dispatch!(
    /// Affine normalisation of one channel, optionally followed by SiLU.
    norm_channel(src: &[f32], dst: &mut [f32], scale: f32, shift: f32, silu: bool) -> (),
    norm_body
);
dispatch!(
    /// The sum of `xs`, accumulated in f64 across blocks.
    sum(xs: &[f32]) -> f64,
    sum_body
);
dispatch!(
    /// The sum of `(x - mean)^2`, accumulated in f64 across blocks.
    sq_dev(xs: &[f32], mean: f64) -> f64,
    sq_dev_body
);

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_is_within_two_ulp_over_the_range() {
        let mut worst = 0;
        let mut x = -87.0f32;
        while x < 88.0 {
            let exact = (x as f64).exp() as f32;
            worst = worst.max(ulps(exp1(x), exact));
            let mut v = [x; 19];
            exp_inplace(&mut v);
            assert_eq!(
                v[18].to_bits(),
                exp1(x).to_bits(),
                "vectorised and scalar paths agree at {x}"
            );
            x += 0.0137;
        }
        assert!(worst <= 2, "worst {worst} ulp");
        assert_eq!(exp1(0.0), 1.0);
        assert_eq!(exp1(f32::NEG_INFINITY), exp1(EXP_LO));
        assert!(exp1(EXP_LO) < 1.2e-38 && exp1(1000.0).is_finite());
    }

    #[test]
    fn softmax_and_silu_match_the_definitions() {
        let row: Vec<f32> = (0..37)
            .map(|i| ((i * 7919) % 23) as f32 * 0.37 - 4.0)
            .collect();
        let mut got = row.clone();
        softmax_row(&mut got);
        let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let total: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
        for (g, &v) in got.iter().zip(&row) {
            let want = (v as f64 - max).exp() / total;
            assert!((*g as f64 - want).abs() < 1e-7, "{g} vs {want}");
        }
        let mut s = row.clone();
        silu_inplace(&mut s);
        for (g, &v) in s.iter().zip(&row) {
            let want = v as f64 / (1.0 + (-v as f64).exp());
            assert!((*g as f64 - want).abs() < 1e-6, "{g} vs {want}");
        }
    }

    #[test]
    fn erf_is_within_4e7() {
        let mut worst = 0f64;
        let mut x = -6.0f64;
        while x < 6.0 {
            let got = erf1(x as f32) as f64;
            // erf via its complement's continued relation to exp is not in std; use a series
            // for |x| < 3 and the asymptotic value beyond.
            let want = erf_ref(x);
            worst = worst.max((got - want).abs());
            x += 0.00731;
        }
        assert!(worst < 4e-7, "worst {worst}");
    }

    /// erf by its Taylor series (|x| < 3) or 1 - erfc's asymptotic expansion.
    fn erf_ref(x: f64) -> f64 {
        let a = x.abs();
        let v = if a < 3.0 {
            let (mut term, mut sum, mut n) = (a, a, 0f64);
            while term.abs() > 1e-17 {
                n += 1.0;
                term *= -a * a / n;
                sum += term / (2.0 * n + 1.0);
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            let mut s = 1.0;
            let mut t = 1.0;
            for k in 1..8 {
                t *= -((2 * k - 1) as f64) / (2.0 * a * a);
                s += t;
            }
            1.0 - (-a * a).exp() / (a * std::f64::consts::PI.sqrt()) * s
        };
        v.copysign(x)
    }

    #[test]
    fn sums_are_accurate_on_long_inputs() {
        let xs: Vec<f32> = (0..100_003).map(|i| 1.0 + (i % 10) as f32 * 1e-3).collect();
        let exact: f64 = xs.iter().map(|&v| v as f64).sum();
        assert!(
            (sum(&xs) - exact).abs() / exact < 1e-12,
            "{} vs {exact}",
            sum(&xs)
        );
        let mean = exact / xs.len() as f64;
        let exact_sq: f64 = xs.iter().map(|&v| (v as f64 - mean).powi(2)).sum();
        assert!((sq_dev(&xs, mean) - exact_sq).abs() / exact_sq < 1e-9);
    }
}
