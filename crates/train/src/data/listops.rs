//! ListOps (Nangia & Bowman 2018) as in the Long Range Arena: a seeded generator equivalent to
//! LRA's `lra_benchmarks/data/listops.py`, a reader of LRA's TSV files, and evaluation.
//!
//! Generator (LRA defaults): operators MAX, MIN, MED (median, truncated), SM (sum mod 10);
//! values 0–9; a node below `max_depth` is a leaf with probability 0.75, otherwise an operator
//! with 2..=`max_args` children; trees are kept when `min_length < length < max_length`
//! (length counts operators, values and closing brackets) and are unique. LRA draws 100k
//! unique trees with no seed and splits 96k/2k/2k; we draw them from a seed.

use std::collections::HashSet;

use crate::rng::DataRng;

/// An operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// Maximum.
    Max,
    /// Minimum.
    Min,
    /// Median (the mean of the two middle values for an even count, truncated).
    Med,
    /// Sum modulo 10.
    Sm,
}

impl Op {
    const ALL: [Op; 4] = [Op::Min, Op::Max, Op::Med, Op::Sm];

    /// The token, as in LRA's files.
    pub fn token(self) -> &'static str {
        match self {
            Op::Max => "[MAX",
            Op::Min => "[MIN",
            Op::Med => "[MED",
            Op::Sm => "[SM",
        }
    }

    fn apply(self, args: &[u8]) -> u8 {
        match self {
            Op::Max => *args.iter().max().expect("an operator has arguments"),
            Op::Min => *args.iter().min().expect("an operator has arguments"),
            Op::Sm => (args.iter().map(|&a| a as u32).sum::<u32>() % 10) as u8,
            Op::Med => {
                let mut s = args.to_vec();
                s.sort_unstable();
                let n = s.len();
                if n % 2 == 1 {
                    s[n / 2]
                } else {
                    // numpy's median of ints is a float; LRA takes int() of it (truncation).
                    ((s[n / 2 - 1] as u32 + s[n / 2] as u32) / 2) as u8
                }
            }
        }
    }
}

/// A ListOps expression.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Tree {
    /// A digit.
    Value(u8),
    /// An operator applied to its arguments.
    Node(Op, Vec<Tree>),
}

impl Tree {
    /// The value of the expression (0–9).
    pub fn evaluate(&self) -> u8 {
        match self {
            Tree::Value(v) => *v,
            Tree::Node(op, args) => {
                let values: Vec<u8> = args.iter().map(Tree::evaluate).collect();
                op.apply(&values)
            }
        }
    }

    /// The tokens: operators, digits and `]`.
    pub fn tokens(&self) -> Vec<String> {
        let mut out = Vec::new();
        self.push_tokens(&mut out);
        out
    }

    fn push_tokens(&self, out: &mut Vec<String>) {
        match self {
            Tree::Value(v) => out.push(v.to_string()),
            Tree::Node(op, args) => {
                out.push(op.token().to_string());
                for a in args {
                    a.push_tokens(out);
                }
                out.push("]".to_string());
            }
        }
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        match self {
            Tree::Value(_) => 1,
            Tree::Node(_, args) => 2 + args.iter().map(Tree::len).sum::<usize>(),
        }
    }

    /// Whether the tree has no tokens (never: a value is one token).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// LRA's source string: every tuple of the Python tree wrapped in parentheses, e.g.
    /// `( ( ( [MAX 2 ) 9 ) ] )`.
    pub fn lra_source(&self) -> String {
        match self {
            Tree::Value(v) => v.to_string(),
            Tree::Node(op, args) => {
                let mut t = format!("( {} {} )", op.token(), args[0].lra_source());
                for a in &args[1..] {
                    t = format!("( {t} {} )", a.lra_source());
                }
                format!("( {t} ] )")
            }
        }
    }
}

/// Generator settings (LRA defaults).
#[derive(Clone, Debug, PartialEq)]
pub struct ListOpsSettings {
    /// Maximum depth of the tree (LRA: 10).
    pub max_depth: usize,
    /// Maximum arguments of an operator (LRA: 10).
    pub max_args: usize,
    /// Lengths must exceed this (LRA: 500).
    pub min_length: usize,
    /// Lengths must stay below this (LRA: 2000).
    pub max_length: usize,
    /// Training examples (LRA: 96,000).
    pub train: usize,
    /// Validation examples (LRA: 2,000).
    pub valid: usize,
    /// Test examples (LRA: 2,000).
    pub test: usize,
    /// Seed.
    pub seed: u64,
}

impl Default for ListOpsSettings {
    fn default() -> Self {
        Self {
            max_depth: 10,
            max_args: 10,
            min_length: 500,
            max_length: 2000,
            train: 96_000,
            valid: 2_000,
            test: 2_000,
            seed: 0,
        }
    }
}

/// One example: tokens and the answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListOpsExample {
    /// Tokens (operators, digits, `]`).
    pub tokens: Vec<String>,
    /// The value, 0–9.
    pub label: u8,
}

fn generate_tree(depth: usize, s: &ListOpsSettings, rng: &mut DataRng) -> Tree {
    let r = if depth < s.max_depth {
        rng.uniform()
    } else {
        1.0
    };
    if r > 0.25 {
        Tree::Value(rng.below(10) as u8)
    } else {
        let n = 2 + rng.below(s.max_args.max(2) - 1); // randint(2, max_args) inclusive
        let args = (0..n).map(|_| generate_tree(depth + 1, s, rng)).collect();
        Tree::Node(Op::ALL[rng.below(4)], args)
    }
}

/// Generates unique trees and splits them into (train, valid, test), like LRA.
///
/// # Errors
/// If the length window is empty or cannot produce enough unique trees in a reasonable number
/// of draws (the message names the settings).
pub fn generate(s: &ListOpsSettings) -> Result<[Vec<ListOpsExample>; 3], String> {
    if s.min_length + 1 >= s.max_length {
        return Err(format!(
            "listops: min_length {} and max_length {} leave no length (lengths must satisfy min < len < max)",
            s.min_length, s.max_length
        ));
    }
    if s.max_args < 2 || s.max_depth < 1 {
        return Err("listops: max_args must be at least 2 and max_depth at least 1".into());
    }
    let total = s.train + s.valid + s.test;
    let mut rng = DataRng::new(s.seed);
    let mut seen = HashSet::with_capacity(total);
    let mut trees = Vec::with_capacity(total);
    let mut draws: u64 = 0;
    let budget = 1_000_000 + 5_000 * total as u64;
    while trees.len() < total {
        draws += 1;
        if draws > budget {
            return Err(format!(
                "listops: only {} unique trees with {} < length < {} after {draws} draws; widen the length window or lower max_depth",
                trees.len(),
                s.min_length,
                s.max_length
            ));
        }
        let tree = generate_tree(1, s, &mut rng);
        let len = tree.len();
        if len > s.min_length && len < s.max_length && seen.insert(tree.clone()) {
            trees.push(tree);
        }
    }
    let examples: Vec<ListOpsExample> = trees
        .into_iter()
        .map(|t| ListOpsExample {
            label: t.evaluate(),
            tokens: t.tokens(),
        })
        .collect();
    let mut it = examples.into_iter();
    let train = it.by_ref().take(s.train).collect();
    let valid = it.by_ref().take(s.valid).collect();
    let test = it.collect();
    Ok([train, valid, test])
}

/// Parses one line of LRA's `basic_*.tsv` (`Source\tTarget`): parentheses are dropped and `]`
/// kept as the closing token (LRA's pipeline maps it to `X`; the vocabulary is the same).
///
/// # Errors
/// If the line has no tab or the target is not a digit.
pub fn parse_tsv_line(line: &str) -> Result<ListOpsExample, String> {
    let (source, target) = line
        .rsplit_once('\t')
        .ok_or_else(|| "expected `Source<TAB>Target`".to_string())?;
    let label: u8 = target
        .trim()
        .parse()
        .ok()
        .filter(|v: &u8| *v < 10)
        .ok_or_else(|| format!("target `{}` is not a digit 0-9", target.trim()))?;
    let tokens = source
        .split_whitespace()
        .filter(|t| *t != "(" && *t != ")")
        .map(|t| {
            if t == "X" {
                "]".to_string()
            } else {
                t.to_string()
            }
        })
        .collect();
    Ok(ListOpsExample { tokens, label })
}

/// The vocabulary: index 0 is padding, 1 the CLS token, then operators, digits and `]`.
pub const VOCAB: [&str; 17] = [
    "<pad>", "<cls>", "[MIN", "[MAX", "[MED", "[SM", "0", "1", "2", "3", "4", "5", "6", "7", "8",
    "9", "]",
];

/// The id of a token.
///
/// # Errors
/// For a token outside the ListOps vocabulary.
pub fn token_id(token: &str) -> Result<u32, String> {
    VOCAB
        .iter()
        .position(|v| *v == token)
        .map(|i| i as u32)
        .ok_or_else(|| format!("`{token}` is not a ListOps token"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operators_follow_lra() {
        let t = Tree::Node(
            Op::Max,
            vec![
                Tree::Value(2),
                Tree::Node(Op::Med, vec![Tree::Value(3), Tree::Value(8)]),
                Tree::Node(Op::Sm, vec![Tree::Value(7), Tree::Value(6)]),
            ],
        );
        // MED(3, 8) = int(5.5) = 5; SM(7, 6) = 3; MAX(2, 5, 3) = 5
        assert_eq!(t.evaluate(), 5);
        assert_eq!(t.tokens().join(" "), "[MAX 2 [MED 3 8 ] [SM 7 6 ] ]");
        assert_eq!(t.len(), 11);
        let line = format!("{}\t{}", t.lra_source(), t.evaluate());
        let parsed = parse_tsv_line(&line).unwrap();
        assert_eq!(parsed.tokens, t.tokens());
        assert_eq!(parsed.label, 5);
        assert_eq!(
            Tree::Node(Op::Max, vec![Tree::Value(2), Tree::Value(9)]).lra_source(),
            "( ( ( [MAX 2 ) 9 ) ] )"
        );
    }

    #[test]
    fn generator_is_seeded_unique_and_respects_lengths() {
        let s = ListOpsSettings {
            min_length: 10,
            max_length: 40,
            train: 200,
            valid: 20,
            test: 20,
            ..Default::default()
        };
        let [a, b, c] = generate(&s).unwrap();
        assert_eq!((a.len(), b.len(), c.len()), (200, 20, 20));
        assert!(
            a.iter()
                .chain(&b)
                .chain(&c)
                .all(|e| e.tokens.len() > 10 && e.tokens.len() < 40)
        );
        let again = generate(&s).unwrap();
        assert_eq!(again[0], a);
        let unique: HashSet<Vec<String>> = a
            .iter()
            .chain(&b)
            .chain(&c)
            .map(|e| e.tokens.clone())
            .collect();
        assert_eq!(unique.len(), 240);
        for e in &a {
            assert!(e.tokens.iter().all(|t| token_id(t).is_ok()));
        }
    }

    #[test]
    fn an_impossible_window_is_an_error() {
        let s = ListOpsSettings {
            min_length: 5,
            max_length: 6,
            ..Default::default()
        };
        assert!(generate(&s).unwrap_err().contains("no length"));
    }
}
