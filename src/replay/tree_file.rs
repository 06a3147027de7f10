//! The thread-tree file format (`NODE` in `tests/fixtures/README.md`): parsing with errors
//! that name the node and field, and writing trees back with logits filled in.

use crate::error::{Result, SpindleError};
use crate::tree::JoinKind;
use serde_json::{json, Map, Value};

/// One teacher-forced thread of a tree file.
#[derive(Debug, Clone, PartialEq)]
pub struct TreeNode {
    /// This thread's own tokens.
    pub tokens: Vec<u32>,
    /// Tokens handed back at a re-prefill join instead of the transcript (APR).
    pub returns: Option<Vec<u32>>,
    /// The fork after its tokens, if any.
    pub fork: Option<Fork>,
    /// The parent's tokens after the join.
    pub then: Option<Box<TreeNode>>,
}

/// A fork: its children and how they join.
#[derive(Debug, Clone, PartialEq)]
pub struct Fork {
    pub join: JoinKind,
    pub children: Vec<TreeNode>,
}

/// Logits produced for one node (the same shape as the tree).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeLogits {
    pub logits: Vec<Vec<f32>>,
    pub join_logits: Vec<Vec<f32>>,
    pub children: Vec<NodeLogits>,
    pub then: Option<Box<NodeLogits>>,
}

/// Limits a tree file must respect.
#[derive(Debug, Clone, Copy)]
pub struct TreeLimits {
    pub vocab_size: usize,
    pub max_depth: usize,
}

impl NodeLogits {
    /// Empty logits shaped like `tree`.
    pub fn skeleton(tree: &TreeNode) -> NodeLogits {
        NodeLogits {
            logits: Vec::new(),
            join_logits: Vec::new(),
            children: tree.fork.as_ref().map_or_else(Vec::new, |f| {
                f.children.iter().map(NodeLogits::skeleton).collect()
            }),
            then: tree
                .then
                .as_ref()
                .map(|t| Box::new(NodeLogits::skeleton(t))),
        }
    }
}

impl TreeNode {
    /// Parses a `NODE`; `origin` names the file in errors. Any `logits` are ignored.
    pub fn parse(value: &Value, origin: &str, limits: TreeLimits) -> Result<TreeNode> {
        parse_node(value, origin, "tree", 0, limits)
    }

    /// Tokens this tree feeds in all (own tokens, re-prefills and `then`s), for sizing.
    pub fn total_tokens(&self) -> usize {
        let mut n = self.tokens.len();
        if let Some(f) = &self.fork {
            for c in &f.children {
                n += c.total_tokens();
                if f.join == JoinKind::Reprefill {
                    n += c.returns.as_ref().map_or(c.total_tokens(), Vec::len);
                }
            }
        }
        n + self.then.as_ref().map_or(0, |t| t.total_tokens())
    }

    /// Number of threads (nodes with their own tokens, `then`s included).
    pub fn num_nodes(&self) -> usize {
        1 + self
            .fork
            .as_ref()
            .map_or(0, |f| f.children.iter().map(TreeNode::num_nodes).sum())
            + self.then.as_ref().map_or(0, |t| t.num_nodes())
    }

    /// A tree without forks holding `tokens`.
    pub fn sequence(tokens: Vec<u32>) -> TreeNode {
        TreeNode {
            tokens,
            returns: None,
            fork: None,
            then: None,
        }
    }

    /// The tree as `NODE` JSON with `logits` (and `join_logits`) from `out`.
    pub fn to_json(&self, out: &NodeLogits) -> Value {
        let mut m = Map::new();
        m.insert("tokens".into(), json!(self.tokens));
        m.insert("logits".into(), json!(out.logits));
        if let Some(r) = &self.returns {
            m.insert("returns".into(), json!(r));
        }
        if let Some(f) = &self.fork {
            let children: Vec<Value> = f
                .children
                .iter()
                .enumerate()
                .map(|(i, c)| c.to_json(out.children.get(i).unwrap_or(&NodeLogits::default())))
                .collect();
            let mut fm = Map::new();
            let join = match f.join {
                JoinKind::Reuse => "reuse",
                JoinKind::Reprefill => "reprefill",
            };
            fm.insert("join".into(), json!(join));
            fm.insert("children".into(), Value::Array(children));
            if f.join == JoinKind::Reprefill {
                fm.insert("join_logits".into(), json!(out.join_logits));
            }
            m.insert("fork".into(), Value::Object(fm));
        }
        if let Some(t) = &self.then {
            let empty = NodeLogits::default();
            let tl = out.then.as_deref().unwrap_or(&empty);
            m.insert("then".into(), t.to_json(tl));
        }
        Value::Object(m)
    }
}

fn err(origin: &str, at: &str, msg: impl std::fmt::Display) -> SpindleError {
    SpindleError::TreeFile {
        path: origin.to_string(),
        msg: format!("{at}: {msg}"),
    }
}

fn parse_tokens(v: &Value, origin: &str, at: &str, vocab: usize) -> Result<Vec<u32>> {
    let arr = v
        .as_array()
        .ok_or_else(|| err(origin, at, "expected an array of token ids"))?;
    arr.iter()
        .enumerate()
        .map(|(i, t)| {
            let id = t.as_u64().ok_or_else(|| {
                err(
                    origin,
                    &format!("{at}[{i}]"),
                    format!("{t} is not a token id"),
                )
            })?;
            if id as usize >= vocab {
                return Err(err(
                    origin,
                    &format!("{at}[{i}]"),
                    format!("token id {id} is past the vocabulary (size {vocab})"),
                ));
            }
            Ok(id as u32)
        })
        .collect()
}

fn parse_node(
    v: &Value,
    origin: &str,
    at: &str,
    depth: usize,
    lim: TreeLimits,
) -> Result<TreeNode> {
    let obj = v
        .as_object()
        .ok_or_else(|| err(origin, at, "expected an object"))?;
    let tokens = match obj.get("tokens") {
        Some(t) => parse_tokens(t, origin, &format!("{at}.tokens"), lim.vocab_size)?,
        None => return Err(err(origin, at, "missing \"tokens\"")),
    };
    let returns = match obj.get("returns") {
        Some(r) => Some(parse_tokens(
            r,
            origin,
            &format!("{at}.returns"),
            lim.vocab_size,
        )?),
        None => None,
    };
    let fork = match obj.get("fork") {
        None | Some(Value::Null) => None,
        Some(f) => {
            let fat = format!("{at}.fork");
            let fo = f
                .as_object()
                .ok_or_else(|| err(origin, &fat, "expected an object"))?;
            let join = match fo.get("join").and_then(Value::as_str) {
                Some("reuse") => JoinKind::Reuse,
                Some("reprefill") => JoinKind::Reprefill,
                Some(other) => {
                    return Err(err(
                        origin,
                        &format!("{fat}.join"),
                        format!("unknown join \"{other}\" (expected \"reuse\" or \"reprefill\")"),
                    ))
                }
                None => return Err(err(origin, &fat, "missing \"join\"")),
            };
            let kids = fo
                .get("children")
                .and_then(Value::as_array)
                .ok_or_else(|| err(origin, &fat, "missing \"children\" array"))?;
            if kids.is_empty() {
                return Err(err(
                    origin,
                    &format!("{fat}.children"),
                    "a fork needs at least one child",
                ));
            }
            if depth + 1 > lim.max_depth {
                return Err(err(
                    origin,
                    &fat,
                    format!(
                        "fork depth {} is over the limit of {}",
                        depth + 1,
                        lim.max_depth
                    ),
                ));
            }
            let children = kids
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    parse_node(c, origin, &format!("{fat}.children[{i}]"), depth + 1, lim)
                })
                .collect::<Result<Vec<_>>>()?;
            Some(Fork { join, children })
        }
    };
    let then = match obj.get("then") {
        None | Some(Value::Null) => None,
        Some(t) => {
            if fork.is_none() {
                return Err(err(origin, at, "\"then\" without a \"fork\""));
            }
            Some(Box::new(parse_node(
                t,
                origin,
                &format!("{at}.then"),
                depth,
                lim,
            )?))
        }
    };
    Ok(TreeNode {
        tokens,
        returns,
        fork,
        then,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIM: TreeLimits = TreeLimits {
        vocab_size: 10,
        max_depth: 2,
    };

    fn parse(s: &str) -> Result<TreeNode> {
        let v: Value = serde_json::from_str(s).expect("test JSON");
        TreeNode::parse(&v, "t.json", LIM)
    }

    #[test]
    fn errors_name_the_problem() {
        let cases = [
            (
                r#"{"tokens":[1,2],"fork":{"join":"reuse","children":[]}}"#,
                "at least one child",
            ),
            (
                r#"{"tokens":[1],"fork":{"join":"merge","children":[{"tokens":[1]}]}}"#,
                "unknown join \"merge\"",
            ),
            (
                r#"{"tokens":[1,12]}"#,
                "tree.tokens[1]: token id 12 is past the vocabulary",
            ),
            (r#"{"tokens":[1,"a"]}"#, "tree.tokens[1]"),
            (
                r#"{"tokens":[1],"then":{"tokens":[2]}}"#,
                "without a \"fork\"",
            ),
            (
                r#"{"tokens":[1],"fork":{"join":"reuse","children":[{"tokens":[1],"fork":{"join":"reuse","children":[{"tokens":[2],"fork":{"join":"reuse","children":[{"tokens":[3]}]}}]}}]}}"#,
                "over the limit of 2",
            ),
        ];
        for (text, want) in cases {
            let e = parse(text).expect_err(text).to_string();
            assert!(e.contains(want), "{e:?} should contain {want:?}");
            assert!(e.starts_with("t.json: "), "{e}");
        }
    }

    #[test]
    fn forks_as_deep_as_the_limit_parse() {
        // Two nested forks with max_depth 2: at the limit, not over it.
        let t = parse(r#"{"tokens":[1],"fork":{"join":"reuse","children":[{"tokens":[2],"fork":{"join":"reuse","children":[{"tokens":[3]}]}}]}}"#)
            .expect("depth 2 is within the limit of 2");
        assert_eq!(t.num_nodes(), 3);
    }

    #[test]
    fn to_json_writes_the_tree_back_with_its_logits() {
        let text = r#"{"tokens":[1,2],"fork":{"join":"reprefill","children":[{"tokens":[3],"fork":{"join":"reuse","children":[{"tokens":[8]}]}},{"tokens":[4,5],"returns":[6]}]},"then":{"tokens":[7]}}"#;
        let t = parse(text).expect("valid");
        let row = |x: f32| vec![x, x + 0.5];
        let mut out = NodeLogits::skeleton(&t);
        assert_eq!(out.children.len(), 2);
        assert_eq!(out.children[0].children.len(), 1);
        assert!(out.children[1].children.is_empty());
        assert!(out.then.is_some());
        out.logits = vec![row(1.0), row(2.0)];
        out.join_logits = vec![row(9.0)];
        out.children[0].logits = vec![row(3.0)];
        out.children[0].join_logits = vec![row(-1.0)];
        out.children[0].children[0].logits = vec![row(8.0)];
        out.children[1].logits = vec![row(4.0), row(5.0)];
        out.then.as_mut().expect("then").logits = vec![row(7.0)];
        let v = t.to_json(&out);
        // It parses back to the same tree.
        assert_eq!(TreeNode::parse(&v, "back", LIM).expect("parses back"), t);
        assert_eq!(v["logits"], json!([[1.0, 1.5], [2.0, 2.5]]));
        assert_eq!(v["returns"], Value::Null);
        let fork = &v["fork"];
        assert_eq!(fork["join"], "reprefill");
        assert_eq!(fork["join_logits"], json!([[9.0, 9.5]]));
        let kids = fork["children"].as_array().expect("children");
        assert_eq!(kids[0]["logits"], json!([[3.0, 3.5]]));
        // A reuse join has no join logits to write.
        assert_eq!(kids[0]["fork"]["join"], "reuse");
        assert!(kids[0]["fork"].get("join_logits").is_none());
        assert_eq!(
            kids[0]["fork"]["children"][0]["logits"],
            json!([[8.0, 8.5]])
        );
        assert_eq!(kids[1]["logits"], json!([[4.0, 4.5], [5.0, 5.5]]));
        assert_eq!(kids[1]["returns"], json!([6]));
        assert_eq!(v["then"]["tokens"], json!([7]));
        assert_eq!(v["then"]["logits"], json!([[7.0, 7.5]]));
    }

    #[test]
    fn counts_tokens_and_nodes() {
        let t = parse(r#"{"tokens":[1,2],"fork":{"join":"reprefill","children":[{"tokens":[3]},{"tokens":[4,5],"returns":[6]}]},"then":{"tokens":[7]}}"#)
            .expect("valid");
        assert_eq!(t.total_tokens(), 2 + 1 + 2 + 1 + 1 + 1);
        assert_eq!(t.num_nodes(), 4);
    }
}
