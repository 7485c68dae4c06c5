//! The content-addressed store under an output root.
//!
//! ```text
//! <root>/images/<key[0..2]>/<key>.png     images
//! <root>/quarantine/<key>.png             images held back by the safety stage
//! <root>/manifest.jsonl                   one ManifestRecord JSON per line
//! <root>/manifest.d/shard-K-of-N.jsonl    manifests of sharded runs
//! <root>/locks/<key>.lock                 per-image locks of running makers
//! ```
//!
//! Images are written to a unique temp file in their folder, fsynced, renamed, and the folder
//! fsynced; then the manifest line is appended (O_APPEND, one write, fsync). A run killed at any
//! instant leaves a whole image or none, and at worst a temp file that [`Store::clean_temp_files`]
//! removes and lookups ignore. A record counts only when its file's sha256 matches.

use super::{sha256_bytes, sha256_file, sync_dir, write_atomic, CacheError};
use crate::output::{ImageStatus, ManifestRecord};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;

/// Folder of images, under the root.
pub const IMAGES_DIR: &str = "images";
/// Folder of quarantined images, under the root.
pub const QUARANTINE_DIR: &str = "quarantine";
/// The main manifest file, under the root.
pub const MANIFEST_FILE: &str = "manifest.jsonl";
/// Folder of extra manifests (sharded runs), under the root.
pub const MANIFEST_DIR: &str = "manifest.d";
/// Folder of per-image lock files, under the root.
pub const LOCKS_DIR: &str = ".sd-run/locks";

#[derive(Debug, Default)]
struct ManifestState {
    records: HashMap<String, ManifestRecord>,
    /// How far each manifest file has been read (always at a line start).
    offsets: HashMap<PathBuf, u64>,
    bad_lines: usize,
}

/// An output root's store of images and manifest records.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    manifest: String,
    state: Mutex<ManifestState>,
}

/// An exclusive claim on one image key, held while it is made; released on drop.
#[derive(Debug)]
pub struct KeyLock {
    file: File,
    path: PathBuf,
    key: String,
}

impl KeyLock {
    /// The key this lock holds.
    pub fn key(&self) -> &str {
        &self.key
    }
}

impl Drop for KeyLock {
    fn drop(&mut self) {
        // Remove the file before releasing: a maker that opened it meanwhile sees a stale inode
        // and gives up (see `Store::lock_key`).
        let _ = std::fs::remove_file(&self.path);
        let _ = fs4::fs_std::FileExt::unlock(&self.file);
    }
}

fn is_key(key: &str) -> bool {
    !key.is_empty() && key.len() <= 128 && key.bytes().all(|b| b.is_ascii_hexdigit())
}

fn check_key(key: &str) -> Result<(), CacheError> {
    if is_key(key) {
        Ok(())
    } else {
        Err(CacheError::Key(format!("'{key}' is not a hex cache key")))
    }
}

/// `rel` is a plain relative path (no root, no `..`).
fn is_plain_relative(rel: &Path) -> bool {
    rel.components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

fn lock_state(m: &Mutex<ManifestState>) -> std::sync::MutexGuard<'_, ManifestState> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Store {
    /// Opens the store at `root` and reads its manifests (`manifest.jsonl` and
    /// `manifest.d/*.jsonl`). Creates nothing: folders appear on the first write. Records append
    /// to `manifest.jsonl` unless [`with_manifest_name`](Self::with_manifest_name) says otherwise.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, CacheError> {
        let store = Self {
            root: root.into(),
            manifest: MANIFEST_FILE.into(),
            state: Mutex::default(),
        };
        store.refresh()?;
        Ok(store)
    }

    /// Appends records to `name` (relative to the root), e.g.
    /// [`shard_manifest_name`](Self::shard_manifest_name)`(k, n)`.
    pub fn with_manifest_name(mut self, name: impl Into<String>) -> Self {
        self.manifest = name.into();
        self
    }

    /// `manifest.d/shard-K-of-N.jsonl`.
    pub fn shard_manifest_name(index: usize, count: usize) -> String {
        format!("{MANIFEST_DIR}/shard-{index}-of-{count}.jsonl")
    }

    /// The output root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The manifest file records are appended to.
    pub fn manifest_path(&self) -> PathBuf {
        self.root.join(&self.manifest)
    }

    /// The folder (relative to the root) an image of `key` goes to: `images/<key[0..2]>`.
    pub fn image_dir(key: &str) -> String {
        let prefix: String = key.chars().take(2).collect();
        format!("{IMAGES_DIR}/{prefix}")
    }

    /// Every manifest file present: `manifest.jsonl`, then `manifest.d/*.jsonl` sorted, then the
    /// append target if it is elsewhere.
    pub fn manifest_paths(&self) -> Result<Vec<PathBuf>, CacheError> {
        let mut out = Vec::new();
        let main = self.root.join(MANIFEST_FILE);
        if main.is_file() {
            out.push(main);
        }
        let dir = self.root.join(MANIFEST_DIR);
        match std::fs::read_dir(&dir) {
            Ok(entries) => {
                let mut shards = Vec::new();
                for e in entries {
                    let e = e.map_err(|err| CacheError::io(&dir, err))?;
                    let p = e.path();
                    if p.extension().is_some_and(|x| x == "jsonl") && p.is_file() {
                        shards.push(p);
                    }
                }
                shards.sort();
                out.extend(shards);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(CacheError::io(&dir, e)),
        }
        let own = self.manifest_path();
        if own.is_file() && !out.contains(&own) {
            out.push(own);
        }
        Ok(out)
    }

    /// Reads what was appended to the manifests since the last read (by this or another
    /// process). Bad lines are skipped; a truncated last line (a crash mid-append) is ignored.
    pub fn refresh(&self) -> Result<(), CacheError> {
        let paths = self.manifest_paths()?;
        let mut st = lock_state(&self.state);
        for path in paths {
            let offset = st.offsets.get(&path).copied().unwrap_or(0);
            let mut f = match File::open(&path) {
                Ok(f) => f,
                // Removed since it was listed: nothing to read.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(CacheError::io(&path, e)),
            };
            let len = f.metadata().map_err(|e| CacheError::io(&path, e))?.len();
            // A manifest that shrank was rewritten: read it again from the start.
            let offset = if len < offset { 0 } else { offset };
            if len == offset {
                continue;
            }
            f.seek(SeekFrom::Start(offset))
                .map_err(|e| CacheError::io(&path, e))?;
            // Stream line by line: a manifest of a million images need not fit in memory twice.
            let mut reader = BufReader::with_capacity(1 << 20, f);
            let mut line = Vec::new();
            let mut consumed = offset;
            loop {
                line.clear();
                let n = reader
                    .read_until(b'\n', &mut line)
                    .map_err(|e| CacheError::io(&path, e))?;
                if n == 0 {
                    break;
                }
                let complete = line.last() == Some(&b'\n');
                let trimmed = line.trim_ascii();
                if !trimmed.is_empty() {
                    match serde_json::from_slice::<ManifestRecord>(trimmed) {
                        Ok(rec) => {
                            st.records.insert(rec.key.clone(), rec);
                        }
                        // An incomplete last line may still be being written (or a crash cut
                        // it): read it again next time; an append completes it as a bad line.
                        Err(_) if !complete => break,
                        Err(e) => {
                            st.bad_lines += 1;
                            tracing::warn!("{}: skipping a bad manifest line: {e}", path.display());
                        }
                    }
                }
                consumed += n as u64;
            }
            st.offsets.insert(path, consumed);
        }
        Ok(())
    }

    /// How many manifest lines could not be read so far.
    pub fn bad_lines(&self) -> usize {
        lock_state(&self.state).bad_lines
    }

    /// The latest record of every key (unverified), in no particular order.
    pub fn records(&self) -> Vec<ManifestRecord> {
        lock_state(&self.state).records.values().cloned().collect()
    }

    /// The latest record of `key`, without checking its file.
    pub fn record(&self, key: &str) -> Option<ManifestRecord> {
        lock_state(&self.state).records.get(key).cloned()
    }

    /// The record of an image already made: a record exists, is not `failed`, and its file
    /// exists with the recorded sha256 (a dropped image, `path: null` and `flagged`, counts as
    /// made). A missing or damaged file is a miss. Reads only what is in memory: call
    /// [`refresh`](Self::refresh) (or [`lookup_fresh`](Self::lookup_fresh)) to see other
    /// processes' records.
    pub fn lookup(&self, key: &str) -> Option<ManifestRecord> {
        let rec = self.record(key)?;
        self.verify(&rec).then_some(rec)
    }

    /// [`refresh`](Self::refresh), then [`lookup`](Self::lookup): the re-check a maker does after
    /// taking a key's lock.
    pub fn lookup_fresh(&self, key: &str) -> Result<Option<ManifestRecord>, CacheError> {
        self.refresh()?;
        Ok(self.lookup(key))
    }

    /// Whether each key is made ([`lookup`](Self::lookup) hits), checked on all cores.
    pub fn cached_flags(&self, keys: &[String]) -> Vec<bool> {
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(16);
        if threads <= 1 || keys.len() < 256 {
            return keys.iter().map(|k| self.lookup(k).is_some()).collect();
        }
        let chunk = keys.len().div_ceil(threads);
        let mut out = Vec::with_capacity(keys.len());
        std::thread::scope(|s| {
            let hs: Vec<_> = keys
                .chunks(chunk)
                .map(|part| {
                    s.spawn(move || {
                        part.iter()
                            .map(|k| self.lookup(k).is_some())
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            for h in hs {
                match h.join() {
                    Ok(v) => out.extend(v),
                    Err(p) => std::panic::resume_unwind(p),
                }
            }
        });
        out
    }

    fn verify(&self, rec: &ManifestRecord) -> bool {
        if rec.status == ImageStatus::Failed {
            return false;
        }
        let Some(rel) = &rec.path else {
            return rec.status == ImageStatus::Flagged;
        };
        let Some(expected) = &rec.file_sha256 else {
            return false;
        };
        if !is_plain_relative(Path::new(rel)) {
            return false;
        }
        match sha256_file(&self.root.join(rel)) {
            Ok(actual) => actual.eq_ignore_ascii_case(expected),
            Err(_) => false,
        }
    }

    /// Writes `<root>/<rel_dir>/<key>.png` atomically and returns its path relative to the root
    /// (`/`-separated) and the sha256 of its bytes.
    pub fn write_image(
        &self,
        key: &str,
        rel_dir: &str,
        png: &[u8],
    ) -> Result<(String, String), CacheError> {
        check_key(key)?;
        let rel_dir = rel_dir.trim_end_matches('/');
        if !is_plain_relative(Path::new(rel_dir)) {
            return Err(CacheError::invalid(
                rel_dir,
                "image folder must be relative to the output root, without '..'",
            ));
        }
        let rel = if rel_dir.is_empty() {
            format!("{key}.png")
        } else {
            format!("{rel_dir}/{key}.png")
        };
        write_atomic(&self.root.join(&rel), png)?;
        Ok((rel, sha256_bytes(png)))
    }

    /// Appends one record to the manifest: one line, one `O_APPEND` write under an exclusive
    /// lock of the file, fsync; lines of concurrent writers (processes, or machines sharing the
    /// folder over NFS) never interleave or overwrite each other. Starts on a fresh line when a crash left the file
    /// without a final newline.
    pub fn append_manifest(&self, record: &ManifestRecord) -> Result<(), CacheError> {
        let path = self.manifest_path();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| CacheError::io(dir, e))?;
        }
        let mut line = serde_json::to_vec(record).map_err(|e| {
            CacheError::invalid(&path, format!("cannot encode a manifest record: {e}"))
        })?;
        line.push(b'\n');
        let mut f = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(|e| CacheError::io(&path, e))?;
        // Writers of one manifest (two copies of one shard) take turns: on NFS, O_APPEND alone
        // does not stop two clients from writing at the same offset; a lock makes the client
        // revalidate the size first. Released when `f` closes.
        fs4::fs_std::FileExt::lock_exclusive(&f).map_err(|e| CacheError::io(&path, e))?;
        let len = f.metadata().map_err(|e| CacheError::io(&path, e))?.len();
        if len > 0 {
            let mut last = [0u8; 1];
            f.seek(SeekFrom::Start(len - 1))
                .map_err(|e| CacheError::io(&path, e))?;
            f.read_exact(&mut last)
                .map_err(|e| CacheError::io(&path, e))?;
            if last[0] != b'\n' {
                line.insert(0, b'\n');
            }
        }
        f.write_all(&line).map_err(|e| CacheError::io(&path, e))?;
        f.sync_data().map_err(|e| CacheError::io(&path, e))?;
        if len == 0 {
            if let Some(dir) = path.parent() {
                sync_dir(dir);
            }
        }
        lock_state(&self.state)
            .records
            .insert(record.key.clone(), record.clone());
        Ok(())
    }

    /// Tries to take the exclusive lock of `key` (`locks/<key>.lock`, non-blocking): `None` when
    /// another maker (this or another process) holds it.
    pub fn lock_key(&self, key: &str) -> Result<Option<KeyLock>, CacheError> {
        use fs4::fs_std::FileExt;
        check_key(key)?;
        let dir = self.root.join(LOCKS_DIR);
        std::fs::create_dir_all(&dir).map_err(|e| CacheError::io(&dir, e))?;
        let path = dir.join(format!("{key}.lock"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| CacheError::io(&path, e))?;
        if !file
            .try_lock_exclusive()
            .map_err(|e| CacheError::io(&path, e))?
        {
            return Ok(None);
        }
        // The holder we raced with may have removed the file after we opened it: our lock is then
        // on a stale inode, and someone may hold the new one. Give up; the caller retries later.
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            let ours = file.metadata().map_err(|e| CacheError::io(&path, e))?;
            match std::fs::metadata(&path) {
                Ok(now) if now.ino() == ours.ino() && now.dev() == ours.dev() => {}
                _ => {
                    let _ = FileExt::unlock(&file);
                    return Ok(None);
                }
            }
        }
        Ok(Some(KeyLock {
            file,
            path,
            key: key.to_string(),
        }))
    }

    /// Removes temp files left by writers that died (under `images/*/`, `quarantine/` and the
    /// root); returns how many were removed. Temp files of live processes are kept.
    pub fn clean_temp_files(&self) -> Result<usize, CacheError> {
        let mut dirs = vec![self.root.clone(), self.root.join(QUARANTINE_DIR)];
        let images = self.root.join(IMAGES_DIR);
        if let Ok(entries) = std::fs::read_dir(&images) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    dirs.push(e.path());
                }
            }
        }
        let mut removed = 0;
        for dir in dirs {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(pid) = temp_file_pid(&name) {
                    if !writer_alive(pid, &e.path()) && std::fs::remove_file(e.path()).is_ok() {
                        removed += 1;
                    }
                }
            }
        }
        Ok(removed)
    }
}

/// The writer's pid of a temp file name `.<name>.tmp-<pid>-<n>`.
fn temp_file_pid(name: &str) -> Option<u32> {
    if !name.starts_with('.') {
        return None;
    }
    let (_, tail) = name.rsplit_once(".tmp-")?;
    let (pid, n) = tail.split_once('-')?;
    n.parse::<u64>().ok()?;
    pid.parse().ok()
}

fn writer_alive(pid: u32, file: &Path) -> bool {
    if pid == std::process::id() {
        return true;
    }
    let proc = Path::new("/proc");
    if proc.is_dir() {
        return proc.join(pid.to_string()).exists();
    }
    // No /proc: only files untouched for a day are considered abandoned.
    std::fs::metadata(file)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_none_or(|age| age.as_secs() < 86_400)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::SafetyRecord;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("sd-run-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn key(i: u32) -> String {
        format!("{:064x}", 0xabc000 + i)
    }

    fn record(
        key: &str,
        path: Option<String>,
        sha: Option<String>,
        status: ImageStatus,
    ) -> ManifestRecord {
        ManifestRecord {
            key: key.into(),
            path,
            file_sha256: sha,
            job: "j".into(),
            model: "m".into(),
            prompt: "p".into(),
            negative_prompt: String::new(),
            seed: 1,
            steps: 2,
            guidance: 7.5,
            scheduler: "ddim".into(),
            width: 64,
            height: 64,
            noise: "torch-cpu".into(),
            refiner: None,
            safety: SafetyRecord::default(),
            status,
            seconds: 0.1,
            model_hash: "0123456789".into(),
            grid: vec![],
            error: None,
        }
    }

    fn make(store: &Store, k: &str, bytes: &[u8]) -> ManifestRecord {
        let (rel, sha) = store.write_image(k, &Store::image_dir(k), bytes).unwrap();
        let rec = record(k, Some(rel), Some(sha), ImageStatus::Ok);
        store.append_manifest(&rec).unwrap();
        rec
    }

    #[test]
    fn write_lookup_reopen() {
        let root = tmpdir("basic");
        let store = Store::open(&root).unwrap();
        let k = key(1);
        assert!(store.lookup(&k).is_none());
        let rec = make(&store, &k, b"png bytes");
        assert_eq!(
            rec.path.as_deref(),
            Some(format!("images/{}/{k}.png", &k[..2]).as_str())
        );
        assert_eq!(store.lookup(&k), Some(rec.clone()));
        let again = Store::open(&root).unwrap();
        assert_eq!(again.lookup(&k), Some(rec));
        assert!(again.lookup(&key(2)).is_none());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn damaged_or_missing_file_is_a_miss() {
        let root = tmpdir("damaged");
        let store = Store::open(&root).unwrap();
        let (k1, k2) = (key(1), key(2));
        let r1 = make(&store, &k1, b"first image");
        let r2 = make(&store, &k2, b"second image");
        std::fs::write(root.join(r1.path.as_ref().unwrap()), b"first imagX").unwrap();
        std::fs::remove_file(root.join(r2.path.as_ref().unwrap())).unwrap();
        let store = Store::open(&root).unwrap();
        assert!(store.lookup(&k1).is_none());
        assert!(store.lookup(&k2).is_none());
        assert_eq!(
            store.cached_flags(&[k1.clone(), k2.clone()]),
            vec![false, false]
        );
        // Remaking it heals the entry; the last record wins.
        let r1b = make(&store, &k1, b"first image");
        assert_eq!(Store::open(&root).unwrap().lookup(&k1), Some(r1b));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn crash_between_write_and_rename() {
        let root = tmpdir("crash");
        let store = Store::open(&root).unwrap();
        let k = key(3);
        let dir = root.join(Store::image_dir(&k));
        std::fs::create_dir_all(&dir).unwrap();
        // A writer (pid that cannot exist) died after writing its temp file.
        let junk = dir.join(format!(".{k}.png.tmp-4294967290-0"));
        std::fs::write(&junk, b"half an ima").unwrap();
        assert!(store.lookup(&k).is_none());
        // A record without a matching file (written by hand) is still a miss.
        let rec = make(&store, &k, b"whole image");
        assert_eq!(store.lookup(&k), Some(rec));
        assert_eq!(store.clean_temp_files().unwrap(), 1);
        assert!(!junk.exists());
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left.len(), 1, "{left:?}");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn truncated_and_bad_manifest_lines() {
        let root = tmpdir("trunc");
        let store = Store::open(&root).unwrap();
        let (k1, k2, k3) = (key(1), key(2), key(3));
        let r1 = make(&store, &k1, b"one");
        let manifest = root.join(MANIFEST_FILE);
        // Garbage line, then a crash mid-append of k2's record.
        let mut f = OpenOptions::new().append(true).open(&manifest).unwrap();
        f.write_all(b"this is not json\n").unwrap();
        let (rel2, sha2) = store
            .write_image(&k2, &Store::image_dir(&k2), b"two")
            .unwrap();
        let full =
            serde_json::to_string(&record(&k2, Some(rel2), Some(sha2), ImageStatus::Ok)).unwrap();
        f.write_all(&full.as_bytes()[..full.len() / 2]).unwrap();
        drop(f);
        let store = Store::open(&root).unwrap();
        assert_eq!(store.lookup(&k1), Some(r1.clone()));
        assert!(store.lookup(&k2).is_none());
        assert_eq!(store.bad_lines(), 1);
        // The next append starts on a fresh line and is readable.
        let r3 = make(&store, &k3, b"three");
        let store = Store::open(&root).unwrap();
        assert_eq!(store.lookup(&k1), Some(r1));
        assert_eq!(store.lookup(&k3), Some(r3));
        assert!(store.lookup(&k2).is_none());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn statuses_and_shard_manifests() {
        let root = tmpdir("status");
        let store = Store::open(&root)
            .unwrap()
            .with_manifest_name(Store::shard_manifest_name(1, 3));
        let (k1, k2, k3) = (key(1), key(2), key(3));
        store
            .append_manifest(&record(&k1, None, None, ImageStatus::Flagged))
            .unwrap();
        store
            .append_manifest(&record(&k2, None, None, ImageStatus::Failed))
            .unwrap();
        let r3 = make(&store, &k3, b"three");
        assert!(root.join("manifest.d/shard-1-of-3.jsonl").is_file());
        let other = Store::open(&root).unwrap();
        assert_eq!(other.manifest_paths().unwrap().len(), 1);
        assert!(other.lookup(&k1).is_some(), "dropped images count as made");
        assert!(other.lookup(&k2).is_none(), "failed images do not");
        assert_eq!(other.lookup(&k3), Some(r3));
        // Another process's append is seen after a refresh.
        let k4 = key(4);
        let r4 = make(&store, &k4, b"four");
        assert!(other.lookup(&k4).is_none());
        assert_eq!(other.lookup_fresh(&k4).unwrap(), Some(r4));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn concurrent_writers_of_one_manifest_keep_every_line() {
        let root = tmpdir("appenders");
        let threads: Vec<_> = (0..6u32)
            .map(|t| {
                let root = root.clone();
                std::thread::spawn(move || {
                    let store = Store::open(&root)
                        .unwrap()
                        .with_manifest_name(Store::shard_manifest_name(0, 2));
                    for i in 0..40 {
                        let k = key(t * 1000 + i);
                        store
                            .append_manifest(&record(&k, None, None, ImageStatus::Flagged))
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let store = Store::open(&root).unwrap();
        assert_eq!(store.records().len(), 240);
        assert_eq!(store.bad_lines(), 0);
        let text = std::fs::read_to_string(root.join("manifest.d/shard-0-of-2.jsonl")).unwrap();
        assert_eq!(text.lines().count(), 240);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn lock_prevents_a_second_maker() {
        let root = tmpdir("lock");
        let a = Store::open(&root).unwrap();
        let b = Store::open(&root).unwrap();
        let k = key(9);
        let held = a.lock_key(&k).unwrap().expect("first lock");
        assert!(b.lock_key(&k).unwrap().is_none());
        assert!(a.lock_key(&k).unwrap().is_none());
        assert!(b.lock_key(&key(10)).unwrap().is_some());
        drop(held);
        assert!(b.lock_key(&k).unwrap().is_some());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn bad_keys_and_folders_are_errors() {
        let root = tmpdir("bad");
        let store = Store::open(&root).unwrap();
        assert!(store.write_image("../evil", "images", b"x").is_err());
        assert!(store.write_image(&key(1), "../out", b"x").is_err());
        assert!(store.write_image(&key(1), "/abs", b"x").is_err());
        assert!(store.lock_key("not/a key").is_err());
        let (rel, _) = store.write_image(&key(1), QUARANTINE_DIR, b"x").unwrap();
        assert_eq!(rel, format!("quarantine/{}.png", key(1)));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
