//! Digests of the files of a diffusers folder that change pixels.
//!
//! [`digest_model`] hashes, for each component folder present (`unet`, `vae`, `text_encoder`,
//! `text_encoder_2`, `tokenizer`, `tokenizer_2`, `scheduler`, `safety_checker`,
//! `feature_extractor`), its `*.safetensors`, `*.json` and `*.txt` files (never `.bin`, `.ckpt`,
//! `.onnx`, `.msgpack`), plus `model_index.json`. The combined digest is a sha256 over
//! `"sd-run/model-digest/v1"` followed by, for each file in sorted relative-path order (`/`
//! separators), the path's length (u64 little-endian), its UTF-8 bytes, and the file's raw
//! 32-byte sha256.
//!
//! File digests are remembered in a [`DigestIndex`] keyed by canonical path, size and
//! modification time (ns): an unchanged file is never re-hashed, a changed one always is.

use super::{default_cache_dir, sha256_file, write_atomic, CacheError};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Component folders whose files change pixels.
pub const COMPONENTS: [&str; 9] = [
    "unet",
    "vae",
    "text_encoder",
    "text_encoder_2",
    "tokenizer",
    "tokenizer_2",
    "scheduler",
    "safety_checker",
    "feature_extractor",
];

/// File extensions that are hashed (weights in other formats are never read).
pub const HASHED_EXTENSIONS: [&str; 3] = ["safetensors", "json", "txt"];

const MODEL_DIGEST_FORMAT: &str = "sd-run/model-digest/v1";

/// A checkpoint's digests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelDigest {
    /// Hex sha256 over every pixel-changing file of the folder (see the module docs).
    pub combined: String,
    /// Hex sha256 of the UNet weights file (`unet/diffusion_pytorch_model.safetensors`, else
    /// `unet/model.safetensors`); empty when the folder has no UNet weights.
    pub unet: String,
}

impl ModelDigest {
    /// AUTOMATIC1111's `Model hash`: the first 10 hex digits of the UNet weights' sha256.
    pub fn a1111_hash(&self) -> &str {
        &self.unet[..self.unet.len().min(10)]
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct IndexEntry {
    size: u64,
    mtime_ns: i128,
    sha256: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct IndexFile {
    version: u32,
    files: BTreeMap<String, IndexEntry>,
}

const INDEX_VERSION: u32 = 1;

/// Remembered file digests, keyed by (canonical path, size, mtime ns), optionally backed by a
/// JSON file. Shareable between threads.
#[derive(Debug)]
pub struct DigestIndex {
    path: Option<PathBuf>,
    entries: Mutex<BTreeMap<String, IndexEntry>>,
    dirty: Mutex<bool>,
    hashed: AtomicUsize,
}

impl DigestIndex {
    /// An index that lives only in memory.
    pub fn in_memory() -> Self {
        Self {
            path: None,
            entries: Mutex::new(BTreeMap::new()),
            dirty: Mutex::new(false),
            hashed: AtomicUsize::new(0),
        }
    }

    /// Opens the index stored at `path` (a missing or damaged file gives an empty index, rebuilt
    /// on the next [`save`](Self::save)).
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, CacheError> {
        let path = path.into();
        let entries = read_index(&path)?;
        Ok(Self {
            path: Some(path),
            entries: Mutex::new(entries),
            dirty: Mutex::new(false),
            hashed: AtomicUsize::new(0),
        })
    }

    /// Opens `digests.json` in [`default_cache_dir`] (`$SD_RUN_CACHE`, ...).
    pub fn open_default() -> Result<Self, CacheError> {
        Self::open(default_cache_dir().join("digests.json"))
    }

    /// The backing file, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// How many files this index has actually hashed (not found remembered) since it was opened.
    pub fn hashed_count(&self) -> usize {
        self.hashed.load(Ordering::Relaxed)
    }

    /// Hex sha256 of a file, from the index when its canonical path, size and mtime are
    /// unchanged, else hashed (and remembered).
    pub fn file_digest(&self, file: &Path) -> Result<String, CacheError> {
        let canon = std::fs::canonicalize(file).map_err(|e| CacheError::io(file, e))?;
        let meta = std::fs::metadata(&canon).map_err(|e| CacheError::io(file, e))?;
        if !meta.is_file() {
            return Err(CacheError::invalid(file, "not a regular file"));
        }
        let size = meta.len();
        let stamp = mtime_ns(&meta);
        let key = canon.to_string_lossy().into_owned();
        if let Some(e) = lock(&self.entries).get(&key) {
            if e.size == size && e.mtime_ns == stamp {
                return Ok(e.sha256.clone());
            }
        }
        let sha256 = sha256_file(&canon)?;
        self.hashed.fetch_add(1, Ordering::Relaxed);
        // If the file changed while it was read, do not remember a digest for the old stamp.
        let after = std::fs::metadata(&canon).map_err(|e| CacheError::io(file, e))?;
        if after.len() == size && mtime_ns(&after) == stamp {
            lock(&self.entries).insert(
                key,
                IndexEntry {
                    size,
                    mtime_ns: stamp,
                    sha256: sha256.clone(),
                },
            );
            *lock(&self.dirty) = true;
        }
        Ok(sha256)
    }

    /// Writes the index to its file when something changed (merging entries another process
    /// wrote meanwhile; temp file + rename). A no-op for an in-memory index.
    pub fn save(&self) -> Result<(), CacheError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let mut dirty = lock(&self.dirty);
        if !*dirty {
            return Ok(());
        }
        let mut merged = read_index(path).unwrap_or_default();
        let mut entries = lock(&self.entries);
        for (k, v) in entries.iter() {
            merged.insert(k.clone(), v.clone());
        }
        // Drop entries whose files are gone, so the index does not grow forever.
        merged.retain(|k, _| Path::new(k).exists());
        let file = IndexFile {
            version: INDEX_VERSION,
            files: merged,
        };
        let json = serde_json::to_vec_pretty(&file).map_err(|e| {
            CacheError::invalid(path, format!("cannot encode the digest index: {e}"))
        })?;
        write_atomic(path, &json)?;
        *entries = file.files;
        *dirty = false;
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn read_index(path: &Path) -> Result<BTreeMap<String, IndexEntry>, CacheError> {
    match std::fs::read(path) {
        Ok(bytes) => match serde_json::from_slice::<IndexFile>(&bytes) {
            Ok(f) if f.version == INDEX_VERSION => Ok(f.files),
            Ok(_) => Ok(BTreeMap::new()),
            Err(e) => {
                tracing::warn!("{}: damaged digest index ignored: {e}", path.display());
                Ok(BTreeMap::new())
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(CacheError::io(path, e)),
    }
}

fn mtime_ns(meta: &std::fs::Metadata) -> i128 {
    match meta.modified() {
        Ok(t) => match t.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => d.as_nanos() as i128,
            Err(e) => -(e.duration().as_nanos() as i128),
        },
        Err(_) => 0,
    }
}

fn is_hashed(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| HASHED_EXTENSIONS.iter().any(|h| e.eq_ignore_ascii_case(h)))
}

/// Regular files directly inside `dir` with a hashed extension, as (relative name, path).
fn hashed_files(dir: &Path, prefix: &str) -> Result<Vec<(String, PathBuf)>, CacheError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| CacheError::io(dir, e))? {
        let entry = entry.map_err(|e| CacheError::io(dir, e))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !is_hashed(&path) || !path.is_file() {
            continue;
        }
        out.push((format!("{prefix}{name}"), path));
    }
    Ok(out)
}

fn combine(mut files: Vec<(String, PathBuf)>, index: &DigestIndex) -> Result<String, CacheError> {
    files.sort_by(|a, b| a.0.cmp(&b.0));
    let mut h = Sha256::new();
    h.update((MODEL_DIGEST_FORMAT.len() as u64).to_le_bytes());
    h.update(MODEL_DIGEST_FORMAT.as_bytes());
    for (rel, path) in &files {
        let digest = index.file_digest(path)?;
        let raw = hex::decode(&digest)
            .map_err(|e| CacheError::invalid(path, format!("bad digest: {e}")))?;
        h.update((rel.len() as u64).to_le_bytes());
        h.update(rel.as_bytes());
        h.update(&raw);
    }
    Ok(hex::encode(h.finalize()))
}

fn save_quietly(index: &DigestIndex) {
    if let Err(e) = index.save() {
        tracing::warn!("digest index not saved: {e}");
    }
}

/// Digests a diffusers-layout folder (see the module docs for what is hashed and how).
///
/// Fails when `dir` is not a folder, or has neither `model_index.json` nor any component folder.
/// Saves the index (best effort) when it learned new digests.
pub fn digest_model(dir: &Path, index: &DigestIndex) -> Result<ModelDigest, CacheError> {
    let meta = std::fs::metadata(dir).map_err(|e| CacheError::io(dir, e))?;
    if !meta.is_dir() {
        return Err(CacheError::invalid(
            dir,
            "not a folder (a diffusers model folder is expected)",
        ));
    }
    let mut files = Vec::new();
    let model_index = dir.join("model_index.json");
    if model_index.is_file() {
        files.push(("model_index.json".to_string(), model_index));
    }
    let mut components = 0;
    for comp in COMPONENTS {
        let sub = dir.join(comp);
        if sub.is_dir() {
            components += 1;
            files.extend(hashed_files(&sub, &format!("{comp}/"))?);
        }
    }
    if components == 0 || files.is_empty() {
        return Err(CacheError::invalid(
            dir,
            "not a diffusers model folder: no component folder (unet/, vae/, ...) with .safetensors/.json/.txt files",
        ));
    }
    let unet_file = ["diffusion_pytorch_model.safetensors", "model.safetensors"]
        .iter()
        .map(|n| dir.join("unet").join(n))
        .find(|p| p.is_file());
    let result = (|| {
        let combined = combine(files, index)?;
        let unet = match unet_file {
            Some(f) => index.file_digest(&f)?,
            None => String::new(),
        };
        Ok(ModelDigest { combined, unet })
    })();
    save_quietly(index);
    result
}

/// Digests the hashed files directly inside one folder (e.g. a `safety_checker/` given as a
/// path): same combination as [`digest_model`], relative names without a folder prefix.
pub fn digest_folder(dir: &Path, index: &DigestIndex) -> Result<String, CacheError> {
    let files = hashed_files(dir, "")?;
    if files.is_empty() {
        return Err(CacheError::invalid(
            dir,
            "no .safetensors/.json/.txt file to digest",
        ));
    }
    let result = combine(files, index);
    save_quietly(index);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("sd-run-digest-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn fake_model(dir: &Path) {
        std::fs::write(dir.join("model_index.json"), b"{}").unwrap();
        for c in ["unet", "vae", "tokenizer"] {
            std::fs::create_dir_all(dir.join(c)).unwrap();
            std::fs::write(
                dir.join(c).join("config.json"),
                format!("{{\"c\":\"{c}\"}}"),
            )
            .unwrap();
        }
        std::fs::write(
            dir.join("unet/diffusion_pytorch_model.safetensors"),
            b"unet weights",
        )
        .unwrap();
        std::fs::write(
            dir.join("vae/diffusion_pytorch_model.safetensors"),
            b"vae weights",
        )
        .unwrap();
        std::fs::write(dir.join("tokenizer/merges.txt"), b"a b").unwrap();
        std::fs::write(dir.join("unet/diffusion_pytorch_model.bin"), b"ignored").unwrap();
    }

    #[test]
    fn digest_is_stable_remembered_and_sensitive() {
        let dir = tmpdir("model");
        fake_model(&dir);
        let idx_path = dir.join("index/digests.json");
        let index = DigestIndex::open(&idx_path).unwrap();
        let d1 = digest_model(&dir, &index).unwrap();
        assert_eq!(index.hashed_count(), 7);
        assert_eq!(d1.unet, crate::cache::sha256_bytes(b"unet weights"));
        assert_eq!(d1.a1111_hash().len(), 10);
        assert!(idx_path.is_file());

        // Unchanged files are never re-hashed, even by a fresh index reading the saved file.
        let index2 = DigestIndex::open(&idx_path).unwrap();
        assert_eq!(digest_model(&dir, &index2).unwrap(), d1);
        assert_eq!(index2.hashed_count(), 0);

        // .bin files do not count.
        std::fs::write(dir.join("unet/diffusion_pytorch_model.bin"), b"changed").unwrap();
        assert_eq!(digest_model(&dir, &index2).unwrap(), d1);

        // A changed weight file is re-hashed and changes the digest.
        std::fs::write(
            dir.join("vae/diffusion_pytorch_model.safetensors"),
            b"vae weights 2",
        )
        .unwrap();
        let d2 = digest_model(&dir, &index2).unwrap();
        assert_ne!(d2.combined, d1.combined);
        assert_eq!(d2.unet, d1.unet);
        assert_eq!(index2.hashed_count(), 1);

        // A changed tokenizer file too.
        std::fs::write(dir.join("tokenizer/merges.txt"), b"a c").unwrap();
        assert_ne!(digest_model(&dir, &index2).unwrap().combined, d2.combined);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn damaged_index_and_bad_folders() {
        let dir = tmpdir("bad");
        let idx = dir.join("digests.json");
        std::fs::write(&idx, b"{ not json").unwrap();
        let index = DigestIndex::open(&idx).unwrap();
        assert!(digest_model(&dir.join("missing"), &index).is_err());
        assert!(digest_model(&idx, &index).is_err());
        let empty = dir.join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        let err = digest_model(&empty, &index).unwrap_err().to_string();
        assert!(err.contains("empty"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn golden_model_digest() {
        let dir =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden/models/tiny-sd15");
        if !dir.is_dir() {
            return;
        }
        let index = DigestIndex::in_memory();
        let d = digest_model(&dir, &index).unwrap();
        let unet = sha256_file(&dir.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
        assert_eq!(d.unet, unet);
        assert_eq!(d.combined.len(), 64);
        let sc = digest_folder(&dir.join("safety_checker"), &index).unwrap();
        assert_eq!(sc.len(), 64);
    }
}
