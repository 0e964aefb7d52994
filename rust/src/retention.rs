//! Which checkpoints a retention policy deletes.
//!
//! The keep set is the union of: the newest valid checkpoint (always, whatever the
//! policy), the `keep_last_n` newest valid ones, the valid milestones
//! (`batch_idx % keep_every == 0`) and the `keep_best_n` valid ones with the best
//! loss. Invalid checkpoints never take a slot; they are deleted only with
//! `delete_invalid`. "Newer" orders by batch index, then by position in the input.

use std::cmp::Ordering;

use crate::error::{Error, Result};

/// A retention policy.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    /// Keep this many newest valid checkpoints; `None` keeps every valid one.
    pub keep_last_n: Option<usize>,
    /// Keep every valid checkpoint whose batch index is a multiple of this (>= 1).
    pub keep_every: Option<u64>,
    /// Keep this many valid checkpoints with the lowest loss (highest when
    /// `maximize`). A NaN loss never counts as best; ties go to the newer one.
    pub keep_best_n: usize,
    pub maximize: bool,
    /// Delete invalid checkpoints (else they are left alone).
    pub delete_invalid: bool,
}

/// One candidate: `(batch_idx, valid, loss)`.
pub type Candidate = (u64, bool, f64);

/// Indices of the candidates that `policy` deletes, sorted ascending.
pub fn plan(candidates: &[Candidate], policy: &Policy) -> Result<Vec<usize>> {
    if policy.keep_every == Some(0) {
        return Err(Error::invalid("keep_every must be at least 1"));
    }
    // Valid candidates, newest first.
    let mut valid: Vec<usize> = (0..candidates.len()).filter(|&i| candidates[i].1).collect();
    valid.sort_by(|&a, &b| (candidates[b].0, b).cmp(&(candidates[a].0, a)));

    let mut keep = vec![false; candidates.len()];
    let last_n = policy.keep_last_n.unwrap_or(usize::MAX).max(1);
    for &i in valid.iter().take(last_n) {
        keep[i] = true;
    }
    if let Some(k) = policy.keep_every {
        for &i in &valid {
            if candidates[i].0.is_multiple_of(k) {
                keep[i] = true;
            }
        }
    }
    if policy.keep_best_n > 0 {
        let mut ranked: Vec<usize> = valid
            .iter()
            .copied()
            .filter(|&i| !candidates[i].2.is_nan())
            .collect();
        // `valid` is newest first and the sort is stable, so ties go to the newer.
        ranked.sort_by(|&a, &b| {
            let (la, lb) = (candidates[a].2, candidates[b].2);
            let o = la.partial_cmp(&lb).unwrap_or(Ordering::Equal);
            if policy.maximize {
                o.reverse()
            } else {
                o
            }
        });
        for &i in ranked.iter().take(policy.keep_best_n) {
            keep[i] = true;
        }
    }
    Ok((0..candidates.len())
        .filter(|&i| !keep[i] && (candidates[i].1 || policy.delete_invalid))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn last(n: Option<usize>) -> Policy {
        Policy {
            keep_last_n: n,
            ..Policy::default()
        }
    }

    #[test]
    fn keep_last_n_counts_only_valid() {
        let c = [
            (1, true, 0.0),
            (2, true, 0.0),
            (3, false, 0.0),
            (4, false, 0.0),
            (5, true, 0.0),
        ];
        assert_eq!(plan(&c, &last(Some(2))).unwrap(), vec![0]);
        assert_eq!(plan(&c, &last(Some(1))).unwrap(), vec![0, 1]);
        assert_eq!(plan(&c, &last(Some(0))).unwrap(), vec![0, 1]);
        assert_eq!(plan(&c, &last(None)).unwrap(), Vec::<usize>::new());
        let p = Policy {
            keep_last_n: Some(1),
            delete_invalid: true,
            ..Policy::default()
        };
        assert_eq!(plan(&c, &p).unwrap(), vec![0, 1, 2, 3]);
    }

    #[test]
    fn newest_valid_survives_even_when_invalid_are_newer() {
        let c = [(1, true, 0.0), (2, false, 0.0), (3, false, 0.0)];
        let p = Policy {
            keep_last_n: Some(0),
            delete_invalid: true,
            ..Policy::default()
        };
        assert_eq!(plan(&c, &p).unwrap(), vec![1, 2]);
    }

    #[test]
    fn milestones_and_best() {
        let c: Vec<Candidate> = (1..=10)
            .map(|b| (b, true, (b as f64 - 4.0).abs()))
            .collect();
        let p = Policy {
            keep_last_n: Some(2),
            keep_every: Some(5),
            keep_best_n: 1,
            ..Policy::default()
        };
        // keep 10, 9 (last), 5, 10 (milestones), 4 (best loss 0)
        assert_eq!(plan(&c, &p).unwrap(), vec![0, 1, 2, 5, 6, 7]);
        let p = Policy {
            keep_last_n: Some(1),
            keep_best_n: 2,
            maximize: true,
            ..Policy::default()
        };
        // highest losses: batch 10 (6), batch 9 (5); last: 10
        assert_eq!(plan(&c, &p).unwrap(), vec![0, 1, 2, 3, 4, 5, 6, 7]);
        assert!(plan(
            &c,
            &Policy {
                keep_every: Some(0),
                ..Policy::default()
            }
        )
        .is_err());
    }

    #[test]
    fn best_ignores_nan_and_breaks_ties_by_newer() {
        let c = [
            (1, true, 1.0),
            (2, true, f64::NAN),
            (3, true, 1.0),
            (4, true, 5.0),
        ];
        let p = Policy {
            keep_last_n: Some(0),
            keep_best_n: 1,
            ..Policy::default()
        };
        // newest (4) always; best: batch 3 (tie with 1, newer wins)
        assert_eq!(plan(&c, &p).unwrap(), vec![0, 1]);
        let p = Policy {
            keep_best_n: 3,
            ..p
        };
        // NaN never counts: 1, 3, 4 kept
        assert_eq!(plan(&c, &p).unwrap(), vec![1]);
        let c = [(7, true, 1.0), (7, true, 1.0)];
        // Same batch: the later index is newer.
        assert_eq!(plan(&c, &last(Some(1))).unwrap(), vec![0]);
    }

    fn candidates() -> impl Strategy<Value = Vec<Candidate>> {
        proptest::collection::vec(
            (
                0u64..30,
                any::<bool>(),
                prop_oneof![Just(f64::NAN), Just(f64::INFINITY), -5.0f64..5.0, Just(1.0)],
            ),
            0..25,
        )
    }

    fn policy() -> impl Strategy<Value = Policy> {
        (
            proptest::option::of(0usize..6),
            proptest::option::of(1u64..7),
            0usize..4,
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(
                |(keep_last_n, keep_every, keep_best_n, maximize, delete_invalid)| Policy {
                    keep_last_n,
                    keep_every,
                    keep_best_n,
                    maximize,
                    delete_invalid,
                },
            )
    }

    proptest! {
        #[test]
        fn invariants(c in candidates(), p in policy()) {
            let del = plan(&c, &p).unwrap();
            prop_assert!(del.windows(2).all(|w| w[0] < w[1]));
            prop_assert!(del.iter().all(|&i| i < c.len()));
            let deleted = |i: usize| del.binary_search(&i).is_ok();
            let valid: Vec<usize> = (0..c.len()).filter(|&i| c[i].1).collect();
            // The newest valid one is never deleted.
            if let Some(&newest) = valid.iter().max_by_key(|&&i| (c[i].0, i)) {
                prop_assert!(!deleted(newest));
            }
            // Never deletes a valid one while fewer than keep_last_n valid ones remain:
            // at least min(n, #valid) valid ones survive.
            let kept_valid = valid.iter().filter(|&&i| !deleted(i)).count();
            let n = p.keep_last_n.unwrap_or(usize::MAX).max(1);
            prop_assert!(kept_valid >= n.min(valid.len()));
            // The keep_last_n newest valid ones survive whatever the invalid ones are.
            let mut newest_first = valid.clone();
            newest_first.sort_by_key(|&i| std::cmp::Reverse((c[i].0, i)));
            for &i in newest_first.iter().take(n) {
                prop_assert!(!deleted(i));
            }
            // Invalid ones are deleted only with delete_invalid, and then all of them.
            for i in (0..c.len()).filter(|&i| !c[i].1) {
                prop_assert_eq!(deleted(i), p.delete_invalid);
            }
            // Milestones survive.
            if let Some(k) = p.keep_every {
                for &i in &valid {
                    if c[i].0 % k == 0 {
                        prop_assert!(!deleted(i));
                    }
                }
            }
            // The keep_best_n best (NaN excluded, ties to the newer) survive.
            let mut ranked: Vec<usize> = valid.iter().copied().filter(|&i| !c[i].2.is_nan()).collect();
            ranked.sort_by(|&a, &b| {
                let o = c[a].2.partial_cmp(&c[b].2).unwrap();
                let o = if p.maximize { o.reverse() } else { o };
                o.then((c[b].0, b).cmp(&(c[a].0, a)))
            });
            for &i in ranked.iter().take(p.keep_best_n) {
                prop_assert!(!deleted(i));
            }
            // Deleted and kept are disjoint: everything deleted is outside the union
            // of the keep rules.
            for &i in &del {
                let in_last = newest_first.iter().take(n).any(|&j| j == i);
                let milestone = c[i].1 && p.keep_every.is_some_and(|k| c[i].0 % k == 0);
                let best = ranked.iter().take(p.keep_best_n).any(|&j| j == i);
                prop_assert!(!in_last && !milestone && !best);
            }
            // With no limit on the newest and nothing invalid to delete: nothing goes.
            if p.keep_last_n.is_none() && !p.delete_invalid {
                prop_assert!(del.is_empty());
            }
        }

        /// Invalid candidates never occupy a slot: adding invalid ones does not change
        /// which valid ones are deleted.
        #[test]
        fn invalid_ones_take_no_slot(c in candidates(), p in policy()) {
            let only_valid: Vec<usize> = (0..c.len()).filter(|&i| c[i].1).collect();
            let sub: Vec<Candidate> = only_valid.iter().map(|&i| c[i]).collect();
            let del_all = plan(&c, &p).unwrap();
            let del_sub: Vec<usize> = plan(&sub, &p).unwrap().into_iter().map(|j| only_valid[j]).collect();
            let del_valid: Vec<usize> = del_all.into_iter().filter(|&i| c[i].1).collect();
            prop_assert_eq!(del_valid, del_sub);
        }
    }
}
