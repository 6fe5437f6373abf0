//! How much of a summary is copied from its transcript: the share of the
//! output's sentences that hold a run of [`RUN`] or more words found
//! verbatim (case and punctuation aside) in the transcript. Pure.

use std::collections::HashSet;

/// Words in a row that make a sentence a copy.
pub const RUN: usize = 8;

fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric() && c != '\'')
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// Sentences of a summary: split at `.`, `!`, `?` and line ends; list
/// markers and blanks dropped.
pub fn sentences(text: &str) -> Vec<&str> {
    text.split(['.', '!', '?', '\n'])
        .map(|s| s.trim().trim_start_matches(['-', '*', '•']).trim())
        .filter(|s| !s.is_empty())
        .collect()
}

/// A transcript's runs of [`RUN`] words, built once and asked of every
/// output made from it (a job's kinds, an eval's routers).
pub struct Source {
    runs: HashSet<Vec<String>>,
}

impl Source {
    pub fn new(transcript: &str) -> Source {
        Source {
            runs: words(transcript)
                .windows(RUN)
                .map(<[String]>::to_vec)
                .collect(),
        }
    }

    /// The share of `output`'s sentences copied from the transcript, in
    /// [0, 1]; 0 for an output without sentences.
    pub fn rate(&self, output: &str) -> f64 {
        let sents = sentences(output);
        if sents.is_empty() {
            return 0.0;
        }
        let copied = sents
            .iter()
            .filter(|s| words(s).windows(RUN).any(|w| self.runs.contains(w)))
            .count();
        copied as f64 / sents.len() as f64
    }
}

/// The share of `output`'s sentences copied from `transcript`, in [0, 1];
/// 0 for an output without sentences.
pub fn copy_rate(output: &str, transcript: &str) -> f64 {
    Source::new(transcript).rate(output)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T: &str = "Alice: I think we should move the launch to the second week of March because QA needs time.\nBob: Fine by me.";

    #[test]
    fn a_copied_line_counts_and_a_paraphrase_does_not() {
        let copied = "We should move the launch to the second week of March. Bob agreed.";
        assert!((copy_rate(copied, T) - 0.5).abs() < 1e-12);
        let para = "Alice proposed delaying the launch to March for QA. Bob agreed.";
        assert_eq!(copy_rate(para, T), 0.0);
        // Case and punctuation do not hide a copy.
        let shouted = "- WE SHOULD MOVE THE LAUNCH, TO THE SECOND WEEK OF MARCH";
        assert_eq!(copy_rate(shouted, T), 1.0);
        // Seven words in a row are not yet a copy.
        assert_eq!(copy_rate("move the launch to the second week.", T), 0.0);
        assert_eq!(copy_rate("", T), 0.0);
        assert_eq!(copy_rate("anything at all here", "short"), 0.0);
        // One source answers for many outputs as each call would.
        let source = Source::new(T);
        for out in [copied, para, shouted, ""] {
            assert_eq!(source.rate(out), copy_rate(out, T));
        }
    }

    proptest! {
        #[test]
        fn the_rate_is_a_share_and_a_transcript_copies_itself(
            ws in proptest::collection::vec("[a-z]{1,6}", 8..40),
            other in "[A-Z ]{0,60}",
        ) {
            let transcript = ws.join(" ");
            prop_assert_eq!(copy_rate(&transcript, &transcript), 1.0);
            let r = copy_rate(&other, &transcript);
            prop_assert!((0.0..=1.0).contains(&r));
        }
    }
}
