//! Replays the committed fuzz corpus (fuzz/corpus, grown by `scripts/fuzz`
//! with cargo-fuzz) through the job parser, the gateway's body decoding and
//! the transcript-format parsers, with the same properties the fuzz targets
//! assert: no panic, accepted jobs survive serialization, a submission never
//! yields another tenant's job, and no parsed cue ends before it starts.

use recap_job::formats::{parse_text, TranscriptFormat};
use recap_job::{parse_job, parse_submission, Limits};
use std::path::PathBuf;

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .filter(|e| e.path().is_file())
        .map(|e| {
            let bytes = std::fs::read(e.path()).expect("read corpus file");
            (e.file_name().to_string_lossy().into_owned(), bytes)
        })
        .collect();
    out.sort();
    out
}

#[test]
fn the_job_parser_corpus_replays_without_a_panic() {
    let cases = corpus("job_parser");
    assert!(
        cases.len() >= 20,
        "the corpus is committed ({} files)",
        cases.len()
    );
    let mut accepted = 0;
    for (name, bytes) in &cases {
        if let Ok(job) = parse_job(bytes, &Limits::default()) {
            accepted += 1;
            assert!(
                parse_job(&job.to_json(), &Limits::default()).is_ok(),
                "{name}"
            );
        }
    }
    // The corpus reaches past the first refusals into accepted jobs.
    assert!(accepted > 0);
}

#[test]
fn the_gateway_body_corpus_replays_without_a_panic() {
    let cases = corpus("gateway_body");
    assert!(
        cases.len() >= 20,
        "the corpus is committed ({} files)",
        cases.len()
    );
    let id = uuid::Uuid::from_u128(0x5eed);
    let mut accepted = 0;
    for (name, bytes) in &cases {
        if let Ok(job) = parse_submission(bytes, "acme", id, &Limits::default()) {
            accepted += 1;
            assert_eq!(job.tenant, "acme", "{name}");
            assert!(
                parse_job(&job.to_json(), &Limits::default()).is_ok(),
                "{name}"
            );
        }
    }
    assert!(accepted > 0);
}

#[test]
fn the_transcript_formats_corpus_replays_without_a_panic() {
    let cases = corpus("transcript_formats");
    assert!(
        cases.len() >= 10,
        "the corpus is committed ({} files)",
        cases.len()
    );
    let mut read = 0;
    for (name, bytes) in &cases {
        let text = String::from_utf8_lossy(bytes);
        for f in TranscriptFormat::ALL.map(Some).into_iter().chain([None]) {
            if let Ok(turns) = parse_text(&text, f) {
                read += usize::from(!turns.is_empty());
                for t in turns {
                    if let (Some(s), Some(e)) = (t.start_s, t.end_s) {
                        assert!(s <= e, "{name} {f:?}: {t:?}");
                    }
                }
            }
        }
    }
    // The seeds are real files of each format: most of them read.
    assert!(read >= 10, "{read}");
}
