//! Times one text-to-image generation with sd-run's engine, stage by stage: model load (config
//! files and memory-mapped weights to a ready pipeline), text encode (prompt and negative
//! prompt), the denoising loop (UNet with classifier-free guidance and the scheduler step), VAE
//! decode. Prints one JSON line; `scripts/bench-vs-diffusers.sh` runs it beside diffusers.
//!
//! `cargo run --release --example bench_pipeline -- MODEL_DIR [--width W] [--height H]
//! [--steps N] [--scheduler ddim] [--image-out FILE.f32]`
//! Threads: `RAYON_NUM_THREADS`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use candle_core::{DType, Device};
use sd_run::engine::pipeline::{GenerateRequest, LoadOptions, Pipeline};
use sd_run::spec::{MemoryPolicy, NoiseSource, SchedulerName, SdxlConditioning};

const PROMPT: &str = "a photograph of an astronaut riding a horse, detailed, 4k";
const NEGATIVE: &str = "blurry, low quality";
const GUIDANCE: f64 = 7.5;
const SEED: u64 = 0;

struct Args {
    model: PathBuf,
    width: usize,
    height: usize,
    steps: usize,
    scheduler: SchedulerName,
    image_out: Option<PathBuf>,
}

fn parse() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let mut model = None;
    let mut a = Args {
        model: PathBuf::new(),
        width: 256,
        height: 256,
        steps: 2,
        scheduler: SchedulerName::Ddim,
        image_out: None,
    };
    let num = |v: Option<String>, flag: &str| -> Result<usize, String> {
        v.and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("{flag}: expected a number"))
    };
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--width" => a.width = num(it.next(), "--width")?,
            "--height" => a.height = num(it.next(), "--height")?,
            "--steps" => a.steps = num(it.next(), "--steps")?,
            "--image-out" => a.image_out = it.next().map(PathBuf::from),
            "--scheduler" => {
                let name = it.next().unwrap_or_default();
                a.scheduler = serde_json::from_value(serde_json::Value::String(name.clone()))
                    .map_err(|_| format!("--scheduler {name}: unknown"))?;
            }
            other if other.starts_with("--") => return Err(format!("unknown flag {other}")),
            other => model = Some(PathBuf::from(other)),
        }
    }
    a.model = model.ok_or(
        "usage: bench_pipeline MODEL_DIR [--width W] [--height H] [--steps N] [--image-out FILE]",
    )?;
    if a.steps == 0 || !a.width.is_multiple_of(8) || !a.height.is_multiple_of(8) {
        return Err("steps must be > 0 and the size a multiple of 8".into());
    }
    Ok(a)
}

fn run(a: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let opts = LoadOptions {
        device: Device::Cpu,
        dtype: DType::F32,
        memory: MemoryPolicy::default(),
    };
    let t0 = Instant::now();
    let pipe = Pipeline::load(&a.model, &opts)?;
    let load = t0.elapsed().as_secs_f64();

    let t0 = Instant::now();
    let cond = pipe.encode_prompt(PROMPT, NEGATIVE)?;
    let text = t0.elapsed().as_secs_f64();

    let req = GenerateRequest {
        seeds: vec![SEED],
        steps: a.steps,
        guidance: GUIDANCE,
        scheduler: a.scheduler,
        width: a.width,
        height: a.height,
        noise: NoiseSource::TorchCpu,
        sdxl: SdxlConditioning::default(),
        denoising_end: None,
        start: None,
    };
    let t0 = Instant::now();
    let latents = pipe.generate(&req, &cond)?;
    let denoise = t0.elapsed().as_secs_f64();

    let t0 = Instant::now();
    let image = pipe.decode(&latents)?;
    let image = image.flatten_all()?.to_vec1::<f32>()?;
    let decode = t0.elapsed().as_secs_f64();

    if let Some(out) = &a.image_out {
        let bytes: Vec<u8> = image.iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(out, bytes)?;
    }
    println!(
        "{}",
        serde_json::json!({
            "load": load,
            "text": text,
            "unet_step": denoise / a.steps as f64,
            "decode": decode,
            "image": text + denoise + decode,
        })
    );
    Ok(())
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(1)
        }
    }
}
