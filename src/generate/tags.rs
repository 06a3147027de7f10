//! Tag protocols as data: the control tags of a fork/join protocol as token sequences, the
//! per-thread parser that reads them, and the three presets.
//!
//! Grammar (every preset is an instance, with its own tags):
//!
//! ```text
//! thread    := text* ( block | container | result )* end?
//! block     := BLOCK_OPEN ... BLOCK_CLOSE            (<Parallel> ... </Parallel>; bookkeeping)
//! container := C_OPEN ( E_OPEN entry E_CLOSE )+ C_CLOSE   -> fork, one child per entry
//! end       := CHILD_END                             (children only: ends the thread)
//! result    := R_OPEN result-text CHILD_END          (APR children: the only tokens returned)
//! ```
//!
//! | preset | block | container / entry | child prime | child end | join |
//! |---|---|---|---|---|---|
//! | threadweaver | `<Parallel>` | `<Outlines>` / `<Outline>` | `<Thread>` + ` i:` | `</Thread>` | re-prefill (reuse selectable) |
//! | multiverse | `<Parallel>` | `<Goal>` / `<Outline>` | `<Path>` + ` i` | `</Path>` | reuse, then `<Conclusion>` |
//! | apr | - | `<spawn>` / `<Outline>` | the entry's text only | `</join>` | re-prefill of `<join>` result `</join>` |
//!
//! Tags are matched on token ids, as suffixes of the thread's generated tokens, so a tag
//! configured as several tokens is recognised when its last token arrives. A preset whose
//! tags are not single tokens in the tokenizer also matches those tags on the decoded text
//! (BPE may merge a tag's edge with its neighbour: `><` is one token in SmolLM2's
//! vocabulary). When a tag ends inside a newly chosen token, the parser splits that token
//! before it is cached: the thread is fed the tokens of the text up to the tag's end, and
//! the rest of the token's text is re-fed after it (dropped when the tag forks or ends the
//! thread, where a text-level client stops generating). Single-token tags stay id-only: text
//! that merely spells one in ordinary tokens is text. Malformed sequences never panic: a
//! close without an open, an entry outside a container, a container with no entries, or a
//! child-end tag in a root thread are kept as text and reported as [`Action::Malformed`].

use super::protocol::{
    Action, ChildSpec, ForkSpec, Protocol, Role, ThreadParser, TokenSplit, Truncation,
};
use crate::error::{Result, SpindleError};
use crate::tokenizer::Tokenizer;
use crate::tree::JoinKind;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

/// A control tag: one or more token ids.
pub type Tag = Vec<u32>;

/// An opening tag and its closing tag (`<Outline>`, `</Outline>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagPair {
    pub open: Tag,
    pub close: Tag,
}

/// How each child of a fork is primed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChildPrime {
    /// `tag` then the child's number label (`labels[i]`, e.g. the tokens of ` 1:`); past
    /// the last label only the tag.
    Numbered { tag: Tag, labels: Vec<Vec<u32>> },
    /// The entry's own tokens: the message handed to the child (APR).
    EntryContent,
}

/// The tags and join rule of one protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagSpec {
    pub name: String,
    /// Optional enclosing block (`<Parallel>`, `</Parallel>`), checked for balance only.
    pub block: Option<TagPair>,
    /// The container whose close forks (`<Outlines>`, `</Outlines>`).
    pub container: TagPair,
    /// One entry per child (`<Outline>`, `</Outline>`).
    pub entry: TagPair,
    pub child_prime: ChildPrime,
    /// Ends a child thread (`</Thread>`).
    pub child_end: Tag,
    /// With a result tag (APR's `<join>`), a child hands back only `result .. child_end`.
    pub result: Option<Tag>,
    /// Children see the parent's context (false: only their prime).
    pub share_context: bool,
    pub join: JoinKind,
    /// Fed to the parent after the join. A reuse join needs at least one token here: the
    /// parent's next token must be computed after the merged context.
    pub after_join: Vec<u32>,
}

/// Number labels prepared for presets (wider forks get the bare tag).
pub const LABELS: usize = 64;

/// A tag that the tokenizer splits into several tokens ([`TagProtocol::split_tags`]).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SplitTag {
    /// The tag as text, e.g. `<Parallel>`.
    pub text: String,
    /// How many tokens it takes.
    pub tokens: usize,
}

/// A protocol defined by a [`TagSpec`].
#[derive(Debug, Clone)]
pub struct TagProtocol {
    spec: Arc<TagSpec>,
    /// Text of each tag, for readable protocol messages (empty: tags show as token ids).
    names: Arc<HashMap<Vec<u32>, String>>,
    /// Text-level matching of the tags that are several tokens (None: ids only).
    text: Option<Arc<TextTags>>,
}

/// What text-level tag matching needs: the tokenizer and each multi-token tag's text.
struct TextTags {
    tok: Tokenizer,
    /// Tag ids -> text, for tags of two or more tokens.
    texts: HashMap<Vec<u32>, String>,
    /// Tokens decoded to look for a tag: enough to hold the longest tag text.
    window: usize,
}

impl fmt::Debug for TextTags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TextTags")
            .field("texts", &self.texts)
            .field("window", &self.window)
            .finish()
    }
}

impl TextTags {
    /// The text of the last `window` tokens of `ids` (and how many tokens that is).
    fn tail(&self, ids: &[u32]) -> (String, usize) {
        let n = ids.len().min(self.window);
        let text = self.tok.decode(&ids[ids.len() - n..]).unwrap_or_default();
        (text, n)
    }

    /// How many trailing tokens of `ids` it takes to cover the last `bytes` bytes of text.
    fn tokens_covering(&self, ids: &[u32], bytes: usize) -> usize {
        for k in 1..=ids.len().min(self.window) {
            let t = self.tok.decode(&ids[ids.len() - k..]).unwrap_or_default();
            if t.len() >= bytes {
                return k;
            }
        }
        ids.len().min(self.window)
    }
}

fn resolve(tok: &Tokenizer, tag: &str) -> Result<Tag> {
    tok.tag(tag)
        .map_err(|e| SpindleError::Protocol(format!("tag {tag}: {e}")))
}

fn pair(tok: &Tokenizer, open: &str, close: &str) -> Result<TagPair> {
    Ok(TagPair {
        open: resolve(tok, open)?,
        close: resolve(tok, close)?,
    })
}

fn labels(tok: &Tokenizer, fmt: impl Fn(usize) -> String) -> Result<Vec<Vec<u32>>> {
    (1..=LABELS).map(|i| tok.encode(&fmt(i))).collect()
}

impl TagProtocol {
    /// A protocol from `spec`, checked: no empty tag, and a reuse join primes the parent.
    pub fn new(spec: TagSpec) -> Result<Self> {
        if spec.all_tags().any(|(_, t)| t.is_empty()) {
            return Err(SpindleError::Protocol(format!("{}: empty tag", spec.name)));
        }
        if spec.join == JoinKind::Reuse && !spec.share_context {
            return Err(SpindleError::Protocol(format!(
                "{}: a reuse join needs children that share the parent's context (their positions continue the parent's)",
                spec.name
            )));
        }
        if spec.join == JoinKind::Reuse && spec.after_join.is_empty() {
            return Err(SpindleError::Protocol(format!(
                "{}: a reuse join needs tokens to feed the parent after it",
                spec.name
            )));
        }
        Ok(Self {
            spec: Arc::new(spec),
            names: Arc::default(),
            text: None,
        })
    }

    /// Every tag of the spec.
    fn tags(&self) -> Vec<&Tag> {
        self.spec.all_tags().map(|(_, t)| t).collect()
    }

    /// The tags that are not single tokens, as text with their token counts (`<Parallel>`
    /// as 4 tokens), sorted by text; empty when every tag is one token.
    pub fn split_tags(&self) -> Vec<SplitTag> {
        let mut out: Vec<SplitTag> = self
            .tags()
            .into_iter()
            .filter(|t| t.len() > 1)
            .map(|t| SplitTag {
                text: text(&self.names, t),
                tokens: t.len(),
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Also matches the tags that are several tokens on the decoded text (see the module
    /// docs), decoding with `tok`. Presets turn this on when some tag is split.
    pub fn with_text_matching(mut self, tok: &Tokenizer) -> Self {
        let texts: HashMap<Vec<u32>, String> = self
            .tags()
            .into_iter()
            .filter(|t| t.len() > 1)
            .filter_map(|t| Some((t.clone(), tok.decode(t).ok()?)))
            .filter(|(_, s)| !s.is_empty())
            .collect();
        if texts.is_empty() {
            self.text = None;
            return self;
        }
        // Every token decodes to at least one byte, so a tag of N bytes spans at most N
        // tokens; one more covers a token merged across its start.
        let window = texts.values().map(|s| s.len()).max().unwrap_or(0) + 1;
        self.text = Some(Arc::new(TextTags {
            tok: tok.clone(),
            texts,
            window,
        }));
        self
    }

    /// Names every tag by its text through `tok`, so protocol messages read `</Outlines>`
    /// rather than token ids.
    pub fn with_names(mut self, tok: &Tokenizer) -> Self {
        let names = self
            .spec
            .all_tags()
            .map(|(_, t)| t)
            .filter_map(|t| Some((t.clone(), tok.decode(t).ok()?)))
            .collect();
        self.names = Arc::new(names);
        self
    }

    /// The protocol's tags.
    pub fn spec(&self) -> &TagSpec {
        &self.spec
    }

    /// ThreadWeaver: `<Parallel><Outlines><Outline>..</Outline>..</Outlines>`, children
    /// primed `<Thread> i:` and ended by `</Thread>`, joined by re-prefill (or reuse, in
    /// which case the parent is primed with a newline before it continues).
    pub fn threadweaver(tok: &Tokenizer, join: JoinKind) -> Result<Self> {
        let after_join = match join {
            JoinKind::Reprefill => Vec::new(),
            JoinKind::Reuse => tok.encode("\n")?,
        };
        Self::new(TagSpec {
            name: "threadweaver".into(),
            block: Some(pair(tok, "<Parallel>", "</Parallel>")?),
            container: pair(tok, "<Outlines>", "</Outlines>")?,
            entry: pair(tok, "<Outline>", "</Outline>")?,
            child_prime: ChildPrime::Numbered {
                tag: resolve(tok, "<Thread>")?,
                labels: labels(tok, |i| format!(" {i}:"))?,
            },
            child_end: resolve(tok, "</Thread>")?,
            result: None,
            share_context: true,
            join,
            after_join,
        })
    }

    /// Multiverse: `<Parallel><Goal><Outline>..</Outline>..</Goal>`, paths primed
    /// `<Path> i` and ended by `</Path>`, joined by KV reuse; the parent goes on with
    /// `<Conclusion>`.
    pub fn multiverse(tok: &Tokenizer) -> Result<Self> {
        Self::new(TagSpec {
            name: "multiverse".into(),
            block: Some(pair(tok, "<Parallel>", "</Parallel>")?),
            container: pair(tok, "<Goal>", "</Goal>")?,
            entry: pair(tok, "<Outline>", "</Outline>")?,
            child_prime: ChildPrime::Numbered {
                tag: resolve(tok, "<Path>")?,
                labels: labels(tok, |i| format!(" {i}"))?,
            },
            child_end: resolve(tok, "</Path>")?,
            result: None,
            share_context: true,
            join: JoinKind::Reuse,
            after_join: resolve(tok, "<Conclusion>")?,
        })
    }

    /// APR: `<spawn><Outline>message</Outline>..</spawn>` forks one child per message; a
    /// child sees only its message (no parent context, positions from 0), writes its
    /// result as `<join>result</join>` and ends there; the parent re-prefills each child's
    /// `<join>result</join>` in order and continues.
    pub fn apr(tok: &Tokenizer) -> Result<Self> {
        Self::new(TagSpec {
            name: "apr".into(),
            block: None,
            container: pair(tok, "<spawn>", "</spawn>")?,
            entry: pair(tok, "<Outline>", "</Outline>")?,
            child_prime: ChildPrime::EntryContent,
            child_end: resolve(tok, "</join>")?,
            result: Some(resolve(tok, "<join>")?),
            share_context: false,
            join: JoinKind::Reprefill,
            after_join: Vec::new(),
        })
    }

    /// A preset by name: `threadweaver`, `threadweaver-reuse`, `multiverse`, `apr`.
    pub fn preset(name: &str, tok: &Tokenizer) -> Result<Self> {
        let protocol = match name {
            "threadweaver" => Self::threadweaver(tok, JoinKind::Reprefill),
            "threadweaver-reuse" => Self::threadweaver(tok, JoinKind::Reuse),
            "multiverse" => Self::multiverse(tok),
            "apr" => Self::apr(tok),
            other => Err(SpindleError::Protocol(format!(
                "unknown protocol {other:?} (threadweaver, threadweaver-reuse, multiverse, apr)"
            ))),
        }?;
        Ok(protocol.with_names(tok).with_text_matching(tok))
    }
}

impl Protocol for TagProtocol {
    fn name(&self) -> &str {
        &self.spec.name
    }

    fn parser(&self, role: Role) -> Box<dyn ThreadParser> {
        Box::new(TagParser {
            spec: self.spec.clone(),
            names: self.names.clone(),
            text: self.text.clone(),
            role,
            blocks: 0,
            container: None,
            result: None,
        })
    }

    fn control_tokens(&self) -> Vec<u32> {
        let s = &self.spec;
        let mut ids: Vec<u32> = s.all_tags().flat_map(|(_, t)| t).copied().collect();
        if let ChildPrime::Numbered { tag, .. } = &s.child_prime {
            ids.extend(tag);
        }
        ids.extend(&s.after_join);
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    BlockOpen,
    BlockClose,
    ContainerOpen,
    ContainerClose,
    EntryOpen,
    EntryClose,
    ChildEnd,
    ResultOpen,
}

#[derive(Debug, Default)]
struct Container {
    entries: Vec<Vec<u32>>,
    open: bool,
}

struct TagParser {
    spec: Arc<TagSpec>,
    names: Arc<HashMap<Vec<u32>, String>>,
    text: Option<Arc<TextTags>>,
    role: Role,
    blocks: usize,
    container: Option<Container>,
    /// APR children: the result captured since the result tag.
    result: Option<Vec<u32>>,
}

impl TagSpec {
    /// Every tag of the spec with its kind: the one list of them.
    fn all_tags(&self) -> impl Iterator<Item = (Kind, &Tag)> {
        [
            (Kind::ContainerOpen, &self.container.open),
            (Kind::ContainerClose, &self.container.close),
            (Kind::EntryOpen, &self.entry.open),
            (Kind::EntryClose, &self.entry.close),
            (Kind::ChildEnd, &self.child_end),
        ]
        .into_iter()
        .chain(
            self.block
                .iter()
                .flat_map(|b| [(Kind::BlockOpen, &b.open), (Kind::BlockClose, &b.close)]),
        )
        .chain(self.result.iter().map(|r| (Kind::ResultOpen, r)))
    }
}

/// A tag as text when its name is known, else as its token ids.
fn text(names: &HashMap<Vec<u32>, String>, tag: &[u32]) -> String {
    names
        .get(tag)
        .cloned()
        .unwrap_or_else(|| format!("{tag:?}"))
}

impl TagParser {
    /// The longest tag that `generated` ends with.
    fn matched(&self, generated: &[u32]) -> Option<(Kind, usize)> {
        let s = &self.spec;
        if let Some(by_id) = s
            .all_tags()
            .filter(|(_, t)| generated.ends_with(t))
            .max_by_key(|(_, t)| t.len())
            .map(|(k, t)| (k, t.len()))
        {
            return Some(by_id);
        }
        // Multi-token tags on the text: the decoded tail ends with the tag's text.
        let tt = self.text.as_ref()?;
        let (tail, _) = tt.tail(generated);
        let (kind, tag_text) = s
            .all_tags()
            .filter_map(|(k, t)| Some((k, tt.texts.get(t)?)))
            .filter(|(_, s)| tail.ends_with(s.as_str()))
            .max_by_key(|(_, s)| s.len())?;
        Some((kind, tt.tokens_covering(generated, tag_text.len())))
    }

    /// The buffer ordinary tokens go to (an open entry, or a result being captured).
    fn buffer(&mut self) -> Option<&mut Vec<u32>> {
        if let Some(r) = self.result.as_mut() {
            return Some(r);
        }
        match self.container.as_mut() {
            Some(c) if c.open => c.entries.last_mut(),
            _ => None,
        }
    }

    fn prime(&self, index: usize, entry: &[u32]) -> Vec<u32> {
        match &self.spec.child_prime {
            ChildPrime::Numbered { tag, labels } => {
                let mut p = tag.clone();
                if let Some(l) = labels.get(index) {
                    p.extend(l);
                }
                p
            }
            ChildPrime::EntryContent => entry.to_vec(),
        }
    }

    fn wrap_result(&self, body: &[u32]) -> Option<Vec<u32>> {
        let open = self.spec.result.as_ref()?;
        let mut r = open.clone();
        r.extend(body);
        r.extend(&self.spec.child_end);
        Some(r)
    }
}

impl ThreadParser for TagParser {
    fn split(&mut self, generated: &[u32], token: u32) -> Option<TokenSplit> {
        let tt = self.text.as_ref()?;
        let (before, n) = tt.tail(generated);
        let mut ids = generated[generated.len() - n..].to_vec();
        ids.push(token);
        let all = tt.tok.decode(&ids).ok()?;
        // The token's own text follows the text before it (byte-level BPE decodes by
        // concatenation); anything else (a partial character) is left alone.
        if !all.starts_with(&before) || all.len() <= before.len() {
            return None;
        }
        let start = before.len();
        // The earliest multi-token tag that ends strictly inside the new token's text.
        let cut = tt
            .texts
            .values()
            .filter_map(|s| {
                all.match_indices(s.as_str())
                    .map(|(i, m)| i + m.len())
                    .find(|&end| end > start && end < all.len())
            })
            .min()?;
        let head = tt.tok.encode(&all[start..cut]).ok()?;
        let rest = tt.tok.encode(&all[cut..]).ok()?;
        if head.is_empty() {
            return None;
        }
        Some(TokenSplit { head, rest })
    }

    fn on_token(&mut self, generated: &[u32]) -> Action {
        let Some(&last) = generated.last() else {
            return Action::Text;
        };
        let Some((kind, len)) = self.matched(generated) else {
            if let Some(b) = self.buffer() {
                b.push(last);
            }
            return Action::Text;
        };
        // The tag's earlier tokens went into the buffer as text: take them back.
        if len > 1 {
            if let Some(b) = self.buffer() {
                let keep = b.len().saturating_sub(len - 1);
                b.truncate(keep);
            }
        }
        let s = self.spec.clone();
        let malformed = |what: String| Action::Malformed(what);
        match kind {
            Kind::BlockOpen => {
                self.blocks += 1;
                Action::Text
            }
            Kind::BlockClose => {
                if self.blocks == 0 {
                    return malformed(format!(
                        "block close {} without an open; kept as text",
                        text(
                            &self.names,
                            &s.block
                                .as_ref()
                                .map(|b| b.close.clone())
                                .unwrap_or_default()
                        )
                    ));
                }
                self.blocks -= 1;
                Action::Text
            }
            Kind::ContainerOpen => {
                if self.container.is_some() {
                    return malformed(format!(
                        "container open {} inside an open container; kept as text",
                        text(&self.names, &s.container.open)
                    ));
                }
                self.container = Some(Container::default());
                Action::Text
            }
            Kind::EntryOpen => match self.container.as_mut() {
                Some(c) => {
                    c.entries.push(Vec::new());
                    c.open = true;
                    Action::Text
                }
                None => malformed(format!(
                    "entry {} outside a container; kept as text",
                    text(&self.names, &s.entry.open)
                )),
            },
            Kind::EntryClose => match self.container.as_mut() {
                Some(c) if c.open => {
                    c.open = false;
                    Action::Text
                }
                _ => malformed(format!(
                    "entry close {} without an open; kept as text",
                    text(&self.names, &s.entry.close)
                )),
            },
            Kind::ContainerClose => {
                let Some(c) = self.container.take() else {
                    return malformed(format!(
                        "container close {} without an open; kept as text",
                        text(&self.names, &s.container.close)
                    ));
                };
                if c.entries.is_empty() {
                    return malformed(format!(
                        "container {} closed with no entries: no fork",
                        text(&self.names, &s.container.open)
                    ));
                }
                let children = c
                    .entries
                    .iter()
                    .enumerate()
                    .map(|(i, e)| ChildSpec {
                        prime: self.prime(i, e),
                    })
                    .collect();
                Action::Fork(ForkSpec {
                    children,
                    share_context: s.share_context,
                    join: s.join,
                    after_join: s.after_join.clone(),
                })
            }
            Kind::ResultOpen => {
                if self.role == Role::Root {
                    return malformed(format!(
                        "result tag {} in a root thread; kept as text",
                        text(&self.names, s.result.as_deref().unwrap_or_default())
                    ));
                }
                self.result = Some(Vec::new());
                Action::Text
            }
            Kind::ChildEnd => {
                if self.role == Role::Root {
                    return malformed(format!(
                        "child end {} in a root thread; kept as text",
                        text(&self.names, &s.child_end)
                    ));
                }
                if s.result.is_none() {
                    return Action::End { returns: None };
                }
                let body = match self.result.take() {
                    Some(r) => r,
                    None => generated[..generated.len() - len].to_vec(),
                };
                Action::End {
                    returns: self.wrap_result(&body),
                }
            }
        }
    }

    fn on_truncate(&mut self, generated: &[u32]) -> Truncation {
        let s = &self.spec;
        let problem = if self.container.is_some() {
            Some(format!(
                "container {} still open when the thread ended",
                text(&self.names, &s.container.open)
            ))
        } else if self.blocks > 0 {
            Some(format!(
                "block {} still open when the thread ended",
                text(
                    &self.names,
                    &s.block.as_ref().map(|b| b.open.clone()).unwrap_or_default()
                )
            ))
        } else {
            None
        };
        let returns = match self.role {
            Role::Root => None,
            Role::Child { .. } => match self.result.take() {
                Some(r) => self.wrap_result(&r),
                None => self.wrap_result(generated),
            },
        };
        Truncation {
            returns,
            append: match (self.role, &s.result) {
                (Role::Child { .. }, None) => s.child_end.clone(),
                _ => Vec::new(),
            },
            problem,
        }
    }
}
