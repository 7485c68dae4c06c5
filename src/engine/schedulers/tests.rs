//! Scheduler tests: timesteps, sigmas and `init_noise_sigma` against diffusers' golden values for
//! every scheduler name and 1, 4, 25, 50 steps; step functions on synthetic model outputs.

use super::common::{alpha_sigma_t, np_linspace, sigma_to_t};
use super::*;
use candle_core::{Device, Tensor};
use std::collections::HashMap;

fn fixture_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden")
}

fn model_config(model: &str) -> SchedulerConfig {
    load_config(&fixture_dir().join("models").join(model).join("scheduler")).expect("config")
}

fn golden_f64(file: &str) -> HashMap<String, Vec<f64>> {
    let bytes = std::fs::read(fixture_dir().join("cases").join(file)).expect("fixture");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    st.tensors()
        .into_iter()
        .filter(|(_, t)| t.dtype() == safetensors::Dtype::F64)
        .map(|(name, t)| {
            let v = t
                .data()
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")))
                .collect();
            (name, v)
        })
        .collect()
}

fn assert_close(got: &[f64], want: &[f64], rel: f64, what: &str) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: length {got:?} vs {want:?}");
    let mut worst = 0f64;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs() / w.abs().max(1e-12);
        let err = if *w == 0.0 { g.abs() } else { err };
        worst = worst.max(err);
        assert!(
            err <= rel,
            "{what}[{i}]: got {g}, want {w} (rel err {err:e})"
        );
    }
    worst
}

fn check_components(model: &str, file: &str, default_as: &str) {
    let cfg = model_config(model);
    let golden = golden_f64(file);
    let (mut worst_sigma, mut worst_init, mut worst_ts) = (0f64, 0f64, 0f64);
    for name in SchedulerName::ALL {
        let key_name = if name == SchedulerName::Default {
            default_as
        } else {
            name.as_str()
        };
        for n in [1usize, 4, 25, 50] {
            let s = build(name, &cfg, n).unwrap_or_else(|e| panic!("{model} {name:?}: {e}"));
            let what = format!("{model} {} {n}", name.as_str());
            let ts = &golden[&format!("{key_name}_{n}_timesteps")];
            let ins = golden[&format!("{key_name}_{n}_init_noise_sigma")][0];
            worst_init = worst_init.max(assert_close(
                &[s.init_noise_sigma()],
                &[ins],
                1e-6,
                &format!("{what} init"),
            ));
            worst_ts = worst_ts.max(assert_close(
                s.timesteps(),
                ts,
                1e-6,
                &format!("{what} timesteps"),
            ));
            if let Some(want) = golden.get(&format!("{key_name}_{n}_sigmas")) {
                let got = s.sigmas().expect("sigma scheduler exposes sigmas");
                worst_sigma =
                    worst_sigma.max(assert_close(got, want, 1e-6, &format!("{what} sigmas")));
            } else {
                assert!(s.sigmas().is_none(), "{what}: unexpected sigmas");
            }
            assert_eq!(s.num_train_timesteps(), 1000);
        }
    }
    eprintln!(
        "{model}: worst relative error: sigmas {worst_sigma:e}, init_noise_sigma \
         {worst_init:e}, timesteps {worst_ts:e}"
    );
}

#[test]
fn golden_schedules_tiny_sd15() {
    check_components("tiny-sd15", "components_tiny-sd15.safetensors", "ddim");
}

#[test]
fn golden_schedules_tiny_sdxl_base() {
    check_components(
        "tiny-sdxl-base",
        "components_tiny-sdxl-base.safetensors",
        "euler",
    );
}

/// Noise source for tests: a fixed value, counting the draws.
struct ConstNoise {
    value: f32,
    draws: usize,
}

impl NoiseFn for ConstNoise {
    fn randn_like(&mut self, like: &Tensor) -> candle_core::Result<Tensor> {
        self.draws += 1;
        Tensor::full(self.value, like.dims(), like.device())
    }
}

fn t(v: &[f32]) -> Tensor {
    Tensor::from_vec(v.to_vec(), (1, v.len()), &Device::Cpu).expect("tensor")
}

fn vals(x: &Tensor) -> Vec<f32> {
    x.flatten_all().and_then(|x| x.to_vec1()).expect("values")
}

fn cfg_json(json: &str) -> SchedulerConfig {
    SchedulerConfig::from_json(json).expect("config json")
}

fn sd_config(extra: &str) -> SchedulerConfig {
    cfg_json(&format!(
        r#"{{"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear",
            "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": false,
            "set_alpha_to_one": false, "steps_offset": 1{extra}}}"#
    ))
}

fn alphas_cumprod_sd() -> Vec<f32> {
    super::common::TrainSchedule::new(&sd_config(""), false)
        .expect("schedule")
        .alphas_cumprod
}

#[test]
fn ddim_eps_zero_rescales_by_alphas() {
    let cfg = sd_config("");
    let mut s = build(SchedulerName::Ddim, &cfg, 4).expect("ddim");
    assert_eq!(s.timesteps(), &[751.0, 501.0, 251.0, 1.0]);
    let ac = alphas_cumprod_sd();
    let x = t(&[1.0, -2.0, 0.5]);
    let zero = t(&[0.0, 0.0, 0.0]);
    let mut noise = ConstNoise {
        value: 0.0,
        draws: 0,
    };
    let out = vals(&s.step(&zero, 0, &x, &mut noise).expect("step"));
    // eps = 0: x0 = x / sqrt(a_t), prev = sqrt(a_prev) * x0.
    let (a, ap) = (ac[751], ac[501]);
    for (o, xi) in out.iter().zip([1.0f32, -2.0, 0.5]) {
        let want = ap.sqrt() * (xi / a.sqrt());
        assert!((o - want).abs() <= 1e-6 * want.abs(), "{o} vs {want}");
    }
    // Last step: prev timestep < 0 uses final_alpha_cumprod = alphas_cumprod[0].
    let out = vals(&s.step(&zero, 3, &x, &mut noise).expect("step"));
    let want = ac[0].sqrt() * (1.0 / ac[1].sqrt());
    assert!((out[0] - want).abs() < 1e-6);
    assert_eq!(noise.draws, 0);
}

#[test]
fn ddim_prediction_types_agree() {
    // The same x0 expressed as epsilon, v and sample gives the same DDIM step.
    let ac = alphas_cumprod_sd();
    let (a, b) = (ac[751].sqrt(), (1.0 - ac[751]).sqrt());
    let x0 = [0.3f32, -0.7];
    let eps = [1.1f32, 0.4];
    let x: Vec<f32> = (0..2).map(|k| a * x0[k] + b * eps[k]).collect();
    let v: Vec<f32> = (0..2).map(|k| a * eps[k] - b * x0[k]).collect();
    let mut outs = Vec::new();
    for (pt, mo) in [
        ("epsilon", eps.to_vec()),
        ("v_prediction", v),
        ("sample", x0.to_vec()),
    ] {
        let cfg = sd_config(&format!(r#", "prediction_type": "{pt}""#));
        let mut s = build(SchedulerName::Ddim, &cfg, 4).expect("ddim");
        let mut noise = ConstNoise {
            value: 0.0,
            draws: 0,
        };
        outs.push(vals(&s.step(&t(&mo), 0, &t(&x), &mut noise).expect("step")));
    }
    for o in &outs[1..] {
        for (p, q) in o.iter().zip(&outs[0]) {
            assert!((p - q).abs() < 1e-5, "{o:?} vs {:?}", outs[0]);
        }
    }
}

#[test]
fn ddim_clips_predicted_x0_by_default() {
    // DDIM's own default clip_sample = True applies when the config does not say otherwise.
    let cfg =
        cfg_json(r#"{"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}"#);
    let mut s = build(SchedulerName::Ddim, &cfg, 2).expect("ddim");
    let mut noise = ConstNoise {
        value: 0.0,
        draws: 0,
    };
    let out = vals(
        &s.step(&t(&[100.0]), 0, &t(&[0.0]), &mut noise)
            .expect("step"),
    );
    // x0 = -sqrt(b)/sqrt(a) * 100 is clipped to -1; eps stays 100.
    let ac = super::common::TrainSchedule::new(&cfg, false)
        .expect("s")
        .alphas_cumprod;
    let (tt, tp) = (s.timesteps()[0] as usize, s.timesteps()[1] as usize);
    assert_eq!((tt, tp), (500, 0));
    let want = -ac[tp].sqrt() + (1.0 - ac[tp]).sqrt() * 100.0;
    assert!((out[0] - want).abs() < 1e-4, "{} vs {want}", out[0]);
}

#[test]
fn euler_step_is_x_plus_dt_times_eps() {
    let cfg = model_config("tiny-sdxl-base");
    let mut s = build(SchedulerName::Euler, &cfg, 4).expect("euler");
    let sig: Vec<f64> = s.sigmas().expect("sigmas").to_vec();
    let x = t(&[0.5, -1.5]);
    let eps = t(&[0.25, 2.0]);
    let scaled = vals(&s.scale_model_input(&x, 1).expect("scale"));
    let c = (sig[1] * sig[1] + 1.0).sqrt();
    assert!((scaled[0] as f64 - 0.5 / c).abs() < 1e-6);
    let mut noise = ConstNoise {
        value: 0.0,
        draws: 0,
    };
    let out = vals(&s.step(&eps, 1, &x, &mut noise).expect("step"));
    for (k, (xi, ei)) in [(0.5f64, 0.25f64), (-1.5, 2.0)].into_iter().enumerate() {
        let want = xi + (sig[2] - sig[1]) * ei;
        assert!((out[k] as f64 - want).abs() < 1e-5, "{} vs {want}", out[k]);
    }
    assert_eq!(noise.draws, 0);
}

#[test]
fn euler_v_prediction_conversion() {
    let cfg = cfg_json(
        r#"{"_class_name": "EulerDiscreteScheduler", "beta_schedule": "scaled_linear",
            "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "v_prediction",
            "timestep_spacing": "trailing"}"#,
    );
    let mut s = build(SchedulerName::Default, &cfg, 3).expect("euler v");
    // trailing: 999, 666, 332; init sigma = max sigma.
    assert_eq!(s.timesteps(), &[999.0, 666.0, 332.0]);
    let sig = s.sigmas().expect("sigmas").to_vec();
    assert_eq!(s.init_noise_sigma(), sig[0]);
    let sigma = sig[0];
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    // Build x (in sigma units) from x0 and eps; v = alpha*eps - sigma_t*x0 with the VP scaling.
    let (x0, eps) = (0.4f64, -0.9f64);
    let x = x0 + sigma * eps;
    let v = alpha * eps - (sigma * alpha) * x0;
    let mut noise = ConstNoise {
        value: 0.0,
        draws: 0,
    };
    let out = vals(
        &s.step(&t(&[v as f32]), 0, &t(&[x as f32]), &mut noise)
            .expect("step"),
    );
    let want = x + (sig[1] - sigma) * eps;
    assert!(
        (out[0] as f64 - want).abs() < 1e-4 * want.abs().max(1.0),
        "{} vs {want}",
        out[0]
    );
}

#[test]
fn euler_ancestral_draws_noise_every_step() {
    let cfg = model_config("tiny-sd15");
    let mut s = build(SchedulerName::EulerA, &cfg, 3).expect("euler a");
    let sig = s.sigmas().expect("sigmas").to_vec();
    let x = t(&[1.0]);
    let eps = t(&[0.5]);
    let mut noise = ConstNoise {
        value: 2.0,
        draws: 0,
    };
    let out = vals(&s.step(&eps, 0, &x, &mut noise).expect("step"))[0] as f64;
    let (from, to) = (sig[0], sig[1]);
    let up = (to * to * (from * from - to * to) / (from * from)).sqrt();
    let down = (to * to - up * up).sqrt();
    let want = 1.0 + (down - from) * 0.5 + 2.0 * up;
    assert!((out - want).abs() < 1e-5, "{out} vs {want}");
    for i in 1..3 {
        s.step(&eps, i, &x, &mut noise).expect("step");
    }
    assert_eq!(noise.draws, 3);
}

/// Runs all steps with a model that predicts a constant x0 (`sample` prediction).
fn run_constant_x0(name: SchedulerName, extra: &str, steps: usize, start: usize) -> Vec<f32> {
    let cfg = sd_config(&format!(r#", "prediction_type": "sample"{extra}"#));
    let mut s = build(name, &cfg, steps).expect("build");
    let x0 = t(&[0.75, -0.25]);
    let mut x = t(&[3.0, 1.0]);
    let mut noise = ConstNoise {
        value: 0.0,
        draws: 0,
    };
    for i in start..s.timesteps().len() {
        x = s.step(&x0, i, &x, &mut noise).expect("step");
    }
    vals(&x)
}

#[test]
fn multistep_solvers_land_on_constant_x0() {
    for name in [
        SchedulerName::DpmPp2m,
        SchedulerName::DpmPp2mKarras,
        SchedulerName::Unipc,
        SchedulerName::Euler,
    ] {
        for steps in [1, 2, 5, 8] {
            let out = run_constant_x0(name, "", steps, 0);
            assert!(
                (out[0] - 0.75).abs() < 1e-5 && (out[1] + 0.25).abs() < 1e-5,
                "{name:?} {steps}: {out:?}"
            );
        }
    }
    // Third order and a refiner-style start in the middle.
    let out = run_constant_x0(SchedulerName::DpmPp2m, r#", "solver_order": 3"#, 9, 0);
    assert!((out[0] - 0.75).abs() < 1e-5, "{out:?}");
    let out = run_constant_x0(SchedulerName::Unipc, r#", "solver_order": 3"#, 9, 0);
    assert!((out[0] - 0.75).abs() < 1e-5, "{out:?}");
    let out = run_constant_x0(SchedulerName::Unipc, "", 10, 4);
    assert!((out[0] - 0.75).abs() < 1e-5, "{out:?}");
}

#[test]
fn dpm_first_step_is_first_order_even_mid_schedule() {
    // A fresh scheduler whose first step is i > 0 (SDXL refiner) takes a first-order step.
    let cfg = sd_config("");
    let mut s = build(SchedulerName::DpmPp2m, &cfg, 10).expect("dpm");
    let sig = s.sigmas().expect("sigmas").to_vec();
    let x = t(&[1.2]);
    let eps = t(&[0.3]);
    let mut noise = ConstNoise {
        value: 0.0,
        draws: 0,
    };
    let out = vals(&s.step(&eps, 3, &x, &mut noise).expect("step"))[0] as f64;
    let (a_s, s_s) = {
        let (a, s) = alpha_sigma_t(sig[3] as f32);
        (a as f64, s as f64)
    };
    let (a_t, s_t) = {
        let (a, s) = alpha_sigma_t(sig[4] as f32);
        (a as f64, s as f64)
    };
    let x0 = (1.2 - s_s * 0.3) / a_s;
    let h = (a_t.ln() - s_t.ln()) - (a_s.ln() - s_s.ln());
    let want = (s_t / s_s) * 1.2 - a_t * ((-h).exp() - 1.0) * x0;
    assert!((out - want).abs() < 1e-5, "{out} vs {want}");
}

#[test]
fn dpm_second_order_uses_history() {
    let cfg = sd_config("");
    let run = |second_eps: f32| {
        let mut s = build(SchedulerName::DpmPp2m, &cfg, 6).expect("dpm");
        let mut noise = ConstNoise {
            value: 0.0,
            draws: 0,
        };
        let x = s.step(&t(&[0.5]), 0, &t(&[2.0]), &mut noise).expect("step");
        vals(&s.step(&t(&[second_eps]), 1, &x, &mut noise).expect("step"))[0]
    };
    // Same current output, different history: a second-order step differs from first order.
    let mut fresh = build(SchedulerName::DpmPp2m, &cfg, 6).expect("dpm");
    let mut noise = ConstNoise {
        value: 0.0,
        draws: 0,
    };
    let mut s2 = build(SchedulerName::DpmPp2m, &cfg, 6).expect("dpm");
    let x = s2
        .step(&t(&[0.5]), 0, &t(&[2.0]), &mut noise)
        .expect("step");
    let first_order = vals(&fresh.step(&t(&[0.9]), 1, &x, &mut noise).expect("step"))[0];
    let second = run(0.9);
    assert!(
        (first_order - second).abs() > 1e-4,
        "{first_order} vs {second}"
    );
    // With a constant epsilon the trajectory is exact, so the history adds nothing.
    let fresh_same = {
        let mut f = build(SchedulerName::DpmPp2m, &cfg, 6).expect("dpm");
        vals(&f.step(&t(&[0.5]), 1, &x, &mut noise).expect("step"))[0]
    };
    assert!((fresh_same - run(0.5)).abs() < 1e-5);
}

#[test]
fn pndm_constant_eps_matches_closed_form() {
    let cfg = sd_config("");
    let mut s = build(SchedulerName::Pndm, &cfg, 4).expect("pndm");
    assert_eq!(s.timesteps(), &[751.0, 501.0, 501.0, 251.0, 1.0]);
    let ac = alphas_cumprod_sd();
    let eps = 0.2f64;
    let mut x = t(&[1.0]);
    let mut want = 1.0f64;
    let mut noise = ConstNoise {
        value: 0.0,
        draws: 0,
    };
    // With a constant epsilon every PLMS combination equals epsilon; the effective
    // (t, prev) pairs are (751,501), (751,501) from the stored sample, (501,251), (251,1), (1,0->a0).
    let pairs = [
        (751usize, 501usize),
        (751, 501),
        (501, 251),
        (251, 1),
        (1, usize::MAX),
    ];
    let mut sample_at_751 = 1.0f64;
    for (i, (tt, tp)) in pairs.into_iter().enumerate() {
        let a_t = ac[tt] as f64;
        let a_p = if tp == usize::MAX {
            ac[0] as f64
        } else {
            ac[tp] as f64
        };
        let base = if i == 1 { sample_at_751 } else { want };
        if i == 0 {
            sample_at_751 = base;
        }
        let denom = a_t * (1.0 - a_p).sqrt() + (a_t * (1.0 - a_t) * a_p).sqrt();
        want = (a_p / a_t).sqrt() * base - (a_p - a_t) * eps / denom;
        x = s.step(&t(&[eps as f32]), i, &x, &mut noise).expect("step");
        let got = vals(&x)[0] as f64;
        assert!(
            (got - want).abs() < 1e-5 * want.abs().max(1.0),
            "step {i}: {got} vs {want}"
        );
    }
}

#[test]
fn pndm_with_runge_kutta_warmup() {
    // `default` of a PNDM config without skip_prk_steps runs PRK then PLMS, as diffusers does.
    let cfg = cfg_json(
        r#"{"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear",
            "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1}"#,
    );
    let mut s = build(SchedulerName::Default, &cfg, 5).expect("pndm prk");
    // _timesteps = [1, 201, 401, 601, 801]; PRK on the last 4 with half steps of 100, then
    // PLMS on [201, 1] (numpy: `_timesteps[:-3][::-1]`).
    let want = [
        801.0, 701.0, 701.0, 601.0, 601.0, 501.0, 501.0, 401.0, 401.0, 301.0, 301.0, 201.0, 201.0,
        1.0,
    ];
    assert_eq!(s.timesteps(), &want);
    assert!(build(SchedulerName::Default, &cfg, 3).is_err());
    // `pndm` forces PLMS on the same config.
    let plms = build(SchedulerName::Pndm, &cfg, 5).expect("plms");
    assert_eq!(plms.timesteps().len(), 6);
    // With epsilon = 0 every step rescales the sample: RK4 combinations of zeros stay zero and
    // the result is sqrt(ac[last prev] / ac[first t]) after chaining the PRK sub-steps.
    let ac = alphas_cumprod_sd();
    let zero = t(&[0.0]);
    let mut x = t(&[1.0]);
    let mut noise = ConstNoise {
        value: 0.0,
        draws: 0,
    };
    for i in 0..want.len() {
        x = s.step(&zero, i, &x, &mut noise).expect("step");
    }
    // Sample after the RK block of (801 -> 601) is sqrt(ac[601]/ac[801]); the chain telescopes
    // down to the final alpha (alphas_cumprod[0], set_alpha_to_one = false).
    let want_final = (ac[0] as f64 / ac[801] as f64).sqrt();
    let got = vals(&x)[0] as f64;
    assert!((got - want_final).abs() < 1e-5, "{got} vs {want_final}");
}

#[test]
fn add_noise_levels() {
    let cfg = sd_config("");
    let x0 = t(&[1.0]);
    let n = t(&[0.5]);
    let ac = alphas_cumprod_sd();
    let ddim = build(SchedulerName::Ddim, &cfg, 4).expect("ddim");
    let got = vals(&ddim.add_noise(&x0, &n, 1).expect("noise"))[0];
    let want = ac[501].sqrt() + (1.0 - ac[501]).sqrt() * 0.5;
    assert!((got - want).abs() < 1e-6);
    let euler = build(SchedulerName::Euler, &cfg, 4).expect("euler");
    let sig = euler.sigmas().expect("sigmas")[2];
    let got = vals(&euler.add_noise(&x0, &n, 2).expect("noise"))[0] as f64;
    assert!((got - (1.0 + 0.5 * sig)).abs() < 1e-5);
    let dpm = build(SchedulerName::DpmPp2m, &cfg, 4).expect("dpm");
    let (a, s) = alpha_sigma_t(dpm.sigmas().expect("sigmas")[0] as f32);
    let got = vals(&dpm.add_noise(&x0, &n, 0).expect("noise"))[0];
    assert!((got - (a + 0.5 * s)).abs() < 1e-6);
}

#[test]
fn turbo_trailing_few_steps() {
    let cfg = cfg_json(
        r#"{"_class_name": "EulerAncestralDiscreteScheduler", "beta_schedule": "scaled_linear",
            "beta_start": 0.00085, "beta_end": 0.012, "timestep_spacing": "trailing",
            "steps_offset": 1}"#,
    );
    for (steps, want) in [
        (1usize, vec![999.0]),
        (2, vec![999.0, 499.0]),
        (4, vec![999.0, 749.0, 499.0, 249.0]),
    ] {
        for name in [
            SchedulerName::Default,
            SchedulerName::Euler,
            SchedulerName::Ddim,
        ] {
            let s = build(name, &cfg, steps).expect("build");
            assert_eq!(s.timesteps(), &want[..], "{name:?} {steps}");
        }
    }
    let s = build(SchedulerName::Default, &cfg, 1).expect("build");
    assert_eq!(s.init_noise_sigma(), s.sigmas().expect("sigmas")[0]);
}

#[test]
fn spacings_match_numpy() {
    // Expected values computed with numpy exactly as diffusers' set_timesteps does.
    let with = |spacing: &str| {
        cfg_json(&format!(
            r#"{{"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                "timestep_spacing": "{spacing}"}}"#
        ))
    };
    let ts = |name, spacing: &str, n| {
        build(name, &with(spacing), n)
            .expect("build")
            .timesteps()
            .to_vec()
    };
    assert_eq!(
        ts(SchedulerName::Ddim, "trailing", 7),
        [999.0, 856.0, 713.0, 570.0, 428.0, 285.0, 142.0]
    );
    assert_eq!(
        ts(SchedulerName::Ddim, "linspace", 7),
        [999.0, 832.0, 666.0, 500.0, 333.0, 166.0, 0.0]
    );
    assert_eq!(
        ts(SchedulerName::DpmPp2m, "linspace", 7),
        [999.0, 856.0, 714.0, 571.0, 428.0, 285.0, 143.0]
    );
    assert_eq!(
        ts(SchedulerName::Unipc, "trailing", 13),
        [
            999.0, 922.0, 845.0, 768.0, 691.0, 614.0, 537.0, 461.0, 384.0, 307.0, 230.0, 153.0,
            76.0
        ]
    );
    assert_eq!(
        ts(SchedulerName::Euler, "linspace", 13),
        [
            999.0, 915.75, 832.5, 749.25, 666.0, 582.75, 499.5, 416.25, 333.0, 249.75, 166.5,
            83.25, 0.0
        ]
    );
    assert_eq!(
        ts(SchedulerName::Pndm, "linspace", 7),
        [999.0, 832.0, 832.0, 666.0, 500.0, 333.0, 166.0, 0.0]
    );
}

#[test]
fn config_parsing_and_errors() {
    let cfg = cfg_json(
        r#"{"_class_name": "DPMSolverMultistepScheduler", "lambda_min_clipped": -Infinity,
            "unknown_key": [1, 2], "note": "Infinity inside a string", "solver_order": 2}"#,
    );
    assert_eq!(cfg.lambda_min_clipped, None);
    assert_eq!(cfg.solver_order, Some(2));
    assert!(build(SchedulerName::Default, &cfg, 5).is_ok());
    let bad = cfg_json(r#"{"_class_name": "LMSDiscreteScheduler"}"#);
    let err = build(SchedulerName::Default, &bad, 5)
        .err()
        .expect("error")
        .to_string();
    assert!(err.contains("LMSDiscreteScheduler"), "{err}");
    // Other names still work from that config.
    assert!(build(SchedulerName::Euler, &bad, 5).is_ok());
    let bad = cfg_json(r#"{"beta_schedule": "cubic"}"#);
    let err = build(SchedulerName::Ddim, &bad, 5)
        .err()
        .expect("error")
        .to_string();
    assert!(err.contains("cubic"), "{err}");
    assert!(build(SchedulerName::Ddim, &SchedulerConfig::default(), 0).is_err());
    let missing = load_config(std::path::Path::new("/nonexistent/scheduler"));
    assert!(missing.is_err());
}

#[test]
fn dynamic_thresholding_per_image() {
    let th = super::common::Threshold {
        ratio: 0.5,
        max_value: 10.0,
    };
    let x = Tensor::from_vec(
        vec![
            0f32, -1., 2., 3., 4., -5., 6., 7., 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, -9.,
        ],
        (2, 2, 2, 2),
        &Device::Cpu,
    )
    .expect("tensor");
    let out = vals(&th.apply(&x).expect("threshold"));
    // Image 0: quantile(|x|, 0.5) = 3.5; image 1: 0.5 clamped up to 1.
    assert!((out[7] - 1.0).abs() < 1e-6 && (out[5] + 1.0).abs() < 1e-6);
    assert!((out[3] - 3.0 / 3.5).abs() < 1e-6);
    assert!((out[2] - 2.0 / 3.5).abs() < 1e-6);
    assert_eq!(out[8], 0.5);
    assert_eq!(out[15], -1.0);
}

#[test]
fn numpy_helpers() {
    assert_eq!(np_linspace(0.0, 999.0, 4), vec![0.0, 333.0, 666.0, 999.0]);
    assert_eq!(np_linspace(2.0, 5.0, 1), vec![2.0]);
    // A sigma exactly on the table maps to its index.
    let ls: Vec<f32> = [0.1f32, 0.5, 1.0, 3.0].iter().map(|v| v.ln()).collect();
    assert!((sigma_to_t(1.0, &ls) - 2.0).abs() < 1e-6);
    assert!((sigma_to_t(100.0, &ls) - 3.0).abs() < 1e-12);
    assert!((sigma_to_t(1e-3, &ls)).abs() < 1e-12);
}
