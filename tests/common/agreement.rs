//! Agreement of two sets of logit rows (a backend under test against a reference): the
//! largest difference, each row's scale, and top-1 agreement with the reference's top-2 gap
//! of every row that disagrees.

use serde_json::Value;
use spindle::replay::tree_file::NodeLogits;

/// What one compared row showed.
#[derive(Debug, Clone, Copy)]
pub struct RowStat {
    /// Largest |got - want| in the row.
    pub max_abs: f32,
    /// Root mean square of the reference row (its scale).
    pub rms: f32,
    /// The reference's top-2 gap when the top-1 tokens differ.
    pub miss_gap: Option<f32>,
}

/// How far a row may be from its reference.
#[derive(Debug, Clone, Copy)]
pub enum Bound {
    /// At most this |difference| anywhere.
    Abs(f32),
    /// At most this fraction of the reference row's RMS.
    RowRms(f32),
}

impl Bound {
    fn of(self, row: &RowStat) -> f32 {
        match self {
            Bound::Abs(x) => x,
            Bound::RowRms(f) => f * row.rms,
        }
    }
}

/// Rows compared so far.
#[derive(Debug, Default, Clone)]
pub struct Agreement {
    pub rows: Vec<RowStat>,
}

/// Index of the largest value (the first among ties).
fn top(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &x)| {
            if x > bv {
                (i, x)
            } else {
                (bi, bv)
            }
        })
        .0
}

impl Agreement {
    pub fn add_row(&mut self, got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len(), "vocab size");
        let max_abs = got
            .iter()
            .zip(want)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        let rms = (want.iter().map(|x| x * x).sum::<f32>() / want.len().max(1) as f32).sqrt();
        let miss_gap = (top(got) != top(want)).then(|| {
            let mut sorted = want.to_vec();
            sorted.sort_by(|a, b| b.total_cmp(a));
            sorted[0] - sorted.get(1).copied().unwrap_or(sorted[0])
        });
        self.rows.push(RowStat {
            max_abs,
            rms,
            miss_gap,
        });
    }

    pub fn add_rows(&mut self, got: &[Vec<f32>], want: &Value, what: &str) {
        let want = want
            .as_array()
            .unwrap_or_else(|| panic!("{what}: reference logits missing"));
        assert_eq!(got.len(), want.len(), "{what}: number of logit rows");
        for (g, w) in got.iter().zip(want) {
            let w: Vec<f32> = w
                .as_array()
                .expect("row")
                .iter()
                .map(|x| x.as_f64().expect("float") as f32)
                .collect();
            self.add_row(g, &w);
        }
    }

    /// Every logit row of a tree (logits, join logits, children, then).
    pub fn add_tree(&mut self, got: &NodeLogits, want: &Value, what: &str) {
        self.add_rows(&got.logits, &want["logits"], what);
        if let Some(fork) = want.get("fork") {
            if fork["join"] == "reprefill" {
                self.add_rows(&got.join_logits, &fork["join_logits"], what);
            }
            let kids = fork["children"].as_array().expect("children");
            assert_eq!(got.children.len(), kids.len(), "{what}: children");
            for (i, (g, w)) in got.children.iter().zip(kids).enumerate() {
                self.add_tree(g, w, &format!("{what}.children[{i}]"));
            }
        }
        if let Some(then) = want.get("then") {
            let g = got.then.as_deref().expect("then logits");
            self.add_tree(g, then, &format!("{what}.then"));
        }
    }

    /// Largest |difference| over all rows.
    pub fn max_abs(&self) -> f32 {
        self.rows.iter().fold(0.0, |m, r| m.max(r.max_abs))
    }

    /// Fraction of rows whose top-1 token agrees.
    pub fn top1(&self) -> f64 {
        let same = self.rows.iter().filter(|r| r.miss_gap.is_none()).count();
        same as f64 / self.rows.len().max(1) as f64
    }

    /// Asserts every row within `bound`, top-1 agreement >= `top1`, and agreement on every
    /// row whose reference top-2 gap exceeds twice the row's bound (two rows that may each
    /// move by the bound can swap only a pair closer than that; a flip past it is a bug).
    pub fn check(&self, what: &str, bound: Bound, top1: f64) {
        let worst = self
            .rows
            .iter()
            .fold(0.0f32, |m, r| m.max(r.max_abs / Bound::of(bound, r)));
        let gaps: Vec<f32> = self.rows.iter().filter_map(|r| r.miss_gap).collect();
        println!(
            "{what}: {} rows, max |diff| {:.4}, worst row at {:.2} of its bound {bound:?}, top-1 agreement {:.1}% (misses' reference gaps {gaps:?})",
            self.rows.len(),
            self.max_abs(),
            worst,
            100.0 * self.top1(),
        );
        assert!(!self.rows.is_empty(), "{what}: no rows compared");
        for (i, r) in self.rows.iter().enumerate() {
            let b = bound.of(r);
            assert!(
                r.max_abs <= b,
                "{what}: row {i}: max |diff| {} > {b} ({bound:?}, row rms {})",
                r.max_abs,
                r.rms
            );
            if let Some(gap) = r.miss_gap {
                assert!(
                    gap <= 2.0 * b,
                    "{what}: row {i}: top-1 differs although the reference's top-2 gap {gap} exceeds twice the bound {b}"
                );
            }
        }
        assert!(
            self.top1() >= top1,
            "{what}: top-1 agreement {:.3} < {top1}",
            self.top1()
        );
    }
}
