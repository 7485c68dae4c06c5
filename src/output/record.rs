//! The manifest record: one JSON object per image, in `manifest.jsonl` and in each PNG's
//! `sd-run` tEXt chunk.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use crate::spec::RefinerStage;

/// What the safety stage did to an image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct SafetyRecord {
    /// Whether a checker ran.
    pub checked: bool,
    pub flagged: bool,
    /// The action taken when flagged (`tag`, `blur`, `black`, `quarantine`, `drop`), or null.
    pub action: Option<String>,
    /// Concept and special-care scores by name (`concept_0`, `special_0`, ...), after
    /// `threshold_adjust`: > 0 means over the threshold.
    pub scores: BTreeMap<String, f64>,
}

/// `status` of a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageStatus {
    Ok,
    Flagged,
    Failed,
}

/// One image's manifest record, as `shared/spec.md` lists its fields (plus a few more).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestRecord {
    /// Hex sha256 cache key.
    pub key: String,
    /// Path of the PNG relative to the output root; null when the image was dropped or failed.
    pub path: Option<String>,
    /// Hex sha256 of the PNG file's bytes (how the store tells a whole file from a damaged one).
    pub file_sha256: Option<String>,
    pub job: String,
    pub model: String,
    pub prompt: String,
    pub negative_prompt: String,
    pub seed: u64,
    pub steps: u32,
    pub guidance: f64,
    pub scheduler: String,
    pub width: u32,
    pub height: u32,
    pub noise: String,
    pub refiner: Option<RefinerStage>,
    pub safety: SafetyRecord,
    pub status: ImageStatus,
    /// Wall seconds spent on this image (its share of its batch).
    pub seconds: f64,
    /// First 10 hex digits of the UNet weights' sha256 (AUTOMATIC1111's `Model hash`).
    pub model_hash: String,
    /// The grid point's (field, value) pairs.
    #[serde(default)]
    pub grid: Vec<(String, String)>,
    /// Why the image failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}
