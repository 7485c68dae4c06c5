//! PNG encoding with metadata: AUTOMATIC1111's `parameters` text and the `sd-run` manifest record.
//!
//! `parameters` follows A1111's infotext layout so that its "PNG Info" tab, ComfyUI loaders and
//! image browsers read our files:
//!
//! ```text
//! a red fox mascot, flat vector
//! Negative prompt: text, watermark
//! Steps: 25, Sampler: DPM++ 2M Karras, Schedule type: Karras, CFG scale: 7.5, Seed: 1, Size: 512x512, Model hash: 6ce0161689, Model: sd15, Version: sd-run 0.1.0
//! ```

use std::collections::BTreeMap;
use std::io::Cursor;

use super::{ManifestRecord, OutputError};

/// Keyword of the A1111 text chunk.
pub const PARAMETERS_KEY: &str = "parameters";
/// Keyword of the chunk holding the manifest record as JSON.
pub const RECORD_KEY: &str = "sd-run";

/// A parsed A1111 `parameters` text.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct A1111Params {
    /// The positive prompt (lines joined with `\n`).
    pub prompt: String,
    /// The negative prompt, empty when the text has none.
    pub negative_prompt: String,
    /// The last line's `Key: value` pairs, values unquoted.
    pub params: BTreeMap<String, String>,
}

impl A1111Params {
    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.params.get(key).map(String::as_str)
    }

    /// `Size: WxH` as `(width, height)`.
    pub fn size(&self) -> Option<(u32, u32)> {
        let (w, h) = self.get("Size")?.split_once('x')?;
        Some((w.trim().parse().ok()?, h.trim().parse().ok()?))
    }
}

/// A1111's sampler name (and schedule type, when it has one) for a scheduler name.
///
/// Accepts the spec's names (`dpmpp_2m_karras`), diffusers class names (`EulerDiscreteScheduler`)
/// and `default (ClassName)`; anything else comes back verbatim.
pub fn a1111_sampler(scheduler: &str) -> (String, Option<&'static str>) {
    let s = scheduler.trim();
    // `default (PNDMScheduler)` / `default:PNDMScheduler` → the class it resolved to.
    let inner = if let Some((_, rest)) = s.split_once('(') {
        rest.trim_end_matches(')').trim()
    } else if let Some(rest) = s.strip_prefix("default:") {
        rest.trim()
    } else {
        s
    };
    let name = match inner {
        "ddim" | "DDIMScheduler" => "DDIM",
        "euler" | "EulerDiscreteScheduler" => "Euler",
        "euler_a" | "EulerAncestralDiscreteScheduler" => "Euler a",
        "dpmpp_2m" | "DPMSolverMultistepScheduler" => "DPM++ 2M",
        "dpmpp_2m_karras" => return ("DPM++ 2M Karras".into(), Some("Karras")),
        "unipc" | "UniPCMultistepScheduler" => "UniPC",
        "pndm" | "PNDMScheduler" => "PLMS",
        "LMSDiscreteScheduler" => "LMS",
        "HeunDiscreteScheduler" => "Heun",
        "KDPM2DiscreteScheduler" => "DPM2",
        "KDPM2AncestralDiscreteScheduler" => "DPM2 a",
        _ => return (s.to_string(), None),
    };
    (name.to_string(), None)
}

/// Formats a float as Python's `str(float)` does for ordinary values (`7.0`, `7.5`).
fn py_float(x: f64) -> String {
    format!("{x:?}")
}

/// Quotes a value as A1111's `infotext_utils.quote` does: JSON-quoted when it holds a comma,
/// a colon or a newline, verbatim otherwise.
pub fn quote(value: &str) -> String {
    if value.contains(',') || value.contains(':') || value.contains('\n') {
        serde_json::to_string(value).unwrap_or_else(|_| value.to_string())
    } else {
        value.to_string()
    }
}

/// Builds the A1111 `parameters` text of a record. `extra` pairs (e.g. `("Denoising strength",
/// "0.75")` for img2img) go after the model fields, before `Version`.
pub fn a1111_parameters(record: &ManifestRecord, extra: &[(&str, String)]) -> String {
    let (sampler, schedule) = a1111_sampler(&record.scheduler);
    let mut fields: Vec<(String, String)> = vec![
        ("Steps".into(), record.steps.to_string()),
        ("Sampler".into(), sampler),
    ];
    if let Some(schedule) = schedule {
        fields.push(("Schedule type".into(), schedule.into()));
    }
    fields.push(("CFG scale".into(), py_float(record.guidance)));
    fields.push(("Seed".into(), record.seed.to_string()));
    fields.push(("Size".into(), format!("{}x{}", record.width, record.height)));
    if !record.model_hash.is_empty() {
        fields.push(("Model hash".into(), record.model_hash.clone()));
    }
    fields.push(("Model".into(), record.model.clone()));
    for (k, v) in extra {
        fields.push(((*k).to_string(), v.clone()));
    }
    if let Some(refiner) = &record.refiner {
        fields.push(("Refiner".into(), refiner.model.clone()));
        fields.push(("Refiner switch at".into(), py_float(refiner.switch_at)));
    }
    match record.noise.as_str() {
        // A1111's "CPU" RNG is exactly torch.randn with a seeded CPU generator.
        "torch-cpu" => fields.push(("RNG".into(), "CPU".into())),
        "" => {}
        other => fields.push(("Noise".into(), other.to_string())),
    }
    if record.safety.flagged {
        let action = record
            .safety
            .action
            .clone()
            .unwrap_or_else(|| "flagged".into());
        fields.push(("Safety".into(), action));
    }
    fields.push((
        "Version".into(),
        format!("sd-run {}", env!("CARGO_PKG_VERSION")),
    ));

    let last = fields
        .iter()
        .map(|(k, v)| format!("{k}: {}", quote(v)))
        .collect::<Vec<_>>()
        .join(", ");
    let mut text = record.prompt.clone();
    if !record.negative_prompt.is_empty() {
        text.push_str("\nNegative prompt: ");
        text.push_str(&record.negative_prompt);
    }
    text.push('\n');
    text.push_str(&last);
    text.trim().to_string()
}

/// JSON of the record on one line, non-ASCII escaped as `\uXXXX` so it fits a Latin-1 tEXt chunk.
pub fn record_json(record: &ManifestRecord) -> Result<String, OutputError> {
    let json = serde_json::to_string(record)?;
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{u:04x}"));
            }
        }
    }
    Ok(out)
}

fn check_buffer(width: u32, height: u32, rgb: &[u8]) -> Result<(), OutputError> {
    if width == 0 || height == 0 {
        return Err(OutputError::EmptyImage { width, height });
    }
    let want = width as usize * height as usize * 3;
    if rgb.len() != want {
        return Err(OutputError::BufferSize {
            width,
            height,
            got: rgb.len(),
            want,
        });
    }
    Ok(())
}

fn encode(
    width: u32,
    height: u32,
    rgb: &[u8],
    texts: &[(&str, String)],
) -> Result<Vec<u8>, OutputError> {
    check_buffer(width, height, rgb)?;
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, width, height);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        for (key, text) in texts {
            // tEXt is Latin-1; like PIL, fall back to iTXt (UTF-8) when the text is not.
            if text.chars().all(|c| (c as u32) < 256) {
                enc.add_text_chunk((*key).to_string(), text.clone())?;
            } else {
                enc.add_itxt_chunk((*key).to_string(), text.clone())?;
            }
        }
        let mut writer = enc.write_header()?;
        writer.write_image_data(rgb)?;
        writer.finish()?;
    }
    Ok(out)
}

/// Encodes an 8-bit RGB image (`rgb` row-major, 3 bytes a pixel) as PNG with two text chunks:
/// `parameters` (A1111 infotext) and `sd-run` (the record as one-line JSON).
pub fn encode_png(
    width: u32,
    height: u32,
    rgb: &[u8],
    record: &ManifestRecord,
) -> Result<Vec<u8>, OutputError> {
    encode_png_with(width, height, rgb, record, &[])
}

/// [`encode_png`] with extra A1111 fields (see [`a1111_parameters`]).
pub fn encode_png_with(
    width: u32,
    height: u32,
    rgb: &[u8],
    record: &ManifestRecord,
    extra: &[(&str, String)],
) -> Result<Vec<u8>, OutputError> {
    let texts = [
        (PARAMETERS_KEY, a1111_parameters(record, extra)),
        (RECORD_KEY, record_json(record)?),
    ];
    encode(width, height, rgb, &texts)
}

/// A plain 8-bit RGB PNG without metadata (contact sheets).
pub fn encode_rgb_png(width: u32, height: u32, rgb: &[u8]) -> Result<Vec<u8>, OutputError> {
    encode(width, height, rgb, &[])
}

/// Every text chunk (tEXt, zTXt, iTXt) of a PNG as `(keyword, text)`.
pub fn read_text_chunks(png_bytes: &[u8]) -> Result<Vec<(String, String)>, OutputError> {
    let decoder = png::Decoder::new(Cursor::new(png_bytes));
    let mut reader = decoder.read_info()?;
    // Text chunks may also follow the image data: read through to the end.
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| OutputError::TextChunk {
            keyword: String::new(),
            reason: "image too large to read".into(),
        })?;
    let mut buf = vec![0u8; size];
    reader.next_frame(&mut buf)?;
    reader.finish()?;
    let info = reader.info();
    let mut out = Vec::new();
    for t in &info.uncompressed_latin1_text {
        out.push((t.keyword.clone(), t.text.clone()));
    }
    for t in &info.compressed_latin1_text {
        let mut t = t.clone();
        t.decompress_text().map_err(|e| text_err(&t.keyword, e))?;
        let text = t.get_text().map_err(|e| text_err(&t.keyword, e))?;
        out.push((t.keyword.clone(), text));
    }
    for t in &info.utf8_text {
        let mut t = t.clone();
        t.decompress_text().map_err(|e| text_err(&t.keyword, e))?;
        let text = t.get_text().map_err(|e| text_err(&t.keyword, e))?;
        out.push((t.keyword.clone(), text));
    }
    Ok(out)
}

fn text_err(keyword: &str, e: png::DecodingError) -> OutputError {
    OutputError::TextChunk {
        keyword: keyword.to_string(),
        reason: e.to_string(),
    }
}

/// The manifest record stored in a PNG's `sd-run` chunk, if it has one.
pub fn read_record(png_bytes: &[u8]) -> Result<Option<ManifestRecord>, OutputError> {
    for (k, v) in read_text_chunks(png_bytes)? {
        if k == RECORD_KEY {
            return Ok(Some(serde_json::from_str(&v)?));
        }
    }
    Ok(None)
}

fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

fn is_key_char(c: char) -> bool {
    is_word(c) || c == ' ' || c == '-' || c == '/'
}

/// Tries A1111's `re_param` (`\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)`) at `start`;
/// returns (key, raw value, end).
fn match_param(s: &[char], start: usize) -> Option<(String, String, usize)> {
    let mut i = start;
    while i < s.len() && s[i].is_whitespace() {
        i += 1;
    }
    let key_start = i;
    if i >= s.len() || !is_word(s[i]) {
        return None;
    }
    i += 1;
    while i < s.len() && is_key_char(s[i]) {
        i += 1;
    }
    if i - key_start < 2 || i >= s.len() || s[i] != ':' {
        return None;
    }
    let key: String = s[key_start..i].iter().collect();
    i += 1;
    while i < s.len() && s[i].is_whitespace() {
        i += 1;
    }
    let value_start = i;
    // Quoted alternative: at least one escaped or plain char, then a quote, then `,` or end.
    if i < s.len() && s[i] == '"' {
        let mut j = i + 1;
        let mut n = 0;
        while j < s.len() && s[j] != '"' {
            if s[j] == '\\' {
                if j + 1 >= s.len() {
                    break;
                }
                j += 1;
            }
            j += 1;
            n += 1;
        }
        if n > 0 && j < s.len() && s[j] == '"' && (j + 1 == s.len() || s[j + 1] == ',') {
            let value: String = s[value_start..=j].iter().collect();
            let end = if j + 1 < s.len() { j + 2 } else { j + 1 };
            return Some((key, value, end));
        }
    }
    let mut j = value_start;
    while j < s.len() && s[j] != ',' {
        j += 1;
    }
    let value: String = s[value_start..j].iter().collect();
    let end = if j < s.len() { j + 1 } else { j };
    Some((key, value, end))
}

/// All `Key: value` pairs of a line, as Python's `re.findall(re_param, line)` finds them.
fn find_params(line: &str) -> Vec<(String, String)> {
    let chars: Vec<char> = line.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        match match_param(&chars, i) {
            Some((k, v, end)) => {
                out.push((k, v));
                i = end.max(i + 1);
            }
            None => i += 1,
        }
    }
    out
}

/// A1111's `unquote`: a JSON string when the value is `"…"`, verbatim otherwise.
fn unquote(v: &str) -> String {
    if v.len() >= 2 && v.starts_with('"') && v.ends_with('"') {
        serde_json::from_str::<String>(v).unwrap_or_else(|_| v.to_string())
    } else {
        v.to_string()
    }
}

/// Parses an A1111 `parameters` text the way A1111's `parse_generation_parameters` does: the
/// last line holds the `Key: value` pairs (when it has at least 3), a line starting with
/// `Negative prompt:` starts the negative prompt, every line before it is the prompt.
pub fn parse_parameters(text: &str) -> Result<A1111Params, OutputError> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(OutputError::Parameters("the text is empty".into()));
    }
    let mut lines: Vec<&str> = trimmed.split('\n').collect();
    let mut last = lines.pop().unwrap_or_default();
    if find_params(last).len() < 3 {
        lines.push(last);
        last = "";
    }
    let mut out = A1111Params::default();
    let mut in_negative = false;
    for line in lines {
        let mut line = line.trim();
        if let Some(rest) = line.strip_prefix("Negative prompt:") {
            in_negative = true;
            line = rest.trim();
        }
        let target = if in_negative {
            &mut out.negative_prompt
        } else {
            &mut out.prompt
        };
        if !target.is_empty() {
            target.push('\n');
        }
        target.push_str(line);
    }
    for (k, v) in find_params(last) {
        out.params.insert(k.trim().to_string(), unquote(&v));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_hand_written_a1111_infotext() {
        // As A1111 1.10 writes it: a two-line prompt, a negative prompt, a quoted value
        // (Lora hashes holds a colon and a comma), a schedule type and a hires upscaler.
        let text = "masterpiece, 1girl, (red scarf:1.2)\nstanding in snow, <lora:film:0.6>\n\
Negative prompt: lowres, bad hands\nblurry\n\
Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 3141592653, \
Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.45, \
Hires upscale: 2, Hires upscaler: Latent, Lora hashes: \"film: a1b2c3d4e5f6, other: 00ff\", \
TI hashes: \"say \\\"hi\\\": 1\", Version: v1.10.1";
        let p = parse_parameters(text).unwrap();
        assert_eq!(
            p.prompt,
            "masterpiece, 1girl, (red scarf:1.2)\nstanding in snow, <lora:film:0.6>"
        );
        assert_eq!(p.negative_prompt, "lowres, bad hands\nblurry");
        assert_eq!(p.get("Steps"), Some("30"));
        assert_eq!(p.get("Sampler"), Some("DPM++ 2M"));
        assert_eq!(p.get("Schedule type"), Some("Karras"));
        assert_eq!(p.get("CFG scale"), Some("7"));
        assert_eq!(p.get("Seed"), Some("3141592653"));
        assert_eq!(p.size(), Some((512, 768)));
        assert_eq!(p.get("Model hash"), Some("6ce0161689"));
        assert_eq!(p.get("Model"), Some("v1-5-pruned-emaonly"));
        assert_eq!(p.get("Denoising strength"), Some("0.45"));
        assert_eq!(
            p.get("Lora hashes"),
            Some("film: a1b2c3d4e5f6, other: 00ff")
        );
        assert_eq!(p.get("TI hashes"), Some("say \"hi\": 1"));
        assert_eq!(p.get("Version"), Some("v1.10.1"));
        assert_eq!(p.params.len(), 14);
    }

    #[test]
    fn short_last_line_is_prompt_and_errors() {
        let p = parse_parameters("just a prompt\nSteps: 20").unwrap();
        assert_eq!(p.prompt, "just a prompt\nSteps: 20");
        assert!(p.params.is_empty());
        assert!(parse_parameters("  \n ").is_err());
    }

    #[test]
    fn sampler_names() {
        let s = |x: &str| a1111_sampler(x).0;
        assert_eq!(s("ddim"), "DDIM");
        assert_eq!(s("euler"), "Euler");
        assert_eq!(s("euler_a"), "Euler a");
        assert_eq!(s("dpmpp_2m"), "DPM++ 2M");
        assert_eq!(
            a1111_sampler("dpmpp_2m_karras"),
            ("DPM++ 2M Karras".into(), Some("Karras"))
        );
        assert_eq!(s("unipc"), "UniPC");
        assert_eq!(s("pndm"), "PLMS");
        assert_eq!(s("PNDMScheduler"), "PLMS");
        assert_eq!(s("default (EulerDiscreteScheduler)"), "Euler");
        assert_eq!(s("MyOwnScheduler"), "MyOwnScheduler");
    }

    #[test]
    fn quoting_matches_a1111() {
        assert_eq!(quote("plain"), "plain");
        assert_eq!(quote("a, b"), "\"a, b\"");
        assert_eq!(quote("k: v"), "\"k: v\"");
        assert_eq!(quote("say \"x\", y"), "\"say \\\"x\\\", y\"");
        assert_eq!(py_float(7.0), "7.0");
        assert_eq!(py_float(7.5), "7.5");
    }
}
