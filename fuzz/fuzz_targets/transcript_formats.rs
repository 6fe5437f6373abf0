#![no_main]
//! Any bytes as a transcript file, in every format and detected: the
//! parsers answer utterances or a FormatError, never panic; and what they
//! answer holds text, with no cue ending before it starts.
use libfuzzer_sys::fuzz_target;
use recap_job::formats::{parse_text, TranscriptFormat};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let formats = TranscriptFormat::ALL.map(Some);
    for f in formats.iter().copied().chain([None]) {
        if let Ok(turns) = parse_text(&text, f) {
            for t in turns {
                if let (Some(s), Some(e)) = (t.start_s, t.end_s) {
                    assert!(s <= e, "{t:?}");
                }
            }
        }
    }
});
