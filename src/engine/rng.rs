//! Bit-exact `torch.randn` on a CPU generator (`torch.Generator("cpu").manual_seed(seed)`).
//!
//! torch's CPU generator is an mt19937 seeded with the low 32 bits of the seed. `randn` of a
//! float32 tensor with at least 16 elements fills the tensor with 24-bit uniforms, then applies
//! Box-Muller to each block of 16 (values `j` and `j + 8` form a pair); a tail that is not a
//! multiple of 16 is handled by drawing 16 fresh uniforms for the last 16 slots. On x86-64 torch
//! runs this through its AVX2 kernel whose `log`/`sincos` are the Cephes polynomials of
//! `avx_mathfun.h`, compiled with fused multiply-adds; [`normal_fill_16`] reproduces that kernel
//! lane by lane, including where the compiler fuses. Tensors with fewer than 16 elements take
//! the scalar path: double-precision Box-Muller from 53-bit uniforms, whose second value is
//! cached in the generator.

/// mt19937 exactly as `at::mt19937` implements it.
#[derive(Clone)]
struct Mt19937 {
    state: [u32; 624],
    index: usize,
}

impl Mt19937 {
    const N: usize = 624;
    const M: usize = 397;

    fn new(seed: u64) -> Self {
        let mut state = [0u32; 624];
        // torch keeps only the low 32 bits of the 64-bit seed.
        state[0] = (seed & 0xffff_ffff) as u32;
        for j in 1..Self::N {
            let prev = state[j - 1];
            state[j] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(j as u32);
        }
        Mt19937 {
            state,
            index: Self::N,
        }
    }

    fn twist(&mut self) {
        for k in 0..Self::N {
            let y = (self.state[k] & 0x8000_0000) | (self.state[(k + 1) % Self::N] & 0x7fff_ffff);
            let mut v = self.state[(k + Self::M) % Self::N] ^ (y >> 1);
            if y & 1 != 0 {
                v ^= 0x9908_b0df;
            }
            self.state[k] = v;
        }
        self.index = 0;
    }

    fn next_u32(&mut self) -> u32 {
        if self.index >= Self::N {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }
}

/// A torch-compatible CPU random generator: the same seed gives the same `randn` stream.
#[derive(Clone)]
pub struct TorchRng {
    engine: Mt19937,
    /// The second Box-Muller value of the scalar (double) path, as torch caches it.
    next_double_normal: Option<f64>,
}

impl TorchRng {
    /// Equivalent of `torch.Generator("cpu").manual_seed(seed)`.
    pub fn new(seed: u64) -> Self {
        TorchRng {
            engine: Mt19937::new(seed),
            next_double_normal: None,
        }
    }

    fn random(&mut self) -> u32 {
        self.engine.next_u32()
    }

    fn random64(&mut self) -> u64 {
        let hi = self.random() as u64;
        let lo = self.random() as u64;
        (hi << 32) | lo
    }

    /// `uniform_real_distribution<float>(0, 1)`: 24 random bits scaled by 2^-24.
    fn uniform_f32(&mut self) -> f32 {
        (self.random() & 0x00ff_ffff) as f32 * (1.0 / 16_777_216.0)
    }

    /// `uniform_real_distribution<double>(0, 1)`: 53 random bits scaled by 2^-53.
    fn uniform_f64(&mut self) -> f64 {
        (self.random64() & ((1u64 << 53) - 1)) as f64 * (1.0 / 9_007_199_254_740_992.0)
    }

    /// `at::normal_distribution<double>(0, 1)` with torch's cached second sample.
    fn normal_f64(&mut self) -> f64 {
        if let Some(v) = self.next_double_normal.take() {
            return v;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.next_double_normal = Some(r * theta.sin());
        r * theta.cos()
    }

    /// Equivalent of `torch.randn(shape, generator=g)` in float32, continuing this generator's
    /// stream (row-major order).
    pub fn randn(&mut self, shape: &[usize]) -> Vec<f32> {
        let size: usize = shape.iter().product();
        if size < 16 {
            return (0..size).map(|_| self.normal_f64() as f32).collect();
        }
        let mut data: Vec<f32> = (0..size).map(|_| self.uniform_f32()).collect();
        for block in data.chunks_exact_mut(16) {
            normal_fill_16(block);
        }
        if !size.is_multiple_of(16) {
            let tail = &mut data[size - 16..];
            for v in tail.iter_mut() {
                *v = self.uniform_f32();
            }
            normal_fill_16(tail);
        }
        data
    }
}

/// Per-image torch-compatible noise streams: image `b` of a batch draws from its own
/// [`TorchRng`], so an image's noise never depends on its batch or position.
pub struct TorchNoise {
    rngs: Vec<TorchRng>,
}

impl TorchNoise {
    /// One generator per image, seeded with the image's seed.
    pub fn new(seeds: &[u64]) -> Self {
        TorchNoise {
            rngs: seeds.iter().map(|&s| TorchRng::new(s)).collect(),
        }
    }

    /// The generators, in batch order.
    pub fn rngs_mut(&mut self) -> &mut [TorchRng] {
        &mut self.rngs
    }

    /// `randn` of shape `[B, rest...]` (B = number of images): image `b` draws `[1, rest...]`
    /// from its own stream, as diffusers' `randn_tensor` does with a list of generators.
    pub fn randn(
        &mut self,
        shape: &[usize],
        dtype: candle_core::DType,
        device: &candle_core::Device,
    ) -> candle_core::Result<candle_core::Tensor> {
        let (&batch, rest) = shape
            .split_first()
            .ok_or_else(|| candle_core::Error::Msg("noise shape is empty".into()))?;
        if batch != self.rngs.len() {
            return Err(candle_core::Error::Msg(format!(
                "noise for a batch of {batch} but {} generators",
                self.rngs.len()
            )));
        }
        let mut one = vec![1usize];
        one.extend_from_slice(rest);
        let mut data = Vec::with_capacity(shape.iter().product());
        for rng in &mut self.rngs {
            data.extend(rng.randn(&one));
        }
        candle_core::Tensor::from_vec(data, shape, &candle_core::Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)
    }
}

impl crate::engine::schedulers::NoiseFn for TorchNoise {
    fn randn_like(
        &mut self,
        like: &candle_core::Tensor,
    ) -> candle_core::Result<candle_core::Tensor> {
        self.randn(like.dims(), like.dtype(), like.device())
    }
}

/// Noise from the device's own generator (`noise: device`): fast, not reproducible across
/// devices.
pub struct DeviceNoise;

impl crate::engine::schedulers::NoiseFn for DeviceNoise {
    fn randn_like(
        &mut self,
        like: &candle_core::Tensor,
    ) -> candle_core::Result<candle_core::Tensor> {
        like.randn_like(0.0, 1.0)
    }
}

/// Box-Muller on 16 uniforms in place: lanes `j` and `j + 8` give `r cos θ` and `r sin θ`.
fn normal_fill_16(data: &mut [f32]) {
    let two_pi = (2.0f64 * std::f64::consts::PI) as f32;
    for j in 0..8 {
        let u1 = 1.0f32 - data[j];
        let u2 = data[j + 8];
        let radius = (-2.0f32 * cephes_log(u1)).sqrt();
        let theta = two_pi * u2;
        let (s, c) = cephes_sincos(theta);
        // `fmadd(n, std = 1, mean = 0)` turns -0 into +0, hence the `+ 0.0`.
        data[j] = radius * c + 0.0;
        data[j + 8] = radius * s + 0.0;
    }
}

/// `log256_ps` of torch's `avx_mathfun.h` for one lane, with the fusions GCC applies.
#[allow(clippy::excessive_precision)]
fn cephes_log(x: f32) -> f32 {
    // The constants are C double literals converted to float, as in the C header.
    const P: [f64; 9] = [
        7.0376836292E-2,
        -1.1514610310E-1,
        1.1676998740E-1,
        -1.2420140846E-1,
        1.4249322787E-1,
        -1.6668057665E-1,
        2.0000714765E-1,
        -2.4999993993E-1,
        3.3333331174E-1,
    ];
    const Q1: f32 = -2.12194440e-4f64 as f32;
    const Q2: f32 = 0.693359375;
    const SQRTHF: f32 = std::f64::consts::FRAC_1_SQRT_2 as f32;
    if x.is_nan() || x <= 0.0 {
        return f32::NAN;
    }
    let x = x.max(f32::MIN_POSITIVE);
    let bits = x.to_bits();
    let mut e = ((bits >> 23) as i32 - 0x7f) as f32 + 1.0;
    let mut m = f32::from_bits((bits & !0x7f80_0000) | 0.5f32.to_bits());
    if m < SQRTHF {
        e -= 1.0;
        m = (m - 1.0) + m;
    } else {
        m -= 1.0;
    }
    let z = m * m;
    let mut y = P[0] as f32;
    for &p in &P[1..] {
        y = y.mul_add(m, p as f32);
    }
    y *= m;
    y = y.mul_add(z, e * Q1);
    y -= z * 0.5;
    e.mul_add(Q2, m + y)
}

/// `sincos256_ps` of torch's `avx_mathfun.h` for one lane (returns `(sin, cos)`).
#[allow(clippy::excessive_precision)]
fn cephes_sincos(x: f32) -> (f32, f32) {
    const FOPI: f32 = 1.27323954473516f64 as f32;
    const DP1: f32 = -0.78515625;
    const DP2: f32 = -2.4187564849853515625e-4;
    const DP3: f32 = -3.77489497744594108e-8f64 as f32;
    const SIN_P: [f32; 3] = [
        -1.9515295891E-4f64 as f32,
        8.3321608736E-3f64 as f32,
        -1.6666654611E-1f64 as f32,
    ];
    const COS_P: [f32; 3] = [
        2.443315711809948E-5f64 as f32,
        -1.388731625493765E-3f64 as f32,
        4.166664568298827E-2f64 as f32,
    ];
    let mut sign_sin = x.is_sign_negative();
    let xa = x.abs();
    // cvttps: truncation; out-of-range lanes give i32::MIN as the instruction does.
    let scaled = xa * FOPI;
    let mut j = if scaled < 2_147_483_648.0 {
        scaled as i32
    } else {
        i32::MIN
    };
    j = j.wrapping_add(1) & !1;
    let y = j as f32;
    let swap_sin = j & 4 != 0;
    let poly_cos_first = j & 2 == 0;
    let cos_negative = (!(j.wrapping_sub(2))) & 4 != 0;
    sign_sin ^= swap_sin;
    let mut r = y.mul_add(DP1, xa);
    r = y.mul_add(DP2, r);
    r = y.mul_add(DP3, r);
    let z = r * r;
    let mut yc = COS_P[0].mul_add(z, COS_P[1]);
    yc = yc.mul_add(z, COS_P[2]);
    yc *= z;
    yc = yc.mul_add(z, -(z * 0.5));
    yc += 1.0;
    let mut ys = SIN_P[0].mul_add(z, SIN_P[1]);
    ys = ys.mul_add(z, SIN_P[2]);
    ys *= z;
    ys = ys.mul_add(r, r);
    let (mut s, mut c) = if poly_cos_first { (ys, yc) } else { (yc, ys) };
    if sign_sin {
        s = -s;
    }
    if cos_negative {
        c = -c;
    }
    (s, c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn golden(file: &str) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
        let path = format!(
            "{}/tests/fixtures/golden/cases/{file}",
            env!("CARGO_MANIFEST_DIR")
        );
        let bytes = std::fs::read(&path).expect("fixture");
        let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
        st.tensors()
            .into_iter()
            .filter(|(_, t)| t.dtype() == safetensors::Dtype::F32)
            .map(|(name, t)| {
                let v = t
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                (name, (t.shape().to_vec(), v))
            })
            .collect()
    }

    fn assert_bits(got: &[f32], want: &[f32], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        let bad: Vec<usize> = (0..got.len())
            .filter(|&i| got[i].to_bits() != want[i].to_bits())
            .collect();
        assert!(
            bad.is_empty(),
            "{what}: {} of {} values differ, first at {} ({} vs {})",
            bad.len(),
            got.len(),
            bad[0],
            got[bad[0]],
            want[bad[0]]
        );
    }

    #[test]
    fn mt19937_reference_stream() {
        // The reference mt19937 with the standard default seed 5489: the 10000th output is
        // 4123659995 (C++ standard, [rand.predef]).
        let mut mt = Mt19937::new(5489);
        let mut last = 0;
        for _ in 0..10000 {
            last = mt.next_u32();
        }
        assert_eq!(last, 4_123_659_995);
    }

    #[test]
    fn randn_matches_torch_bit_exact() {
        let g = golden("torch_cpu_randn.safetensors");
        assert!(g.len() >= 15);
        for (key, (shape, want)) in &g {
            let seed: u64 = key
                .strip_prefix("seed")
                .and_then(|s| s.split('_').next())
                .and_then(|s| s.parse().ok())
                .expect("key seed");
            let got = TorchRng::new(seed).randn(shape);
            assert_bits(&got, want, key);
        }
    }

    #[test]
    fn init_noise_of_cases_bit_exact() {
        for (file, seed, batch) in [
            ("ddim_basic.safetensors", 42u64, 1usize),
            ("ddim_batch_neg.safetensors", 1000, 2),
            ("euler_nonsquare.safetensors", 7, 1),
            ("euler_a_batch.safetensors", 500, 2),
            ("pndm.safetensors", 21, 1),
        ] {
            let g = golden(file);
            let (shape, want) = &g["init_noise"];
            assert_eq!(shape[0], batch);
            let per: usize = shape[1..].iter().product();
            for i in 0..batch {
                let got = TorchRng::new(seed + i as u64).randn(&[1, shape[1], shape[2], shape[3]]);
                assert_bits(&got, &want[i * per..(i + 1) * per], file);
            }
        }
    }

    #[test]
    fn torch_noise_batches_per_image_streams() {
        use crate::engine::schedulers::NoiseFn;
        let g = golden("euler_a_batch.safetensors");
        let (shape, want) = &g["init_noise"];
        let mut noise = TorchNoise::new(&[500, 501]);
        let first = noise
            .randn(shape, candle_core::DType::F32, &candle_core::Device::Cpu)
            .expect("noise");
        let got: Vec<f32> = first.flatten_all().and_then(|t| t.to_vec1()).expect("vec");
        assert_bits(&got, want, "batched init noise");
        // The next draw continues each image's own stream.
        let next = noise.randn_like(&first).expect("noise");
        let next: Vec<f32> = next.flatten_all().and_then(|t| t.to_vec1()).expect("vec");
        let per: usize = shape[1..].iter().product();
        let mut one = vec![1usize];
        one.extend_from_slice(&shape[1..]);
        for (b, seed) in [500u64, 501].into_iter().enumerate() {
            let mut r = TorchRng::new(seed);
            r.randn(&one);
            assert_bits(&next[b * per..(b + 1) * per], &r.randn(&one), "second draw");
        }
        assert!(noise
            .randn(&[3, 4], candle_core::DType::F32, &candle_core::Device::Cpu)
            .is_err());
    }

    #[test]
    fn stream_continues_across_calls() {
        let mut a = TorchRng::new(3);
        let first = a.randn(&[32]);
        let second = a.randn(&[32]);
        let mut b = TorchRng::new(3);
        assert_eq!(b.randn(&[32]), first);
        assert_ne!(first, second);
        assert_eq!(b.randn(&[32]), second);
    }

    #[test]
    fn small_tensors_use_cached_double_path() {
        // Scalar path: two 53-bit uniforms per pair, the sine half cached for the next value.
        let mut a = TorchRng::new(0);
        let three = a.randn(&[3]);
        let mut b = TorchRng::new(0);
        let u1 = b.uniform_f64();
        let u2 = b.uniform_f64();
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let th = 2.0 * std::f64::consts::PI * u1;
        assert_eq!(three[0], (r * th.cos()) as f32);
        assert_eq!(three[1], (r * th.sin()) as f32);
        // The third value starts a new pair; its sine half stays cached for the next call.
        let mut c = TorchRng::new(0);
        let one_by_one: Vec<f32> = (0..4).flat_map(|_| c.randn(&[1])).collect();
        assert_eq!(&one_by_one[..3], &three[..]);
        assert!(three.iter().all(|v| v.is_finite()));
    }
}
