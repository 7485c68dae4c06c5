//! UNet, VAE and Hugging Face source resolution against diffusers' golden components
//! (tests/fixtures/golden, computed by diffusers 0.42.1 on CPU in float32).

mod common;
use common::diff;

use candle_core::{DType, Device, Tensor};
use sd_run::engine::unet::{AddedCond, UNet};
use sd_run::engine::vae::Vae;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn golden() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden")
}

fn model(name: &str) -> PathBuf {
    golden().join("models").join(name)
}

fn case(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        golden().join("cases").join(format!("{name}.safetensors")),
        &Device::Cpu,
    )
    .expect("golden case")
}

fn check(what: &str, got: &Tensor, want: &Tensor) {
    let (d, m) = diff(got, want);
    println!(
        "{what}: max abs diff {d:e} (reference max abs {m}, ratio {:e})",
        d / m
    );
    assert!(d <= 1e-4 * m, "{what}: max abs diff {d} exceeds 1e-4 x {m}");
}

fn timestep(c: &HashMap<String, Tensor>) -> f64 {
    c["unet_timestep"]
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()[0]
}

#[test]
fn unet_sd15_matches_diffusers() {
    let c = case("components_tiny-sd15");
    let unet = UNet::load(&model("tiny-sd15/unet"), &Device::Cpu, DType::F32).unwrap();
    let out = unet
        .forward(
            &c["unet_sample"],
            timestep(&c),
            &c["unet_encoder_hidden_states"],
            None,
        )
        .unwrap();
    check("unet tiny-sd15", &out, &c["unet_out"]);
}

#[test]
fn unet_attention_slicing_gives_the_same_numbers() {
    let c = case("components_tiny-sd15");
    let mut unet = UNet::load(&model("tiny-sd15/unet"), &Device::Cpu, DType::F32).unwrap();
    unet.set_attention_slice(Some(5));
    let out = unet
        .forward(
            &c["unet_sample"],
            timestep(&c),
            &c["unet_encoder_hidden_states"],
            None,
        )
        .unwrap();
    check("unet tiny-sd15 sliced", &out, &c["unet_out"]);
}

#[test]
fn unet_sdxl_base_matches_diffusers() {
    let c = case("components_tiny-sdxl-base");
    let unet = UNet::load(&model("tiny-sdxl-base/unet"), &Device::Cpu, DType::F32).unwrap();
    let added = AddedCond {
        text_embeds: c["unet_text_embeds"].clone(),
        time_ids: c["unet_time_ids"].clone(),
    };
    let out = unet
        .forward(
            &c["unet_sample"],
            timestep(&c),
            &c["unet_encoder_hidden_states"],
            Some(&added),
        )
        .unwrap();
    check("unet tiny-sdxl-base", &out, &c["unet_out"]);
    // Without the added conditioning, a text_time UNet refuses rather than guessing.
    assert!(unet
        .forward(
            &c["unet_sample"],
            timestep(&c),
            &c["unet_encoder_hidden_states"],
            None
        )
        .is_err());
}

#[test]
fn vae_decode_matches_diffusers() {
    for m in ["tiny-sd15", "tiny-sdxl-base"] {
        let c = case(&format!("components_{m}"));
        let vae = Vae::load(&model(&format!("{m}/vae")), &Device::Cpu, DType::F32).unwrap();
        let out = vae.decode(&c["vae_latents"]).unwrap();
        check(&format!("vae decode {m}"), &out, &c["vae_decoded"]);
    }
}

/// A fresh temporary folder for one test.
fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sd-run-engine-unet-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn sdxl_refiner_unet_forward_shape() {
    // The refiner conditions on an aesthetic score: time_ids of length 5.
    let dir = model("tiny-sdxl-refiner/unet");
    let unet = UNet::load(&dir, &Device::Cpu, DType::F32).unwrap();
    let cfg = unet.config();
    let ctx_dim = match &cfg.cross_attention_dim {
        sd_run::engine::unet::PerBlock::One(d) => *d,
        sd_run::engine::unet::PerBlock::Each(v) => v[0],
    };
    let pooled = cfg.projection_class_embeddings_input_dim.unwrap()
        - 5 * cfg.addition_time_embed_dim.unwrap();
    let dev = Device::Cpu;
    let sample = Tensor::randn(0f32, 1.0, (2, cfg.in_channels, 8, 8), &dev).unwrap();
    let ctx = Tensor::randn(0f32, 1.0, (2, 77, ctx_dim), &dev).unwrap();
    let added = AddedCond {
        text_embeds: Tensor::randn(0f32, 1.0, (2, pooled), &dev).unwrap(),
        time_ids: Tensor::new(&[[64f32, 64., 0., 0., 6.0], [64., 64., 0., 0., 2.5]], &dev).unwrap(),
    };
    let out = unet.forward(&sample, 500.5, &ctx, Some(&added)).unwrap();
    assert_eq!(out.dims(), &[2, cfg.out_channels, 8, 8]);
    // A base-style (B, 6) time_ids does not fit the refiner's projection: an error, not a panic.
    let wrong = AddedCond {
        time_ids: Tensor::zeros((2, 6), DType::F32, &dev).unwrap(),
        ..added
    };
    let err = unet
        .forward(&sample, 500.0, &ctx, Some(&wrong))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("projection_class_embeddings_input_dim"),
        "{err}"
    );
}

#[test]
fn demo_unet_and_vae_round_shapes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo");
    let dev = Device::Cpu;
    let unet = UNet::load(&root.join("unet"), &dev, DType::F32).unwrap();
    let cfg = unet.config().clone();
    let ctx_dim = match &cfg.cross_attention_dim {
        sd_run::engine::unet::PerBlock::One(d) => *d,
        sd_run::engine::unet::PerBlock::Each(v) => v[0],
    };
    // Non-square, not a multiple of 2^levels: the upsamplers follow the skip sizes.
    let sample = Tensor::randn(0f32, 1.0, (2, cfg.in_channels, 9, 6), &dev).unwrap();
    let ctx = Tensor::randn(0f32, 1.0, (2, 77, ctx_dim), &dev).unwrap();
    let out = unet.forward(&sample, 999.0, &ctx, None).unwrap();
    assert_eq!(out.dims(), &[2, cfg.out_channels, 9, 6]);

    let vae = Vae::load(&root.join("vae"), &dev, DType::F32).unwrap();
    assert!((vae.scaling_factor() - 0.567).abs() < 1e-6);
    let latents = Tensor::randn(0f32, 1.0, (1, 4, 8, 8), &dev).unwrap();
    let image = vae.decode(&latents).unwrap();
    assert_eq!(image.dims(), &[1, 3, 64, 64]);
    // encode: mean (no noise) equals mean + std * 0; noise moves it; shapes come back.
    let image = image.clamp(-1f32, 1f32).unwrap();
    let z0 = vae.encode(&image, None).unwrap();
    assert_eq!(z0.dims(), &[1, 4, 8, 8]);
    let zeros = Tensor::zeros((1, 4, 8, 8), DType::F32, &dev).unwrap();
    let (d, _) = diff(&vae.encode(&image, Some(&zeros)).unwrap(), &z0);
    assert_eq!(d, 0.0);
    let noise = Tensor::ones((1, 4, 8, 8), DType::F32, &dev).unwrap();
    let (d, _) = diff(&vae.encode(&image, Some(&noise)).unwrap(), &z0);
    assert!(d > 0.0);
}

/// Writes `unet/` of tiny-sd15 into a temp folder with its weights rewritten by `edit`.
fn edited_unet(name: &str, edit: impl Fn(&str, &[usize]) -> Option<Vec<usize>>) -> PathBuf {
    let src = model("tiny-sd15/unet");
    let dst = temp_dir(name).join("unet");
    copy_dir(&src, &dst);
    let bytes = std::fs::read(src.join("diffusion_pytorch_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut kept = Vec::new();
    for (n, view) in st.tensors() {
        if let Some(shape) = edit(&n, view.shape()) {
            kept.push((
                n,
                safetensors::tensor::TensorView::new(view.dtype(), shape, view.data()).unwrap(),
            ));
        }
    }
    safetensors::serialize_to_file(kept, None, &dst.join("diffusion_pytorch_model.safetensors"))
        .unwrap();
    dst
}

#[test]
fn missing_tensor_names_file_and_tensor() {
    let dir = edited_unet("missing", |n, s| {
        (n != "time_embedding.linear_2.bias").then(|| s.to_vec())
    });
    let err = UNet::load(&dir, &Device::Cpu, DType::F32)
        .unwrap_err()
        .to_string();
    println!("{err}");
    assert!(err.contains("diffusion_pytorch_model.safetensors"), "{err}");
    assert!(err.contains("time_embedding.linear_2.bias"), "{err}");
    let _ = std::fs::remove_dir_all(dir.parent().unwrap());
}

#[test]
fn wrongly_shaped_tensor_names_file_and_tensor() {
    let dir = edited_unet("shape", |n, s| {
        if n == "conv_in.weight" {
            // Same element count, another shape.
            Some(vec![s[0], s[1], s[2] * s[3], 1])
        } else {
            Some(s.to_vec())
        }
    });
    let err = UNet::load(&dir, &Device::Cpu, DType::F32)
        .unwrap_err()
        .to_string();
    println!("{err}");
    assert!(err.contains("diffusion_pytorch_model.safetensors"), "{err}");
    assert!(err.contains("conv_in.weight"), "{err}");
    assert!(err.contains("shape"), "{err}");
    let _ = std::fs::remove_dir_all(dir.parent().unwrap());
}

#[test]
fn bad_config_field_names_config_and_field() {
    let cases: &[(&str, serde_json::Value)] = &[
        ("resnet_time_scale_shift", serde_json::json!("scale_shift")),
        ("class_embed_type", serde_json::json!("timestep")),
        (
            "down_block_types",
            serde_json::json!(["SimpleCrossAttnDownBlock2D", "DownBlock2D"]),
        ),
        ("attention_head_dim", serde_json::json!([4, 4, 4])),
        ("layers_per_block", serde_json::json!("two")),
        ("addition_embed_type", serde_json::json!("text")),
    ];
    for (i, (field, value)) in cases.iter().enumerate() {
        let dst = temp_dir(&format!("cfg{i}")).join("unet");
        copy_dir(&model("tiny-sd15/unet"), &dst);
        let cfg_path = dst.join("config.json");
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
        cfg[*field] = value.clone();
        std::fs::write(&cfg_path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
        let err = UNet::load(&dst, &Device::Cpu, DType::F32)
            .unwrap_err()
            .to_string();
        println!("{err}");
        assert!(
            err.contains("config.json") && err.contains(field),
            "{field}: {err}"
        );
        let _ = std::fs::remove_dir_all(dst.parent().unwrap());
    }
}

mod hub {
    use super::*;
    use sd_run::engine::hub::{resolve, HubOptions};
    use sd_run::spec::{ModelSource, Precision};

    const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

    /// A standard hub cache holding tiny-sd15 as `org/tiny` at `COMMIT`, ref `main`.
    fn cache(name: &str) -> PathBuf {
        let root = temp_dir(name);
        let repo = root.join("models--org--tiny");
        copy_dir(&model("tiny-sd15"), &repo.join("snapshots").join(COMMIT));
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), COMMIT).unwrap();
        root
    }

    fn hf(rev: Option<&str>) -> ModelSource {
        ModelSource::Hf {
            repo: "org/tiny".into(),
            revision: rev.map(String::from),
        }
    }

    #[test]
    fn offline_resolution_from_the_cache() {
        let root = cache("hub-ok");
        let opts = HubOptions {
            cache_dir: root.clone(),
            offline: true,
        };
        let snap = root.join("models--org--tiny/snapshots").join(COMMIT);
        for rev in [None, Some("main"), Some(COMMIT)] {
            let dir = resolve(&hf(rev), Precision::F32, &opts).unwrap();
            assert_eq!(dir, snap, "{rev:?}");
        }
        let dir = resolve(&hf(None), Precision::F16, &opts).unwrap();
        UNet::load(&dir.join("unet"), &Device::Cpu, DType::F32).unwrap();
        // An unknown revision or repo is an error naming it.
        let err = resolve(&hf(Some("v2")), Precision::F32, &opts)
            .unwrap_err()
            .to_string();
        assert!(err.contains("org/tiny@v2"), "{err}");
        // A path source is its own folder.
        let p = ModelSource::Path {
            path: model("tiny-sd15"),
        };
        assert_eq!(
            resolve(&p, Precision::F32, &opts).unwrap(),
            model("tiny-sd15")
        );
        let _ = std::fs::remove_dir_all(root);
    }

    #[test]
    fn offline_missing_file_is_named() {
        let root = cache("hub-missing");
        let snap = root.join("models--org--tiny/snapshots").join(COMMIT);
        std::fs::remove_file(snap.join("vae/diffusion_pytorch_model.safetensors")).unwrap();
        let opts = HubOptions {
            cache_dir: root.clone(),
            offline: true,
        };
        let err = resolve(&hf(None), Precision::F32, &opts)
            .unwrap_err()
            .to_string();
        println!("{err}");
        assert!(
            err.contains("vae/diffusion_pytorch_model.safetensors") && err.contains("org/tiny"),
            "{err}"
        );
        std::fs::remove_file(snap.join("scheduler/scheduler_config.json")).unwrap();
        let err = resolve(&hf(None), Precision::F32, &opts)
            .unwrap_err()
            .to_string();
        assert!(err.contains("scheduler/scheduler_config.json"), "{err}");
        let _ = std::fs::remove_dir_all(root);
    }
}

#[test]
fn vae_tiling_follows_diffusers_tiles() {
    let dev = Device::Cpu;
    let c = case("components_tiny-sd15");
    let mut vae = Vae::load(&model("tiny-sd15/vae"), &dev, DType::F32).unwrap();
    let plain = vae.decode(&c["vae_latents"]).unwrap();
    vae.set_tiling(true);
    assert!(vae.tiling());
    // 8x12 latents exceed the 8-latent tile (sample_size 64 / 8): tiled, same shape, and
    // close to the untiled image where the first tile is not blended.
    let tiled = vae.decode(&c["vae_latents"]).unwrap();
    assert_eq!(tiled.dims(), plain.dims());
    let v: Vec<f32> = tiled.flatten_all().unwrap().to_vec1().unwrap();
    assert!(v.iter().all(|x| x.is_finite()));
    let (d, _) = diff(&tiled, &plain);
    assert!(d > 0.0, "tiling changed nothing");
    // Tile (0, 0) is not blended: its first 48x48 pixels (tile 64 - blend 16) are the output's.
    let z = &c["vae_latents"];
    let crop = |t: &Tensor, y: usize, x: usize, h: usize, w: usize| {
        t.narrow(2, y, h).unwrap().narrow(3, x, w).unwrap()
    };
    let t00 = vae.decode(&crop(z, 0, 0, 8, 8)).unwrap();
    assert_eq!(
        diff(&crop(&tiled, 0, 0, 48, 48), &crop(&t00, 0, 0, 48, 48)).0,
        0.0
    );
    // Tile (0, 1) starts at latent column 6 (pixel 48); past its 16 blended columns it is copied.
    let t01 = vae.decode(&crop(z, 0, 6, 8, 6)).unwrap();
    assert_eq!(
        diff(&crop(&tiled, 0, 64, 48, 32), &crop(&t01, 0, 16, 48, 32)).0,
        0.0
    );
    // Latents within one tile are decoded whole: identical to untiled.
    let small = c["vae_latents"].narrow(3, 0, 8).unwrap();
    vae.set_tiling(false);
    let a = vae.decode(&small).unwrap();
    vae.set_tiling(true);
    let b = vae.decode(&small).unwrap();
    assert_eq!(diff(&a, &b).0, 0.0);
    // Tiled encode of a 96x128 image gives 12x16 latents.
    let image = Tensor::rand(-1f32, 1.0, (1, 3, 96, 128), &dev).unwrap();
    assert_eq!(vae.encode(&image, None).unwrap().dims(), &[1, 4, 12, 16]);
}
