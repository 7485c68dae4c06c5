//! Text-level parsers for spec values (sizes, byte counts, model sources, ...), shared by the
//! YAML validator, `sd-run.toml` and grid expansion. Each returns the user-facing message on error.

use super::types::{
    AttentionSlicing, GenParams, ModelSource, NoiseSource, Offload, Precision, SchedulerName,
};

/// Fields a `grid:` may sweep, in documentation order.
pub const SWEEPABLE: [&str; 11] = [
    "steps",
    "guidance",
    "scheduler",
    "size",
    "negative_prompt",
    "noise",
    "strength",
    "original_size",
    "crop",
    "aesthetic_score",
    "negative_aesthetic_score",
];

/// Parses a YAML-style integer (`12`, `-3`, `+4`, `0x1f`, `0o17`); `None` when it is not one.
pub fn int_text(s: &str) -> Option<i128> {
    let (neg, body) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let v = if let Some(h) = body.strip_prefix("0x") {
        if h.is_empty() || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        i128::from_str_radix(h, 16).ok()?
    } else if let Some(o) = body.strip_prefix("0o") {
        if o.is_empty() || !o.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
            return None;
        }
        i128::from_str_radix(o, 8).ok()?
    } else {
        if body.is_empty() || !body.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        body.parse::<i128>().ok()?
    };
    Some(if neg { -v } else { v })
}

/// True when `s` is written as an integer, even one too large for [`int_text`].
pub fn looks_integral(s: &str) -> bool {
    let body = s.strip_prefix(['-', '+']).unwrap_or(s);
    !body.is_empty() && body.bytes().all(|b| b.is_ascii_digit())
}

/// Parses a YAML-style number (integer or float, `.inf`/`.nan` included); `None` otherwise.
pub fn num_text(s: &str) -> Option<f64> {
    if let Some(i) = int_text(s) {
        return Some(i as f64);
    }
    match s {
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => return Some(f64::INFINITY),
        "-.inf" | "-.Inf" | "-.INF" => return Some(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => return Some(f64::NAN),
        _ => {}
    }
    let ok = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'-' | b'+'))
        && s.bytes().any(|b| b.is_ascii_digit());
    if !ok {
        return None;
    }
    s.parse::<f64>().ok()
}

/// Parses a plain YAML boolean.
pub fn bool_text(s: &str) -> Option<bool> {
    match s {
        "true" | "True" | "TRUE" => Some(true),
        "false" | "False" | "FALSE" => Some(false),
        _ => None,
    }
}

fn wxh(s: &str) -> Option<(u64, u64)> {
    let (w, h) = s.trim().split_once(['x', 'X'])?;
    let (w, h) = (w.trim(), h.trim());
    if w.is_empty() || h.is_empty() || !w.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !h.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((w.parse().unwrap_or(u64::MAX), h.parse().unwrap_or(u64::MAX)))
}

/// Parses `size` (`WIDTHxHEIGHT`, both positive multiples of 8, at most 16384).
pub fn parse_size(field: &str, s: &str) -> Result<(u32, u32), String> {
    let Some((w, h)) = wxh(s) else {
        return Err(format!(
            "`{field}` must be WIDTHxHEIGHT (e.g. 512x768), got `{s}`"
        ));
    };
    if w == 0 || h == 0 || w % 8 != 0 || h % 8 != 0 || w > 16384 || h > 16384 {
        return Err(format!(
            "`{field}` width and height must be positive multiples of 8 (at most 16384), got {w}x{h}"
        ));
    }
    Ok((w as u32, h as u32))
}

/// Parses SDXL's `original_size` (`WIDTHxHEIGHT`, both positive).
pub fn parse_original_size(s: &str) -> Result<(u32, u32), String> {
    let Some((w, h)) = wxh(s) else {
        return Err(format!(
            "`original_size` must be WIDTHxHEIGHT (e.g. 1024x1024), got `{s}`"
        ));
    };
    if w == 0 || h == 0 || w > u32::MAX as u64 || h > u32::MAX as u64 {
        return Err(format!(
            "`original_size` width and height must be positive, got {w}x{h}"
        ));
    }
    Ok((w as u32, h as u32))
}

/// Parses a byte size: `12GiB`, `512MiB`, `2GB`, `1.5 GiB` or a plain byte count.
pub fn parse_bytes(field: &str, s: &str) -> Result<u64, String> {
    let bad =
        || format!("`{field}` must be a size like 12GiB, 512MiB, 2GB or a byte count, got `{s}`");
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = (&t[..split], t[split..].trim());
    let mult: f64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return Err(bad()),
    };
    if num.is_empty() || num.matches('.').count() > 1 || num == "." {
        return Err(bad());
    }
    let v: f64 = num.parse().map_err(|_| bad())?;
    let bytes = (v * mult).round();
    if !(1.0..1.8e19).contains(&bytes) {
        return Err(format!("`{field}` must be more than 0 bytes, got `{s}`"));
    }
    Ok(bytes as u64)
}

fn repo_part_ok(p: &str) -> bool {
    !p.is_empty()
        && p != "."
        && p != ".."
        && p.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Parses `hf:ORG/NAME[@REVISION]`; `Ok(None)` when `s` is not an `hf:` source at all.
pub fn parse_hf_source(s: &str) -> Result<Option<ModelSource>, String> {
    let Some(rest) = s.strip_prefix("hf:") else {
        return Ok(None);
    };
    let bad = || format!("`source` must be hf:ORG/NAME[@REVISION], got `{s}`");
    let (repo, revision) = match rest.split_once('@') {
        Some((r, rev)) => (r, Some(rev)),
        None => (rest, None),
    };
    let Some((org, name)) = repo.split_once('/') else {
        return Err(bad());
    };
    if !repo_part_ok(org) || !repo_part_ok(name) {
        return Err(bad());
    }
    if let Some(rev) = revision {
        let ok = !rev.is_empty()
            && rev
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b'/'));
        if !ok {
            return Err(bad());
        }
    }
    Ok(Some(ModelSource::Hf {
        repo: repo.to_string(),
        revision: revision.map(str::to_string),
    }))
}

/// Parses `dtype`.
pub fn parse_dtype(s: &str) -> Result<Precision, String> {
    match s {
        "f32" => Ok(Precision::F32),
        "f16" => Ok(Precision::F16),
        "bf16" => Ok(Precision::Bf16),
        _ => Err(format!(
            "unknown dtype `{s}`{}; valid: f32, f16, bf16",
            did_you_mean(s, ["f32", "f16", "bf16"])
        )),
    }
}

/// Parses `memory.attention_slicing` given as text (`off`, `auto`, or a slice size).
pub fn parse_slicing(s: &str) -> Result<AttentionSlicing, String> {
    match s {
        "off" | "false" => Ok(AttentionSlicing::Off),
        "auto" | "true" => Ok(AttentionSlicing::Auto),
        _ => match int_text(s) {
            Some(n) if n >= 1 && n <= u32::MAX as i128 => Ok(AttentionSlicing::Size(n as usize)),
            _ => Err(format!(
                "`attention_slicing` must be off, auto or a positive slice size, got `{s}`"
            )),
        },
    }
}

/// Parses `memory.offload`.
pub fn parse_offload(s: &str) -> Result<Offload, String> {
    match s {
        "none" => Ok(Offload::None),
        "model" => Ok(Offload::Model),
        _ => Err(format!("unknown offload `{s}`; valid: none, model")),
    }
}

/// Parses a scheduler name.
pub fn parse_scheduler(s: &str) -> Result<SchedulerName, String> {
    SchedulerName::parse(s).ok_or_else(|| {
        let all: Vec<&str> = SchedulerName::ALL.iter().map(|n| n.as_str()).collect();
        format!(
            "unknown scheduler `{s}`{}; valid: {}",
            did_you_mean(s, all.iter().copied()),
            all.join(", ")
        )
    })
}

/// Parses a noise source.
pub fn parse_noise(s: &str) -> Result<NoiseSource, String> {
    match s {
        "torch-cpu" => Ok(NoiseSource::TorchCpu),
        "device" => Ok(NoiseSource::Device),
        _ => Err(format!(
            "unknown noise `{s}`{}; valid: torch-cpu, device",
            did_you_mean(s, ["torch-cpu", "device"])
        )),
    }
}

/// Parses `steps` (an integer in 1..=1000).
pub fn parse_steps(s: &str) -> Result<u32, String> {
    match int_text(s) {
        Some(n) if (1..=1000).contains(&n) => Ok(n as u32),
        Some(_) => Err(format!("`steps` must be between 1 and 1000, got {s}")),
        None if looks_integral(s) => Err(format!("`steps` must be between 1 and 1000, got {s}")),
        None => Err("`steps` must be an integer".into()),
    }
}

/// Parses `batch_size` (an integer >= 1).
pub fn parse_batch_size(s: &str) -> Result<u32, String> {
    match int_text(s) {
        Some(n) if n >= 1 && n <= u32::MAX as i128 => Ok(n as u32),
        Some(_) => Err(format!("`batch_size` must be at least 1, got {s}")),
        None if looks_integral(s) => Err(format!("`batch_size` is too large, got {s}")),
        None => Err("`batch_size` must be an integer".into()),
    }
}

/// Parses a finite number for `field`.
pub fn parse_number(field: &str, s: &str) -> Result<f64, String> {
    match num_text(s) {
        Some(v) if v.is_finite() => Ok(v),
        Some(_) => Err(format!("`{field}` must be a finite number, got {s}")),
        None => Err(format!("`{field}` must be a number")),
    }
}

/// Parses `guidance` (a number >= 0).
pub fn parse_guidance(s: &str) -> Result<f64, String> {
    let v = parse_number("guidance", s)?;
    if v < 0.0 {
        return Err(format!("`guidance` must be >= 0, got {s}"));
    }
    Ok(v)
}

/// Parses `strength` (a number in (0, 1]).
pub fn parse_strength(s: &str) -> Result<f64, String> {
    let v = parse_number("strength", s)?;
    if !(v > 0.0 && v <= 1.0) {
        return Err(format!("`strength` must be in (0, 1], got {s}"));
    }
    Ok(v)
}

/// Parses `switch_at` (a number strictly between 0 and 1).
pub fn parse_switch_at(s: &str) -> Result<f64, String> {
    let v = parse_number("switch_at", s)?;
    if !(v > 0.0 && v < 1.0) {
        return Err(format!(
            "`switch_at` must be strictly between 0 and 1, got {s}"
        ));
    }
    Ok(v)
}

/// Parses one crop coordinate.
pub fn parse_crop_coord(s: &str) -> Result<u32, String> {
    match int_text(s) {
        Some(n) if (0..=u32::MAX as i128).contains(&n) => Ok(n as u32),
        _ => Err(format!("`crop` values must be integers >= 0, got `{s}`")),
    }
}

/// Renders a crop as the grid records it: `[top, left]`.
pub fn render_crop(top: u32, left: u32) -> String {
    format!("[{top}, {left}]")
}

/// Applies one grid value (as [`super::GridAxis`] records it) to `params`.
pub fn apply_grid_value(params: &mut GenParams, field: &str, value: &str) -> Result<(), String> {
    match field {
        "steps" => params.steps = parse_steps(value)?,
        "guidance" => params.guidance = parse_guidance(value)?,
        "scheduler" => params.scheduler = parse_scheduler(value)?,
        "size" => (params.width, params.height) = parse_size("size", value)?,
        "negative_prompt" => params.negative_prompt = value.to_string(),
        "noise" => params.noise = parse_noise(value)?,
        "strength" => params.strength = parse_strength(value)?,
        "original_size" => params.sdxl.original_size = Some(parse_original_size(value)?),
        "crop" => {
            let inner = value
                .trim()
                .strip_prefix('[')
                .and_then(|v| v.strip_suffix(']'));
            let parts: Vec<&str> = inner
                .map(|v| v.split(',').map(str::trim).collect())
                .unwrap_or_default();
            if parts.len() != 2 {
                return Err(format!("`crop` must be a list [top, left], got `{value}`"));
            }
            params.sdxl.crop = (parse_crop_coord(parts[0])?, parse_crop_coord(parts[1])?);
        }
        "aesthetic_score" => params.sdxl.aesthetic_score = parse_number(field, value)?,
        "negative_aesthetic_score" => {
            params.sdxl.negative_aesthetic_score = parse_number(field, value)?
        }
        "batch_size" => return Err(batch_size_not_sweepable()),
        _ => {
            return Err(format!(
                "`{field}` cannot be swept{}; sweepable fields: {}",
                did_you_mean(field, SWEEPABLE),
                SWEEPABLE.join(", ")
            ))
        }
    }
    Ok(())
}

/// The message for a `batch_size` grid axis.
pub fn batch_size_not_sweepable() -> String {
    "`batch_size` cannot be swept: it does not change pixels (set it on the job instead)".into()
}

/// Optimal-string-alignment edit distance (a transposition counts as one edit).
pub fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    if a.len() > 64 || b.len() > 64 {
        return usize::MAX;
    }
    let w = b.len() + 1;
    let mut d = vec![0usize; (a.len() + 1) * w];
    for i in 0..=a.len() {
        d[i * w] = i;
    }
    for (j, cell) in d.iter_mut().enumerate().take(w) {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut v = (d[(i - 1) * w + j] + 1)
                .min(d[i * w + j - 1] + 1)
                .min(d[(i - 1) * w + j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                v = v.min(d[(i - 2) * w + j - 2] + 1);
            }
            d[i * w + j] = v;
        }
    }
    d[a.len() * w + b.len()]
}

/// ` (did you mean `x`?)` for the closest candidate within a small edit distance, or "".
pub fn did_you_mean<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> String {
    let limit = if word.chars().count() >= 5 { 2 } else { 1 };
    let best = candidates
        .into_iter()
        .map(|c| (edit_distance(&word.to_ascii_lowercase(), c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d);
    match best {
        Some((_, c)) => format!(" (did you mean `{c}`?)"),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers() {
        assert_eq!(int_text("42"), Some(42));
        assert_eq!(int_text("-3"), Some(-3));
        assert_eq!(int_text("0x10"), Some(16));
        assert_eq!(int_text("1.5"), None);
        assert_eq!(num_text("7.5"), Some(7.5));
        assert_eq!(num_text("1e3"), Some(1000.0));
        assert_eq!(num_text("abc"), None);
        assert_eq!(num_text("inf"), None);
    }

    #[test]
    fn sizes_and_bytes() {
        assert_eq!(parse_size("size", "512x768"), Ok((512, 768)));
        assert!(parse_size("size", "500x512").is_err());
        assert!(parse_size("size", "0x512").is_err());
        assert!(parse_size("size", "512").is_err());
        assert_eq!(parse_bytes("m", "12GiB"), Ok(12 << 30));
        assert_eq!(parse_bytes("m", "512MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("m", "2GB"), Ok(2_000_000_000));
        assert_eq!(parse_bytes("m", "1.5 GiB"), Ok(3 << 29));
        assert_eq!(parse_bytes("m", "1000"), Ok(1000));
        assert!(parse_bytes("m", "lots").is_err());
        assert!(parse_bytes("m", "0").is_err());
        assert!(parse_bytes("m", "12XB").is_err());
    }

    #[test]
    fn hf_sources() {
        assert_eq!(
            parse_hf_source("hf:org/name@v1.0"),
            Ok(Some(ModelSource::Hf {
                repo: "org/name".into(),
                revision: Some("v1.0".into())
            }))
        );
        assert_eq!(parse_hf_source("./x"), Ok(None));
        for bad in [
            "hf:", "hf:org", "hf:org/", "hf:/n", "hf:a/b/c", "hf:a/b@", "hf:a b/c",
        ] {
            assert!(parse_hf_source(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn suggestions() {
        assert_eq!(edit_distance("stpes", "steps"), 1);
        assert_eq!(
            did_you_mean("stpes", ["steps", "seeds"]),
            " (did you mean `steps`?)"
        );
        assert_eq!(did_you_mean("zzz", ["steps"]), "");
    }

    #[test]
    fn grid_values_apply() {
        let mut p = GenParams::default();
        apply_grid_value(&mut p, "crop", "[8, 16]").unwrap();
        apply_grid_value(&mut p, "size", "768x512").unwrap();
        apply_grid_value(&mut p, "scheduler", "euler_a").unwrap();
        assert_eq!(p.sdxl.crop, (8, 16));
        assert_eq!((p.width, p.height), (768, 512));
        assert_eq!(p.scheduler, SchedulerName::EulerA);
        assert!(apply_grid_value(&mut p, "batch_size", "2").is_err());
    }
}
