//! Text in and out: a Hugging Face `tokenizer.json` read through the `tokenizers` crate,
//! control tags resolved to token ids, and an incremental decoder for streaming output.

use crate::error::{Result, SpindleError};
use std::path::Path;

/// A tokenizer loaded from a `tokenizer.json`.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
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
        Ok(Self { inner })
    }

    /// Token ids of `text`. Added special tokens written in the text (`<Parallel>`) become
    /// their ids; no BOS/EOS is added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(tok_err)?;
        Ok(enc.get_ids().to_vec())
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
