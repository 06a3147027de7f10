//! What each fuzz target checks, shared by the targets (`fuzz_targets/*.rs`, nightly) and by
//! `tests/fuzz_regressions.rs` (stable `cargo test`), which replays every input kept under
//! `fuzz/regressions/<target>/`. The invariant everywhere: a typed error is fine, a panic is
//! not; on success the result is checked for consistency.

use model_loader::gguf::{gguf_config, load_tensors, parse_gguf};
use model_loader::{parse_safetensors, GgufValue, ModelConfig};
use serde_json::Value;
use spindle::generate::tags::ChildPrime;
use spindle::generate::{Action, Protocol, Role, TagProtocol, TokenSplit};
use spindle::replay::tree_file::{NodeLogits, TreeLimits, TreeNode};
use spindle::tokenizer::Tokenizer;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::LazyLock;

use spindle::backend::null::NullBackend;
use spindle::kv::SharedTail;
use spindle::plan::{AttentionPlan, PlanRow, PlanThread};
use spindle::{AttentionMode, Engine, EngineConfig, JoinKind, RequestId, ThreadId};

/// Runs the check of fuzz target `target` on `data`; `false` for an unknown target.
pub fn run(target: &str, data: &[u8]) -> bool {
    match target {
        "safetensors_header" => safetensors_header(data),
        "gguf_header" => gguf_header(data),
        "config_json" => config_json(data),
        "tree_file" => tree_file(data),
        "protocol_tokens" => protocol_tokens(data),
        "engine_ops" => engine_ops(data),
        _ => return false,
    }
    true
}

/// The safetensors header parser on arbitrary bytes: a typed error or a header whose tensors
/// lie inside the file, sorted, sized by dtype × shape, and not overlapping.
pub fn safetensors_header(data: &[u8]) {
    let Ok(tensors) = parse_safetensors(data, Path::new("fuzz.safetensors")) else {
        return;
    };
    let mut last_end = 0;
    for t in &tensors {
        assert!(
            t.start <= t.end && t.end <= data.len(),
            "{t:?} outside the file"
        );
        let numel: usize = t.shape.iter().product();
        assert_eq!(t.end - t.start, numel * t.dtype.size_bytes(), "{t:?}");
        if t.start != t.end {
            assert!(t.start >= last_end, "{t:?} overlaps an earlier tensor");
            last_end = t.end;
        }
    }
}

/// The GGUF loader on arbitrary bytes: header and tensor index, the tokenizer the metadata
/// describes (used to encode and decode a little text), the config, and dequantising every
/// tensor.
pub fn gguf_header(data: &[u8]) {
    let path = Path::new("fuzz.gguf");
    let Ok(header) = parse_gguf(data, path) else {
        return;
    };
    if let Ok(tok) = Tokenizer::from_gguf(&header.metadata, path) {
        if let Ok(ids) = tok.encode_prompt("ab <Thread> 1: c\n") {
            let _ = tok.decode(&ids);
        }
        let n = tok.vocab_size().min(512) as u32;
        let _ = tok.decode(&(0..n).collect::<Vec<u32>>());
        let _ = tok.special_ids();
        let _ = tok.chat_prompt("hi");
    }
    for t in &header.tensors {
        assert!(
            t.start <= t.end && t.end <= data.len(),
            "{t:?} outside the file"
        );
    }
    let has_output = header.tensors.iter().any(|t| t.name == "output.weight");
    let has_qkv_bias = header.tensors.iter().any(|t| t.name == "blk.0.attn_q.bias");
    let Ok(config) = gguf_config(&header, path, has_output, has_qkv_bias) else {
        return;
    };
    if let Ok(tensors) = load_tensors(&header, data, path, &config) {
        for t in &tensors {
            assert_eq!(
                t.values.len(),
                t.shape.iter().product::<usize>(),
                "{}",
                t.name
            );
        }
    }
}

/// `config.json` validation on arbitrary text: a typed error, or a config whose tensor list
/// and parameter count can be computed and which reads back identically from its own
/// `to_hf_json` (the contract `ModelConfig::to_hf_json` documents).
pub fn config_json(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let origin = Path::new("fuzz/config.json");
    let Ok(config) = ModelConfig::from_json_str(text, origin) else {
        return;
    };
    let _ = config.num_parameters();
    // One entry per weight; skip only absurd layer counts, for speed.
    if config.num_layers <= 4096 {
        let _ = config.expected_tensors();
    }
    let back = ModelConfig::from_json_str(&config.to_hf_json().to_string(), origin)
        .expect("a config's own to_hf_json reads back");
    assert_eq!(back, config, "to_hf_json round trip");
}

const TREE_LIMITS: TreeLimits = TreeLimits {
    vocab_size: 512,
    max_depth: 8,
};

/// The thread-tree file parser on arbitrary JSON (skipped when not JSON): a typed error, or a
/// tree whose sizes can be computed and which `to_json` writes back as the same tree.
pub fn tree_file(data: &[u8]) {
    let Ok(value) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    // A whole reference.json: its tree cases; anything else: the value itself as a NODE.
    let trees: Vec<&Value> = match value.get("cases").and_then(Value::as_array) {
        Some(cases) => cases.iter().filter_map(|c| c.get("tree")).collect(),
        None => vec![&value],
    };
    for v in trees {
        let Ok(tree) = TreeNode::parse(v, "fuzz.json", TREE_LIMITS) else {
            continue;
        };
        let _ = tree.total_tokens();
        let _ = tree.num_nodes();
        let written = tree.to_json(&NodeLogits::skeleton(&tree));
        let back = TreeNode::parse(&written, "written.json", TREE_LIMITS)
            .expect("a parsed tree's own to_json parses");
        assert_eq!(back, tree, "to_json round trip");
    }
}

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
    Tokenizer::from_gguf(&m, Path::new("chars.gguf")).expect("char tokenizer")
}

fn setup(tok: Tokenizer) -> Setup {
    let protocols = PRESETS
        .iter()
        .map(|name| {
            let protocol = TagProtocol::preset(name, &tok).expect("preset");
            let s = protocol.spec();
            let mut table = vec![
                s.container.open.clone(),
                s.container.close.clone(),
                s.entry.open.clone(),
                s.entry.close.clone(),
                s.child_end.clone(),
            ];
            if let Some(b) = &s.block {
                table.extend([b.open.clone(), b.close.clone()]);
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
    let bytes = include_bytes!("../tests/fixtures/tiny-qwen2/tokenizer.json");
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

/// The tag protocols' thread parsers fed arbitrary token streams, as the generator feeds
/// them: each chosen token may be split (`split`), its pieces are pushed to `generated` and
/// read (`on_token`) until a fork or end; a child ends at its end tag, at end-of-text, or by
/// truncation (`on_truncate`) when the stream runs out. Every preset, for a root and for
/// children, over the fixture tokenizer (every tag one token) and over a character-level BPE
/// (every tag several tokens, matched on the decoded text, `><` merged across tag edges).
///
/// Input: byte 0 picks the preset (bits 0-1), the role (bits 2-3: root, or child 0-2) and the
/// tokenizer (bit 4); then each byte is a token: below 0x20 a whole control tag (or number
/// label, or merge token) from a table, 0xF0 and up a raw 16-bit id from the next two bytes
/// (possibly past the vocabulary, as a model's padded output layer can produce), anything
/// else that byte as an id.
pub fn protocol_tokens(data: &[u8]) {
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
            Some(TokenSplit { head, rest }) => {
                assert!(!head.is_empty(), "split with an empty head");
                // The pieces spell what the token spelled after the same context.
                let ctx = &generated[generated.len().saturating_sub(64)..];
                let spelled = |ids: &[u32]| {
                    let mut all = ctx.to_vec();
                    all.extend(ids);
                    setup.tok.decode(&all).ok()
                };
                let pieces: Vec<u32> = head.iter().chain(&rest).copied().collect();
                assert_eq!(
                    spelled(&pieces),
                    spelled(&[token]),
                    "split changed the text"
                );
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
}

const ENGINE_CONFIG: &str = include_str!("../tests/fixtures/tiny-llama/config.json");

/// Reads bytes one at a time, zeros once the input runs out.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn next(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
}

fn scratch_plan(e: &Engine<NullBackend>) -> AttentionPlan {
    let out = e.last_output();
    let bs = e.pool().block_size();
    let mut row = 0u32;
    let threads: Vec<PlanThread> = out
        .threads
        .iter()
        .map(|t| {
            let view = &e.thread(t.thread).expect("an output's thread exists").view;
            let rows = (0..t.fed)
                .map(|i| PlanRow {
                    row: row + i as u32,
                    limit: (view.len() - t.fed + i + 1) as u32,
                })
                .collect();
            row += t.fed as u32;
            PlanThread {
                chunks: view.chunks(bs),
                rows,
            }
        })
        .collect();
    AttentionPlan::build(&threads, e.config().mode, e.config().split_tokens)
}

/// Random sequences of engine calls on a tiny pool, invariant checks on: every call returns
/// a value or a typed error, the incremental plan equals the plan built from scratch after
/// every step, and cancelling every request frees every block.
pub fn engine_ops(data: &[u8]) {
    let mut b = Bytes(data);
    let Ok(cfg) = ModelConfig::from_json_str(ENGINE_CONFIG, "config.json".as_ref()) else {
        return;
    };
    let vocab = cfg.vocab_size as u32;
    let setup = b.next();
    let block = [1usize, 2, 4, 16][(setup & 3) as usize];
    let blocks = 4 + (b.next() % 60) as usize;
    let mut e = Engine::new(
        NullBackend::new(cfg, block, blocks),
        EngineConfig {
            mode: if setup & 4 == 0 {
                AttentionMode::Forked
            } else {
                AttentionMode::Naive
            },
            split_tokens: [0, 3, 8, 512][((setup >> 3) & 3) as usize],
            max_step_tokens: 1 + (b.next() % 64) as usize,
            prefill_chunk: 1 + (b.next() % 16) as usize,
            shared_tail: if setup & 32 == 0 {
                SharedTail::NewSpan
            } else {
                SharedTail::CopyOnWrite
            },
            max_fork_width: 8,
            max_fork_depth: 4,
            check_invariants: true,
        },
    );
    for _ in 0..256 {
        if b.0.is_empty() {
            break;
        }
        let op = b.next() % 12;
        let n = e.threads().len() + 2;
        let id = ThreadId(b.next() as usize % n);
        let arg = b.next();
        let tokens: Vec<u32> = (0..arg % 24)
            .map(|i| (u32::from(arg) * 31 + i as u32) % (vocab + 2))
            .collect();
        let _ = match op {
            0 => e.add_request(&tokens).map(drop),
            1 => e.feed(id, &tokens),
            2 => e.fork(id, (arg % 6) as usize, arg & 8 == 0).map(drop),
            3 => e
                .fork_with(id, (arg % 6) as usize, true, Some(JoinKind::Reprefill))
                .map(drop),
            4 => e.finish(id),
            5 => e
                .join(
                    id,
                    if arg & 1 == 0 {
                        JoinKind::Reuse
                    } else {
                        JoinKind::Reprefill
                    },
                )
                .map(drop),
            6 => e.cancel(RequestId(id.index())),
            7 => e.cancel_thread(id),
            8 => e.release_cache(id),
            9 => e.forget(id),
            10 => e.set_returns(id, &tokens),
            _ => match e.step() {
                Ok(_) => {
                    assert_eq!(
                        e.last_plan(),
                        &scratch_plan(&e),
                        "incremental plan differs from the plan built from scratch"
                    );
                    Ok(())
                }
                Err(err) => Err(err),
            },
        };
    }
    // Cancelling every request leaves every block free.
    let requests: Vec<RequestId> = e
        .threads()
        .iter()
        .filter(|t| t.parent.is_none())
        .map(|t| t.request)
        .collect();
    for r in requests {
        e.cancel(r).expect("cancel a request");
    }
    assert!(e.pool().all_free(), "blocks leaked");
}
