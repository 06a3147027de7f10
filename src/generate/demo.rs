//! The synthetic workload of `spindle demo`: three requests (ThreadWeaver with a nested
//! fork, Multiverse with a KV-reuse join, APR with summary-only returns) whose control tags
//! come from a script while every other token is the real model's argmax. The engine,
//! forward pass and KV cache are real; the weights are random and the tags scripted.

use super::generator::Request;
use super::sampler::SamplingParams;
use super::scripted::Scripted;
use super::tags::TagProtocol;
use crate::error::Result;
use crate::tokenizer::Tokenizer;
use crate::tree::JoinKind;
use std::sync::Arc;

/// One scripted request of the demo.
pub struct DemoRequest {
    /// What it shows.
    pub title: &'static str,
    pub request: Request,
}

/// Scripts by thread path: `(path, script)` with `{N}` for `N` model-chosen tokens.
type Scripts = &'static [(&'static [u32], &'static str)];

const THREADWEAVER: Scripts = &[
    (
        &[],
        "{4}<Parallel><Outlines><Outline> 1: the terms</Outline><Outline> 2: the notice</Outline>\
         <Outline> 3: the warranty</Outline></Outlines>{6}</Parallel>{4}<|endoftext|>",
    ),
    (&[0], "{24}</Thread>"),
    (
        &[1],
        "{3}<Parallel><Outlines><Outline> 1: copies</Outline><Outline> 2: sources</Outline>\
         </Outlines>{3}</Parallel></Thread>",
    ),
    (&[1, 0], "{18}</Thread>"),
    (&[1, 1], "{22}</Thread>"),
    (&[2], "{30}</Thread>"),
];

const MULTIVERSE: Scripts = &[
    (
        &[],
        "{3}<Parallel><Goal><Outline> 1: left</Outline><Outline> 2: right</Outline></Goal>\
         {6}</Conclusion></Parallel><|endoftext|>",
    ),
    (&[0], "{28}</Path>"),
    (&[1], "{20}</Path>"),
];

const APR: Scripts = &[
    (
        &[],
        "{3}<spawn><Outline> count the terms</Outline><Outline> count the notices</Outline>\
         </spawn>{5}<|endoftext|>",
    ),
    (&[0], "{20}<join> 12</join>"),
    (&[1], "{16}<join> 7</join>"),
];

/// Tokens the model may not pick for free text: control tokens, and (for a readable demo)
/// any token that is not a plain ASCII word piece.
pub fn banned_for_free_text(tok: &Tokenizer) -> Result<Vec<u32>> {
    let mut banned = tok.special_ids();
    for id in 0..tok.vocab_size() as u32 {
        let s = tok.decode(&[id])?;
        let plain = !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == ' ' || c == ',' || c == '.');
        if !plain {
            banned.push(id);
        }
    }
    banned.sort_unstable();
    banned.dedup();
    Ok(banned)
}

fn scripted(tok: &Tokenizer, scripts: Scripts) -> Result<Scripted> {
    let mut s = Scripted::new(banned_for_free_text(tok)?);
    for (path, text) in scripts {
        s = s.script(path, Scripted::parse(tok, text)?);
    }
    Ok(s)
}

/// The demo's three requests.
pub fn workload(tok: &Tokenizer) -> Result<Vec<DemoRequest>> {
    let sampling = SamplingParams::default();
    let make = |prompt: &str, protocol: TagProtocol, scripts: Scripts| -> Result<Request> {
        Ok(
            Request::new(tok.encode(prompt)?, Arc::new(protocol), sampling.clone())
                .with_source(Box::new(scripted(tok, scripts)?)),
        )
    };
    Ok(vec![
        DemoRequest {
            title: "threadweaver: 3 threads, one forking 2 more; joins by re-prefill",
            request: make(
                "<think> Read the licence and list what it asks.",
                TagProtocol::threadweaver(tok, JoinKind::Reprefill)?,
                THREADWEAVER,
            )?,
        },
        DemoRequest {
            title: "multiverse: 2 paths; joined by KV reuse, then <Conclusion>",
            request: make(
                "<think> Compare the two licences.",
                TagProtocol::multiverse(tok)?,
                MULTIVERSE,
            )?,
        },
        DemoRequest {
            title: "apr: 2 children see only their message and hand back only <join> results",
            request: make(
                "Count the clauses of the licence.",
                TagProtocol::apr(tok)?,
                APR,
            )?,
        },
    ])
}
