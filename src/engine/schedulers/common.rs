//! Pieces shared by the schedulers: the training noise schedule (betas, cumulative alphas), the
//! numpy helpers diffusers' `set_timesteps` uses (`linspace`, `arange`, `interp`, round half to
//! even), sigma/timestep conversions, Karras sigmas, dynamic thresholding and scalar tensor ops.

use super::SchedulerConfig;
use candle_core::{DType, Tensor};

/// What the model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prediction {
    Epsilon,
    VPrediction,
    Sample,
}

impl Prediction {
    pub(crate) fn parse(s: Option<&str>) -> Result<Self, String> {
        match s.unwrap_or("epsilon") {
            "epsilon" => Ok(Prediction::Epsilon),
            "v_prediction" => Ok(Prediction::VPrediction),
            "sample" => Ok(Prediction::Sample),
            other => Err(format!(
                "unsupported prediction_type `{other}` (epsilon, v_prediction or sample)"
            )),
        }
    }
}

/// `timestep_spacing`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Spacing {
    Linspace,
    Leading,
    Trailing,
}

impl Spacing {
    pub(crate) fn parse(s: Option<&str>, default: Spacing) -> Result<Self, String> {
        match s {
            None => Ok(default),
            Some("linspace") => Ok(Spacing::Linspace),
            Some("leading") => Ok(Spacing::Leading),
            Some("trailing") => Ok(Spacing::Trailing),
            Some(other) => Err(format!(
                "unsupported timestep_spacing `{other}` (linspace, leading or trailing)"
            )),
        }
    }
}

/// The training noise schedule, in float32 as diffusers holds it.
pub(crate) struct TrainSchedule {
    pub num_train_timesteps: usize,
    pub alphas_cumprod: Vec<f32>,
}

impl TrainSchedule {
    /// betas from the config, optionally rescaled to zero terminal SNR, then `cumprod(1 - betas)`.
    pub(crate) fn new(cfg: &SchedulerConfig, rescale_zero_snr: bool) -> Result<Self, String> {
        let n = cfg.num_train_timesteps.unwrap_or(1000);
        if n < 2 {
            return Err(format!("num_train_timesteps must be at least 2, got {n}"));
        }
        let mut betas = betas(cfg, n)?;
        if rescale_zero_snr {
            betas = rescale_zero_terminal_snr(&betas);
        }
        let alphas: Vec<f32> = betas.iter().map(|b| 1.0f32 - b).collect();
        Ok(TrainSchedule {
            num_train_timesteps: betas.len(),
            alphas_cumprod: cumprod(&alphas),
        })
    }

    /// `((1 - alphas_cumprod) / alphas_cumprod) ** 0.5` in float32.
    pub(crate) fn sigmas(&self) -> Vec<f32> {
        self.alphas_cumprod
            .iter()
            .map(|&a| ((1.0f32 - a) / a).sqrt())
            .collect()
    }

    /// `alphas_cumprod[t]`, checked.
    pub(crate) fn alpha_cumprod(&self, t: i64) -> candle_core::Result<f32> {
        usize::try_from(t)
            .ok()
            .and_then(|t| self.alphas_cumprod.get(t).copied())
            .ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "timestep {t} outside the {} training timesteps",
                    self.alphas_cumprod.len()
                ))
            })
    }
}

/// `torch.cumprod` of float32 on CPU: accumulates in double, stores float.
fn cumprod(alphas: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    alphas
        .iter()
        .map(|&a| {
            acc *= a as f64;
            acc as f32
        })
        .collect()
}

/// `torch.linspace(start, end, n, dtype=float32)`: float step, filled from both ends.
fn torch_linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let start = start as f32;
    let end = end as f32;
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((n - i - 1) as f32, end)
            }
        })
        .collect()
}

fn betas(cfg: &SchedulerConfig, n: usize) -> Result<Vec<f32>, String> {
    if let Some(trained) = &cfg.trained_betas {
        if trained.is_empty() {
            return Err("trained_betas is empty".into());
        }
        return Ok(trained.iter().map(|&b| b as f32).collect());
    }
    let start = cfg.beta_start.unwrap_or(0.0001);
    let end = cfg.beta_end.unwrap_or(0.02);
    match cfg.beta_schedule.as_deref().unwrap_or("linear") {
        "linear" => Ok(torch_linspace_f32(start, end, n)),
        "scaled_linear" => Ok(torch_linspace_f32(start.sqrt(), end.sqrt(), n)
            .into_iter()
            .map(|b| b * b)
            .collect()),
        "squaredcos_cap_v2" => {
            let alpha_bar = |t: f64| {
                ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
                    .cos()
                    .powi(2)
            };
            Ok((0..n)
                .map(|i| {
                    let t1 = i as f64 / n as f64;
                    let t2 = (i + 1) as f64 / n as f64;
                    (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
                })
                .collect())
        }
        other => Err(format!(
            "unsupported beta_schedule `{other}` (linear, scaled_linear or squaredcos_cap_v2)"
        )),
    }
}

/// diffusers' `rescale_zero_terminal_snr`, in float32.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0f32 - b).collect();
    let mut sqrt_bar: Vec<f32> = cumprod(&alphas).iter().map(|a| a.sqrt()).collect();
    let first = sqrt_bar[0];
    let last = sqrt_bar[sqrt_bar.len() - 1];
    let scale = first / (first - last);
    for v in sqrt_bar.iter_mut() {
        *v = (*v - last) * scale;
    }
    let bar: Vec<f32> = sqrt_bar.iter().map(|v| v * v).collect();
    let mut out = Vec::with_capacity(bar.len());
    out.push(1.0f32 - bar[0]);
    for w in bar.windows(2) {
        out.push(1.0f32 - w[1] / w[0]);
    }
    out
}

/// numpy's `np.round`: half to even.
pub(crate) fn np_round(x: f64) -> f64 {
    x.round_ties_even()
}

/// `np.linspace(start, stop, num)` in float64.
pub(crate) fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 0 {
        return Vec::new();
    }
    if num == 1 {
        return vec![start];
    }
    let div = (num - 1) as f64;
    let delta = stop - start;
    let step = delta / div;
    let mut y: Vec<f64> = (0..num)
        .map(|i| {
            if step == 0.0 {
                i as f64 / div * delta + start
            } else {
                i as f64 * step + start
            }
        })
        .collect();
    y[num - 1] = stop;
    y
}

/// `np.arange(start, stop, step)` in float64: numpy fills `start + i * delta` with
/// `delta = (start + step) - start`.
pub(crate) fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let delta = (start + step) - start;
    (0..len as usize)
        .map(|i| match i {
            0 => start,
            1 => start + step,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// `np.interp(x, arange(len(fp)), fp)` with `fp` float32 promoted to float64.
pub(crate) fn np_interp(x: &[f64], fp: &[f32]) -> Vec<f64> {
    let n = fp.len();
    x.iter()
        .map(|&xv| {
            if xv.is_nan() {
                return xv;
            }
            if xv <= 0.0 {
                return fp[0] as f64;
            }
            if xv >= (n - 1) as f64 {
                return fp[n - 1] as f64;
            }
            let j = xv.floor() as usize;
            if j as f64 == xv {
                return fp[j] as f64;
            }
            // xp spacing is 1, so the slope is the difference.
            let slope = fp[j + 1] as f64 - fp[j] as f64;
            slope * (xv - j as f64) + fp[j] as f64
        })
        .collect()
}

/// diffusers' `_sigma_to_t`: fractional training timestep of `sigma` by log-sigma interpolation.
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let n = log_sigmas.len();
    // np.cumsum(dists >= 0).argmax(): the first index where the count of non-negative
    // distances reaches its maximum.
    let mut count = 0usize;
    let mut best = 0usize;
    let mut best_idx = 0usize;
    for (i, &ls) in log_sigmas.iter().enumerate() {
        if log_sigma - ls as f64 >= 0.0 {
            count += 1;
        }
        if count > best {
            best = count;
            best_idx = i;
        }
    }
    let low_idx = best_idx.min(n - 2);
    let high_idx = low_idx + 1;
    let low = log_sigmas[low_idx];
    let high = log_sigmas[high_idx];
    let w = ((low as f64 - log_sigma) / (low - high) as f64).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// `np.log` of float32 sigmas (float32 result).
pub(crate) fn log_f32(v: &[f32]) -> Vec<f32> {
    v.iter().map(|x| x.ln()).collect()
}

/// diffusers' `_convert_to_karras` (rho = 7) in float64.
pub(crate) fn karras(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0f64;
    let min_inv = sigma_min.powf(1.0 / rho);
    let max_inv = sigma_max.powf(1.0 / rho);
    np_linspace(0.0, 1.0, n)
        .into_iter()
        .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
        .collect()
}

/// Rejects sigma-schedule options sd-run does not implement.
pub(crate) fn reject_unsupported_sigmas(cfg: &SchedulerConfig) -> Result<(), String> {
    for (flag, name) in [
        (cfg.use_exponential_sigmas, "use_exponential_sigmas"),
        (cfg.use_beta_sigmas, "use_beta_sigmas"),
        (cfg.use_lu_lambdas, "use_lu_lambdas"),
        (cfg.use_flow_sigmas, "use_flow_sigmas"),
    ] {
        if flag == Some(true) {
            return Err(format!("`{name}: true` is not supported"));
        }
    }
    Ok(())
}

/// `final_sigmas_type`: true for "zero", false for "sigma_min".
pub(crate) fn final_sigma_zero(cfg: &SchedulerConfig) -> Result<bool, String> {
    match cfg.final_sigmas_type.as_deref().unwrap_or("zero") {
        "zero" => Ok(true),
        "sigma_min" => Ok(false),
        other => Err(format!(
            "unsupported final_sigmas_type `{other}` (zero or sigma_min)"
        )),
    }
}

/// Settings of diffusers' dynamic thresholding.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Threshold {
    pub ratio: f64,
    pub max_value: f64,
}

impl Threshold {
    pub(crate) fn from_config(cfg: &SchedulerConfig) -> Option<Self> {
        (cfg.thresholding == Some(true)).then(|| Threshold {
            ratio: cfg.dynamic_thresholding_ratio.unwrap_or(0.995),
            max_value: cfg.sample_max_value.unwrap_or(1.0),
        })
    }

    /// diffusers' `_threshold_sample`: per image, `s = clamp(quantile(|x|, ratio), 1, max)`,
    /// then `clamp(x, -s, s) / s`.
    pub(crate) fn apply(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims().to_vec();
        let b = dims.first().copied().unwrap_or(1);
        let flat = x.to_dtype(DType::F32)?.reshape((b, ()))?;
        let rows = flat.to_vec2::<f32>()?;
        let ratio = self.ratio as f32;
        let mut out = Vec::with_capacity(rows.len() * rows.first().map_or(0, |r| r.len()));
        for row in rows {
            if row.is_empty() {
                continue;
            }
            let mut abs: Vec<f32> = row.iter().map(|v| v.abs()).collect();
            abs.sort_by(|a, b| a.total_cmp(b));
            let rank = ratio * (abs.len().saturating_sub(1)) as f32;
            let below = rank as usize;
            let above = (rank.ceil() as usize).min(abs.len() - 1);
            let weight = rank - below as f32;
            let (lo, hi) = (abs[below], abs[above]);
            let q = if weight < 0.5 {
                lo + weight * (hi - lo)
            } else {
                hi - (hi - lo) * (1.0 - weight)
            };
            let s = q.max(1.0).min(self.max_value as f32);
            out.extend(row.iter().map(|v| v.clamp(-s, s) / s));
        }
        Tensor::from_vec(out, dims, x.device())
    }
}

/// `t * s` with a float32 scalar (t is float32).
pub(crate) fn mul_s(t: &Tensor, s: f32) -> candle_core::Result<Tensor> {
    t.broadcast_mul(&Tensor::new(s, t.device())?)
}

/// `t / s` with a float32 scalar (true division, as torch does).
pub(crate) fn div_s(t: &Tensor, s: f32) -> candle_core::Result<Tensor> {
    t.broadcast_div(&Tensor::new(s, t.device())?)
}

/// A float32 copy of a tensor.
pub(crate) fn f32t(t: &Tensor) -> candle_core::Result<Tensor> {
    t.to_dtype(DType::F32)
}

/// diffusers' `_sigma_to_alpha_sigma_t` in float32: `alpha = 1 / sqrt(sigma² + 1)`.
pub(crate) fn alpha_sigma_t(sigma: f32) -> (f32, f32) {
    let alpha = 1.0f32 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// `log(alpha) - log(sigma)` in float32.
pub(crate) fn lambda(alpha: f32, sigma: f32) -> f32 {
    alpha.ln() - sigma.ln()
}

/// Checks a step index against the schedule length.
pub(crate) fn check_index(i: usize, len: usize) -> candle_core::Result<()> {
    if i >= len {
        return Err(candle_core::Error::Msg(format!(
            "step index {i} out of range for {len} timesteps"
        )));
    }
    Ok(())
}
