//! The real `sd-run` binary on the tiny models: a campaign, re-runs, crashes, concurrent runs,
//! the safety actions, the demo's pictures, and the CLI's exit codes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_sd-run");

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn demo_model() -> PathBuf {
    root().join("models/demo")
}

/// A fresh temp folder for one test.
fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sd-run-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Writes a spec on the demo model into `dir` and returns its path.
fn write_spec(dir: &Path, body: &str) -> PathBuf {
    let text = format!(
        "version: 1\noutput: out\nmodels:\n  demo:\n    source: {}\n{body}",
        demo_model().display()
    );
    let p = dir.join("spec.yaml");
    std::fs::write(&p, text).unwrap();
    p
}

/// The binary with `args`, its digest cache in a temp folder.
fn sd_run_cmd(args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env(
        "SD_RUN_CACHE",
        std::env::temp_dir().join("sd-run-test-cache"),
    );
    cmd
}

fn sd_run(args: &[&str]) -> std::process::Output {
    sd_run_cmd(args).output().unwrap()
}

/// Manifest records of an output folder (every line, in order).
fn manifest(out: &Path) -> Vec<serde_json::Value> {
    let mut lines = Vec::new();
    let mut files = vec![out.join("manifest.jsonl")];
    if let Ok(d) = std::fs::read_dir(out.join("manifest.d")) {
        files.extend(d.flatten().map(|e| e.path()));
    }
    for f in files {
        if let Ok(text) = std::fs::read_to_string(f) {
            lines.extend(text.lines().filter_map(|l| serde_json::from_str(l).ok()));
        }
    }
    lines
}

/// The summary event of a `--log json` run.
fn summary(stdout: &[u8]) -> serde_json::Value {
    String::from_utf8_lossy(stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "summary")
        .unwrap_or_else(|| panic!("no summary in {}", String::from_utf8_lossy(stdout)))
}

const SMALL_JOB: &str = "defaults:\n  steps: 6\n  guidance: 6\n  size: 64x64\n  batch_size: 2\nsafety:\n  checker: off\njobs:\n  - name: shapes\n    model: demo\n    prompts: [\"a yellow star on a purple background\", \"a white circle on a black background\"]\n    seeds: [1, 2, 3]\n";

#[test]
fn campaign_then_rerun_makes_nothing_and_damage_is_repaired() {
    let dir = temp_dir("campaign");
    let spec = write_spec(&dir, SMALL_JOB);
    let out = dir.join("out");
    let first = sd_run(&["run", spec.to_str().unwrap(), "--log", "json"]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let s = summary(&first.stdout);
    assert_eq!(s["made"], 6);
    let recs = manifest(&out);
    assert_eq!(recs.len(), 6);
    for r in &recs {
        let png = out.join(r["path"].as_str().unwrap());
        let bytes = std::fs::read(&png).unwrap();
        let chunks = sd_run::output::png_meta::read_text_chunks(&bytes).unwrap();
        let params = chunks
            .iter()
            .find(|(k, _)| k == "parameters")
            .expect("parameters chunk");
        let parsed = sd_run::output::png_meta::parse_parameters(&params.1).unwrap();
        assert_eq!(parsed.get("Steps"), Some("6"));
        assert_eq!(parsed.get("Seed"), Some(r["seed"].to_string().as_str()));
        assert_eq!(parsed.get("Size"), Some("64x64"));
        assert!(chunks.iter().any(|(k, _)| k == "sd-run"));
    }

    // Plain `sd-run SPEC` re-run: nothing made.
    let again = sd_run(&[spec.to_str().unwrap(), "--log", "json"]);
    assert!(again.status.success());
    let s = summary(&again.stdout);
    assert_eq!(s["made"], 0);
    assert_eq!(s["cached"], 6);

    // A damaged image is made again, and only it.
    let victim = out.join(recs[2]["path"].as_str().unwrap());
    std::fs::write(&victim, b"not a png").unwrap();
    let repair = sd_run(&["run", spec.to_str().unwrap(), "--log", "json"]);
    assert!(repair.status.success());
    assert_eq!(summary(&repair.stdout)["made"], 1);
    let bytes = std::fs::read(&victim).unwrap();
    assert!(bytes.starts_with(b"\x89PNG"));

    // plan --json agrees: everything cached.
    let plan = sd_run(&["plan", spec.to_str().unwrap(), "--json"]);
    assert!(plan.status.success());
    let v: serde_json::Value = serde_json::from_slice(&plan.stdout).unwrap();
    assert_eq!(v["images"], 6);
    assert_eq!(v["cached"], 6);
    assert_eq!(v["to_make"], 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn killed_runs_resume_and_every_image_is_made_once() {
    let dir = temp_dir("kill");
    let spec = write_spec(
        &dir,
        &SMALL_JOB.replace("seeds: [1, 2, 3]", "seeds: [1, 2, 3, 4]"),
    );
    let out = dir.join("out");
    // Kill the run at several points.
    for delay_ms in [300u64, 900, 1500] {
        let mut child = sd_run_cmd(&["run", spec.to_str().unwrap(), "--log", "json"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
    }
    let done = sd_run(&["run", spec.to_str().unwrap(), "--log", "json"]);
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let recs = manifest(&out);
    let mut per_key: HashMap<String, usize> = HashMap::new();
    for r in &recs {
        assert_ne!(r["status"], "failed");
        *per_key
            .entry(r["key"].as_str().unwrap().to_string())
            .or_default() += 1;
        let png = out.join(r["path"].as_str().unwrap());
        let bytes = std::fs::read(&png).unwrap();
        image::load_from_memory(&bytes).expect("whole PNG");
    }
    assert_eq!(per_key.len(), 8);
    assert!(per_key.values().all(|n| *n == 1), "{per_key:?}");
    // No temp files left visible as images.
    let images: usize = walk(&out.join("images"))
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .count();
    assert_eq!(images, 8);
    let _ = std::fs::remove_dir_all(&dir);
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(d) = std::fs::read_dir(dir) {
        for e in d.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn two_concurrent_runs_make_each_image_once() {
    let dir = temp_dir("concurrent");
    let spec = write_spec(&dir, &SMALL_JOB.replace("batch_size: 2", "batch_size: 1"));
    let out = dir.join("out");
    let spawn = || {
        sd_run_cmd(&["run", spec.to_str().unwrap(), "--log", "json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(a.status.success() && b.status.success());
    let made =
        summary(&a.stdout)["made"].as_u64().unwrap() + summary(&b.stdout)["made"].as_u64().unwrap();
    let recs = manifest(&out);
    let ok: Vec<_> = recs.iter().filter(|r| r["status"] != "failed").collect();
    assert_eq!(ok.len(), 6, "each image recorded once");
    assert_eq!(made, 6);
    // A third run finds everything.
    let c = sd_run(&["run", spec.to_str().unwrap(), "--log", "json"]);
    assert_eq!(summary(&c.stdout)["made"], 0);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Mean RGB of a border ring and of the centre region.
fn border_and_centre(rgb: &image::RgbImage) -> ([f64; 3], Vec<[u8; 3]>) {
    let (w, h) = rgb.dimensions();
    let mut sum = [0f64; 3];
    let mut n = 0f64;
    let mut centre = Vec::new();
    for y in 0..h {
        for x in 0..w {
            let p = rgb.get_pixel(x, y).0;
            if x < 3 || y < 3 || x >= w - 3 || y >= h - 3 {
                for c in 0..3 {
                    sum[c] += p[c] as f64;
                }
                n += 1.0;
            } else if x > w / 4 && x < 3 * w / 4 && y > h / 4 && y < 3 * h / 4 {
                centre.push(p);
            }
        }
    }
    (sum.map(|s| s / n), centre)
}

fn colour(name: &str) -> [f64; 3] {
    match name {
        "red" => [255.0, 0.0, 0.0],
        "green" => [0.0, 200.0, 0.0],
        "blue" => [0.0, 0.0, 255.0],
        "yellow" => [255.0, 255.0, 0.0],
        "white" => [255.0, 255.0, 255.0],
        "black" => [0.0, 0.0, 0.0],
        "purple" => [128.0, 0.0, 128.0],
        "orange" => [255.0, 165.0, 0.0],
        _ => unreachable!(),
    }
}

fn dist(a: [f64; 3], b: [f64; 3]) -> f64 {
    ((a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2) + (a[2] - b[2]).powi(2)).sqrt()
}

/// The nearest named colour.
fn nearest(c: [f64; 3]) -> &'static str {
    [
        "red", "green", "blue", "yellow", "white", "black", "purple", "orange",
    ]
    .into_iter()
    .min_by(|a, b| dist(c, colour(a)).total_cmp(&dist(c, colour(b))))
    .unwrap()
}

#[test]
fn demo_model_draws_what_prompts_say_and_flags_red() {
    let dir = temp_dir("demo");
    let cases = [
        ("yellow", "star", "purple"),
        ("red", "circle", "blue"),
        ("green", "triangle", "white"),
        ("blue", "square", "red"),
        ("white", "circle", "black"),
    ];
    let prompts: Vec<String> = cases
        .iter()
        .map(|(c, s, b)| format!("\"a {c} {s} on a {b} background\""))
        .collect();
    let body = format!(
        "defaults:\n  steps: 20\n  guidance: 6\n  size: 64x64\nsafety:\n  checker: model\n  action: tag\njobs:\n  - name: shapes\n    model: demo\n    prompts: [{}]\n    seeds: [1]\n",
        prompts.join(", ")
    );
    let spec = write_spec(&dir, &body);
    let run = sd_run(&["run", spec.to_str().unwrap(), "--log", "json"]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let out = dir.join("out");
    let recs = manifest(&out);
    assert_eq!(recs.len(), cases.len());
    for (c, _, b) in cases {
        let prompt_start = format!("a {c} ");
        let r = recs
            .iter()
            .find(|r| {
                r["prompt"].as_str().unwrap().starts_with(&prompt_start)
                    && r["prompt"]
                        .as_str()
                        .unwrap()
                        .ends_with(&format!("{b} background"))
            })
            .unwrap();
        let img = image::open(out.join(r["path"].as_str().unwrap()))
            .unwrap()
            .to_rgb8();
        let (border, centre) = border_and_centre(&img);
        assert_eq!(
            nearest(border),
            b,
            "background of {}: {border:?}",
            r["prompt"]
        );
        let shape_px = centre
            .iter()
            .filter(|p| nearest(p.map(f64::from)) == c)
            .count();
        assert!(
            shape_px * 10 >= centre.len(),
            "{}: {shape_px} of {} centre pixels are {c}",
            r["prompt"],
            centre.len()
        );
        let red = c == "red" || b == "red";
        assert_eq!(
            r["safety"]["flagged"], red,
            "{}: {}",
            r["prompt"], r["safety"]
        );
        assert_eq!(r["status"], if red { "flagged" } else { "ok" });
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn each_safety_action_does_what_it_says() {
    for action in ["blur", "black", "quarantine", "drop"] {
        let dir = temp_dir(&format!("safety-{action}"));
        let body = format!(
            "defaults:\n  steps: 10\n  guidance: 6\n  size: 64x64\nsafety:\n  checker: model\n  action: {action}\njobs:\n  - name: red\n    model: demo\n    prompts: [\"a red square on a green background\"]\n    seeds: [5]\n  - name: clean\n    model: demo\n    prompts: [\"a yellow circle on a blue background\"]\n    seeds: [5]\n"
        );
        let spec = write_spec(&dir, &body);
        let run = sd_run(&["run", spec.to_str().unwrap(), "--log", "json"]);
        assert!(
            run.status.success(),
            "{action}: {}",
            String::from_utf8_lossy(&run.stderr)
        );
        let out = dir.join("out");
        let recs = manifest(&out);
        let red = recs.iter().find(|r| r["job"] == "red").unwrap();
        let clean = recs.iter().find(|r| r["job"] == "clean").unwrap();
        assert_eq!(red["status"], "flagged", "{action}");
        assert_eq!(red["safety"]["action"], action);
        assert_eq!(clean["status"], "ok");
        match action {
            "drop" => assert!(red["path"].is_null()),
            "quarantine" => assert!(red["path"].as_str().unwrap().starts_with("quarantine/")),
            _ => {
                let img = image::open(out.join(red["path"].as_str().unwrap()))
                    .unwrap()
                    .to_rgb8();
                let px: Vec<_> = img.pixels().map(|p| p.0).collect();
                if action == "black" {
                    assert!(px.iter().all(|p| *p == [0, 0, 0]));
                } else {
                    // Blurred: neighbouring pixels barely differ.
                    let rough = px
                        .windows(2)
                        .map(|w| (w[0][0] as i32 - w[1][0] as i32).abs())
                        .max()
                        .unwrap();
                    assert!(rough < 40, "blur left edges of {rough}");
                }
            }
        }
        // A re-run counts the flagged image as made.
        let again = sd_run(&["run", spec.to_str().unwrap(), "--log", "json"]);
        assert_eq!(summary(&again.stdout)["made"], 0, "{action}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn invalid_spec_exits_2_with_locations() {
    let dir = temp_dir("invalid");
    let spec = write_spec(
        &dir,
        "jobs:\n  - name: a\n    model: nope\n    prompts: [\"x\"]\n    seeds: [1]\n    stepz: 3\n",
    );
    for cmd in ["validate", "plan", "run"] {
        let o = sd_run(&[cmd, spec.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(2), "{cmd}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("spec.yaml:8:12"), "{cmd}: {err}");
        assert!(err.contains("spec.yaml:11:5"), "{cmd}: {err}");
    }
    let o = sd_run(&["run", spec.to_str().unwrap(), "--shard", "3/2"]);
    assert_eq!(o.status.code(), Some(2));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn grid_jobs_get_a_contact_sheet_and_the_report_lists_every_image() {
    let dir = temp_dir("grid");
    let body = "defaults:\n  steps: 4\n  size: 64x64\nsafety:\n  checker: off\njobs:\n  - name: sweep\n    model: demo\n    prompts: [\"a green star on a black background\"]\n    seeds: [3]\n    grid:\n      scheduler: [ddim, euler_a]\n      guidance: [2, 6]\n";
    let spec = write_spec(&dir, body);
    let run = sd_run(&["run", spec.to_str().unwrap(), "--log", "json"]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let out = dir.join("out");
    let sheet = image::open(out.join("sheets/sweep.png")).unwrap();
    assert!(sheet.width() >= 2 * 64 && sheet.height() >= 2 * 64);
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    for r in manifest(&out) {
        assert!(html.contains(r["path"].as_str().unwrap()));
    }
    assert!(html.contains("sheets/sweep.png"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The golden image of a case as 8-bit RGB: `round(image * 255)`.
fn golden_rgb8(case: &str, key: &str) -> Vec<u8> {
    let file = root()
        .join("tests/fixtures/golden/cases")
        .join(format!("{case}.safetensors"));
    let t = candle_core::safetensors::load(file, &candle_core::Device::Cpu).unwrap();
    let v = t[key].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    sd_run::output::pixels::to_rgb8(&v)
}

fn assert_png_close(png: &Path, expected: &[u8]) {
    let img = image::open(png).unwrap().to_rgb8().into_raw();
    assert_eq!(img.len(), expected.len());
    let worst = img
        .iter()
        .zip(expected)
        .map(|(a, b)| (*a as i32 - *b as i32).abs())
        .max()
        .unwrap();
    assert!(
        worst <= 1,
        "{}: pixels differ from diffusers by {worst} levels",
        png.display()
    );
}

#[test]
fn tiny_sd15_png_equals_diffusers_image() {
    let dir = temp_dir("sd15");
    let model = root().join("tests/fixtures/golden/models/tiny-sd15");
    let spec = dir.join("spec.yaml");
    std::fs::write(
        &spec,
        format!(
            "version: 1\noutput: out\nmodels:\n  tiny:\n    source: {}\nsafety:\n  checker: off\njobs:\n  - name: fox\n    model: tiny\n    prompts: [\"a red fox in the snow\"]\n    seeds: [42]\n    steps: 4\n    guidance: 7.5\n    scheduler: ddim\n    size: 64x64\n",
            model.display()
        ),
    )
    .unwrap();
    let run = sd_run(&["run", spec.to_str().unwrap(), "--log", "json"]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let recs = manifest(&dir.join("out"));
    assert_eq!(recs.len(), 1);
    assert_png_close(
        &dir.join("out").join(recs[0]["path"].as_str().unwrap()),
        &golden_rgb8("ddim_basic", "image"),
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Writes a spec on the tiny SDXL base + refiner pair (64x64, 8 steps, guidance 5, batches of 2,
/// no safety checker) into `dir`; `rest` continues the `defaults:` block and holds the jobs.
fn write_sdxl_spec(dir: &Path, rest: &str) -> PathBuf {
    let models = root().join("tests/fixtures/golden/models");
    let text = format!(
        "version: 1\noutput: out\nmodels:\n  base:\n    source: {}\n  refiner:\n    source: {}\nsafety:\n  checker: off\ndefaults:\n  size: 64x64\n  steps: 8\n  guidance: 5\n  batch_size: 2\n{rest}",
        models.join("tiny-sdxl-base").display(),
        models.join("tiny-sdxl-refiner").display()
    );
    let spec = dir.join("spec.yaml");
    std::fs::write(&spec, text).unwrap();
    spec
}

#[test]
fn sdxl_base_and_refiner_run_stage_major_and_match_diffusers() {
    let dir = temp_dir("sdxl");
    let spec = write_sdxl_spec(
        &dir,
        "  scheduler: euler\njobs:\n  - name: alpine\n    model: base\n    prompts: [{prompt: \"professional photograph of alpine meadow\", negative_prompt: \"blurry\"}]\n    seeds: [1234, 1, 2]\n    refiner:\n      model: refiner\n      switch_at: 0.8\n",
    );
    let plan = sd_run(&["plan", spec.to_str().unwrap(), "--json"]);
    assert!(
        plan.status.success(),
        "{}",
        String::from_utf8_lossy(&plan.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&plan.stdout).unwrap();
    assert_eq!(v["model_loads"], 2, "{v}");
    let stages: Vec<(String, String)> = v["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["model"].as_str().unwrap().to_string(),
                s["role"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        stages,
        [
            ("base".into(), "base".into()),
            ("refiner".into(), "refiner".into())
        ]
    );

    let run = sd_run(&["run", spec.to_str().unwrap(), "--log", "json"]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let loads = String::from_utf8_lossy(&run.stdout)
        .lines()
        .filter(|l| l.contains("\"model_loaded\""))
        .count();
    assert_eq!(loads, 2, "base once, refiner once");
    let recs = manifest(&dir.join("out"));
    assert_eq!(recs.len(), 3);
    let r = recs.iter().find(|r| r["seed"] == 1234).unwrap();
    assert_eq!(r["refiner"]["model"], "refiner");
    assert_png_close(
        &dir.join("out").join(r["path"].as_str().unwrap()),
        &golden_rgb8("sdxl_refiner", "refined_image"),
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A copy of a fixture model (folders linked) whose scheduler config is edited by `edit`.
fn model_with_scheduler(dir: &Path, name: &str, edit: impl Fn(&mut serde_json::Value)) -> PathBuf {
    let src = root().join("tests/fixtures/golden/models").join(name);
    let dst = dir.join(format!("{name}-edited"));
    std::fs::create_dir_all(dst.join("scheduler")).unwrap();
    for e in std::fs::read_dir(&src).unwrap().flatten() {
        let n = e.file_name();
        if n == "scheduler" {
            continue;
        }
        std::os::unix::fs::symlink(e.path(), dst.join(&n)).unwrap();
    }
    let cfg = src.join("scheduler/scheduler_config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(cfg).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(dst.join("scheduler/scheduler_config.json"), v.to_string()).unwrap();
    dst
}

#[test]
fn turbo_style_trailing_one_step_and_img2img_make_images() {
    let dir = temp_dir("turbo");
    let turbo = model_with_scheduler(&dir, "tiny-sdxl-base", |v| {
        v["timestep_spacing"] = "trailing".into();
        v["_class_name"] = "EulerAncestralDiscreteScheduler".into();
    });
    let init = dir.join("init.png");
    image::RgbImage::from_fn(64, 64, |x, _| image::Rgb([(x * 4) as u8, 100, 200]))
        .save(&init)
        .unwrap();
    let spec = dir.join("spec.yaml");
    std::fs::write(
        &spec,
        format!(
            "version: 1\noutput: out\nmodels:\n  turbo:\n    source: {}\n  tiny:\n    source: {}\ndefaults:\n  size: 64x64\nsafety:\n  checker: off\njobs:\n  - name: turbo\n    model: turbo\n    prompts: [\"a cat\"]\n    seeds: [1, 2]\n    grid:\n      steps: [1, 4]\n    guidance: 0\n    scheduler: euler_a\n  - name: img2img\n    model: tiny\n    prompts: [\"a cat\"]\n    seeds: [1]\n    steps: 10\n    init_image: init.png\n    grid:\n      strength: [0.3, 0.9]\n",
            turbo.display(),
            root().join("tests/fixtures/golden/models/tiny-sd15").display()
        ),
    )
    .unwrap();
    let run = sd_run(&["run", spec.to_str().unwrap(), "--log", "json"]);
    assert!(
        run.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&run.stderr),
        String::from_utf8_lossy(&run.stdout)
    );
    let recs = manifest(&dir.join("out"));
    assert_eq!(recs.len(), 6);
    assert!(recs.iter().all(|r| r["status"] == "ok"), "{recs:?}");
    // Strength changes the picture: the two img2img images differ.
    let imgs: Vec<Vec<u8>> = recs
        .iter()
        .filter(|r| r["job"] == "img2img")
        .map(|r| {
            image::open(dir.join("out").join(r["path"].as_str().unwrap()))
                .unwrap()
                .to_rgb8()
                .into_raw()
        })
        .collect();
    assert_eq!(imgs.len(), 2);
    assert_ne!(imgs[0], imgs[1]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_crash_between_base_and_refiner_keeps_the_base_latents() {
    use std::io::BufRead;
    let dir = temp_dir("handoff");
    let spec = write_sdxl_spec(
        &dir,
        "jobs:\n  - name: alpine\n    model: base\n    prompts: [\"alpine meadow\"]\n    seeds: [1, 2, 3]\n    refiner:\n      model: refiner\n      switch_at: 0.7\n",
    );
    let mut child = sd_run_cmd(&["run", spec.to_str().unwrap(), "--log", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line.unwrap();
        if line.contains("\"model_loading\"") && line.contains("\"refiner\"") {
            let _ = child.kill();
            break;
        }
    }
    let _ = child.wait();
    assert!(
        manifest(&dir.join("out")).is_empty(),
        "killed before any image landed"
    );
    let again = sd_run(&["run", spec.to_str().unwrap(), "--log", "json"]);
    assert!(again.status.success());
    let log = String::from_utf8_lossy(&again.stdout);
    assert!(
        !log.lines()
            .any(|l| l.contains("\"batch\"") && l.contains("\"base\"")),
        "base pass repeated:\n{log}"
    );
    assert_eq!(summary(&again.stdout)["made"], 3);
    // The handoff files are gone once the images landed.
    let left = walk(&dir.join("out/.sd-run/latents"));
    assert!(left.is_empty(), "{left:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn ctrl_c_finishes_the_batch_and_says_how_to_resume() {
    use std::io::BufRead;
    let dir = temp_dir("sigint");
    let spec = write_spec(
        &dir,
        &SMALL_JOB
            .replace("seeds: [1, 2, 3]", "seeds: [1, 2, 3, 4, 5, 6]")
            .replace("batch_size: 2", "batch_size: 1"),
    );
    let mut child = sd_run_cmd(&["run", spec.to_str().unwrap(), "--log", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = std::io::BufReader::new(stdout).lines();
    for line in lines.by_ref() {
        if line.unwrap().contains("\"event\":\"image\"") {
            let ok = Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status()
                .unwrap();
            assert!(ok.success());
            break;
        }
    }
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    let s: serde_json::Value = rest
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .find(|v: &serde_json::Value| v["event"] == "summary")
        .unwrap();
    assert_eq!(s["interrupted"], true);
    assert!(s["made"].as_u64().unwrap() < 12);
    assert!(err.contains("again"), "{err}");
    // Every image written is whole and recorded; the next run makes the rest.
    let done = manifest(&dir.join("out")).len();
    let again = sd_run(&["run", spec.to_str().unwrap(), "--log", "json"]);
    assert!(again.status.success());
    assert_eq!(
        summary(&again.stdout)["made"].as_u64().unwrap() as usize + done,
        12
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_model_without_a_checker_is_a_warning_at_plan_time() {
    let dir = temp_dir("nochecker");
    let spec = dir.join("spec.yaml");
    std::fs::write(
        &spec,
        format!(
            "version: 1\noutput: out\nmodels:\n  xl:\n    source: {}\nsafety:\n  checker: model\njobs:\n  - name: a\n    model: xl\n    prompts: [\"x\"]\n    size: 64x64\n",
            root().join("tests/fixtures/golden/models/tiny-sdxl-base").display()
        ),
    )
    .unwrap();
    let o = sd_run(&["plan", spec.to_str().unwrap()]);
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("warning") && err.contains("no safety_checker"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn hf_sources_run_offline_from_a_filled_cache() {
    let dir = temp_dir("hf");
    // The standard cache layout: hub/models--ORG--NAME/{refs/main, snapshots/<commit>/...}.
    let repo = dir.join("hf/hub/models--tiny-org--tiny-sd");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    std::fs::create_dir_all(repo.join("snapshots")).unwrap();
    std::os::unix::fs::symlink(
        root().join("tests/fixtures/golden/models/tiny-sd15"),
        repo.join("snapshots").join(commit),
    )
    .unwrap();
    let spec = dir.join("spec.yaml");
    std::fs::write(
        &spec,
        "version: 1\noutput: out\nmodels:\n  tiny:\n    source: hf:tiny-org/tiny-sd\nsafety:\n  checker: off\njobs:\n  - name: fox\n    model: tiny\n    prompts: [\"a red fox in the snow\"]\n    seeds: [42]\n    steps: 4\n    guidance: 7.5\n    scheduler: ddim\n    size: 64x64\n",
    )
    .unwrap();
    let run = sd_run_cmd(&["run", spec.to_str().unwrap(), "--log", "json"])
        .env("HF_HOME", dir.join("hf"))
        .env_remove("HF_HUB_CACHE")
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let recs = manifest(&dir.join("out"));
    assert_png_close(
        &dir.join("out").join(recs[0]["path"].as_str().unwrap()),
        &golden_rgb8("ddim_basic", "image"),
    );
    // A repository missing from the cache is a clear error naming it.
    std::fs::write(
        &spec,
        std::fs::read_to_string(&spec)
            .unwrap()
            .replace("tiny-org/tiny-sd", "tiny-org/absent"),
    )
    .unwrap();
    let o = sd_run_cmd(&["run", spec.to_str().unwrap()])
        .env("HF_HOME", dir.join("hf"))
        .env_remove("HF_HUB_CACHE")
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("tiny-org/absent"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
