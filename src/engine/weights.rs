//! Memory-mapped safetensors behind a `VarBuilder` whose errors name the file and the tensor.

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::{SimpleBackend, VarBuilder};
use candle_nn::Init;
use std::path::{Path, PathBuf};

use super::EngineError;

/// The safetensors files of one component, memory-mapped.
struct Backend {
    file: PathBuf,
    tensors: candle_core::safetensors::MmapedSafetensors,
}

impl Backend {
    fn error(&self, name: &str, message: impl std::fmt::Display) -> candle_core::Error {
        candle_core::Error::Msg(format!(
            "{}: tensor `{name}`: {message}",
            self.file.display()
        ))
    }
}

impl SimpleBackend for Backend {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.shape() != &shape {
            return Err(self.error(
                name,
                format!("expected shape {shape:?}, the file has {:?}", t.shape()),
            ));
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self
            .tensors
            .load(name, dev)
            .map_err(|_| self.error(name, "missing"))?;
        if let Ok(view) = self.tensors.get(name) {
            release_pages(view.data());
        }
        t.to_dtype(dtype).map_err(|e| self.error(name, e))
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.get(name).is_ok()
    }
}

/// Drops the mapped file pages of a tensor that has just been copied out of the mapping, so
/// that the process does not hold each checkpoint twice (the copy and the mapped pages) while
/// it loads: peak memory is the weights plus one tensor, not twice the weights. The pages stay
/// in the page cache; a later read of the mapping faults them back in from there.
fn release_pages(data: &[u8]) {
    #[cfg(target_os = "linux")]
    {
        extern "C" {
            fn madvise(addr: *mut std::ffi::c_void, len: usize, advice: i32) -> i32;
        }
        const MADV_DONTNEED: i32 = 4;
        const PAGE: usize = 4096;
        let start = (data.as_ptr() as usize).div_ceil(PAGE) * PAGE;
        let end = (data.as_ptr() as usize + data.len()) / PAGE * PAGE;
        if end > start {
            // SAFETY: [start, end) lies inside this read-only private file mapping, which stays
            // mapped; MADV_DONTNEED on such a mapping only drops pages that are re-read from the
            // file on the next access, so no data is lost or changed.
            unsafe {
                madvise(start as *mut std::ffi::c_void, end - start, MADV_DONTNEED);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = data;
}

/// Opens `file` (a `.safetensors`) as a `VarBuilder` on `device` in `dtype`.
pub fn open(
    file: &Path,
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>, EngineError> {
    if !file.is_file() {
        return Err(EngineError::Load {
            file: file.to_path_buf(),
            message: "file not found".into(),
        });
    }
    // SAFETY: the file is memory-mapped read-only; a checkpoint changing under a running process
    // is outside what any safetensors reader can guard against.
    let tensors =
        unsafe { candle_core::safetensors::MmapedSafetensors::new(file) }.map_err(|e| {
            EngineError::Load {
                file: file.to_path_buf(),
                message: format!("not a readable safetensors file: {e}"),
            }
        })?;
    let backend = Backend {
        file: file.to_path_buf(),
        tensors,
    };
    Ok(VarBuilder::from_backend(
        Box::new(backend),
        dtype,
        device.clone(),
    ))
}

/// The weights file of a diffusers component folder: `model.safetensors` (transformers) or
/// `diffusion_pytorch_model.safetensors` (diffusers), else their `.fp16` variants.
pub fn component_file(dir: &Path) -> Result<PathBuf, EngineError> {
    for name in [
        "diffusion_pytorch_model.safetensors",
        "model.safetensors",
        "diffusion_pytorch_model.fp16.safetensors",
        "model.fp16.safetensors",
    ] {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(EngineError::Load {
        file: dir.join("diffusion_pytorch_model.safetensors"),
        message: "no safetensors weights in this folder (.bin/.ckpt are not read)".into(),
    })
}

/// Reads and parses a JSON config file, naming the file on error.
pub fn read_json<T: serde::de::DeserializeOwned>(file: &Path) -> Result<T, EngineError> {
    let text = std::fs::read_to_string(file).map_err(|e| EngineError::Load {
        file: file.to_path_buf(),
        message: e.to_string(),
    })?;
    serde_json::from_str(&text).map_err(|e| EngineError::Load {
        file: file.to_path_buf(),
        message: format!("bad JSON: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_read_again_after_their_pages_are_released() {
        let dir = std::env::temp_dir().join(format!("sd-run-weights-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("w.safetensors");
        // Several pages each, so whole pages are released.
        let a: Vec<f32> = (0..20_000).map(|i| i as f32 * 0.5).collect();
        let b: Vec<f32> = (0..5_000).map(|i| -(i as f32)).collect();
        let ta = Tensor::from_vec(a.clone(), (100, 200), &Device::Cpu).unwrap();
        let tb = Tensor::from_vec(b.clone(), 5_000, &Device::Cpu).unwrap();
        candle_core::safetensors::save(
            &[("a".to_string(), ta), ("b".to_string(), tb)]
                .into_iter()
                .collect(),
            &file,
        )
        .unwrap();
        let vb = open(&file, DType::F32, &Device::Cpu).unwrap();
        for _ in 0..2 {
            let got = vb.get((100, 200), "a").unwrap().flatten_all().unwrap();
            assert_eq!(got.to_vec1::<f32>().unwrap(), a);
            assert_eq!(vb.get(5_000, "b").unwrap().to_vec1::<f32>().unwrap(), b);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
