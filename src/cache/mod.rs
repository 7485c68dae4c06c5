//! Cache keys, digests of weight files, and the content-addressed image store.
//!
//! - [`digest`]: sha256 digests of a diffusers folder's pixel-changing files, remembered in a
//!   [`DigestIndex`] by (canonical path, size, mtime) so unchanged files are never re-hashed.
//! - [`key`]: the image cache key, a sha256 over a canonical, versioned encoding of every input
//!   that changes pixels.
//! - [`store`]: `images/<k[0..2]>/<key>.png`, `quarantine/`, `manifest.jsonl`, per-image locks,
//!   atomic writes.
//!
//! Nothing here touches candle.

pub mod digest;
pub mod key;
pub mod store;

pub use digest::{digest_folder, digest_model, DigestIndex, ModelDigest};
pub use key::{
    image_key, image_keys, request_keys, try_image_key, DeviceKind, KeyContext, ModelKeyInfo,
    SafetyKey, KEY_FORMAT,
};
pub use store::{KeyLock, Store};

use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Errors of the cache: digests, the store, keys. Each names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// An I/O operation on `path` failed.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file or folder is not what it should be.
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
    /// A cache key could not be computed (an input's digest is missing).
    #[error("cache key: {0}")]
    Key(String),
}

impl CacheError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    /// An `Invalid` error for `path`.
    pub fn invalid(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::Invalid {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// Size of the read buffer used to hash files.
pub const HASH_BUFFER: usize = 1 << 20;

/// Hex sha256 of a file's bytes, read with a 1 MiB buffer.
pub fn sha256_file(path: &Path) -> Result<String, CacheError> {
    let mut file = std::fs::File::open(path).map_err(|e| CacheError::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; HASH_BUFFER];
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CacheError::io(path, e)),
        };
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Hex sha256 of a byte slice.
pub fn sha256_bytes(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The folder sd-run keeps machine-wide caches in: `$SD_RUN_CACHE`, else
/// `$XDG_CACHE_HOME/sd-run`, else `~/.cache/sd-run` (`%LOCALAPPDATA%\sd-run` on Windows), else
/// `./.sd-run-cache`.
pub fn default_cache_dir() -> PathBuf {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(p) = env("SD_RUN_CACHE") {
        return p;
    }
    if let Some(p) = env("XDG_CACHE_HOME") {
        return p.join("sd-run");
    }
    if let Some(p) = env("LOCALAPPDATA") {
        return p.join("sd-run");
    }
    if let Some(p) = env("HOME") {
        return p.join(".cache").join("sd-run");
    }
    PathBuf::from(".sd-run-cache")
}

/// Writes `bytes` to `path` atomically: a unique temp file in the same folder, fsync, rename,
/// fsync of the folder. Creates the folder when missing.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CacheError> {
    use std::io::Write;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| CacheError::io(dir, e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        temp_sequence()
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(|e| CacheError::io(&tmp, e))?;
        f.write_all(bytes).map_err(|e| CacheError::io(&tmp, e))?;
        f.sync_all().map_err(|e| CacheError::io(&tmp, e))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(|e| CacheError::io(path, e))?;
        sync_dir(dir);
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// A number for temp file names, unique within this process and, by its random start, across
/// processes on other machines or in other containers that share the folder (where pids repeat:
/// every pod's sd-run may be pid 1).
fn temp_sequence() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static BASE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let base = *BASE.get_or_init(|| {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        h.write_u128(now);
        h.write_u32(std::process::id());
        h.finish() >> 1
    });
    base.wrapping_add(COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// Flushes a folder's entries to disk (best effort: not every platform can open a folder).
pub(crate) fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod temp_name_tests {
    use super::*;

    #[test]
    fn temp_sequence_is_unique_and_write_atomic_leaves_no_temp_file() {
        let a = temp_sequence();
        let b = temp_sequence();
        assert_ne!(a, b);
        let dir = std::env::temp_dir().join(format!("sd-run-atomic-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let file = dir.join("report.html");
        write_atomic(&file, b"one").unwrap();
        write_atomic(&file, b"two").unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
