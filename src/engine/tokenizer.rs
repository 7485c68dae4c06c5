//! CLIP's byte-level BPE tokenizer, as transformers' CLIP tokenizer builds it.
//!
//! A `tokenizer.json` is used as is when the folder has one; otherwise the same pipeline is
//! assembled from `vocab.json` + `merges.txt` (what transformers' `CLIPConverter` produces):
//! NFC + whitespace collapsing + lowercasing, CLIP's split regex, byte-level mapping, BPE with
//! the `</w>` end-of-word suffix. `encode` adds BOS/EOS, truncates and pads to
//! `model_max_length` with the configured pad token.

use serde::Deserialize;
use serde_json::{json, Value};
use std::path::Path;
use std::str::FromStr;
use tokenizers::Tokenizer;

use super::weights::read_json;
use super::EngineError;

/// CLIP's pre-tokenization regex (contractions, letter runs, single digits, other symbol runs).
const CLIP_SPLIT_REGEX: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// The sequence length when `tokenizer_config.json` gives none (or an unbounded one).
const DEFAULT_MAX_LENGTH: usize = 77;

/// A special token as `tokenizer_config.json` spells it: a string or an `AddedToken` object.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum TokenSpec {
    Plain(String),
    Object { content: String },
}

impl TokenSpec {
    fn content(&self) -> &str {
        match self {
            TokenSpec::Plain(s) => s,
            TokenSpec::Object { content } => content,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
struct TokenizerConfig {
    bos_token: Option<TokenSpec>,
    eos_token: Option<TokenSpec>,
    pad_token: Option<TokenSpec>,
    unk_token: Option<TokenSpec>,
    model_max_length: Option<f64>,
}

/// A CLIP tokenizer producing fixed-length id sequences (BOS, tokens, EOS, padding).
pub struct ClipTokenizer {
    inner: Tokenizer,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    max_length: usize,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .field("max_length", &self.max_length)
            .finish()
    }
}

fn load_error(file: &Path, message: impl std::fmt::Display) -> EngineError {
    EngineError::Load {
        file: file.to_path_buf(),
        message: message.to_string(),
    }
}

impl ClipTokenizer {
    /// Loads the tokenizer of a diffusers `tokenizer/` (or `tokenizer_2/`) folder.
    pub fn load(dir: &Path) -> Result<Self, EngineError> {
        let config_file = dir.join("tokenizer_config.json");
        let mut config: TokenizerConfig = if config_file.is_file() {
            read_json(&config_file)?
        } else {
            TokenizerConfig::default()
        };
        // transformers lets `special_tokens_map.json` override the config (SD 2.x pads with `!`).
        let map_file = dir.join("special_tokens_map.json");
        if map_file.is_file() {
            let map: TokenizerConfig = read_json(&map_file)?;
            config.bos_token = map.bos_token.or(config.bos_token);
            config.eos_token = map.eos_token.or(config.eos_token);
            config.unk_token = map.unk_token.or(config.unk_token);
            config.pad_token = map.pad_token.or(config.pad_token);
        }
        let bos = config
            .bos_token
            .as_ref()
            .map_or("<|startoftext|>", TokenSpec::content)
            .to_string();
        let eos = config
            .eos_token
            .as_ref()
            .map_or("<|endoftext|>", TokenSpec::content)
            .to_string();
        let unk = config
            .unk_token
            .as_ref()
            .map_or("<|endoftext|>", TokenSpec::content)
            .to_string();
        let pad = config
            .pad_token
            .as_ref()
            .map_or("<|endoftext|>", TokenSpec::content)
            .to_string();
        let max_length = match config.model_max_length {
            Some(n) if (2.0..=1_000_000.0).contains(&n) => n as usize,
            _ => DEFAULT_MAX_LENGTH,
        };

        let json_file = dir.join("tokenizer.json");
        let (inner, source) = if json_file.is_file() {
            let t = Tokenizer::from_file(&json_file).map_err(|e| load_error(&json_file, e))?;
            (t, json_file)
        } else {
            let vocab_file = dir.join("vocab.json");
            let merges_file = dir.join("merges.txt");
            let t = build_from_vocab(&vocab_file, &merges_file, &[&bos, &eos, &unk, &pad], &unk)?;
            (t, vocab_file)
        };
        let id = |token: &str| {
            inner.token_to_id(token).ok_or_else(|| {
                load_error(&source, format!("token `{token}` is not in the vocabulary"))
            })
        };
        let (bos_id, eos_id, pad_id) = (id(&bos)?, id(&eos)?, id(&pad)?);
        Ok(Self {
            inner,
            bos_id,
            eos_id,
            pad_id,
            max_length,
        })
    }

    /// The fixed length of every encoded sequence (`model_max_length`, 77 for CLIP).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// The id of the padding token.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The id of the end-of-text token.
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// The id of the start-of-text token.
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    /// Encodes `text` into exactly `max_length()` ids: BOS, the tokens (truncated so that the
    /// sequence fits), EOS, then padding.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| EngineError::Other(format!("tokenizing {text:?}: {e}")))?;
        let tokens = encoding.get_ids();
        let keep = tokens.len().min(self.max_length - 2);
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos_id);
        ids.extend_from_slice(&tokens[..keep]);
        ids.push(self.eos_id);
        ids.resize(self.max_length, self.pad_id);
        Ok(ids)
    }

    /// How many prompt tokens (without BOS/EOS) `text` has before truncation.
    pub fn token_count(&self, text: &str) -> Result<usize, EngineError> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| EngineError::Other(format!("tokenizing {text:?}: {e}")))?;
        Ok(encoding.get_ids().len())
    }
}

/// Builds the equivalent of transformers' fast CLIP tokenizer from `vocab.json` + `merges.txt`.
fn build_from_vocab(
    vocab_file: &Path,
    merges_file: &Path,
    specials: &[&str],
    unk: &str,
) -> Result<Tokenizer, EngineError> {
    let vocab: serde_json::Map<String, Value> = read_json(vocab_file)?;
    let merges_text =
        std::fs::read_to_string(merges_file).map_err(|e| load_error(merges_file, e))?;
    let mut merges = Vec::new();
    for (n, line) in merges_text.lines().enumerate() {
        if (n == 0 && line.starts_with("#version")) || line.trim().is_empty() {
            continue;
        }
        let mut parts = line.split(' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => {
                merges.push(json!([a, b]))
            }
            _ => {
                return Err(load_error(
                    merges_file,
                    format!("line {}: expected two symbols: {line:?}", n + 1),
                ))
            }
        }
    }
    let mut added = Vec::new();
    let mut seen = Vec::new();
    for &token in specials {
        if seen.contains(&token) {
            continue;
        }
        seen.push(token);
        let id = vocab.get(token).and_then(Value::as_u64).ok_or_else(|| {
            load_error(
                vocab_file,
                format!("special token `{token}` is not in the vocabulary"),
            )
        })?;
        added.push(json!({
            "id": id, "content": token, "single_word": false, "lstrip": false, "rstrip": false,
            "normalized": false, "special": true
        }));
    }
    added.sort_by_key(|t| t["id"].as_u64());
    let spec = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFC"},
            {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
            {"type": "Lowercase"}
        ]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": CLIP_SPLIT_REGEX}, "behavior": "Removed", "invert": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
        ]},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": "",
            "end_of_word_suffix": "</w>", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges
        }
    });
    Tokenizer::from_str(&spec.to_string())
        .map_err(|e| load_error(vocab_file, format!("building the BPE tokenizer: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn fixture(rel: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/golden/models")
            .join(rel)
    }

    #[test]
    fn vocab_build_matches_tokenizer_json() {
        // tiny-sd15 has vocab.json + merges.txt; tiny-sdxl-base/tokenizer has the same vocabulary
        // as tokenizer.json: both paths must agree.
        let a = ClipTokenizer::load(&fixture("tiny-sd15/tokenizer")).unwrap();
        let b = ClipTokenizer::load(&fixture("tiny-sdxl-base/tokenizer")).unwrap();
        for text in [
            "A  Photo of\tCAFÉ's 123 dogs!!",
            "",
            "  spaced   out  ",
            "<|endoftext|> x",
            "naïve façade, 😀",
        ] {
            assert_eq!(a.encode(text).unwrap(), b.encode(text).unwrap(), "{text:?}");
        }
    }

    #[test]
    fn pads_truncates_and_wraps() {
        let t = ClipTokenizer::load(&fixture("tiny-sdxl-base/tokenizer_2")).unwrap();
        assert_eq!(t.pad_id(), 0);
        let ids = t.encode("hello").unwrap();
        assert_eq!(ids.len(), 77);
        assert_eq!(ids[0], t.bos_id());
        assert_eq!(ids[2], t.eos_id());
        assert!(ids[3..].iter().all(|&i| i == 0));
        let long = "word ".repeat(200);
        let ids = t.encode(&long).unwrap();
        assert_eq!(ids.len(), 77);
        assert_eq!(ids[76], t.eos_id());
        assert!(t.token_count(&long).unwrap() >= 200);
    }

    #[test]
    fn special_tokens_map_overrides_pad() {
        let dir = std::env::temp_dir().join(format!("sdrun-tok-map-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["vocab.json", "merges.txt", "tokenizer_config.json"] {
            std::fs::copy(fixture("tiny-sd15/tokenizer").join(f), dir.join(f)).unwrap();
        }
        std::fs::write(
            dir.join("special_tokens_map.json"),
            r#"{"pad_token": "!", "bos_token": {"content": "<|startoftext|>", "lstrip": false}}"#,
        )
        .unwrap();
        let t = ClipTokenizer::load(&dir).unwrap();
        assert_eq!(t.pad_id(), 0);
        assert_eq!(t.bos_id(), 49406);
        // As in transformers, the pad token is a special added token: `!` in a prompt maps to it.
        let b = ClipTokenizer::load(&fixture("tiny-sdxl-base/tokenizer_2")).unwrap();
        assert_eq!(t.encode("wow! ok").unwrap(), b.encode("wow! ok").unwrap());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn missing_vocab_is_an_error() {
        let dir = std::env::temp_dir().join(format!("sdrun-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let err = ClipTokenizer::load(&dir).unwrap_err().to_string();
        assert!(err.contains("vocab.json"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
