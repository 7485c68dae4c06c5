//! Tokenizer, CLIP text encoders and safety checker against diffusers' golden data
//! (tests/fixtures/golden, produced by diffusers 0.42.1 / transformers 5.24 on CPU, float32).

mod common;
use common::diff;

use candle_core::{DType, Device, Tensor};
use sd_run::engine::clip::{sdxl_embeddings, TextEncoder};
use sd_run::engine::safety::{RgbImage, SafetyChecker};
use sd_run::engine::tokenizer::ClipTokenizer;
use std::collections::HashMap;
use std::path::PathBuf;

fn golden() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden")
}

fn model(rel: &str) -> PathBuf {
    golden().join("models").join(rel)
}

fn case(file: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(golden().join(file), &Device::Cpu).expect("golden case")
}

fn index() -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(golden().join("index.json")).expect("index.json");
    let v: serde_json::Value = serde_json::from_str(&text).expect("index.json parses");
    v["cases"].as_array().expect("cases").clone()
}

/// The text-to-image cases: (file, prompt, negative prompt, model).
fn text_cases() -> Vec<(String, String, String, String)> {
    index()
        .iter()
        .filter(|c| c.get("kind").is_none() && c.get("prompt").is_some())
        .map(|c| {
            let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
            (s("file"), s("prompt"), s("negative_prompt"), s("model"))
        })
        .collect()
}

fn ids_of(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::I64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .iter()
        .map(|&i| i as u32)
        .collect()
}

fn assert_close(what: &str, got: &Tensor, want: &Tensor, rel: f32) {
    let (d, m) = diff(got, want);
    println!(
        "{what}: max abs diff {d:.3e} (max abs {m:.3e}, relative {:.3e})",
        d / m.max(1e-30)
    );
    assert!(d <= rel * m, "{what}: max abs diff {d} > {rel} x {m}");
}

#[test]
fn token_ids_match_every_case() {
    let cases = text_cases();
    assert!(
        cases.len() >= 9,
        "expected the text-to-image cases, got {}",
        cases.len()
    );
    let mut checked = 0;
    for (file, prompt, negative, model_name) in cases {
        let data = case(&file);
        let Some(want) = data.get("input_ids") else {
            continue;
        };
        let tok = ClipTokenizer::load(&model(&model_name).join("tokenizer")).unwrap();
        assert_eq!(
            tok.encode(&prompt).unwrap(),
            ids_of(want),
            "{file}: {prompt:?}"
        );
        let want_neg = &data["negative_input_ids"];
        assert_eq!(
            tok.encode(&negative).unwrap(),
            ids_of(want_neg),
            "{file}: negative {negative:?}"
        );
        checked += 1;
    }
    assert!(checked >= 9, "only {checked} cases had ids");
}

#[test]
fn sd15_prompt_embeddings_match() {
    let dir = model("tiny-sd15");
    let tok = ClipTokenizer::load(&dir.join("tokenizer")).unwrap();
    let enc = TextEncoder::load(&dir.join("text_encoder"), &Device::Cpu, DType::F32).unwrap();
    assert!(!enc.has_projection());
    for (file, prompt, negative, model_name) in text_cases() {
        if model_name != "tiny-sd15" {
            continue;
        }
        let data = case(&file);
        let out = enc.encode(&tok, &[&prompt]).unwrap();
        assert_close(
            &format!("{file} prompt_embeds"),
            &out.last_hidden,
            &data["prompt_embeds"],
            1e-4,
        );
        let neg = enc.encode(&tok, &[&negative]).unwrap();
        assert_close(
            &format!("{file} negative_prompt_embeds"),
            &neg.last_hidden,
            &data["negative_prompt_embeds"],
            1e-4,
        );
        // A batch gives each row what it gives alone.
        let both = enc.encode(&tok, &[&prompt, &negative]).unwrap();
        assert_close(
            "batched row",
            &both.last_hidden.get(1).unwrap().unsqueeze(0).unwrap(),
            &neg.last_hidden,
            1e-5,
        );
    }
}

#[test]
fn sdxl_base_and_refiner_embeddings_match() {
    let c = index()
        .into_iter()
        .find(|c| c["name"] == "sdxl_refiner")
        .expect("sdxl case");
    let prompt = c["prompt"].as_str().unwrap();
    let negative = c["negative_prompt"].as_str().unwrap();
    let data = case(c["file"].as_str().unwrap());
    let base = model(c["model"].as_str().unwrap());
    let refiner = model(c["refiner"].as_str().unwrap());
    let cpu = Device::Cpu;
    let tok1 = ClipTokenizer::load(&base.join("tokenizer")).unwrap();
    let tok2 = ClipTokenizer::load(&base.join("tokenizer_2")).unwrap();
    assert_eq!(tok2.pad_id(), 0, "tokenizer_2 pads with `!`");
    let enc1 = TextEncoder::load(&base.join("text_encoder"), &cpu, DType::F32).unwrap();
    let enc2 = TextEncoder::load(&base.join("text_encoder_2"), &cpu, DType::F32).unwrap();
    assert!(enc2.has_projection());

    let pos = sdxl_embeddings(&[(&tok1, &enc1), (&tok2, &enc2)], &[prompt]).unwrap();
    assert_close(
        "sdxl prompt_embeds",
        &pos.prompt_embeds,
        &data["prompt_embeds"],
        1e-4,
    );
    assert_close(
        "sdxl pooled_prompt_embeds",
        &pos.pooled,
        &data["pooled_prompt_embeds"],
        1e-4,
    );
    let neg = sdxl_embeddings(&[(&tok1, &enc1), (&tok2, &enc2)], &[negative]).unwrap();
    assert_close(
        "sdxl negative_prompt_embeds",
        &neg.prompt_embeds,
        &data["negative_prompt_embeds"],
        1e-4,
    );
    assert_close(
        "sdxl negative_pooled_prompt_embeds",
        &neg.pooled,
        &data["negative_pooled_prompt_embeds"],
        1e-4,
    );

    let rtok = ClipTokenizer::load(&refiner.join("tokenizer_2")).unwrap();
    let renc = TextEncoder::load(&refiner.join("text_encoder_2"), &cpu, DType::F32).unwrap();
    let r = sdxl_embeddings(&[(&rtok, &renc)], &[prompt]).unwrap();
    assert_close(
        "refiner_prompt_embeds",
        &r.prompt_embeds,
        &data["refiner_prompt_embeds"],
        1e-4,
    );
    assert_close(
        "refiner_pooled_prompt_embeds",
        &r.pooled,
        &data["refiner_pooled_prompt_embeds"],
        1e-4,
    );
}

#[test]
fn half_precision_is_close_to_f32() {
    let dir = model("tiny-sdxl-base");
    let tok = ClipTokenizer::load(&dir.join("tokenizer_2")).unwrap();
    let full = TextEncoder::load(&dir.join("text_encoder_2"), &Device::Cpu, DType::F32).unwrap();
    let want = full.encode(&tok, &["a castle on a hill"]).unwrap();
    for dtype in [DType::F16, DType::BF16] {
        let enc = TextEncoder::load(&dir.join("text_encoder_2"), &Device::Cpu, dtype).unwrap();
        let got = enc.encode(&tok, &["a castle on a hill"]).unwrap();
        assert_eq!(got.last_hidden.dtype(), dtype);
        assert_close(
            &format!("{dtype:?} penultimate"),
            &got.penultimate,
            &want.penultimate,
            3e-2,
        );
        assert_close(
            &format!("{dtype:?} pooled"),
            &got.pooled,
            &want.pooled,
            3e-2,
        );
    }
}

fn safety_images(data: &HashMap<String, Tensor>) -> Vec<RgbImage> {
    (0..)
        .map_while(|i| data.get(&format!("images_{i}")))
        .map(|t| {
            let (h, w, _) = t.dims3().unwrap();
            RgbImage::from_unit_floats(w, h, &t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
                .unwrap()
        })
        .collect()
}

#[test]
fn safety_checker_matches() {
    let data = case("cases/safety.safetensors");
    let dir = model("tiny-sd15");
    let checker = SafetyChecker::load(
        &dir.join("safety_checker"),
        &dir.join("feature_extractor"),
        &Device::Cpu,
    )
    .unwrap();
    let images = safety_images(&data);
    assert_eq!(images.len(), 3);
    assert!(
        images.iter().any(|i| i.width != i.height),
        "a non-square image exercises resize + crop"
    );

    let input = checker.preprocess(&images).unwrap();
    let (d, _) = diff(&input, &data["clip_input"]);
    println!("clip_input: max abs diff {d:.3e}");
    assert!(d <= 2e-3, "clip_input differs by {d}");

    // Embeddings of diffusers' own preprocessed input isolate the vision tower.
    let embeds = checker.image_embeds(&data["clip_input"]).unwrap();
    assert_close(
        "image_embeds (golden input)",
        &embeds,
        &data["image_embeds"],
        1e-4,
    );
    let ours = checker.image_embeds(&input).unwrap();
    let (special, concept) = checker.cosines(&ours).unwrap();
    let (ds, _) = diff(&special, &data["special_cos"]);
    let (dc, _) = diff(&concept, &data["concept_cos"]);
    println!("special_cos: max abs diff {ds:.3e}; concept_cos: max abs diff {dc:.3e}");
    assert!(ds <= 1e-3 && dc <= 1e-3);

    let want: Vec<bool> = ids_of(&data["has_nsfw"]).iter().map(|&v| v != 0).collect();
    let verdicts = checker.check(&images, 0.0).unwrap();
    let got: Vec<bool> = verdicts.iter().map(|v| v.flagged).collect();
    assert_eq!(got, want);
    assert_eq!(verdicts[0].concept_scores.len(), concept.dim(1).unwrap());
    assert_eq!(verdicts[0].special_scores.len(), special.dim(1).unwrap());
    // Raising every threshold by 1 (cosines are ≤ 1) clears every image; lowering flags all.
    assert!(checker
        .check(&images, 1.0)
        .unwrap()
        .iter()
        .all(|v| !v.flagged));
    assert!(checker
        .check(&images, -2.5)
        .unwrap()
        .iter()
        .all(|v| v.flagged));
}

#[test]
fn demo_models_load_and_run() {
    let demo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/demo");
    if !demo.is_dir() {
        return;
    }
    let checker = SafetyChecker::load(
        &demo.join("safety_checker"),
        &demo.join("feature_extractor"),
        &Device::Cpu,
    )
    .unwrap();
    let img = RgbImage {
        width: 80,
        height: 48,
        data: (0..80 * 48 * 3).map(|i| (i % 251) as u8).collect(),
    };
    let v = checker.check(&[img], 0.0).unwrap();
    assert_eq!(v.len(), 1);
    let tok = ClipTokenizer::load(&demo.join("tokenizer")).unwrap();
    let enc = TextEncoder::load(&demo.join("text_encoder"), &Device::Cpu, DType::F32).unwrap();
    let out = enc.encode(&tok, &["a red fox"]).unwrap();
    assert_eq!(out.last_hidden.dims(), &[1, 77, enc.hidden_size()]);
}

fn copy_without(src: &std::path::Path, dst: &std::path::Path, drop: &str) {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() != "model.safetensors" {
            std::fs::copy(entry.path(), dst.join(entry.file_name())).unwrap();
        }
    }
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<_> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != drop)
        .collect();
    assert!(kept.len() + 1 == st.len(), "{drop} was in the file");
    safetensors::serialize_to_file(kept, None, &dst.join("model.safetensors")).unwrap();
}

#[test]
fn missing_tensor_errors_name_file_and_tensor() {
    let tmp = std::env::temp_dir().join(format!("sdrun-engine-text-{}", std::process::id()));
    let src = model("tiny-sdxl-base/text_encoder_2");
    let dst = tmp.join("text_encoder_2");
    let name = "text_model.encoder.layers.1.mlp.fc2.weight";
    copy_without(&src, &dst, name);
    let err = TextEncoder::load(&dst, &Device::Cpu, DType::F32)
        .unwrap_err()
        .to_string();
    println!("{err}");
    assert!(
        err.contains("model.safetensors") && err.contains(name),
        "{err}"
    );

    let sc = tmp.join("safety_checker");
    copy_without(
        &model("tiny-sd15/safety_checker"),
        &sc,
        "special_care_embeds_weights",
    );
    let err = SafetyChecker::load(&sc, &model("tiny-sd15/feature_extractor"), &Device::Cpu)
        .unwrap_err()
        .to_string();
    println!("{err}");
    assert!(
        err.contains("model.safetensors") && err.contains("special_care_embeds_weights"),
        "{err}"
    );

    // A config that disagrees with the weights: the shape error names the tensor.
    let bad = tmp.join("text_encoder_bad");
    copy_without(&src, &bad, "text_projection.weight");
    let config = std::fs::read_to_string(src.join("config.json")).unwrap();
    let config = config.replace("\"intermediate_size\": 125", "\"intermediate_size\": 99");
    std::fs::write(bad.join("config.json"), config).unwrap();
    let err = TextEncoder::load(&bad, &Device::Cpu, DType::F32)
        .unwrap_err()
        .to_string();
    println!("{err}");
    assert!(err.contains("fc1") && err.contains("shape"), "{err}");
    let _ = std::fs::remove_dir_all(&tmp);
}
