//! The spec language: validation messages (exact `FILE:LINE:COL: message`), defaults merging,
//! expansion order and speed, model folders, `sd-run.toml`, and robustness on garbage input.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sd_run::spec::{self, *};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn specs_dir() -> PathBuf {
    fixtures().join("specs")
}

/// Strips the leading newline of a raw string so line 1 is its first real line.
fn text(s: &str) -> &str {
    s.strip_prefix('\n').unwrap_or(s)
}

fn load(s: &str) -> Result<Spec, SpecErrors> {
    spec::load_str(text(s), "t.yaml", &specs_dir())
}

fn ok(s: &str) -> Spec {
    match load(s) {
        Ok(spec) => spec,
        Err(e) => panic!("expected a valid spec, got:\n{e}"),
    }
}

#[track_caller]
fn assert_errors(s: &str, expected: &[&str]) {
    match load(s) {
        Ok(_) => panic!("expected errors, the spec validated"),
        Err(e) => assert_eq!(e.to_string(), expected.join("\n")),
    }
}

/// A valid spec with one job whose extra lines (indented 4) are `job_extra`.
fn with_job(job_extra: &str) -> String {
    format!(
        "version: 1\nmodels:\n  m:\n    source: hf:org/m\njobs:\n  - name: a\n    model: m\n    prompts: [\"x\"]\n    seeds: [1]\n{job_extra}"
    )
}

// ---------------------------------------------------------------- one test per message

#[test]
fn version_must_be_1() {
    assert_errors(
        &with_job("").replace("version: 1", "version: 2"),
        &["t.yaml:1:10: `version` must be 1, got `2`"],
    );
    assert_errors(
        &with_job("").replace("version: 1\n", ""),
        &["t.yaml:1:1: missing `version: 1`"],
    );
}

#[test]
fn unknown_keys_with_and_without_suggestion() {
    assert_errors(
        &with_job("    stpes: 20\n    cfg_scale: 5\n    colour: red\n"),
        &[
            "t.yaml:10:5: unknown key `stpes` (did you mean `steps`?)",
            "t.yaml:11:5: unknown key `cfg_scale` (did you mean `guidance`?)",
            "t.yaml:12:5: unknown key `colour`; known keys here: name, prompts, grid, model, seeds, steps, guidance, scheduler, size, negative_prompt, batch_size, noise, refiner, original_size, crop, aesthetic_score, negative_aesthetic_score, init_image, strength",
        ],
    );
    assert_errors(
        "\nversion: 1\nmodles: {}\njobs: []\n",
        &[
            "t.yaml:1:1: missing `models`",
            "t.yaml:2:1: unknown key `modles` (did you mean `models`?)",
            "t.yaml:3:7: `jobs` is empty",
        ],
    );
}

#[test]
fn duplicate_key() {
    assert_errors(
        &with_job("    steps: 20\n    steps: 30\n"),
        &["t.yaml:11:5: duplicate key `steps`"],
    );
}

#[test]
fn wrong_types() {
    assert_errors(
        &with_job("    steps: \"20\"\n    guidance: high\n    batch_size: 2.5\n    prompts: x\n"),
        &[
            "t.yaml:10:12: `steps` must be an integer",
            "t.yaml:11:15: `guidance` must be a number",
            "t.yaml:12:17: `batch_size` must be an integer",
            "t.yaml:13:5: duplicate key `prompts`",
        ],
    );
    assert_errors(
        &with_job("").replace("prompts: [\"x\"]", "prompts: x"),
        &["t.yaml:8:14: `prompts` must be a list"],
    );
    assert_errors(
        &with_job("    negative_prompt: [a]\n"),
        &["t.yaml:10:22: `negative_prompt` must be a string"],
    );
}

#[test]
fn size_must_be_width_x_height_multiples_of_8() {
    assert_errors(
        &with_job("    size: 512\n"),
        &["t.yaml:10:11: `size` must be WIDTHxHEIGHT (e.g. 512x768), got `512`"],
    );
    assert_errors(
        &with_job("    size: 500x512\n"),
        &["t.yaml:10:11: `size` width and height must be positive multiples of 8 (at most 16384), got 500x512"],
    );
    assert_errors(
        &with_job("    size: [512, 512]\n"),
        &["t.yaml:10:11: `size` must be WIDTHxHEIGHT (e.g. 512x768)"],
    );
    assert_errors(
        &with_job("    size: 0x512\n"),
        &["t.yaml:10:11: `size` width and height must be positive multiples of 8 (at most 16384), got 0x512"],
    );
}

#[test]
fn steps_range() {
    assert_errors(
        &with_job("    steps: 0\n"),
        &["t.yaml:10:12: `steps` must be between 1 and 1000, got 0"],
    );
    assert_errors(
        &with_job("    steps: 1001\n"),
        &["t.yaml:10:12: `steps` must be between 1 and 1000, got 1001"],
    );
    assert_errors(
        &with_job("    steps: 12.5\n"),
        &["t.yaml:10:12: `steps` must be an integer"],
    );
}

#[test]
fn guidance_negative() {
    assert_errors(
        &with_job("    guidance: -1\n"),
        &["t.yaml:10:15: `guidance` must be >= 0, got -1"],
    );
    assert_eq!(
        ok(&with_job("    guidance: 0\n")).jobs[0].params.guidance,
        0.0
    );
}

#[test]
fn switch_at_strictly_between_0_and_1() {
    let spec = |v: &str| {
        format!(
            "version: 1\nmodels:\n  m: {{source: hf:o/m}}\n  r: {{source: hf:o/r}}\njobs:\n  - name: a\n    model: m\n    prompts: [x]\n    refiner: {{model: r, switch_at: {v}}}\n"
        )
    };
    assert_errors(
        &spec("1"),
        &["t.yaml:9:36: `switch_at` must be strictly between 0 and 1, got 1"],
    );
    assert_errors(
        &spec("0"),
        &["t.yaml:9:36: `switch_at` must be strictly between 0 and 1, got 0"],
    );
    let s = ok(&spec("0.8"));
    assert_eq!(
        s.jobs[0].params.refiner,
        Some(RefinerStage {
            model: "r".into(),
            switch_at: 0.8
        })
    );
}

#[test]
fn strength_in_0_1() {
    assert_errors(
        &with_job("    strength: 0\n"),
        &["t.yaml:10:15: `strength` must be in (0, 1], got 0"],
    );
    assert_errors(
        &with_job("    strength: 1.5\n"),
        &["t.yaml:10:15: `strength` must be in (0, 1], got 1.5"],
    );
    assert_eq!(
        ok(&with_job("    strength: 1\n")).jobs[0].params.strength,
        1.0
    );
}

#[test]
fn unknown_models() {
    assert_errors(
        &with_job("").replace("model: m", "model: n"),
        &["t.yaml:7:12: unknown model `n` (did you mean `m`?); declared models: m"],
    );
    assert_errors(
        &with_job("    refiner:\n      model: sdxl-refiner\n"),
        &["t.yaml:11:14: unknown model `sdxl-refiner`; declared models: m"],
    );
}

#[test]
fn unknown_scheduler_lists_valid_ones() {
    assert_errors(
        &with_job("    scheduler: eulr\n"),
        &["t.yaml:10:16: unknown scheduler `eulr` (did you mean `euler`?); valid: default, ddim, euler, euler_a, dpmpp_2m, dpmpp_2m_karras, unipc, pndm"],
    );
}

#[test]
fn duplicate_job_names_point_at_the_second() {
    assert_errors(
        &with_job("  - name: a\n    model: m\n    prompts: [y]\n"),
        &["t.yaml:10:11: duplicate job name `a` (first used on line 6)"],
    );
}

#[test]
fn job_name_pattern() {
    assert_errors(
        &with_job("").replace("name: a", "name: my job"),
        &["t.yaml:6:11: job name `my job` must match [A-Za-z0-9_-]+"],
    );
}

#[test]
fn empty_prompts_and_empty_prompt() {
    assert_errors(
        &with_job("").replace("prompts: [\"x\"]", "prompts: []"),
        &["t.yaml:8:14: `prompts` is empty: a job needs at least one prompt"],
    );
    assert_errors(
        &with_job("").replace(
            "prompts: [\"x\"]",
            "prompts: [\"x\", \"  \", {prompt: \"\"}]",
        ),
        &[
            "t.yaml:8:20: prompt is empty",
            "t.yaml:8:35: prompt is empty",
        ],
    );
}

#[test]
fn seeds_must_be_u64() {
    let bad = |v: &str| with_job("").replace("seeds: [1]", &format!("seeds: {v}"));
    assert_errors(
        &bad("[-1]"),
        &["t.yaml:9:13: seed must be an integer in 0..2^64, got `-1`"],
    );
    assert_errors(
        &bad("[1.5]"),
        &["t.yaml:9:13: seed must be an integer in 0..2^64, got `1.5`"],
    );
    assert_errors(
        &bad("[18446744073709551616]"),
        &["t.yaml:9:13: seed must be an integer in 0..2^64, got `18446744073709551616`"],
    );
    assert_eq!(
        ok(&bad("[18446744073709551615]")).jobs[0].seeds,
        vec![u64::MAX]
    );
    assert_errors(&bad("[]"), &["t.yaml:9:12: `seeds` is empty"]);
    assert_errors(
        &bad("{from: 18446744073709551615, count: 2}"),
        &["t.yaml:9:48: `from + count - 1` must be below 2^64"],
    );
    assert_errors(
        &bad("{from: 3, count: 0}"),
        &["t.yaml:9:29: `count` must be at least 1, got 0"],
    );
    assert_errors(
        &bad("{from: 3}"),
        &["t.yaml:9:12: `seeds` range is missing `count`"],
    );
    assert_errors(
        &bad("seven"),
        &["t.yaml:9:12: `seeds` must be a list of integers or {from, count}"],
    );
}

#[test]
fn batch_size_at_least_1() {
    assert_errors(
        &with_job("    batch_size: 0\n"),
        &["t.yaml:10:17: `batch_size` must be at least 1, got 0"],
    );
}

#[test]
fn noise_and_dtype_values() {
    assert_errors(
        &with_job("    noise: cpu\n"),
        &["t.yaml:10:12: unknown noise `cpu`; valid: torch-cpu, device"],
    );
    assert_errors(
        &with_job("").replace("source: hf:org/m", "source: hf:org/m\n    dtype: fp16"),
        &["t.yaml:5:12: unknown dtype `fp16` (did you mean `f16`?); valid: f32, f16, bf16"],
    );
}

#[test]
fn memory_fields() {
    let s = with_job("").replace(
        "source: hf:org/m",
        "source: hf:org/m\n    memory:\n      attention_slicing: some\n      flash_attention: yes\n      vae_tiling: 1\n      offload: cpu\n      spill: true",
    );
    assert_errors(
        &s,
        &[
            "t.yaml:6:26: `attention_slicing` must be off, auto or a positive slice size, got `some`",
            "t.yaml:7:24: `flash_attention` must be true or false",
            "t.yaml:8:19: `vae_tiling` must be true or false",
            "t.yaml:9:16: unknown offload `cpu`; valid: none, model",
            "t.yaml:10:7: unknown key `spill`; known keys here: attention_slicing, flash_attention, vae_tiling, offload",
        ],
    );
    let s = with_job("").replace(
        "source: hf:org/m",
        "source: hf:org/m\n    memory: {attention_slicing: 4, flash_attention: true, vae_tiling: true, offload: model}",
    );
    let m = &ok(&s).models["m"];
    assert_eq!(
        m.memory,
        MemoryPolicy {
            attention_slicing: AttentionSlicing::Size(4),
            flash_attention: true,
            vae_tiling: true,
            offload: Offload::Model
        }
    );
    let s = with_job("").replace(
        "source: hf:org/m",
        "source: hf:org/m\n    memory: {attention_slicing: off}",
    );
    assert_eq!(
        ok(&s).models["m"].memory.attention_slicing,
        AttentionSlicing::Off
    );
}

#[test]
fn memory_budget_forms() {
    let budget = |v: &str| {
        with_job("").replace("version: 1\n", &format!("version: 1\nmemory_budget: {v}\n"))
    };
    assert_eq!(ok(&budget("12GiB")).memory_budget, Some(12 << 30));
    assert_eq!(ok(&budget("512MiB")).memory_budget, Some(512 << 20));
    assert_eq!(ok(&budget("2GB")).memory_budget, Some(2_000_000_000));
    assert_eq!(ok(&budget("1000000")).memory_budget, Some(1_000_000));
    assert_errors(
        &budget("lots"),
        &["t.yaml:2:16: `memory_budget` must be a size like 12GiB, 512MiB, 2GB or a byte count, got `lots`"],
    );
}

#[test]
fn safety_block() {
    let safety =
        |v: &str| with_job("").replace("version: 1\n", &format!("version: 1\nsafety:\n{v}"));
    assert_errors(
        &safety("  checker: ./nowhere\n  action: pixelate\n  threshold_adjust: lots\n"),
        &[
            "t.yaml:3:12: safety checker folder `./nowhere` does not exist",
            "t.yaml:4:11: unknown safety action `pixelate`; valid: tag, blur, black, quarantine, drop",
            "t.yaml:5:21: `threshold_adjust` must be a number",
        ],
    );
    let s = ok(&safety(
        "  checker: ../golden/models/tiny-sd15\n  action: quarantine\n  threshold_adjust: -0.01\n",
    ));
    assert!(matches!(s.safety.checker, CheckerChoice::Path(ref p) if p.ends_with("tiny-sd15")));
    assert_eq!(s.safety.action, SafetyAction::Quarantine);
    assert_eq!(s.safety.threshold_adjust, -0.01);
    assert_eq!(
        ok(&safety("  checker: off\n")).safety.checker,
        CheckerChoice::Off
    );
    assert_eq!(ok(&with_job("")).safety, SafetyPolicy::default());
}

#[test]
fn grid_axes() {
    assert_errors(
        &with_job("    grid:\n      batch_size: [1, 2]\n      model: [m]\n      steps: []\n      guidance: 5\n      size: [512x512, 513x512]\n      stesp: [1]\n"),
        &[
            "t.yaml:11:7: `batch_size` cannot be swept: it does not change pixels (set it on the job instead)",
            "t.yaml:12:7: `model` cannot be swept; sweepable fields: steps, guidance, scheduler, size, negative_prompt, noise, strength, original_size, crop, aesthetic_score, negative_aesthetic_score",
            "t.yaml:13:14: grid axis `steps` is empty",
            "t.yaml:14:17: grid axis `guidance` must be a list of values",
            "t.yaml:15:23: `size` width and height must be positive multiples of 8 (at most 16384), got 513x512",
            "t.yaml:16:7: `stesp` cannot be swept (did you mean `steps`?); sweepable fields: steps, guidance, scheduler, size, negative_prompt, noise, strength, original_size, crop, aesthetic_score, negative_aesthetic_score",
        ],
    );
}

#[test]
fn sdxl_conditioning_fields() {
    assert_errors(
        &with_job("    original_size: big\n    crop: [0]\n    aesthetic_score: x\n"),
        &[
            "t.yaml:10:20: `original_size` must be WIDTHxHEIGHT (e.g. 1024x1024), got `big`",
            "t.yaml:11:11: `crop` must be a list [top, left]",
            "t.yaml:12:22: `aesthetic_score` must be a number",
        ],
    );
    assert_errors(
        &with_job("    crop: [0, -8]\n"),
        &["t.yaml:10:15: `crop` values must be integers >= 0, got `-8`"],
    );
    let s = ok(&with_job(
        "    original_size: 4096x2048\n    crop: [16, 32]\n    negative_aesthetic_score: 1.5\n",
    ));
    let c = &s.jobs[0].params.sdxl;
    assert_eq!(c.original_size, Some((4096, 2048)));
    assert_eq!(c.crop, (16, 32));
    assert_eq!((c.aesthetic_score, c.negative_aesthetic_score), (6.0, 1.5));
}

#[test]
fn init_image_must_exist() {
    assert_errors(
        &with_job("    init_image: missing.png\n"),
        &["t.yaml:10:17: `init_image` file `missing.png` does not exist"],
    );
    let s = ok(&with_job("    init_image: init.png\n    strength: 0.5\n"));
    assert_eq!(
        s.jobs[0].params.init_image,
        Some(specs_dir().join("init.png").canonicalize().unwrap())
    );
    assert_eq!(s.jobs[0].params.strength, 0.5);
    assert_eq!(ok(&with_job("")).jobs[0].params.strength, 0.8);
}

#[test]
fn model_sources() {
    let src = |v: &str| with_job("").replace("hf:org/m", v);
    assert_errors(
        &src("hf:org"),
        &["t.yaml:4:13: `source` must be hf:ORG/NAME[@REVISION], got `hf:org`"],
    );
    assert_errors(
        &src("hf:org/m@"),
        &["t.yaml:4:13: `source` must be hf:ORG/NAME[@REVISION], got `hf:org/m@`"],
    );
    assert_errors(
        &src("./models/nope"),
        &["t.yaml:4:13: model folder `./models/nope` does not exist"],
    );
    assert_errors(
        &src("models/broken"),
        &["t.yaml:4:13: model folder `models/broken` is not a diffusers layout: missing vae/config.json, scheduler/scheduler_config.json, text_encoder/config.json"],
    );
    let s = ok(&src("hf:org/m@refs/pr/1"));
    assert_eq!(
        s.models["m"].source,
        ModelSource::Hf {
            repo: "org/m".into(),
            revision: Some("refs/pr/1".into())
        }
    );
    // SD 1.5 layout, and the SDXL refiner layout (text_encoder: null).
    for m in ["tiny-sd15", "tiny-sdxl-refiner", "tiny-sdxl-base"] {
        let s = ok(&src(&format!("../golden/models/{m}")));
        let want = fixtures()
            .join("golden/models")
            .join(m)
            .canonicalize()
            .unwrap();
        assert_eq!(s.models["m"].source, ModelSource::Path { path: want });
    }
    assert_errors(
        &with_job("").replace("    source: hf:org/m\n", "    dtype: f16\n"),
        &["t.yaml:3:3: model `m` is missing `source`"],
    );
}

#[test]
fn yaml_syntax_errors_have_positions() {
    let e = load("\nversion: 1\njobs: [a, b\n").unwrap_err();
    assert_eq!(e.0.len(), 1);
    assert!(e.0[0].message.starts_with("invalid YAML: "), "{e}");
    assert!(e.to_string().starts_with("t.yaml:"), "{e}");
    assert_eq!(e.0[0].line, 3, "{e}");
    assert_errors("\n", &["t.yaml:1:1: the spec is empty"]);
    assert_errors("\n- a\n- b\n", &["t.yaml:1:1: the spec must be a mapping"]);
    assert_errors(
        "\nversion: 1\nx: &a 1\ny: *a\n",
        &["t.yaml:3:4: YAML aliases (`*name`) are not supported; write the value out"],
    );
}

#[test]
fn several_errors_at_once_in_file_order() {
    let s = r#"
version: 1
output: out/x
models:
  sd15:
    source: hf:org/sd15
    dtype: f64
defaults:
  steps: 0
  name: nope
jobs:
  - name: one
    model: sd16
    prompts: ["a"]
    seeds: [-5]
    size: 100x100
  - name: one
    model: sd15
    prompts: []
    schedular: ddim
  - model: sd15
    prompts: ["b"]
"#;
    assert_errors(
        s,
        &[
            "t.yaml:6:12: unknown dtype `f64`; valid: f32, f16, bf16",
            "t.yaml:8:10: `steps` must be between 1 and 1000, got 0",
            "t.yaml:9:3: `name` cannot be set in `defaults` (set it on each job)",
            "t.yaml:12:12: unknown model `sd16` (did you mean `sd15`?); declared models: sd15",
            "t.yaml:14:13: seed must be an integer in 0..2^64, got `-5`",
            "t.yaml:15:11: `size` width and height must be positive multiples of 8 (at most 16384), got 100x100",
            "t.yaml:16:11: duplicate job name `one` (first used on line 11)",
            "t.yaml:18:14: `prompts` is empty: a job needs at least one prompt",
            "t.yaml:19:5: unknown key `schedular` (did you mean `scheduler`?)",
            "t.yaml:20:5: job is missing `name`",
        ],
    );
}

// ---------------------------------------------------------------- merging and expansion

#[test]
fn defaults_merge_field_by_field() {
    let s = ok(r#"
version: 1
defaults:
  steps: 30
  guidance: 4
  scheduler: euler
  negative_prompt: "ugly"
  seeds: [9]
  noise: device
models:
  m: {source: hf:o/m}
jobs:
  - name: a
    prompts: [x]
    guidance: 6
  - name: b
    prompts: [y, {prompt: z, negative_prompt: "own"}]
    negative_prompt: "job"
    batch_size: 1
    seeds: [1, 2]
"#);
    let (a, b) = (&s.jobs[0], &s.jobs[1]);
    assert_eq!(a.model, "m", "the only model is the default");
    assert_eq!(
        (a.params.steps, a.params.guidance, a.params.scheduler),
        (30, 6.0, SchedulerName::Euler)
    );
    assert_eq!(
        (a.params.width, a.params.height, a.params.batch_size),
        (512, 512, 4)
    );
    assert_eq!(a.params.noise, NoiseSource::Device);
    assert_eq!(a.seeds, vec![9]);
    assert_eq!(a.params.negative_prompt, "ugly");
    assert_eq!(
        (b.params.steps, b.params.guidance, b.params.batch_size),
        (30, 4.0, 1)
    );
    assert_eq!(b.seeds, vec![1, 2]);
    let imgs = expand(&s);
    let negs: Vec<(&str, &str)> = imgs
        .iter()
        .map(|i| (i.prompt.as_str(), i.params.negative_prompt.as_str()))
        .collect();
    assert_eq!(
        negs,
        vec![
            ("x", "ugly"),
            ("y", "job"),
            ("y", "job"),
            ("z", "own"),
            ("z", "own")
        ]
    );
    // Built-in defaults when nothing is said.
    let p = &ok(&with_job("")).jobs[0].params;
    assert_eq!(*p, GenParams::default());
}

#[test]
fn seed_ranges() {
    let s = ok(&with_job("").replace("seeds: [1]", "seeds: {from: 100, count: 4}"));
    assert_eq!(s.jobs[0].seeds, vec![100, 101, 102, 103]);
    let s = ok(&with_job("").replace(
        "seeds: [1]",
        "seeds: {from: 18446744073709551614, count: 2}",
    ));
    assert_eq!(s.jobs[0].seeds, vec![u64::MAX - 1, u64::MAX]);
}

#[test]
fn expansion_counts_and_order() {
    let s = ok(r#"
version: 1
models:
  m: {source: hf:o/m}
jobs:
  - name: g
    model: m
    prompts: [p0, {prompt: p1, negative_prompt: n1}]
    seeds: [5, 6]
    grid:
      guidance: [5, 7.5]
      scheduler: [ddim, euler_a, dpmpp_2m]
      negative_prompt: ["", "blurry"]
  - name: h
    model: m
    prompts: [q]
    seeds: {from: 1, count: 3}
"#);
    let imgs = expand(&s);
    assert_eq!(imgs.len(), 2 * 2 * 3 * 2 * 2 + 3);
    assert_eq!(job_image_count(&s.jobs[0]), 48);
    // job → prompt → grid point (first axis outermost) → seed.
    let first: Vec<(usize, usize, u64)> = imgs[..6]
        .iter()
        .map(|i| (i.prompt_index, i.grid_index, i.seed))
        .collect();
    assert_eq!(
        first,
        vec![
            (0, 0, 5),
            (0, 0, 6),
            (0, 1, 5),
            (0, 1, 6),
            (0, 2, 5),
            (0, 2, 6)
        ]
    );
    assert_eq!(
        imgs[2].grid_point,
        vec![
            ("guidance".to_string(), "5".to_string()),
            ("scheduler".to_string(), "ddim".to_string()),
            ("negative_prompt".to_string(), "blurry".to_string())
        ]
    );
    let i = &imgs[2 * 2 * 3 * 2 - 1]; // last of prompt 0: guidance 7.5, dpmpp_2m, "blurry", seed 6
    assert_eq!(
        (
            i.params.guidance,
            i.params.scheduler,
            i.params.negative_prompt.as_str(),
            i.seed
        ),
        (7.5, SchedulerName::DpmPp2m, "blurry", 6)
    );
    assert_eq!(imgs[24].prompt, "p1");
    assert_eq!(
        imgs[24].params.negative_prompt, "",
        "a grid negative_prompt wins over the prompt's own"
    );
    assert_eq!(imgs[24].params.guidance, 5.0);
    let tail: Vec<(&str, usize, u64)> = imgs[48..]
        .iter()
        .map(|i| (i.job.as_str(), i.job_index, i.seed))
        .collect();
    assert_eq!(tail, vec![("h", 1, 1), ("h", 1, 2), ("h", 1, 3)]);
    assert!(imgs[48].grid_point.is_empty());
}

#[test]
fn grid_sweeps_every_sweepable_field() {
    let s = ok(&with_job(
        "    grid:\n      steps: [10]\n      size: [768x512]\n      noise: [device]\n      strength: [0.3]\n      original_size: [2048x2048]\n      crop: [[8, 16]]\n      aesthetic_score: [7]\n      negative_aesthetic_score: [2]\n",
    ));
    let imgs = expand(&s);
    assert_eq!(imgs.len(), 1);
    let p = &imgs[0].params;
    assert_eq!(
        (p.steps, p.width, p.height, p.noise, p.strength),
        (10, 768, 512, NoiseSource::Device, 0.3)
    );
    assert_eq!(p.sdxl.original_size, Some((2048, 2048)));
    assert_eq!(p.sdxl.crop, (8, 16));
    assert_eq!(
        (p.sdxl.aesthetic_score, p.sdxl.negative_aesthetic_score),
        (7.0, 2.0)
    );
    assert_eq!(
        imgs[0].grid_point[5],
        ("crop".to_string(), "[8, 16]".to_string())
    );
}

#[test]
fn expanding_a_million_images() {
    let prompts: Vec<String> = (0..1000)
        .map(|i| format!("\"prompt number {i}\""))
        .collect();
    let yaml = format!(
        "version: 1\nmodels:\n  m: {{source: hf:o/m}}\njobs:\n  - name: big\n    model: m\n    prompts: [{}]\n    seeds: {{from: 0, count: 1000}}\n",
        prompts.join(", ")
    );
    let s = spec::load_str(&yaml, "big.yaml", &specs_dir()).unwrap();
    let imgs = expand(&s);
    assert_eq!(imgs.len(), 1_000_000);
    assert_eq!(imgs[999_999].seed, 999);
    assert_eq!(imgs[999_999].prompt, "prompt number 999");
}

// ---------------------------------------------------------------- files

#[test]
fn campaign_parses() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("specs/campaign.yaml");
    let s = spec::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(s.models.len(), 3);
    assert_eq!(s.jobs.len(), 4);
    assert_eq!(s.memory_budget, Some(12 << 30));
    assert!(s.output.ends_with("specs/out/campaign"));
    assert_eq!(
        s.jobs[2].params.refiner,
        Some(RefinerStage {
            model: "refiner".into(),
            switch_at: 0.8
        })
    );
    let imgs = expand(&s);
    assert_eq!(imgs.len(), 64 + 16 + 16 + 12);
    assert_eq!(image_count(&s), imgs.len());
}

#[test]
fn load_from_file_defaults_output_and_finds_config() {
    let path = specs_dir().join("tiny.yaml");
    let s = spec::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(s.output, specs_dir().join("out/tiny"));
    assert_eq!(s.file, path);
    assert_eq!(expand(&s).len(), 2);
    assert_eq!(find_config(&path), Some(specs_dir().join("sd-run.toml")));
    assert_eq!(find_config(&fixtures().join("golden/x.yaml")), None);
    let e = spec::load(&specs_dir().join("absent.yaml")).unwrap_err();
    assert!(
        e.to_string().contains("absent.yaml:1:1: cannot read spec"),
        "{e}"
    );
}

#[test]
fn machine_config() {
    let c = MachineConfig::load(&specs_dir().join("sd-run.toml")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.device, DeviceChoice::Cpu);
    assert_eq!(c.memory_budget, Some(2 << 30));
    assert_eq!(c.store.output, Some(specs_dir().join("store")));
    assert_eq!(c.server.addr, "127.0.0.1:9000");
    assert_eq!(c.server.token.as_deref(), Some("secret"));
    assert_eq!(
        (
            c.server.queue_limit,
            c.server.max_images_per_job,
            c.server.allow_client_models
        ),
        (8, 1000, false)
    );
    assert_eq!(c.models["tiny"].dtype, Precision::F16);
    assert_eq!(
        c.models["tiny"].memory.attention_slicing,
        AttentionSlicing::Size(2)
    );
    assert_eq!(c.models["tiny"].memory.offload, Offload::Model);
    assert_eq!(
        c.models["sdxl"].source,
        ModelSource::Hf {
            repo: "stabilityai/stable-diffusion-xl-base-1.0".into(),
            revision: Some("main".into())
        }
    );
    let d = MachineConfig::load_str("", "c.toml", &specs_dir()).unwrap();
    assert_eq!(
        (d.device, d.server.queue_limit, d.server.addr.as_str()),
        (DeviceChoice::Auto, 64, "127.0.0.1:7860")
    );

    let err = |t: &str| {
        MachineConfig::load_str(t, "c.toml", &specs_dir())
            .unwrap_err()
            .to_string()
    };
    let e = err("device = \"gpu\"\n");
    assert_eq!(
        e,
        "c.toml:1:10: unknown device `gpu`; valid: auto, cpu, cuda, metal"
    );
    let e = err("[server]\nqueue_limt = 3\n");
    assert!(
        e.starts_with("c.toml:2:1: unknown field `queue_limt`"),
        "{e}"
    );
    let e = err("memory_budget = \"much\"\n[models.x]\nsource = \"./none\"\n");
    assert_eq!(
        e,
        "c.toml:1:17: `memory_budget` must be a size like 12GiB, 512MiB, 2GB or a byte count, got `much`\nc.toml:3:10: model folder `./none` does not exist"
    );
    let e = err("[server]\nqueue_limit = 0\n");
    assert_eq!(e, "c.toml:2:15: `queue_limit` must be at least 1, got 0");
}

#[test]
fn serve_mode_options() {
    let mut known = BTreeMap::new();
    known.insert(
        "sd15".to_string(),
        ModelDecl {
            name: "sd15".into(),
            source: ModelSource::Hf {
                repo: "o/sd15".into(),
                revision: None,
            },
            dtype: Precision::F16,
            memory: MemoryPolicy::default(),
        },
    );
    let opts = LoadOptions {
        allow_sources: false,
        known_models: Some(known),
    };
    let client = "version: 1\njobs:\n  - name: a\n    model: sd15\n    prompts: [x]\n";
    let s = spec::load_str_with(client, "client", Path::new("/srv"), &opts)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(s.models["sd15"].dtype, Precision::F16);
    let bring = "version: 1\nmodels:\n  mine:\n    source: /etc\njobs:\n  - name: a\n    model: mine\n    prompts: [x]\n    init_image: /etc/passwd\n";
    let e = spec::load_str_with(bring, "client", Path::new("/srv"), &opts)
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "client:4:5: `source` is not allowed here: name one of the server's models (sd15)\nclient:9:17: `init_image` is not allowed here: this server reads no client-chosen files"
    );
}

// ---------------------------------------------------------------- robustness

fn no_panic(text: &str) {
    let t = text.to_string();
    let r = std::panic::catch_unwind(move || {
        let _ = spec::load_str(&t, "f.yaml", Path::new("/nonexistent"));
    });
    assert!(r.is_ok(), "load_str panicked on {text:?}");
}

#[test]
fn never_panics_on_mutated_or_garbage_input() {
    let base =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("specs/campaign.yaml"))
            .unwrap();
    // Every truncation.
    for cut in (0..base.len()).filter(|&i| base.is_char_boundary(i)) {
        no_panic(&base[..cut]);
    }
    // Single-byte mutations with YAML-significant characters, and deleted lines.
    let specials = [
        ":", "-", "[", "]", "{", "}", "\"", "'", "&", "*", "!", "|", ">", "#", "\t", "\n", " ",
        "%", "@", "?", ",", "\0",
    ];
    let mut rng = 0x2545F4914F6CDD1Du64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let boundaries: Vec<usize> = (0..base.len())
        .filter(|&i| base.is_char_boundary(i))
        .collect();
    for _ in 0..3000 {
        let i = boundaries[(next() % boundaries.len() as u64) as usize];
        let s = specials[(next() % specials.len() as u64) as usize];
        let mut m = base.clone();
        m.insert_str(i, s);
        no_panic(&m);
    }
    let lines: Vec<&str> = base.lines().collect();
    for skip in 0..lines.len() {
        let m: Vec<&str> = lines
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != skip)
            .map(|(_, l)| *l)
            .collect();
        no_panic(&m.join("\n"));
    }
    // Random bytes (as lossy text) and random ASCII.
    for len in [1usize, 7, 64, 512, 4096] {
        for _ in 0..50 {
            let bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            no_panic(&String::from_utf8_lossy(&bytes));
            let ascii: String = bytes.iter().map(|b| (b % 95 + 32) as char).collect();
            no_panic(&ascii);
        }
    }
    // Deep nesting, long scalars, many keys, odd values.
    no_panic(&"[".repeat(100_000));
    no_panic(&"{a: ".repeat(10_000));
    no_panic(&"- ".repeat(10_000));
    no_panic(&format!(
        "version: 1\njobs:\n{}",
        "  - name: x\n".repeat(20_000)
    ));
    no_panic(&format!(
        "version: 1\nmodels: {{m: {{source: \"{}\"}}}}\n",
        "a".repeat(1 << 20)
    ));
    no_panic("version: 1\nmodels: {m: {source: hf:o/m}}\njobs: [{name: a, prompts: [x], seeds: {from: 0, count: 99999999999}}]");
    no_panic("version: 1\nmodels: {m: {source: hf:o/m}}\njobs: [{name: a, prompts: [x], grid: {steps: [1,2,3,4,5,6,7,8,9,10], guidance: [1,2,3,4,5,6,7,8,9,10], noise: [device, torch-cpu]}}]");
}

#[test]
fn too_many_images_is_an_error() {
    let e = load("\nversion: 1\nmodels: {m: {source: hf:o/m}}\njobs:\n  - {name: a, prompts: [x, y], seeds: {from: 0, count: 6000000}}\n")
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "t.yaml:4:3: this spec asks for 12000000 images; at most 10000000 are allowed"
    );
}

#[test]
fn json_specs_are_accepted() {
    let json = serde_json::json!({
        "version": 1,
        "models": {"m": {"source": "hf:o/m", "dtype": "bf16"}},
        "defaults": {"refiner": {"model": "m", "switch_at": 0.7}},
        "jobs": [
            {"name": "a", "prompts": ["x"], "seeds": {"from": 3, "count": 2}, "guidance": 6.5},
            {"name": "b", "prompts": [{"prompt": "y"}], "refiner": null}
        ]
    });
    for text in [
        json.to_string(),
        serde_json::to_string_pretty(&json).unwrap(),
    ] {
        let s = spec::load_str(&text, "body.json", &specs_dir()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.models["m"].dtype, Precision::Bf16);
        assert_eq!(s.jobs[0].seeds, vec![3, 4]);
        assert_eq!(s.jobs[0].params.guidance, 6.5);
        assert_eq!(
            s.jobs[0].params.refiner,
            Some(RefinerStage {
                model: "m".into(),
                switch_at: 0.7
            })
        );
        assert_eq!(
            s.jobs[1].params.refiner, None,
            "refiner: null turns off the defaults' refiner"
        );
        assert_eq!(s.output, specs_dir().join("out/body"));
    }
    let e = spec::load_str("{\"version\": 1, \"jobs\": [}", "body.json", &specs_dir()).unwrap_err();
    assert!(e.to_string().starts_with("body.json:1:"), "{e}");
}

#[test]
fn huge_inputs_stay_bounded() {
    // 100,000 unknown keys: linear work, capped report.
    let keys: String = (0..100_000).map(|i| format!("k{i}: 1\n")).collect();
    let e = spec::load_str(&format!("version: 1\n{keys}"), "h.yaml", &specs_dir()).unwrap_err();
    assert_eq!(e.0.len(), spec::MAX_DIAGNOSTICS + 1);
    assert!(
        e.0.last().unwrap().message.starts_with("... and "),
        "{}",
        e.0.last().unwrap()
    );
    // Many jobs sharing a huge seed range from defaults: stops at the image limit.
    let jobs: String = (0..1000)
        .map(|i| format!("  - {{name: j{i}, prompts: [x]}}\n"))
        .collect();
    let text = format!(
        "version: 1\nmodels: {{m: {{source: hf:o/m}}}}\ndefaults:\n  seeds: {{from: 0, count: 9000000}}\njobs:\n{jobs}"
    );
    let e = spec::load_str(&text, "h.yaml", &specs_dir()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "h.yaml:6:3: this spec asks for 18000000 images; at most 10000000 are allowed"
    );
}
