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
        t.to_dtype(dtype).map_err(|e| self.error(name, e))
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.get(name).is_ok()
    }
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
