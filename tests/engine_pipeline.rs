//! The whole pipeline against diffusers' golden cases (tests/fixtures/golden): initial noise,
//! final latents per scheduler, decoded images; the SDXL base + refiner handoff.

mod common;
use common::diff;

use candle_core::{DType, Device, Tensor};
use sd_run::engine::pipeline::{GenerateRequest, LoadOptions, Pipeline, StartFrom};
use sd_run::spec::{MemoryPolicy, NoiseSource, SchedulerName, SdxlConditioning};
use std::collections::HashMap;
use std::path::PathBuf;

fn golden() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden")
}

fn load_case(file: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(golden().join(file), &Device::Cpu).unwrap()
}

fn opts() -> LoadOptions {
    LoadOptions {
        device: Device::Cpu,
        dtype: DType::F32,
        memory: MemoryPolicy::default(),
    }
}

fn assert_rel(name: &str, a: &Tensor, b: &Tensor, tol: f32) {
    let (d, m) = diff(a, b);
    eprintln!("{name}: max abs diff {d:.3e} (reference max {m:.3})");
    assert!(d <= tol * m.max(1e-6), "{name}: {d} > {tol} x {m}");
}

fn assert_abs(name: &str, a: &Tensor, b: &Tensor, tol: f32) {
    let (d, _) = diff(a, b);
    eprintln!("{name}: max abs diff {d:.3e}");
    assert!(d <= tol, "{name}: {d} > {tol}");
}

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    prompt: String,
    #[serde(default)]
    negative_prompt: String,
    #[serde(default)]
    scheduler: String,
    #[serde(default)]
    steps: usize,
    #[serde(default)]
    guidance: f64,
    #[serde(default)]
    seed: u64,
    #[serde(default)]
    batch: usize,
    #[serde(default)]
    height: usize,
    #[serde(default)]
    width: usize,
    #[serde(default)]
    model: String,
    file: String,
}

/// A text-to-image request with a golden case's settings and the given seeds.
fn case_request(case: &Case, seeds: Vec<u64>) -> GenerateRequest {
    GenerateRequest {
        seeds,
        steps: case.steps,
        guidance: case.guidance,
        scheduler: SchedulerName::parse(&case.scheduler).unwrap(),
        width: case.width,
        height: case.height,
        noise: NoiseSource::TorchCpu,
        sdxl: SdxlConditioning::default(),
        denoising_end: None,
        start: None,
    }
}

fn cases() -> Vec<Case> {
    #[derive(serde::Deserialize)]
    struct Index {
        cases: Vec<Case>,
    }
    let text = std::fs::read_to_string(golden().join("index.json")).unwrap();
    serde_json::from_str::<Index>(&text).unwrap().cases
}

#[test]
fn every_text_to_image_case_matches_diffusers() {
    let mut pipelines: HashMap<String, Pipeline> = HashMap::new();
    let mut ran = 0;
    for case in cases().into_iter().filter(|c| c.kind.is_none()) {
        let pipe = pipelines.entry(case.model.clone()).or_insert_with(|| {
            Pipeline::load(&golden().join("models").join(&case.model), &opts()).unwrap()
        });
        let g = load_case(&case.file);
        let cond = pipe
            .encode_prompt(&case.prompt, &case.negative_prompt)
            .unwrap();
        assert_rel(
            &format!("{} prompt_embeds", case.name),
            &cond.prompt,
            &g["prompt_embeds"],
            1e-4,
        );
        if case.guidance > 1.0 {
            assert_rel(
                &format!("{} negative_prompt_embeds", case.name),
                &cond.negative,
                &g["negative_prompt_embeds"],
                1e-4,
            );
        }
        let req = case_request(
            &case,
            (0..case.batch as u64).map(|i| case.seed + i).collect(),
        );
        let latents = pipe.generate(&req, &cond).unwrap();
        assert_rel(
            &format!("{} final_latents", case.name),
            &latents,
            &g["final_latents"],
            1e-4,
        );
        let image = pipe.decode(&latents).unwrap();
        assert_abs(&format!("{} image", case.name), &image, &g["image"], 2e-3);
        // 8-bit pixels within one level of round(image * 255).
        let ours = sd_run::output::pixels::to_rgb8(
            &image.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        let theirs = sd_run::output::pixels::to_rgb8(
            &g["image"].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        let worst = ours
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (*a as i32 - *b as i32).abs())
            .max()
            .unwrap();
        assert!(worst <= 1, "{}: 8-bit pixels differ by {worst}", case.name);
        ran += 1;
    }
    assert!(ran >= 9, "ran {ran} cases");
}

#[test]
fn a_batch_of_seeds_gives_the_same_pixels_as_one_at_a_time() {
    let pipe = Pipeline::load(&golden().join("models/tiny-sd15"), &opts()).unwrap();
    let cond = pipe.encode_prompt("a knight in shining armor", "").unwrap();
    let req = |seeds: Vec<u64>| GenerateRequest {
        seeds,
        steps: 4,
        guidance: 7.5,
        scheduler: SchedulerName::EulerA,
        width: 64,
        height: 64,
        noise: NoiseSource::TorchCpu,
        sdxl: SdxlConditioning::default(),
        denoising_end: None,
        start: None,
    };
    let both = pipe.generate(&req(vec![10, 11]), &cond).unwrap();
    let one = pipe.generate(&req(vec![11]), &cond).unwrap();
    assert_rel(
        "batch vs single",
        &both.narrow(0, 1, 1).unwrap(),
        &one,
        1e-5,
    );
}

#[test]
fn sdxl_base_and_refiner_match_diffusers() {
    let case = cases()
        .into_iter()
        .find(|c| c.name == "sdxl_refiner")
        .unwrap();
    let g = load_case(&case.file);
    let base = Pipeline::load(&golden().join("models/tiny-sdxl-base"), &opts()).unwrap();
    let refiner = Pipeline::load(&golden().join("models/tiny-sdxl-refiner"), &opts()).unwrap();
    let cond = base
        .encode_prompt(&case.prompt, &case.negative_prompt)
        .unwrap();
    assert_rel("prompt_embeds", &cond.prompt, &g["prompt_embeds"], 1e-4);
    assert_rel(
        "negative_prompt_embeds",
        &cond.negative,
        &g["negative_prompt_embeds"],
        1e-4,
    );
    let (pooled, neg_pooled) = cond.pooled.clone().unwrap();
    assert_rel(
        "pooled_prompt_embeds",
        &pooled,
        &g["pooled_prompt_embeds"],
        1e-4,
    );
    assert_rel(
        "negative_pooled_prompt_embeds",
        &neg_pooled,
        &g["negative_pooled_prompt_embeds"],
        1e-4,
    );
    let mut req = case_request(&case, vec![case.seed]);
    let full = base.generate(&req, &cond).unwrap();
    assert_abs(
        "base_full_image",
        &base.decode(&full).unwrap(),
        &g["base_full_image"],
        2e-3,
    );

    req.denoising_end = Some(0.8);
    let split = base.generate(&req, &cond).unwrap();
    assert_rel(
        "base_latents_at_split",
        &split,
        &g["base_latents_at_split"],
        1e-4,
    );

    let rcond = refiner
        .encode_prompt(&case.prompt, &case.negative_prompt)
        .unwrap();
    assert_rel(
        "refiner_prompt_embeds",
        &rcond.prompt,
        &g["refiner_prompt_embeds"],
        1e-4,
    );
    assert_rel(
        "refiner_pooled_prompt_embeds",
        &rcond.pooled.as_ref().unwrap().0,
        &g["refiner_pooled_prompt_embeds"],
        1e-4,
    );
    req.denoising_end = None;
    req.seeds = vec![case.seed + 1];
    req.start = Some(StartFrom::Latents {
        latents: split,
        denoising_start: 0.8,
    });
    let refined = refiner.generate(&req, &rcond).unwrap();
    assert_abs(
        "refined_image",
        &refiner.decode(&refined).unwrap(),
        &g["refined_image"],
        2e-3,
    );
}

#[test]
fn init_noise_is_torch_randn_of_each_seed() {
    for case in cases().into_iter().filter(|c| c.kind.is_none()) {
        let g = load_case(&case.file);
        let (_, c, h, w) = g["init_noise"].dims4().unwrap();
        for i in 0..case.batch {
            let mut rng = sd_run::engine::rng::TorchRng::new(case.seed + i as u64);
            let ours =
                Tensor::from_vec(rng.randn(&[1, c, h, w]), (1, c, h, w), &Device::Cpu).unwrap();
            let theirs = g["init_noise"].narrow(0, i, 1).unwrap();
            let (d, _) = diff(&ours, &theirs);
            assert_eq!(d, 0.0, "{} image {i}", case.name);
        }
    }
}
