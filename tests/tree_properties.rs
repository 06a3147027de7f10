//! Property tests of the thread tree over random trees: every thread's logits equal one
//! dense forward over the tree flattened with explicit positions and visibility (an
//! independent oracle of the fixtures' semantics, as the reference was built), no block
//! leaks, and the block and KV-read bounds hold.

mod common;

use common::*;
use spindle::kv::SharedTail;
use spindle::replay::tree_file::{Fork, NodeLogits, TreeNode};
use spindle::replay::{blocks_for, replay_with_stats};

use spindle::{AttentionMode, Engine, EngineConfig, JoinKind};

/// Engine against oracle (and oracle against Hugging Face): all are f32 over the same
/// weights and differ only in summation order (the engine-vs-Hugging-Face gap is about
/// 1.3e-5); every bug planted in docs/testing.md lands far outside 1e-4.
const TOL: f32 = 1e-4;

/// The library's seeded generator, so failures reproduce from the seed.
use spindle::generate::rng::Rng;

fn random_tokens(rng: &mut Rng, max_len: u64, vocab: u64) -> Vec<u32> {
    (0..rng.below(max_len + 1))
        .map(|_| rng.below(vocab) as u32)
        .collect()
}

fn random_tree(rng: &mut Rng, depth: usize, max_depth: usize, vocab: u64) -> TreeNode {
    let mut node = TreeNode::sequence(random_tokens(rng, 9, vocab));
    if depth < max_depth && rng.below(2 + depth as u64) == 0 {
        let width = 1 + rng.below(8) as usize;
        let join = if rng.below(2) == 0 {
            JoinKind::Reuse
        } else {
            JoinKind::Reprefill
        };
        let children = (0..width)
            .map(|_| {
                let mut c = random_tree(rng, depth + 1, max_depth, vocab);
                if join == JoinKind::Reprefill && rng.below(4) == 0 {
                    c.returns = Some(random_tokens(rng, 3, vocab));
                }
                c
            })
            .collect();
        node.fork = Some(Fork { join, children });
        if rng.below(2) == 0 {
            node.then = Some(Box::new(random_tree(rng, depth, max_depth, vocab)));
        }
    }
    node
}

/// One token of the flattened tree: id, position, and the entries it attends to (itself last).
struct Entry {
    token: u32,
    pos: u32,
    visible: Vec<usize>,
}

/// Entry indices of each node's outputs, shaped like the tree.
struct OracleNode {
    own: Vec<usize>,
    join: Vec<usize>,
    children: Vec<OracleNode>,
    then: Option<Box<OracleNode>>,
}

fn push(token: u32, pos: u32, ctx: &mut Vec<usize>, all: &mut Vec<Entry>) -> usize {
    ctx.push(all.len());
    all.push(Entry {
        token,
        pos,
        visible: ctx.clone(),
    });
    all.len() - 1
}

/// Independent oracle of `tests/fixtures/README.md`, the way the reference was built: the
/// tree flattened into one sequence with explicit positions and per-token visibility.
/// `ctx` holds the entry indices of the current thread's context.
fn flatten(
    node: &TreeNode,
    ctx: &mut Vec<usize>,
    next: &mut u32,
    all: &mut Vec<Entry>,
) -> OracleNode {
    let mut out = OracleNode {
        own: Vec::new(),
        join: Vec::new(),
        children: Vec::new(),
        then: None,
    };
    for &t in &node.tokens {
        out.own.push(push(t, *next, ctx, all));
        *next += 1;
    }
    if let Some(fork) = &node.fork {
        let base = ctx.clone();
        let p = *next;
        let mut owns = Vec::new();
        let mut extent = 0;
        for c in &fork.children {
            let mut cctx = base.clone();
            let mut cnext = p;
            out.children.push(flatten(c, &mut cctx, &mut cnext, all));
            owns.push((c.returns.clone(), cctx[base.len()..].to_vec()));
            extent = extent.max(cnext - p);
        }
        match fork.join {
            JoinKind::Reuse => {
                for (_, own) in owns {
                    ctx.extend(own);
                }
                *next = p + extent;
            }
            JoinKind::Reprefill => {
                for (returns, own) in owns {
                    let toks =
                        returns.unwrap_or_else(|| own.iter().map(|&i| all[i].token).collect());
                    for t in toks {
                        out.join.push(push(t, *next, ctx, all));
                        *next += 1;
                    }
                }
            }
        }
        if let Some(then) = &node.then {
            out.then = Some(Box::new(flatten(then, ctx, next, all)));
        }
    }
    out
}

/// The independent oracle: a plain f32 dense masked forward of a Llama / Qwen2 / Qwen3
/// decoder, written here from the Hugging Face modelling code and sharing nothing with
/// spindle's model code (no `CpuBackend`, `model::forward`, `AttentionPlan` or
/// `cpu_attention`). It reads `config.json` itself; only the tensors' bytes come through
/// `model_loader` (and are widened to f32 here).
struct Oracle {
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    vocab: usize,
    eps: f32,
    theta: f32,
    embed: Vec<f32>,
    /// `None` when the output projection is tied to the embedding.
    lm_head: Option<Vec<f32>>,
    final_norm: Vec<f32>,
    layers: Vec<OracleLayer>,
}

struct OracleLayer {
    input_norm: Vec<f32>,
    post_norm: Vec<f32>,
    q: (Vec<f32>, Option<Vec<f32>>),
    k: (Vec<f32>, Option<Vec<f32>>),
    v: (Vec<f32>, Option<Vec<f32>>),
    o: Vec<f32>,
    /// Qwen3's per-head RMSNorm of queries and keys.
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    gate: Vec<f32>,
    up: Vec<f32>,
    down: Vec<f32>,
}

impl Oracle {
    fn load(name: &str) -> Oracle {
        let dir = fixture(name);
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("config.json")).expect("config.json"),
        )
        .expect("config JSON");
        let num = |k: &str| cfg[k].as_u64().unwrap_or_else(|| panic!("{k}")) as usize;
        let (hidden, heads) = (num("hidden_size"), num("num_attention_heads"));
        // Newer configs keep the rotary base under rope_parameters, older ones at the top.
        let theta = cfg["rope_parameters"]["rope_theta"]
            .as_f64()
            .or(cfg["rope_theta"].as_f64())
            .unwrap_or(10000.0) as f32;
        let ck = model_loader::Checkpoint::open(&dir).expect("fixture");
        let t = |n: &str| ck.tensor(n).expect(n).to_f32();
        let opt = |n: &str| ck.tensor(n).ok().map(|v| v.to_f32());
        let layers = (0..num("num_hidden_layers"))
            .map(|l| {
                let p = format!("model.layers.{l}");
                let lin = |m: &str| (t(&format!("{p}.{m}.weight")), opt(&format!("{p}.{m}.bias")));
                OracleLayer {
                    input_norm: t(&format!("{p}.input_layernorm.weight")),
                    post_norm: t(&format!("{p}.post_attention_layernorm.weight")),
                    q: lin("self_attn.q_proj"),
                    k: lin("self_attn.k_proj"),
                    v: lin("self_attn.v_proj"),
                    o: t(&format!("{p}.self_attn.o_proj.weight")),
                    q_norm: opt(&format!("{p}.self_attn.q_norm.weight")),
                    k_norm: opt(&format!("{p}.self_attn.k_norm.weight")),
                    gate: t(&format!("{p}.mlp.gate_proj.weight")),
                    up: t(&format!("{p}.mlp.up_proj.weight")),
                    down: t(&format!("{p}.mlp.down_proj.weight")),
                }
            })
            .collect();
        let tied = cfg["tie_word_embeddings"].as_bool().unwrap_or(false);
        Oracle {
            hidden,
            heads,
            kv_heads: num("num_key_value_heads"),
            head_dim: cfg["head_dim"]
                .as_u64()
                .map_or(hidden / heads, |d| d as usize),
            vocab: num("vocab_size"),
            eps: cfg["rms_norm_eps"].as_f64().unwrap_or(1e-6) as f32,
            theta,
            embed: t("model.embed_tokens.weight"),
            lm_head: if tied {
                None
            } else {
                Some(t("lm_head.weight"))
            },
            final_norm: t("model.norm.weight"),
            layers,
        }
    }

    /// `x @ w.T + b` for `x` of `rows` rows; `w` is `[out, in]` row-major.
    fn linear(x: &[f32], w: &[f32], b: Option<&[f32]>, inp: usize) -> Vec<f32> {
        let out = w.len() / inp;
        let mut y = Vec::with_capacity(x.len() / inp * out);
        for row in x.chunks(inp) {
            for (o, wr) in w.chunks(inp).enumerate() {
                let dot: f32 = row.iter().zip(wr).map(|(a, b)| a * b).sum();
                y.push(dot + b.map_or(0.0, |b| b[o]));
            }
        }
        y
    }

    /// RMSNorm over every `w.len()`-wide piece of `x`.
    fn rms_norm(&self, x: &[f32], w: &[f32]) -> Vec<f32> {
        x.chunks(w.len())
            .flat_map(|r| {
                let ms = r.iter().map(|v| v * v).sum::<f32>() / r.len() as f32;
                let inv = 1.0 / (ms + self.eps).sqrt();
                r.iter().zip(w).map(move |(v, g)| g * (v * inv))
            })
            .collect()
    }

    /// Rotary embedding in Hugging Face's rotate-half layout, on `[rows, n * head_dim]`.
    fn rope(&self, x: &mut [f32], positions: &[u32]) {
        let d = self.head_dim;
        let width = x.len() / positions.len();
        for (row, &pos) in x.chunks_mut(width).zip(positions) {
            for head in row.chunks_mut(d) {
                for i in 0..d / 2 {
                    let inv_freq = 1.0 / self.theta.powf((2 * i) as f32 / d as f32);
                    let angle = pos as f32 * inv_freq;
                    let (sin, cos) = angle.sin_cos();
                    let (a, b) = (head[i], head[i + d / 2]);
                    head[i] = a * cos - b * sin;
                    head[i + d / 2] = b * cos + a * sin;
                }
            }
        }
    }

    /// Logits of every entry: one pass over the whole flattened tree, each row attending
    /// exactly to its visible entries (itself included) by a dense masked softmax.
    fn forward(&self, all: &[Entry]) -> Vec<Vec<f32>> {
        if all.is_empty() {
            return Vec::new();
        }
        let (h, d) = (self.hidden, self.head_dim);
        let n = all.len();
        let positions: Vec<u32> = all.iter().map(|e| e.pos).collect();
        let mut x: Vec<f32> = all
            .iter()
            .flat_map(|e| self.embed[e.token as usize * h..][..h].iter().copied())
            .collect();
        let group = self.heads / self.kv_heads;
        let scale = 1.0 / (d as f32).sqrt();
        for l in &self.layers {
            let hn = self.rms_norm(&x, &l.input_norm);
            let mut q = Self::linear(&hn, &l.q.0, l.q.1.as_deref(), h);
            let mut k = Self::linear(&hn, &l.k.0, l.k.1.as_deref(), h);
            let v = Self::linear(&hn, &l.v.0, l.v.1.as_deref(), h);
            if let (Some(qn), Some(kn)) = (&l.q_norm, &l.k_norm) {
                q = self.rms_norm(&q, qn);
                k = self.rms_norm(&k, kn);
            }
            self.rope(&mut q, &positions);
            self.rope(&mut k, &positions);
            let (qw, kw) = (self.heads * d, self.kv_heads * d);
            let mut attn = vec![0.0f32; n * qw];
            for (r, e) in all.iter().enumerate() {
                for hd in 0..self.heads {
                    let kvh = hd / group;
                    let qv = &q[r * qw + hd * d..][..d];
                    let scores: Vec<f32> = e
                        .visible
                        .iter()
                        .map(|&j| {
                            let kv = &k[j * kw + kvh * d..][..d];
                            qv.iter().zip(kv).map(|(a, b)| a * b).sum::<f32>() * scale
                        })
                        .collect();
                    let m = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let w: Vec<f32> = scores.iter().map(|s| (s - m).exp()).collect();
                    let z: f32 = w.iter().sum();
                    let out = &mut attn[r * qw + hd * d..][..d];
                    for (&j, wj) in e.visible.iter().zip(&w) {
                        let vv = &v[j * kw + kvh * d..][..d];
                        for (o, b) in out.iter_mut().zip(vv) {
                            *o += wj / z * b;
                        }
                    }
                }
            }
            let o = Self::linear(&attn, &l.o, None, qw);
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            let hn = self.rms_norm(&x, &l.post_norm);
            let gate = Self::linear(&hn, &l.gate, None, h);
            let up = Self::linear(&hn, &l.up, None, h);
            let act: Vec<f32> = gate
                .iter()
                .zip(&up)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let down = Self::linear(&act, &l.down, None, act.len() / n);
            x.iter_mut().zip(&down).for_each(|(a, b)| *a += b);
        }
        let x = self.rms_norm(&x, &self.final_norm);
        let head = self.lm_head.as_deref().unwrap_or(&self.embed);
        Self::linear(&x, head, None, h)
            .chunks(self.vocab)
            .map(<[f32]>::to_vec)
            .collect()
    }
}

fn compare(dense: &[Vec<f32>], got: &NodeLogits, want: &OracleNode, at: &str) -> f32 {
    let diff = |a: &[Vec<f32>], idx: &[usize], what: &str| {
        assert_eq!(a.len(), idx.len(), "{what}: row count");
        let d = a
            .iter()
            .zip(idx)
            .flat_map(|(x, &i)| x.iter().zip(&dense[i]).map(|(p, q)| (p - q).abs()))
            .fold(0.0f32, f32::max);
        if d > TOL {
            eprintln!("{what}: logits differ by {d}");
        }
        d
    };
    let join = diff(&got.join_logits, &want.join, &format!("{at}.join"));
    let mut m = diff(&got.logits, &want.own, at).max(join);
    assert_eq!(got.children.len(), want.children.len(), "{at}: children");
    for (i, (g, w)) in got.children.iter().zip(&want.children).enumerate() {
        m = m.max(compare(dense, g, w, &format!("{at}.children[{i}]")));
    }
    match (&want.then, got.then.as_deref()) {
        (Some(t), Some(g)) => m = m.max(compare(dense, g, t, &format!("{at}.then"))),
        (None, None) => {}
        (t, _) => panic!("{at}: then expected {}, got the other", t.is_some()),
    }
    m
}

/// The oracle's rows shaped like the tree, to compare with a reference file.
fn oracle_logits(dense: &[Vec<f32>], node: &OracleNode) -> NodeLogits {
    let rows = |idx: &[usize]| idx.iter().map(|&i| dense[i].clone()).collect();
    NodeLogits {
        logits: rows(&node.own),
        join_logits: rows(&node.join),
        children: node
            .children
            .iter()
            .map(|c| oracle_logits(dense, c))
            .collect(),
        then: node
            .then
            .as_ref()
            .map(|t| Box::new(oracle_logits(dense, t))),
    }
}

/// The oracle's own check: every case of every fixture, sequences and trees (Llama; Qwen2
/// with q/k/v biases and a `rope_parameters` base; Qwen3 with q/k norm, an explicit
/// head_dim, tied embeddings and a top-level base), against Hugging Face's logits.
#[test]
fn the_oracle_matches_hugging_face_on_every_fixture_case() {
    let mut cases = 0;
    for name in FIXTURES {
        let oracle = Oracle::load(name);
        let r = reference(name);
        for case in r["cases"].as_array().expect("cases") {
            let (tree, want) = if case["kind"] == "sequence" {
                let tokens = serde_json::from_value(case["tokens"].clone()).expect("tokens");
                (TreeNode::sequence(tokens), case.clone())
            } else {
                (
                    parse_tree(&case["tree"], oracle.vocab),
                    case["tree"].clone(),
                )
            };
            let mut all = Vec::new();
            let shape = flatten(&tree, &mut Vec::new(), &mut 0, &mut all);
            let got = oracle_logits(&oracle.forward(&all), &shape);
            let at = format!("{name}/{}", case["name"]);
            let d = tree_diff(&got, &want, &at);
            println!("oracle {at}: {} tokens, max |diff| {d:.1e}", all.len());
            assert!(d <= TOL, "{at}: oracle differs from the reference by {d}");
            cases += 1;
        }
    }
    assert_eq!(cases, 9, "3 sequences and 6 trees");
}

/// The oracle on tiny-llama, the fixture the pressure tests use.
fn dense_forward(all: &[Entry]) -> Vec<Vec<f32>> {
    Oracle::load("tiny-llama").forward(all)
}

#[test]
fn random_trees_match_flattened_forward_and_free_every_block() {
    let mut rng = Rng::new(0x5eed);
    let oracles = FIXTURES.map(Oracle::load);
    for case in 0..42 {
        // Every fixture in turn: Llama, then Qwen2 (biases), then Qwen3 (q/k norm, tied).
        let (name, oracle) = (FIXTURES[case % 3], &oracles[case % 3]);
        let tree = random_tree(&mut rng, 0, 3, oracle.vocab as u64);
        let block_size = 1 + rng.below(17) as usize;
        let mode = if case % 2 == 0 {
            AttentionMode::Forked
        } else {
            AttentionMode::Naive
        };
        let shared_tail = if (case / 3) % 2 == 0 {
            SharedTail::CopyOnWrite
        } else {
            SharedTail::NewSpan
        };
        let ck = model_loader::Checkpoint::open(&fixture(name)).expect("fixture");
        let blocks = blocks_for(&tree, block_size);
        let backend = spindle::CpuBackend::load(&ck, blocks, block_size).expect("backend");
        let mut e = Engine::new(
            backend,
            EngineConfig {
                mode,
                shared_tail,
                prefill_chunk: 1 + rng.below(8) as usize,
                ..Default::default()
            },
        );
        let (got, stats) = replay_with_stats(&mut e, &tree).expect("replay");
        assert!(e.pool().all_free(), "case {case}: blocks leaked");
        e.check_refcounts().expect("refcounts");
        let mut all = Vec::new();
        let want = flatten(&tree, &mut Vec::new(), &mut 0, &mut all);
        let d = compare(
            &oracle.forward(&all),
            &got,
            &want,
            &format!("case {case} ({name})"),
        );
        assert!(d <= TOL, "case {case}: max |diff| {d}");
        if shared_tail == SharedTail::NewSpan {
            let bound = tree.total_tokens().div_ceil(block_size) + tree.num_nodes();
            assert!(
                stats.blocks_peak <= bound,
                "case {case}: blocks peak {} over the bound {bound}",
                stats.blocks_peak
            );
        }
        println!(
            "case {case}: {} nodes, {} tokens, bs {block_size}, {mode:?}, {shared_tail:?}: max |diff| {d:.1e}, peak {} blocks ({} without sharing)",
            tree.num_nodes(),
            tree.total_tokens(),
            stats.blocks_peak,
            stats.blocks_without_sharing
        );
    }
}

#[test]
fn tree_sizes_count_every_fed_token() {
    let v: serde_json::Value = serde_json::from_str(
        r#"{"tokens":[1,2,3],"fork":{"join":"reuse","children":[{"tokens":[4,5]},{"tokens":[6,7,8]}]},
            "then":{"tokens":[9],"fork":{"join":"reprefill","children":[
                {"tokens":[10,11,12]},{"tokens":[13,14],"returns":[15,16]}]}}}"#,
    )
    .expect("tree JSON");
    let tree = TreeNode::parse(&v, "sizes", limits(512)).expect("tree");
    // Own 3 + children 2 + 3, then 1 + children 3 + 2 + re-prefilled 3 (a transcript)
    // + 2 (returns).
    assert_eq!(tree.total_tokens(), 19);
    assert_eq!(tree.num_nodes(), 6);
    // The flattened tree feeds exactly those tokens.
    let mut all = Vec::new();
    flatten(&tree, &mut Vec::new(), &mut 0, &mut all);
    assert_eq!(all.len(), 19);
}

#[test]
fn shared_prefix_is_read_once_per_step_and_layer() {
    let (p, w, s) = (40u64, 6u64, 5u64);
    let layers = 3u64; // tiny-llama
    let tree = TreeNode {
        tokens: (0..p as u32).collect(),
        returns: None,
        fork: Some(Fork {
            join: JoinKind::Reuse,
            children: (0..w)
                .map(|i| {
                    TreeNode::sequence((0..s as u32).map(|j| 100 + i as u32 * 10 + j).collect())
                })
                .collect(),
        }),
        then: None,
    };
    for mode in [AttentionMode::Forked, AttentionMode::Naive] {
        let mut e = engine("tiny-llama", blocks_for(&tree, 16), 16, mode);
        let (_, stats) = replay_with_stats(&mut e, &tree).expect("replay");
        // Step 1 prefills the prefix; then every child decodes one token per step.
        let forked: u64 = p + (1..=s).map(|k| p + w * k).sum::<u64>();
        let naive: u64 = p + (1..=s).map(|k| w * (p + k)).sum::<u64>();
        assert_eq!(stats.steps, 1 + s);
        assert_eq!(stats.kv_tokens_read_naive, naive * layers, "{mode:?}");
        let want = if mode == AttentionMode::Forked {
            forked
        } else {
            naive
        };
        assert_eq!(stats.kv_tokens_read, want * layers, "{mode:?}");
        assert_eq!(
            e.backend().kv_tokens_read(),
            want * layers,
            "backend count, {mode:?}"
        );
        assert!(stats.blocks_peak < stats.blocks_without_sharing);
        println!(
            "{mode:?}: kv tokens read {} (naive {}), blocks peak {} vs {} without sharing",
            stats.kv_tokens_read,
            stats.kv_tokens_read_naive,
            stats.blocks_peak,
            stats.blocks_without_sharing
        );
    }
}

#[test]
fn a_pool_too_small_for_the_width_waits_and_preempts_without_losing_anything() {
    let mut rng = Rng::new(7);
    // APR-style children: twelve tokens each, one token handed back.
    let children = (0..6)
        .map(|i| TreeNode {
            returns: Some(vec![i]),
            ..TreeNode::sequence((0..12).map(|_| rng.below(512) as u32).collect())
        })
        .collect();
    let tree = TreeNode {
        tokens: (0..20).map(|_| rng.below(512) as u32).collect(),
        returns: None,
        fork: Some(Fork {
            join: JoinKind::Reprefill,
            children,
        }),
        then: Some(Box::new(TreeNode::sequence(vec![1, 2, 3]))),
    };
    let block_size = 4;
    // The prefix takes 5 blocks; all six children at once would need 18 more.
    let blocks = 12;
    let mut e = engine("tiny-llama", blocks, block_size, AttentionMode::Forked);
    let (got, stats) = replay_with_stats(&mut e, &tree).expect("replay under pressure");
    assert!(e.pool().all_free());
    assert!(stats.blocks_peak <= blocks);
    assert!(stats.preemptions > 0, "the pool was meant to be too small");
    let mut all = Vec::new();
    let want = flatten(&tree, &mut Vec::new(), &mut 0, &mut all);
    let d = compare(&dense_forward(&all), &got, &want, "pressure");
    assert!(d <= TOL, "max |diff| {d}");
    println!(
        "pool of {blocks} blocks: {} steps, {} preemptions, peak {} blocks ({} without sharing), max |diff| {d:.1e}",
        stats.steps, stats.preemptions, stats.blocks_peak, stats.blocks_without_sharing
    );
}

/// Replays `tree` with a pool of `blocks`; `None` when the pool cannot hold it at all.
fn replay_tight(
    tree: &TreeNode,
    blocks: usize,
    block_size: usize,
) -> Option<(NodeLogits, spindle::EngineStats)> {
    let mut e = engine("tiny-llama", blocks, block_size, AttentionMode::Forked);
    match replay_with_stats(&mut e, tree) {
        Ok(r) => {
            assert!(e.pool().all_free(), "blocks leaked under pressure");
            e.check_refcounts().expect("refcounts");
            Some(r)
        }
        Err(spindle::SpindleError::ThreadDoesNotFit { .. }) => None,
        Err(other) => panic!("unexpected error under pressure: {other}"),
    }
}

/// A root fork whose last child joins short children of its own by KV reuse, then goes
/// on while its older siblings still decode. The root's join is cheap (a reuse join, or
/// one returned token per child), so the pool's peak is while they all run.
fn late_reuse_tree(rng: &mut Rng) -> TreeNode {
    let reuse = rng.below(2) == 0;
    let seq = |rng: &mut Rng, min: u64, spread: u64| {
        TreeNode::sequence(
            (0..min + rng.below(spread))
                .map(|_| rng.below(512) as u32)
                .collect(),
        )
    };
    // Older siblings that outlast the last child's join.
    let mut children: Vec<TreeNode> = (0..1 + rng.below(3)).map(|_| seq(rng, 8, 8)).collect();
    let kids = (0..1 + rng.below(3)).map(|_| seq(rng, 1, 3)).collect();
    children.push(TreeNode {
        tokens: random_tokens(rng, 2, 512),
        returns: None,
        fork: Some(Fork {
            join: JoinKind::Reuse,
            children: kids,
        }),
        then: Some(Box::new(seq(rng, 2, 7))),
    });
    if !reuse {
        for c in &mut children {
            c.returns = Some(vec![rng.below(512) as u32]);
        }
    }
    TreeNode {
        tokens: (0..1 + rng.below(9))
            .map(|_| rng.below(512) as u32)
            .collect(),
        returns: None,
        fork: Some(Fork {
            join: if reuse {
                JoinKind::Reuse
            } else {
                JoinKind::Reprefill
            },
            children,
        }),
        then: None,
    }
}

#[test]
fn preemption_under_tight_pools_keeps_every_tree_exact() {
    let mut rng = Rng::new(0xfeed);
    let mut preempted_runs = 0;
    let mut reuse_preempted = 0;
    for case in 0..30 {
        // Every other tree puts a reuse join (and tokens after it) in the root fork's last,
        // youngest child, the thread preemption picks first, so that threads are preempted
        // after a reuse join; random trees alone almost never do that.
        let tree = if case % 2 == 1 {
            late_reuse_tree(&mut rng)
        } else {
            loop {
                let t = random_tree(&mut rng, 0, 3, 512);
                if t.fork.is_some() {
                    break t;
                }
            }
        };
        let block_size = 1 + rng.below(if case % 2 == 1 { 2 } else { 4 }) as usize;
        let Some((_, roomy)) = replay_tight(&tree, blocks_for(&tree, block_size), block_size)
        else {
            panic!("case {case}: the roomy pool must fit");
        };
        let mut all = Vec::new();
        let want = flatten(&tree, &mut Vec::new(), &mut 0, &mut all);
        let dense = dense_forward(&all);
        // Shrink the pool below the peak the tree needed until it no longer fits.
        for cut in 1..=roomy.blocks_peak {
            let blocks = roomy.blocks_peak - cut;
            let Some((got, stats)) = replay_tight(&tree, blocks, block_size) else {
                break;
            };
            let d = compare(
                &dense,
                &got,
                &want,
                &format!("case {case} ({blocks} blocks)"),
            );
            assert!(d <= TOL, "case {case}, {blocks} blocks: max |diff| {d}");
            if stats.preemptions > 0 {
                preempted_runs += 1;
            }
            // Threads actually preempted after they had merged children by KV reuse.
            reuse_preempted += stats.preemptions_after_reuse_join;
        }
    }
    println!(
        "{preempted_runs} runs preempted ({reuse_preempted} preemptions after a reuse join), all exact"
    );
    assert!(
        preempted_runs >= 10,
        "too few runs exercised preemption: {preempted_runs}"
    );
    assert!(
        reuse_preempted >= 5,
        "too few preemptions after a reuse join: {reuse_preempted}"
    );
}

#[test]
fn preempting_a_thread_after_a_reuse_join_keeps_the_merged_cache() {
    // The inner thread joins two children by KV reuse, then decodes; the pool forces its
    // preemption after the join. Recomputing the merged children's tokens as one sequence
    // would change their K/V (they must not see each other), so they stay cached.
    let v: serde_json::Value = serde_json::from_str(
        r#"{"tokens":[11,12,13,14],"fork":{"join":"reprefill","children":[
            {"tokens":[21,22,23,24,25,26,27,28],"returns":[1]},
            {"tokens":[31],"returns":[2],"fork":{"join":"reuse","children":[{"tokens":[41,42]},{"tokens":[51,52]}]},
             "then":{"tokens":[61,62,63,64]}}]},
          "then":{"tokens":[70]}}"#,
    )
    .expect("tree JSON");
    let tree = TreeNode::parse(&v, "regression", limits(512)).expect("tree");
    let mut all = Vec::new();
    let want = flatten(&tree, &mut Vec::new(), &mut 0, &mut all);
    let dense = dense_forward(&all);
    let mut preempted = 0;
    for blocks in 10..=20 {
        let Some((got, stats)) = replay_tight(&tree, blocks, 1) else {
            continue;
        };
        preempted += stats.preemptions_after_reuse_join;
        let d = compare(&dense, &got, &want, &format!("{blocks} blocks"));
        assert!(d <= TOL, "{blocks} blocks: max |diff| {d}");
    }
    assert!(
        preempted > 0,
        "the pools were meant to preempt the thread after its reuse join"
    );
}

/// A thread prefilling several rows while it shares a prefix with another: the forked plan
/// (a shared item, then an own item that starts mid-view) and split items must give what
/// one naive item per thread gives, row by row (each row sees only up to its own limit).
#[test]
fn forked_and_split_plans_match_the_naive_plan_row_by_row() {
    use spindle::backend::cpu_attention::{attention, AttnShape};
    use spindle::kv::Chunk;
    use spindle::plan::{AttentionPlan, PlanRow, PlanThread};
    let shape = AttnShape {
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 8,
        block_size: 4,
    };
    let mut rng = Rng::new(11);
    let mut rand = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| (rng.below(2001) as f32 - 1000.0) / 500.0)
            .collect()
    };
    let kv_width = shape.num_kv_heads * shape.head_dim;
    let (k, v) = (rand(3 * 4 * kv_width), rand(3 * 4 * kv_width));
    let q = rand(4 * shape.num_heads * shape.head_dim);
    let chunk = |block, len| Chunk {
        block,
        start: 0,
        len,
    };
    // Thread 0 decodes one row over blocks 0 and 1; thread 1 shares block 0 and prefills
    // three rows into block 2 (seeing 5, 6 and 7 tokens).
    let threads = [
        PlanThread {
            chunks: vec![chunk(0, 4), chunk(1, 4)],
            rows: vec![PlanRow { row: 0, limit: 8 }],
        },
        PlanThread {
            chunks: vec![chunk(0, 4), chunk(2, 3)],
            rows: vec![
                PlanRow { row: 1, limit: 5 },
                PlanRow { row: 2, limit: 6 },
                PlanRow { row: 3, limit: 7 },
            ],
        },
    ];
    let naive = AttentionPlan::build(&threads, AttentionMode::Naive, 512);
    let want = attention(&naive, &q, &k, &v, shape).output;
    for (mode, split) in [
        (AttentionMode::Forked, 512),
        (AttentionMode::Forked, 2),
        (AttentionMode::Naive, 3),
    ] {
        let plan = AttentionPlan::build(&threads, mode, split);
        let got = attention(&plan, &q, &k, &v, shape).output;
        let d = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        // Same values, merged in another order: f32 rounding only.
        assert!(d <= 1e-5, "{mode:?} split {split}: max |diff| {d}");
    }
}
