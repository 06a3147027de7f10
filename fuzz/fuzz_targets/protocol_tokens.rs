//! The tag protocols' thread parsers fed arbitrary token streams, as the generator feeds
//! them: each chosen token may be split (`split`), its pieces are pushed to `generated` and
//! read (`on_token`) until a fork or end; a child ends at its end tag, at end-of-text, or by
//! truncation (`on_truncate`) when the stream runs out. Every preset, for a root and for a
//! child, over the fixture tokenizer (every tag one token) and over a character-level BPE
//! (every tag several tokens, matched on the decoded text, `><` merged across tag edges).
//!
//! Input: byte 0 picks the protocol, the tokenizer and the role; then each byte is a token:
//! below 0x20 a whole control tag (or number label, or merge token) from a table, 0xF0 and
//! up a raw 16-bit id from the next two bytes (possibly past the vocabulary, as a model's
//! padded output layer can produce), anything else that byte as an id.
#![no_main]

use libfuzzer_sys::fuzz_target;
use model_loader::GgufValue;
use spindle::generate::tags::ChildPrime;
use spindle::generate::{Action, Protocol, Role, TagProtocol};
use spindle::tokenizer::Tokenizer;
use std::collections::BTreeMap;
use std::sync::LazyLock;

const PRESETS: [&str; 4] = ["threadweaver", "threadweaver-reuse", "multiverse", "apr"];

struct Setup {
    tok: Tokenizer,
    protocols: Vec<Proto>,
}

struct Proto {
    protocol: TagProtocol,
    /// Token sequences a control byte expands to.
    table: Vec<Vec<u32>>,
}

/// The character-level byte-level BPE of `tests/protocol.rs`: one token per byte (in GPT-2's
/// byte-to-char alphabet), plus `><` and `</` as merges, so every tag is several tokens.
fn char_level_tokenizer() -> Tokenizer {
    let s = |v: &str| GgufValue::String(v.to_string());
    let mut extra = 0u32;
    let mut alphabet: Vec<char> = (0u32..=255)
        .map(|b| {
            let printable = (0x21..=0x7e).contains(&b)
                || (0xa1..=0xac).contains(&b)
                || (0xae..=0xff).contains(&b);
            let c = if printable {
                b
            } else {
                extra += 1;
                255 + extra
            };
            char::from_u32(c).expect("a char")
        })
        .collect();
    alphabet.sort_unstable();
    let mut tokens: Vec<String> = alphabet.iter().map(|c| c.to_string()).collect();
    tokens.extend(["><".to_string(), "</".to_string()]);
    let mut m = BTreeMap::new();
    m.insert("tokenizer.ggml.model".to_string(), s("gpt2"));
    m.insert("tokenizer.ggml.pre".to_string(), s("gpt2"));
    m.insert(
        "tokenizer.ggml.tokens".to_string(),
        GgufValue::Array(tokens.iter().map(|t| s(t)).collect()),
    );
    m.insert(
        "tokenizer.ggml.merges".to_string(),
        GgufValue::Array(vec![s("> <"), s("< /")]),
    );
    Tokenizer::from_gguf(&m, std::path::Path::new("chars.gguf")).expect("char tokenizer")
}

fn setup(tok: Tokenizer) -> Setup {
    let protocols = PRESETS
        .iter()
        .map(|name| {
            let protocol = TagProtocol::preset(name, &tok).expect("preset");
            let s = protocol.spec();
            let mut table = vec![
                s.container.0.clone(),
                s.container.1.clone(),
                s.entry.0.clone(),
                s.entry.1.clone(),
                s.child_end.clone(),
            ];
            if let Some((a, b)) = &s.block {
                table.extend([a.clone(), b.clone()]);
            }
            table.extend(s.result.clone());
            if let ChildPrime::Numbered { tag, labels } = &s.child_prime {
                table.push(tag.clone());
                table.extend(labels.iter().take(3).cloned());
            }
            for t in ["><", "</", ">", "<", "<|endoftext|>"] {
                if let Some(id) = tok.token_id(t) {
                    table.push(vec![id]);
                }
            }
            table.retain(|t| !t.is_empty());
            Proto { protocol, table }
        })
        .collect();
    Setup { tok, protocols }
}

static FIXTURE: LazyLock<Setup> = LazyLock::new(|| {
    let bytes = include_bytes!("../../tests/fixtures/tiny-qwen2/tokenizer.json");
    setup(Tokenizer::from_bytes(bytes).expect("fixture tokenizer"))
});
static CHARS: LazyLock<Setup> = LazyLock::new(|| setup(char_level_tokenizer()));

fn tokens(data: &[u8], table: &[Vec<u32>], vocab: usize) -> Vec<u32> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < data.len() {
        let b = data[i];
        i += 1;
        match b {
            0x00..=0x1f => out.extend(&table[b as usize % table.len()]),
            0xf0..=0xff => {
                let lo = data.get(i).copied().unwrap_or(0);
                let hi = data.get(i + 1).copied().unwrap_or(0);
                i += 2;
                out.push(u32::from(u16::from_le_bytes([lo, hi])));
            }
            _ => out.push(u32::from(b) % vocab as u32),
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let setup: &Setup = if sel & 0x10 == 0 { &FIXTURE } else { &CHARS };
    let proto = &setup.protocols[sel as usize % PRESETS.len()];
    let role = match (sel >> 2) & 0x3 {
        0 => Role::Root,
        k => Role::Child {
            index: usize::from(k) - 1,
        },
    };
    let eos = setup.tok.token_id("<|endoftext|>");
    let stream = tokens(rest, &proto.table, setup.tok.vocab_size());
    let mut parser = proto.protocol.parser(role);
    let mut generated: Vec<u32> = Vec::new();
    for &token in &stream {
        if Some(token) == eos {
            // End of text: a child is truncated there, the root just ends.
            if role != Role::Root {
                let _ = parser.on_truncate(&generated);
            }
            return;
        }
        let pieces = match parser.split(&generated, token) {
            Some((head, rest)) => {
                assert!(!head.is_empty(), "split with an empty head");
                // The pieces spell what the token spelled after the same context.
                let ctx = &generated[generated.len().saturating_sub(64)..];
                let spelled = |ids: &[u32]| {
                    let mut all = ctx.to_vec();
                    all.extend(ids);
                    setup.tok.decode(&all).ok()
                };
                let pieces: Vec<u32> = head.iter().chain(&rest).copied().collect();
                assert_eq!(spelled(&pieces), spelled(&[token]), "split changed the text");
                pieces
            }
            None => vec![token],
        };
        for t in pieces {
            generated.push(t);
            match parser.on_token(&generated) {
                Action::Text | Action::Malformed(_) => {}
                Action::Fork(spec) => {
                    assert!(!spec.children.is_empty(), "a fork with no children");
                    // The parent goes on after the join; the rest of a split token is dropped.
                    break;
                }
                Action::End { .. } => {
                    assert!(role != Role::Root, "a root thread ended by a tag");
                    return;
                }
            }
        }
    }
    let _ = parser.on_truncate(&generated);
});
