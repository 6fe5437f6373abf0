//! Chunking long transcripts on utterance boundaries to a token budget,
//! keeping the speaker labels. Pure: token counts come from the caller.

use recap_job::Utterance;
use std::ops::Range;

/// Splits an utterance whose text alone exceeds `budget` tokens into
/// pieces at word boundaries, each carrying the speaker. `count` counts the
/// tokens of a rendered line. Utterances within budget come back as is.
pub fn split_oversize(
    utterances: &[Utterance],
    budget: usize,
    count: &dyn Fn(&str) -> usize,
) -> Vec<Utterance> {
    let mut out = Vec::with_capacity(utterances.len());
    for u in utterances {
        if count(&u.line()) <= budget {
            out.push(u.clone());
            continue;
        }
        let mut piece = String::new();
        for word in u.text.split_whitespace() {
            let candidate = if piece.is_empty() {
                word.to_string()
            } else {
                format!("{piece} {word}")
            };
            let line = Utterance {
                text: candidate.clone(),
                ..u.clone()
            }
            .line();
            if count(&line) > budget && !piece.is_empty() {
                out.push(Utterance {
                    text: std::mem::take(&mut piece),
                    ..u.clone()
                });
                piece = word.to_string();
            } else {
                piece = candidate;
            }
        }
        if !piece.is_empty() {
            out.push(Utterance {
                text: piece,
                ..u.clone()
            });
        }
    }
    out
}

/// Packs consecutive items into chunks whose summed cost (each item's
/// tokens plus `separator` between items) stays within `budget`. Every item
/// lands in exactly one chunk, in order. An item over budget by itself gets
/// a chunk of its own (callers split those first with [`split_oversize`]).
pub fn pack(costs: &[usize], budget: usize, separator: usize) -> Vec<Range<usize>> {
    let mut chunks = Vec::new();
    let mut start = 0;
    let mut used = 0;
    for (i, &c) in costs.iter().enumerate() {
        let add = if i == start { c } else { c + separator };
        if i > start && used + add > budget {
            chunks.push(start..i);
            start = i;
            used = c;
        } else {
            used += add;
        }
    }
    if start < costs.len() {
        chunks.push(start..costs.len());
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn words(s: &str) -> usize {
        s.split_whitespace().count()
    }

    #[test]
    fn small_transcripts_are_one_chunk() {
        assert_eq!(pack(&[3, 4, 5], 100, 1), vec![0..3]);
        assert_eq!(pack(&[], 10, 1), Vec::<Range<usize>>::new());
    }

    #[test]
    fn packs_to_the_budget() {
        assert_eq!(pack(&[4, 4, 4, 4], 9, 1), vec![0..2, 2..4]);
        assert_eq!(pack(&[10, 1], 5, 0), vec![0..1, 1..2]);
    }

    #[test]
    fn oversize_utterances_split_with_their_speaker() {
        let u = vec![Utterance {
            speaker: Some("Ann".into()),
            start_s: None,
            end_s: None,
            text: "a b c d e f g h".into(),
        }];
        let out = split_oversize(&u, 4, &words);
        assert!(out.len() > 1);
        assert!(out
            .iter()
            .all(|p| p.speaker.as_deref() == Some("Ann") && words(&p.line()) <= 4));
        let joined: Vec<&str> = out.iter().flat_map(|p| p.text.split_whitespace()).collect();
        assert_eq!(joined.join(" "), "a b c d e f g h");
    }

    proptest! {
        #[test]
        fn every_item_in_exactly_one_chunk_in_order_within_budget(
            costs in proptest::collection::vec(1usize..50, 0..200),
            budget in 50usize..400,
            sep in 0usize..3,
        ) {
            let chunks = pack(&costs, budget, sep);
            let mut next = 0;
            for r in &chunks {
                prop_assert_eq!(r.start, next);
                prop_assert!(r.end > r.start);
                next = r.end;
                let cost: usize = costs[r.clone()].iter().sum::<usize>() + sep * (r.len() - 1);
                prop_assert!(cost <= budget, "chunk {:?} costs {} > {}", r, cost, budget);
            }
            prop_assert_eq!(next, costs.len());
        }

        #[test]
        fn split_keeps_every_word_and_the_budget(
            texts in proptest::collection::vec("[a-z]{1,6}( [a-z]{1,6}){0,30}", 1..20),
            budget in 3usize..12,
        ) {
            let us: Vec<Utterance> = texts.iter().map(|t| Utterance { speaker: Some("S".into()), start_s: None, end_s: None, text: t.clone() }).collect();
            let out = split_oversize(&us, budget, &words);
            let before: Vec<&str> = us.iter().flat_map(|u| u.text.split_whitespace()).collect();
            let after: Vec<&str> = out.iter().flat_map(|u| u.text.split_whitespace()).collect();
            prop_assert_eq!(before, after);
            prop_assert!(out.iter().all(|u| words(&u.line()) <= budget));
        }
    }
}
