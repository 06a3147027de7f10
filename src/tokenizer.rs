//! Text in and out: a Hugging Face `tokenizer.json`, or a GGUF's `tokenizer.ggml.*` metadata
//! (GPT-2 style byte-level BPE) built into the same `tokenizers` tokenizer; control tags
//! resolved to token ids; chat-template role markers; an incremental decoder for streaming.

use crate::error::{Result, SpindleError};
use model_loader::{Checkpoint, GgufValue};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// A tokenizer loaded from a `tokenizer.json` or built from a GGUF's metadata.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// The chat template (Jinja source), when the checkpoint has one.
    chat_template: Option<String>,
    /// Prepended to prompts: the BOS id, when a GGUF asks for it (`add_bos_token`).
    bos_prefix: Option<u32>,
}

/// The pre-tokenizer regex of Qwen2 / Qwen3 (`tokenizer.ggml.pre` = `qwen2`).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// The pre-tokenizer regex of Llama 3 (`llama-bpe`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The `tokenizers` pre-tokenizer (as tokenizer.json) for a GGUF `tokenizer.ggml.pre` kind, or
/// `None` for a kind not implemented here. Each mirrors the Hugging Face tokenizer.json of the
/// model family (and llama.cpp's regexes for the kind).
fn pre_tokenizer(kind: &str) -> Option<Value> {
    let byte_level = |use_regex: bool| {
        json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
               "use_regex": use_regex})
    };
    let split = |re: &str| {
        json!({"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated",
               "invert": false})
    };
    Some(match kind {
        "default" | "gpt2" | "gpt-2" => byte_level(true),
        // SmolLM / StarCoder: every digit alone, then GPT-2's byte-level regex.
        "smollm" | "starcoder" | "refact" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        "qwen2" | "deepseek-r1-qwen" => json!({"type": "Sequence", "pretokenizers": [
            split(QWEN2_SPLIT), byte_level(false)]}),
        "llama-bpe" | "llama3" => json!({"type": "Sequence", "pretokenizers": [
            split(LLAMA3_SPLIT), byte_level(false)]}),
        _ => return None,
    })
}

fn tok_err(what: impl std::fmt::Display) -> SpindleError {
    SpindleError::Tokenizer(what.to_string())
}

impl Tokenizer {
    /// Reads `path` (a `tokenizer.json`).
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| SpindleError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_bytes(&bytes).map_err(|e| tok_err(format!("{}: {e}", path.display())))
    }

    /// Parses the bytes of a `tokenizer.json`.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(bytes).map_err(tok_err)?;
        Ok(Self {
            inner,
            chat_template: None,
            bos_prefix: None,
        })
    }

    /// The tokenizer of a checkpoint: built from the GGUF metadata for a GGUF checkpoint, else
    /// `tokenizer.json` in its directory (with the chat template of `tokenizer_config.json`,
    /// when there is one).
    pub fn for_checkpoint(ck: &Checkpoint) -> Result<Self> {
        if let Some(g) = ck.gguf() {
            return Self::from_gguf(&g.metadata, &g.path);
        }
        let mut tok = Self::from_file(&ck.dir().join("tokenizer.json"))?;
        let config = ck.dir().join("tokenizer_config.json");
        if let Ok(bytes) = std::fs::read(&config) {
            let v: Value = serde_json::from_slice(&bytes)
                .map_err(|e| tok_err(format!("{}: {e}", config.display())))?;
            tok.chat_template = v
                .get("chat_template")
                .and_then(Value::as_str)
                .map(str::to_string);
        }
        Ok(tok)
    }

    /// Builds the tokenizer a GGUF describes in `tokenizer.ggml.*`: a byte-level BPE
    /// (`model` = `gpt2`) with its vocabulary, merges and pre-tokenizer kind; tokens of type 3
    /// (control) become special added tokens and type 4 (user-defined) plain added tokens.
    /// `path` (the GGUF file) is named in errors.
    pub fn from_gguf(meta: &BTreeMap<String, GgufValue>, path: &Path) -> Result<Self> {
        let err = |key: &str, msg: &str| tok_err(format!("{}: GGUF `{key}` {msg}", path.display()));
        let get = |key: &str| meta.get(key).ok_or_else(|| err(key, "is missing"));
        let strings = |key: &str| -> Result<Vec<&str>> {
            get(key)?
                .as_array()
                .ok_or_else(|| err(key, "must be an array"))?
                .iter()
                .map(|v| v.as_str().ok_or_else(|| err(key, "must hold strings")))
                .collect()
        };
        let model = get("tokenizer.ggml.model")?
            .as_str()
            .ok_or_else(|| err("tokenizer.ggml.model", "must be a string"))?;
        if model != "gpt2" {
            return Err(err(
                "tokenizer.ggml.model",
                &format!("is {model:?}; only \"gpt2\" (byte-level BPE) is supported"),
            ));
        }
        let tokens = strings("tokenizer.ggml.tokens")?;
        let types: Vec<u64> = match meta.get("tokenizer.ggml.token_type") {
            None => vec![1; tokens.len()],
            Some(v) => v
                .as_array()
                .ok_or_else(|| err("tokenizer.ggml.token_type", "must be an array"))?
                .iter()
                .map(|t| {
                    t.as_u64()
                        .ok_or_else(|| err("tokenizer.ggml.token_type", "must hold integers"))
                })
                .collect::<Result<_>>()?,
        };
        if types.len() != tokens.len() {
            return Err(err(
                "tokenizer.ggml.token_type",
                &format!("has {} entries for {} tokens", types.len(), tokens.len()),
            ));
        }
        let kind = match meta.get("tokenizer.ggml.pre") {
            None => "default",
            Some(v) => v
                .as_str()
                .ok_or_else(|| err("tokenizer.ggml.pre", "must be a string"))?,
        };
        let pre = pre_tokenizer(kind).ok_or_else(|| {
            err(
                "tokenizer.ggml.pre",
                &format!(
                    "{kind:?} is not a supported pre-tokenizer (gpt2, smollm, qwen2, llama-bpe)"
                ),
            )
        })?;
        let merges = strings("tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| json!([a, b]))
                    .ok_or_else(|| {
                        err(
                            "tokenizer.ggml.merges",
                            &format!("entry {m:?} is not \"a b\""),
                        )
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut vocab = Map::new();
        let mut added = Vec::new();
        for (id, (&token, &ty)) in tokens.iter().zip(&types).enumerate() {
            vocab.insert(token.to_string(), json!(id));
            if ty == 3 || ty == 4 {
                added.push(json!({"id": id, "content": token, "single_word": false,
                    "lstrip": false, "rstrip": false, "normalized": false, "special": ty == 3}));
            }
        }
        let doc = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre,
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                        "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": merges},
        });
        let bytes = serde_json::to_vec(&doc).map_err(tok_err)?;
        let mut tok = Self::from_bytes(&bytes).map_err(|e| {
            tok_err(format!(
                "{}: building the GGUF tokenizer: {e}",
                path.display()
            ))
        })?;
        tok.chat_template = meta
            .get("tokenizer.chat_template")
            .and_then(GgufValue::as_str)
            .map(str::to_string);
        let add_bos = meta
            .get("tokenizer.ggml.add_bos_token")
            .and_then(GgufValue::as_bool)
            .unwrap_or(false);
        if add_bos {
            let bos = meta
                .get("tokenizer.ggml.bos_token_id")
                .and_then(GgufValue::as_u64)
                .and_then(|b| u32::try_from(b).ok())
                .filter(|&b| (b as usize) < tokens.len())
                .ok_or_else(|| {
                    err(
                        "tokenizer.ggml.bos_token_id",
                        "is missing or out of range while add_bos_token is true",
                    )
                })?;
            tok.bos_prefix = Some(bos);
        }
        Ok(tok)
    }

    /// `user` wrapped in the chat template's role markers for one user turn and the start of
    /// the assistant's reply. ChatML templates (`<|im_start|>role\n...<|im_end|>\n`) are
    /// rendered, with the template's default system message when it inserts one; other
    /// templates are an error.
    pub fn chat_prompt(&self, user: &str) -> Result<String> {
        let Some(t) = &self.chat_template else {
            return Err(tok_err("the model has no chat template; drop --chat"));
        };
        if !t.contains("<|im_start|>") {
            return Err(tok_err(
                "the chat template is not ChatML (<|im_start|>role ... <|im_end|>); only ChatML is supported",
            ));
        }
        Ok(format!(
            "{}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n",
            default_system(t).unwrap_or_default()
        ))
    }

    /// Token ids of `text`. Added special tokens written in the text (`<Parallel>`) become
    /// their ids; no BOS/EOS is added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(tok_err)?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of a prompt: [`Tokenizer::encode`], after the BOS token when the model's
    /// GGUF asks for one (`tokenizer.ggml.add_bos_token`).
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids: Vec<u32> = self.bos_prefix.into_iter().collect();
        ids.extend(self.encode(text)?);
        Ok(ids)
    }

    /// Text of `ids`, control tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(tok_err)
    }

    /// The id of one vocabulary entry or added token, if it exists.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token sequence of a control tag: its single id when the tag is a vocabulary entry
    /// or added token, else its encoding (a tag split over several tokens).
    pub fn tag(&self, tag: &str) -> Result<Vec<u32>> {
        if let Some(id) = self.token_id(tag) {
            return Ok(vec![id]);
        }
        let ids = self.encode(tag)?;
        if ids.is_empty() {
            return Err(tok_err(format!("tag {tag:?} encodes to no tokens")));
        }
        Ok(ids)
    }

    /// Vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Ids of the added tokens marked special (control tags, end of text).
    pub fn special_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self
            .inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| id)
            .collect();
        ids.sort_unstable();
        ids
    }
}

/// The default system turn a ChatML template inserts when the conversation has none: the
/// literal `<|im_start|>system\n...<|im_end|>\n` written as one quoted string in the template
/// (as in SmolLM2's and Qwen2.5's).
fn default_system(template: &str) -> Option<String> {
    let open = "<|im_start|>system";
    let start = template.find(open)?;
    let body = &template[start..];
    let end = body.find("<|im_end|>")? + "<|im_end|>".len();
    let turn = body[..end].replace("\\n", "\n");
    let rest = &body[end..];
    let newline = rest.starts_with("\\n") || rest.starts_with('\n');
    // Only a literal message: no Jinja expression or string concatenation inside it.
    if turn.contains(['{', '}', '\'', '"', '+']) || !newline {
        return None;
    }
    Some(format!("{turn}\n"))
}

/// Incremental detokenizer for one token stream: yields the text each new token adds, and
/// holds back partial UTF-8 characters until they are complete (the `prefix` / `read`
/// offsets of Hugging Face's streamers).
#[derive(Debug, Clone, Default)]
pub struct TextStream {
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

impl TextStream {
    /// An empty stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `id`; returns the text it completes (empty while a character is incomplete).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let before = tok.decode(&self.ids[self.prefix..self.read])?;
        let now = tok.decode(&self.ids[self.prefix..])?;
        if now.ends_with('\u{FFFD}') || now.len() <= before.len() {
            // An incomplete character (or nothing new yet): wait for more tokens.
            return Ok(String::new());
        }
        // Usually `now` extends `before`; if the decoder rewrote earlier text, emit from the
        // first difference on.
        let mut common = before
            .char_indices()
            .zip(now.chars())
            .find(|((_, a), b)| a != b)
            .map_or(before.len(), |((i, _), _)| i);
        while !now.is_char_boundary(common) {
            common -= 1;
        }
        let delta = now[common..].to_string();
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(delta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(model: &str, pre: &str) -> BTreeMap<String, GgufValue> {
        let s = |v: &str| GgufValue::String(v.to_string());
        let mut m = BTreeMap::new();
        m.insert("tokenizer.ggml.model".into(), s(model));
        m.insert("tokenizer.ggml.pre".into(), s(pre));
        // ids: 0 "<|end|>" (control), 1 "a", 2 "b", 3 "ab", 4 "Ġ", 5 "Ġab"
        let tokens = ["<|end|>", "a", "b", "ab", "Ġ", "Ġab"];
        m.insert(
            "tokenizer.ggml.tokens".into(),
            GgufValue::Array(tokens.iter().map(|t| s(t)).collect()),
        );
        m.insert(
            "tokenizer.ggml.token_type".into(),
            GgufValue::Array([3, 1, 1, 1, 1, 1].map(GgufValue::I32).to_vec()),
        );
        m.insert(
            "tokenizer.ggml.merges".into(),
            GgufValue::Array(vec![s("a b"), s("Ġ ab")]),
        );
        m.insert(
            "tokenizer.chat_template".into(),
            s("{% if loop.first %}{{ '<|im_start|>system\\nBe brief.<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role']}}"),
        );
        m
    }

    #[test]
    fn builds_a_byte_level_bpe_from_gguf_metadata() {
        let tok = Tokenizer::from_gguf(&meta("gpt2", "gpt2"), Path::new("m.gguf")).unwrap();
        assert_eq!(
            tok.encode_prompt("ab").unwrap(),
            vec![3],
            "no BOS unless asked"
        );
        let mut with_bos = meta("gpt2", "gpt2");
        with_bos.insert("tokenizer.ggml.add_bos_token".into(), GgufValue::Bool(true));
        with_bos.insert("tokenizer.ggml.bos_token_id".into(), GgufValue::U32(0));
        let t = Tokenizer::from_gguf(&with_bos, Path::new("m.gguf")).unwrap();
        assert_eq!(t.encode_prompt("ab").unwrap(), vec![0, 3]);
        with_bos.insert("tokenizer.ggml.bos_token_id".into(), GgufValue::U32(99));
        assert!(Tokenizer::from_gguf(&with_bos, Path::new("m.gguf")).is_err());
        // "ab" merges to 3; " ab" to 5 (Ġ is the byte-level space); the control token is 0.
        assert_eq!(tok.encode("ab ab<|end|>").unwrap(), vec![3, 5, 0]);
        assert_eq!(tok.decode(&[3, 5, 0]).unwrap(), "ab ab<|end|>");
        assert_eq!(tok.special_ids(), vec![0]);
        assert_eq!(
            tok.chat_prompt("hi").unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
        // SmolLM's pre-tokenizer (digits split apart, then byte-level) builds too.
        let tok = Tokenizer::from_gguf(&meta("gpt2", "smollm"), Path::new("m.gguf")).unwrap();
        assert_eq!(tok.encode("ab").unwrap(), vec![3]);
    }

    #[test]
    fn gguf_tokenizer_errors_name_the_file_and_key() {
        let err = |m: &BTreeMap<String, GgufValue>| match Tokenizer::from_gguf(
            m,
            Path::new("x/m.gguf"),
        ) {
            Ok(_) => panic!("should fail"),
            Err(e) => e.to_string(),
        };
        let e = err(&meta("llama", "gpt2"));
        assert!(
            e.contains("x/m.gguf") && e.contains("tokenizer.ggml.model"),
            "{e}"
        );
        let e = err(&meta("gpt2", "mystery"));
        assert!(
            e.contains("tokenizer.ggml.pre") && e.contains("mystery"),
            "{e}"
        );
        let mut m = meta("gpt2", "gpt2");
        m.insert(
            "tokenizer.ggml.merges".into(),
            GgufValue::Array(vec![GgufValue::String("ab".into())]),
        );
        assert!(err(&m).contains("tokenizer.ggml.merges"));
        m.remove("tokenizer.ggml.tokens");
        assert!(err(&m).contains("tokenizer.ggml.tokens` is missing"));
        // No chat template: --chat is a clear error.
        let mut m = meta("gpt2", "gpt2");
        m.remove("tokenizer.chat_template");
        let tok = Tokenizer::from_gguf(&m, Path::new("m.gguf")).unwrap();
        assert!(tok.chat_prompt("hi").is_err());
    }
}
