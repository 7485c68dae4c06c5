//! Digesting a multi-GB checkpoint: a 2 GiB `unet/diffusion_pytorch_model.safetensors` of random
//! bytes in a temp model folder. The first `digest_model` hashes it (read from disk: the file's
//! pages are dropped from the page cache first, on Linux); the second finds it in the digest
//! index by (path, size, mtime) and hashes nothing. Goal: the first at disk speed, the second
//! instant. `cargo bench --bench digest` (SD_RUN_BENCH_DIGEST_MIB to change the size).

use sd_run::cache::{digest_model, DigestIndex};
use std::io::Write;
use std::path::Path;
use std::time::Instant;

/// Drops the file's pages from the page cache so the next read comes from the disk.
#[cfg(target_os = "linux")]
fn drop_from_page_cache(path: &Path) {
    use std::os::fd::AsRawFd;
    extern "C" {
        fn posix_fadvise(fd: i32, offset: i64, len: i64, advice: i32) -> i32;
    }
    const POSIX_FADV_DONTNEED: i32 = 4;
    if let Ok(f) = std::fs::File::open(path) {
        // SAFETY: a valid open descriptor; the call only advises the kernel.
        unsafe {
            posix_fadvise(f.as_raw_fd(), 0, 0, POSIX_FADV_DONTNEED);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn drop_from_page_cache(_: &Path) {}

fn main() {
    let mib: usize = std::env::var("SD_RUN_BENCH_DIGEST_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2048);
    let root = std::env::temp_dir().join(format!("sd-run-bench-digest-{}", std::process::id()));
    let model = root.join("model");
    std::fs::create_dir_all(model.join("unet")).expect("temp dir");
    std::fs::write(
        model.join("model_index.json"),
        "{\"_class_name\": \"StableDiffusionPipeline\"}",
    )
    .expect("model_index");
    std::fs::write(model.join("unet/config.json"), "{}").expect("config");
    let weights = model.join("unet/diffusion_pytorch_model.safetensors");

    let t = Instant::now();
    {
        let mut f = std::io::BufWriter::with_capacity(
            8 << 20,
            std::fs::File::create(&weights).expect("create"),
        );
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut buf = vec![0u8; 8 << 20];
        for _ in 0..(mib * (1 << 20)).div_ceil(buf.len()) {
            for chunk in buf.chunks_exact_mut(8) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                chunk.copy_from_slice(&state.to_le_bytes());
            }
            f.write_all(&buf).expect("write");
        }
        f.flush().expect("flush");
        f.get_ref().sync_all().expect("fsync");
    }
    let size = std::fs::metadata(&weights).map(|m| m.len()).unwrap_or(0);
    let size_mib = size as f64 / (1 << 20) as f64;
    println!(
        "digest: wrote {size_mib:.0} MiB of random weights in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    // The disk's own read speed, for reference.
    drop_from_page_cache(&weights);
    let t = Instant::now();
    let mut f = std::fs::File::open(&weights).expect("open");
    let mut buf = vec![0u8; 1 << 20];
    while std::io::Read::read(&mut f, &mut buf)
        .map(|n| n > 0)
        .unwrap_or(false)
    {}
    let read_s = t.elapsed().as_secs_f64();
    println!(
        "digest: plain read {read_s:.2} s ({:.0} MiB/s)",
        size_mib / read_s
    );

    drop_from_page_cache(&weights);
    let index = DigestIndex::open(root.join("digests.json")).expect("index");
    let t = Instant::now();
    let first = digest_model(&model, &index).expect("digest");
    let first_s = t.elapsed().as_secs_f64();
    println!(
        "digest: first digest_model {first_s:.2} s ({:.0} MiB/s, {:.2}x the plain read), {} file(s) hashed",
        size_mib / first_s,
        first_s / read_s,
        index.hashed_count()
    );

    // A later run: a fresh index loaded from disk, as a new process would.
    let index = DigestIndex::open(root.join("digests.json")).expect("index");
    let t = Instant::now();
    let second = digest_model(&model, &index).expect("digest");
    let second_s = t.elapsed().as_secs_f64();
    assert_eq!(first.combined, second.combined);
    println!(
        "digest: remembered digest_model {:.2} ms, {} file(s) hashed",
        second_s * 1e3,
        index.hashed_count()
    );
    let _ = std::fs::remove_dir_all(&root);
}
