//! Replay: teacher-forces a thread tree through the engine as real decoding would run it
//! (the root's first tokens prefilled as a prompt, every other thread decoding one token
//! per step, forks and joins at their points, all threads in fused steps) and collects the
//! logits at every token.

use crate::backend::Backend;
use crate::engine::{Engine, EngineStats};
use crate::error::{Result, SpindleError};
use crate::tree::{JoinKind, RequestId, ThreadId};

pub mod tree_file;
use crate::replay::tree_file::{NodeLogits, TreeNode};
use std::collections::{BTreeMap, VecDeque};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Edge {
    Child(usize),
    Then,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Feeding the node's own tokens.
    Own,
    /// Suspended on a fork.
    Waiting,
    /// Receiving the re-prefilled transcripts of a join.
    JoinPrefill,
}

#[derive(Debug)]
struct Cursor {
    path: Vec<Edge>,
    phase: Phase,
    /// Tokens still to decode, one per step.
    decode: VecDeque<u32>,
    /// Logit rows still expected in this phase.
    expect: usize,
}

fn node_at<'a>(root: &'a TreeNode, path: &[Edge]) -> Option<&'a TreeNode> {
    let mut n = root;
    for e in path {
        n = match e {
            Edge::Child(i) => n.fork.as_ref()?.children.get(*i)?,
            Edge::Then => n.then.as_deref()?,
        };
    }
    Some(n)
}

fn out_at<'a>(root: &'a mut NodeLogits, path: &[Edge]) -> &'a mut NodeLogits {
    let mut n = root;
    for e in path {
        n = match e {
            Edge::Child(i) => {
                if n.children.len() <= *i {
                    n.children.resize_with(*i + 1, NodeLogits::default);
                }
                &mut n.children[*i]
            }
            Edge::Then => n.then.get_or_insert_with(Default::default),
        };
    }
    n
}

/// KV blocks that are always enough to replay `tree` at `block_size`.
pub fn blocks_for(tree: &TreeNode, block_size: usize) -> usize {
    tree.total_tokens().div_ceil(block_size) + 2 * tree.num_nodes() + 4
}

/// Replays `tree` on `engine` and returns the logits at every token, shaped like the tree.
pub fn replay_tree<B: Backend>(engine: &mut Engine<B>, tree: &TreeNode) -> Result<NodeLogits> {
    let mut r = Replay::start(engine, tree)?;
    loop {
        r.prepare(engine)?;
        if r.is_done() {
            break;
        }
        if !engine.has_work() {
            return Err(broken("no thread can make progress"));
        }
        engine.step()?;
        r.collect(engine)?;
    }
    Ok(r.into_logits())
}

fn broken(what: &str) -> SpindleError {
    SpindleError::InvalidInput(format!("replay: {what}"))
}

/// One tree being replayed. Several can share an engine (each is one request): call
/// [`Replay::prepare`] on each before a step and [`Replay::collect`] on each after it.
#[derive(Debug)]
pub struct Replay<'t> {
    tree: &'t TreeNode,
    request: RequestId,
    cursors: BTreeMap<ThreadId, Cursor>,
    out: NodeLogits,
}

impl<'t> Replay<'t> {
    /// Adds `tree`'s root as a request of `engine`, with logits at every token.
    pub fn start<B: Backend>(engine: &mut Engine<B>, tree: &'t TreeNode) -> Result<Self> {
        let root = engine.add_request(&tree.tokens)?;
        engine.set_all_logits(root, true)?;
        let mut cursors = BTreeMap::new();
        cursors.insert(
            root,
            Cursor {
                path: Vec::new(),
                phase: Phase::Own,
                decode: VecDeque::new(),
                expect: tree.tokens.len(),
            },
        );
        Ok(Self {
            tree,
            request: engine.request_of(root)?,
            cursors,
            out: NodeLogits::skeleton(tree),
        })
    }

    /// The request.
    pub fn request(&self) -> RequestId {
        self.request
    }

    /// True when every thread of the tree has finished.
    pub fn is_done(&self) -> bool {
        self.cursors.is_empty()
    }

    /// Moves every thread whose phase is complete on (forks, joins, finishes) and queues
    /// each decoding thread's next token.
    pub fn prepare<B: Backend>(&mut self, engine: &mut Engine<B>) -> Result<()> {
        advance(engine, self.tree, &mut self.cursors)?;
        for (&id, c) in self.cursors.iter_mut() {
            if engine.thread(id)?.pending.is_empty() {
                if let Some(t) = c.decode.pop_front() {
                    engine.feed(id, &[t])?;
                }
            }
        }
        Ok(())
    }

    /// Takes the logits of this tree's threads from the engine's last step.
    pub fn collect<B: Backend>(&mut self, engine: &Engine<B>) -> Result<()> {
        let step = engine.last_output();
        for t in step.threads {
            if engine.thread(t.thread)?.request != self.request {
                continue;
            }
            let c = self
                .cursors
                .get_mut(&t.thread)
                .ok_or_else(|| broken("output for an unknown thread"))?;
            c.expect = c.expect.saturating_sub(t.logit_rows);
            let node = out_at(&mut self.out, &c.path);
            let rows = step.logits_of(t).map(<[f32]>::to_vec);
            match c.phase {
                Phase::JoinPrefill => node.join_logits.extend(rows),
                _ => node.logits.extend(rows),
            }
        }
        Ok(())
    }

    /// The logits collected so far, shaped like the tree.
    pub fn into_logits(self) -> NodeLogits {
        self.out
    }
}

/// Moves every cursor whose phase is complete to its next phase until nothing changes.
fn advance<B: Backend>(
    engine: &mut Engine<B>,
    tree: &TreeNode,
    cursors: &mut BTreeMap<ThreadId, Cursor>,
) -> Result<()> {
    let missing = || SpindleError::InvalidInput("replay: tree path lost".into());
    loop {
        let ready = cursors.iter().find(|(&id, c)| {
            c.phase != Phase::Waiting
                && c.expect == 0
                && c.decode.is_empty()
                && engine.thread(id).is_ok_and(|t| t.pending.is_empty())
        });
        let Some((&id, _)) = ready else {
            return Ok(());
        };
        let c = cursors.get_mut(&id).ok_or_else(missing)?;
        let node = node_at(tree, &c.path).ok_or_else(missing)?;
        match (c.phase, &node.fork) {
            (Phase::Own, Some(fork)) => {
                c.phase = Phase::Waiting;
                let path = c.path.clone();
                let kids = engine.fork_with(id, fork.children.len(), true, Some(fork.join))?;
                for (i, (&kid, child)) in kids.iter().zip(&fork.children).enumerate() {
                    if let Some(r) = &child.returns {
                        engine.set_returns(kid, r)?;
                    }
                    let mut p = path.clone();
                    p.push(Edge::Child(i));
                    cursors.insert(
                        kid,
                        Cursor {
                            path: p,
                            phase: Phase::Own,
                            decode: child.tokens.iter().copied().collect(),
                            expect: child.tokens.len(),
                        },
                    );
                }
            }
            (Phase::Own, None) | (Phase::JoinPrefill, _) => {
                if let Some(then) = &node.then {
                    c.path.push(Edge::Then);
                    c.phase = Phase::Own;
                    c.decode = then.tokens.iter().copied().collect();
                    c.expect = then.tokens.len();
                    continue;
                }
                cursors.remove(&id);
                engine.finish(id)?;
                let Some(parent) = engine.thread(id)?.parent else {
                    continue;
                };
                if !engine.children_done(parent) {
                    continue;
                }
                let pc = cursors.get_mut(&parent).ok_or_else(missing)?;
                let pnode = node_at(tree, &pc.path).ok_or_else(missing)?;
                let kind = pnode.fork.as_ref().ok_or_else(missing)?.join;
                let queued = engine.join(parent, kind)?;
                pc.phase = Phase::JoinPrefill;
                pc.expect = if kind == JoinKind::Reprefill {
                    queued
                } else {
                    0
                };
            }
            (Phase::Waiting, _) => unreachable_phase()?,
        }
    }
}

fn unreachable_phase() -> Result<()> {
    Err(SpindleError::InvalidInput(
        "replay: a waiting thread was advanced".into(),
    ))
}

/// Replays `tree` with fresh counters and returns its logits and stats.
pub fn replay_with_stats<B: Backend>(
    engine: &mut Engine<B>,
    tree: &TreeNode,
) -> Result<(NodeLogits, EngineStats)> {
    engine.reset_stats();
    let logits = replay_tree(engine, tree)?;
    Ok((logits, engine.stats()))
}
