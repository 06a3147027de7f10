//! A scripted token source for tests and the demo: control tokens come from a script per
//! thread path, every other token is the real model's choice (argmax of its logits with
//! control tokens masked). The engine, forward pass and KV cache stay real; only the
//! choice of the tags is scripted, because a random-weight model would never emit them.

use super::rng::Rng;
use super::sampler::{Decide, Sampler, SamplingParams, TokenSource};
use crate::error::{Result, SpindleError};
use crate::tokenizer::Tokenizer;
use std::collections::{HashMap, HashSet, VecDeque};

/// One entry of a thread's script.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScriptItem {
    /// Emit exactly this token.
    Token(u32),
    /// Let the model choose this many tokens (control tokens masked).
    Free(usize),
}

/// Token source that follows a script per thread path. Threads that share a path (the
/// parent after a join, or same-index children of successive forks) consume the same
/// script in the order they run; an exhausted script lets the model choose.
#[derive(Debug, Clone, Default)]
pub struct Scripted {
    scripts: HashMap<Vec<u32>, VecDeque<ScriptItem>>,
    banned: HashSet<u32>,
    /// Samples free tokens (with each thread's own generator) instead of taking the argmax.
    sampler: Option<Sampler>,
    /// The scripts as they were before the first draw, for a restart.
    pristine: Option<HashMap<Vec<u32>, VecDeque<ScriptItem>>>,
}

impl Scripted {
    /// A scripted source whose free tokens never pick one of `banned`.
    pub fn new(banned: impl IntoIterator<Item = u32>) -> Self {
        Self {
            scripts: HashMap::new(),
            banned: banned.into_iter().collect(),
            sampler: None,
            pristine: None,
        }
    }

    /// Free tokens are sampled with `params` (each thread's own generator) rather than the
    /// argmax: scripted control flow with sampled text in between.
    pub fn sampling(mut self, params: SamplingParams) -> Self {
        self.sampler = Some(Sampler::new(params));
        self
    }

    /// Appends `items` to the script of the thread at `path`.
    pub fn script(mut self, path: &[u32], items: impl IntoIterator<Item = ScriptItem>) -> Self {
        let items = items.into_iter().filter(|i| *i != ScriptItem::Free(0));
        self.scripts.entry(path.to_vec()).or_default().extend(items);
        self
    }

    /// Parses a script written as text: `{N}` lets the model choose `N` tokens, everything
    /// else is tokenized (control tags written as text become their ids).
    pub fn parse(tok: &Tokenizer, text: &str) -> Result<Vec<ScriptItem>> {
        let mut items = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            let (before, after) = rest.split_at(open);
            items.extend(tok.encode(before)?.into_iter().map(ScriptItem::Token));
            let close = after.find('}').ok_or_else(|| {
                SpindleError::InvalidInput(format!("script: unclosed '{{' in {text:?}"))
            })?;
            let n: usize = after[1..close].trim().parse().map_err(|_| {
                SpindleError::InvalidInput(format!(
                    "script: {:?} is not a token count",
                    &after[1..close]
                ))
            })?;
            items.push(ScriptItem::Free(n));
            rest = &after[close + 1..];
        }
        items.extend(tok.encode(rest)?.into_iter().map(ScriptItem::Token));
        Ok(items)
    }

    fn free_choice(&self, logits: &[f32], rng: &mut Rng) -> u32 {
        if let Some(sampler) = &self.sampler {
            let mut masked = logits.to_vec();
            for &b in &self.banned {
                if let Some(x) = masked.get_mut(b as usize) {
                    *x = f32::NEG_INFINITY;
                }
            }
            return sampler.sample(&masked, rng);
        }
        let mut best: Option<usize> = None;
        for (i, &x) in logits.iter().enumerate() {
            if self.banned.contains(&(i as u32)) || !x.is_finite() {
                continue;
            }
            if best.is_none_or(|b| x > logits[b]) {
                best = Some(i);
            }
        }
        best.unwrap_or(0) as u32
    }
}

impl TokenSource for Scripted {
    fn restart(&mut self) {
        if let Some(p) = &self.pristine {
            self.scripts = p.clone();
        }
    }

    fn next_token(&mut self, d: Decide<'_>) -> u32 {
        if self.pristine.is_none() {
            self.pristine = Some(self.scripts.clone());
        }
        let queue = self.scripts.get_mut(d.path);
        let item = queue.and_then(|q| {
            let item = q.pop_front()?;
            if let ScriptItem::Free(n) = item {
                if n > 1 {
                    q.push_front(ScriptItem::Free(n - 1));
                }
            }
            Some(item)
        });
        match item {
            Some(ScriptItem::Token(t)) => t,
            Some(ScriptItem::Free(_)) | None => self.free_choice(d.logits, d.rng),
        }
    }
}
