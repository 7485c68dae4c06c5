//! The resolved data model of a campaign: what `spec::load` produces and every later stage reads.
//!
//! These are plain data: no YAML, no candle. Paths are already resolved against the spec's folder.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Where a checkpoint comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ModelSource {
    /// `hf:ORG/NAME[@REVISION]`.
    Hf {
        repo: String,
        revision: Option<String>,
    },
    /// A diffusers-layout folder on disk (absolute after resolution).
    Path { path: PathBuf },
}

/// Weight precision asked for by the spec (CPU always computes in f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    F16,
    Bf16,
}

/// `memory.attention_slicing`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AttentionSlicing {
    Off,
    #[default]
    Auto,
    Size(usize),
}

/// `memory.offload`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Offload {
    #[default]
    None,
    Model,
}

/// A model's memory policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct MemoryPolicy {
    pub attention_slicing: AttentionSlicing,
    pub flash_attention: bool,
    pub vae_tiling: bool,
    pub offload: Offload,
}

/// One entry of `models:`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelDecl {
    pub name: String,
    pub source: ModelSource,
    pub dtype: Precision,
    pub memory: MemoryPolicy,
}

/// Scheduler names of the spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SchedulerName {
    Default,
    Ddim,
    Euler,
    EulerA,
    #[serde(rename = "dpmpp_2m")]
    DpmPp2m,
    #[serde(rename = "dpmpp_2m_karras")]
    DpmPp2mKarras,
    Unipc,
    Pndm,
}

impl SchedulerName {
    /// Every name, in the order the spec documents them.
    pub const ALL: [SchedulerName; 8] = [
        Self::Default,
        Self::Ddim,
        Self::Euler,
        Self::EulerA,
        Self::DpmPp2m,
        Self::DpmPp2mKarras,
        Self::Unipc,
        Self::Pndm,
    ];

    /// The spec's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Default => "default",
            Self::Ddim => "ddim",
            Self::Euler => "euler",
            Self::EulerA => "euler_a",
            Self::DpmPp2m => "dpmpp_2m",
            Self::DpmPp2mKarras => "dpmpp_2m_karras",
            Self::Unipc => "unipc",
            Self::Pndm => "pndm",
        }
    }

    /// Parses the spec's spelling.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|n| n.as_str() == s)
    }
}

/// Where initial latents (and ancestral noise) come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum NoiseSource {
    /// Bit-exact `torch.randn` with a CPU generator seeded per image.
    #[default]
    TorchCpu,
    /// The device's own RNG (faster, not reproducible across devices).
    Device,
}

impl NoiseSource {
    /// The spec's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TorchCpu => "torch-cpu",
            Self::Device => "device",
        }
    }
}

/// `refiner: {model, switch_at}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RefinerStage {
    pub model: String,
    pub switch_at: f64,
}

/// `safety.checker`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum CheckerChoice {
    /// The checkpoint's own `safety_checker/`.
    #[default]
    Model,
    Off,
    /// A `safety_checker` folder, or a model folder that has one.
    Path(PathBuf),
}

/// `safety.action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SafetyAction {
    Tag,
    #[default]
    Blur,
    Black,
    Quarantine,
    Drop,
}

impl SafetyAction {
    /// The spec's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tag => "tag",
            Self::Blur => "blur",
            Self::Black => "black",
            Self::Quarantine => "quarantine",
            Self::Drop => "drop",
        }
    }
}

/// The spec's `safety:` block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct SafetyPolicy {
    pub checker: CheckerChoice,
    pub action: SafetyAction,
    pub threshold_adjust: f64,
}

/// SDXL micro-conditioning (ignored by SD 1.x / 2.x models).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SdxlConditioning {
    /// `original_size` as (width, height); `None` = the image size.
    pub original_size: Option<(u32, u32)>,
    /// `crop` top-left as (top, left).
    pub crop: (u32, u32),
    pub aesthetic_score: f64,
    pub negative_aesthetic_score: f64,
}

impl Default for SdxlConditioning {
    fn default() -> Self {
        Self {
            original_size: None,
            crop: (0, 0),
            aesthetic_score: 6.0,
            negative_aesthetic_score: 2.5,
        }
    }
}

/// Every field a job (or `defaults:`) may set that shapes its images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenParams {
    pub steps: u32,
    pub guidance: f64,
    pub scheduler: SchedulerName,
    pub width: u32,
    pub height: u32,
    pub negative_prompt: String,
    pub batch_size: u32,
    pub noise: NoiseSource,
    pub refiner: Option<RefinerStage>,
    pub sdxl: SdxlConditioning,
    /// img2img: the start image (resolved path) and strength in (0, 1].
    pub init_image: Option<PathBuf>,
    pub strength: f64,
}

impl Default for GenParams {
    fn default() -> Self {
        Self {
            steps: 25,
            guidance: 7.5,
            scheduler: SchedulerName::Default,
            width: 512,
            height: 512,
            negative_prompt: String::new(),
            batch_size: 4,
            noise: NoiseSource::TorchCpu,
            refiner: None,
            sdxl: SdxlConditioning::default(),
            init_image: None,
            strength: 0.8,
        }
    }
}

/// One prompt of a job (a job-level `negative_prompt` fills in when absent).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptEntry {
    pub prompt: String,
    pub negative_prompt: Option<String>,
}

/// One axis of a job's `grid:`: a field name and its values, rendered as in the spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GridAxis {
    pub field: String,
    pub values: Vec<String>,
}

/// A validated job: its base parameters (defaults merged), prompts, seeds and grid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub name: String,
    pub model: String,
    pub prompts: Vec<PromptEntry>,
    pub seeds: Vec<u64>,
    pub grid: Vec<GridAxis>,
    pub params: GenParams,
}

/// A validated campaign.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Spec {
    /// The spec file as given.
    pub file: PathBuf,
    /// Output root, resolved.
    pub output: PathBuf,
    pub models: BTreeMap<String, ModelDecl>,
    pub memory_budget: Option<u64>,
    pub safety: SafetyPolicy,
    pub jobs: Vec<Job>,
}

/// One image the campaign asks for: (job, prompt, grid point, seed) with every parameter resolved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageRequest {
    pub job: String,
    /// Position of the job in the spec, of the prompt in the job, of the grid point in the grid.
    pub job_index: usize,
    pub prompt_index: usize,
    pub grid_index: usize,
    pub model: String,
    pub prompt: String,
    pub seed: u64,
    pub params: GenParams,
    /// The grid point's (field, value) pairs, for labels.
    pub grid_point: Vec<(String, String)>,
}

/// `device` of `sd-run.toml` (and `--device`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// CUDA or Metal when built in and available, else CPU.
    #[default]
    Auto,
    Cpu,
    Cuda,
    Metal,
}

impl DeviceChoice {
    /// The spelling in `sd-run.toml`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Cpu => "cpu",
            Self::Cuda => "cuda",
            Self::Metal => "metal",
        }
    }

    /// Parses `auto`, `cpu`, `cuda` or `metal`.
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Auto, Self::Cpu, Self::Cuda, Self::Metal]
            .into_iter()
            .find(|d| d.as_str() == s)
    }
}
