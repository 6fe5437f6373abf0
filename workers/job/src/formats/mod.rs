//! Transcript formats that meeting tools export, read into utterances:
//! WebVTT (Zoom, Teams, Meet; voice tags and `NOTE` blocks), SubRip, the
//! JSON of Whisper (`segments`), of AWS Transcribe (`speaker_labels`
//! joined to `items`), and a generic diarized list of
//! `{speaker, start, end, text}`. Pure: text or JSON in, utterances out.
//!
//! Every format comes out the same way: one utterance per turn, with the
//! speaker where the file names one, times in seconds, markup stripped,
//! and consecutive cues of the same speaker merged into one turn.
//!
//! The subtitle parsers are written here rather than taken from a crate:
//! the crates for WebVTT and SubRip either drop voice tags or are
//! unmaintained, and both formats are a page of grammar each.

mod asr;
mod cues;

use crate::{utterances_from_text, Utterance};
use serde_json::Value;
use std::fmt;

/// The formats a transcript may come in (the job field `transcript_format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TranscriptFormat {
    /// `Speaker: text` lines (or bare lines).
    Text,
    /// recap's own list of `{speaker, start_s, end_s, text}`.
    Utterances,
    /// W3C WebVTT.
    WebVtt,
    /// SubRip (`.srt`).
    Srt,
    /// Whisper's JSON output: an object with `segments`.
    Whisper,
    /// AWS Transcribe's JSON output: an object with `results`.
    AwsTranscribe,
    /// A list of `{speaker, start, end, text}`, as diarization pipelines write.
    Diarized,
}

impl TranscriptFormat {
    pub const ALL: [TranscriptFormat; 7] = [
        TranscriptFormat::Text,
        TranscriptFormat::Utterances,
        TranscriptFormat::WebVtt,
        TranscriptFormat::Srt,
        TranscriptFormat::Whisper,
        TranscriptFormat::AwsTranscribe,
        TranscriptFormat::Diarized,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TranscriptFormat::Text => "text",
            TranscriptFormat::Utterances => "utterances",
            TranscriptFormat::WebVtt => "webvtt",
            TranscriptFormat::Srt => "srt",
            TranscriptFormat::Whisper => "whisper",
            TranscriptFormat::AwsTranscribe => "aws_transcribe",
            TranscriptFormat::Diarized => "diarized",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.as_str() == s)
    }

    /// Whether the format's files are JSON documents (not text).
    pub fn is_json(self) -> bool {
        matches!(
            self,
            TranscriptFormat::Utterances
                | TranscriptFormat::Whisper
                | TranscriptFormat::AwsTranscribe
                | TranscriptFormat::Diarized
        )
    }
}

impl fmt::Display for TranscriptFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a transcript file could not be read: its format, where (a line of a
/// text format, or a JSON path), and what is wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{format}{}: {message}", at.as_ref().map(|a| format!(" {a}")).unwrap_or_default())]
pub struct FormatError {
    pub format: TranscriptFormat,
    /// `line 12`, or a JSON path such as `segments[3].start`.
    pub at: Option<String>,
    pub message: String,
}

impl FormatError {
    fn at_line(format: TranscriptFormat, line: usize, message: impl Into<String>) -> Self {
        FormatError {
            format,
            at: Some(format!("line {line}")),
            message: message.into(),
        }
    }

    fn at_path(format: TranscriptFormat, path: &str, message: impl Into<String>) -> Self {
        FormatError {
            format,
            at: (!path.is_empty()).then(|| path.to_string()),
            message: message.into(),
        }
    }
}

/// The format of a transcript given as text, from its content: WebVTT by
/// its `WEBVTT` signature, SubRip by a counter line followed by a timing
/// line, JSON by a leading `{` or `[` that parses, and plain text otherwise.
pub fn detect_text(text: &str) -> TranscriptFormat {
    let body = text.trim_start_matches('\u{feff}').trim_start();
    if cues::looks_like_webvtt(body) {
        return TranscriptFormat::WebVtt;
    }
    if cues::looks_like_srt(body) {
        return TranscriptFormat::Srt;
    }
    if body.starts_with(['{', '[']) {
        if let Some(f) = serde_json::from_str::<Value>(body)
            .ok()
            .as_ref()
            .filter(|v| !v.is_string())
            .and_then(detect_json)
        {
            return f;
        }
    }
    TranscriptFormat::Text
}

/// The keys of recap's own utterances.
pub const UTTERANCE_KEYS: [&str; 4] = ["speaker", "start_s", "end_s", "text"];

/// The format of a transcript given as JSON, from its shape; None where it
/// is none of the known ones.
pub fn detect_json(value: &Value) -> Option<TranscriptFormat> {
    match value {
        Value::String(s) => Some(detect_text(s)),
        Value::Object(o) if o.get("segments").is_some_and(Value::is_array) => {
            Some(TranscriptFormat::Whisper)
        }
        Value::Object(o) if o.get("results").is_some_and(Value::is_object) => {
            Some(TranscriptFormat::AwsTranscribe)
        }
        // A list of objects: recap's utterances, or a diarization tool's
        // segments. Diarized: no item uses recap's `start_s`/`end_s`, and
        // some item has a key recap's utterances lack, or a numbered speaker.
        Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_object) => {
            let objects = || items.iter().filter_map(Value::as_object);
            let recap_times =
                objects().any(|o| o.contains_key("start_s") || o.contains_key("end_s"));
            let foreign = objects().any(|o| {
                o.keys().any(|k| !UTTERANCE_KEYS.contains(&k.as_str()))
                    || o.get("speaker").is_some_and(Value::is_number)
            });
            Some(if foreign && !recap_times {
                TranscriptFormat::Diarized
            } else {
                TranscriptFormat::Utterances
            })
        }
        _ => None,
    }
}

/// Reads a transcript given as text in `format` (detected when None).
/// JSON formats are parsed from the text first.
pub fn parse_text(
    text: &str,
    format: Option<TranscriptFormat>,
) -> Result<Vec<Utterance>, FormatError> {
    let format = format.unwrap_or_else(|| detect_text(text));
    let body = text.trim_start_matches('\u{feff}');
    match format {
        TranscriptFormat::Text => Ok(utterances_from_text(body)),
        TranscriptFormat::WebVtt => finish(format, cues::parse_webvtt(body)?),
        TranscriptFormat::Srt => finish(format, cues::parse_srt(body)?),
        json => {
            let value: Value = serde_json::from_str(body).map_err(|e| FormatError {
                format: json,
                at: Some(format!("line {}", e.line())),
                message: format!("not JSON: {e}"),
            })?;
            parse_value(&value, Some(json))
        }
    }
}

/// Reads a transcript given as a JSON value in `format` (detected when
/// None).
pub fn parse_value(
    value: &Value,
    format: Option<TranscriptFormat>,
) -> Result<Vec<Utterance>, FormatError> {
    let format = match format.or_else(|| detect_json(value)) {
        Some(f) => f,
        None => {
            return Err(FormatError::at_path(
                TranscriptFormat::Text,
                "",
                "not a transcript: expected text, a list of utterances, or an object with `segments` (Whisper) or `results` (AWS Transcribe)",
            ))
        }
    };
    match (format, value) {
        (f, Value::String(s)) if !f.is_json() => parse_text(s, Some(f)),
        (TranscriptFormat::Whisper, _) => finish(format, asr::parse_whisper(value)?),
        (TranscriptFormat::AwsTranscribe, _) => finish(format, asr::parse_aws(value)?),
        (TranscriptFormat::Diarized, _) => finish(format, asr::parse_diarized(value)?),
        // recap's own list, read as it is (the job parser checks it field
        // by field; this is the lenient read of a file).
        (TranscriptFormat::Utterances, Value::Array(_)) => {
            serde_json::from_value::<Vec<Utterance>>(value.clone())
                .map(|u| {
                    u.into_iter()
                        .filter(|u| !u.text.trim().is_empty())
                        .collect()
                })
                .map_err(|e| FormatError::at_path(TranscriptFormat::Utterances, "", e.to_string()))
        }
        (f, Value::String(s)) => parse_text(s, Some(f)),
        (f, other) => Err(FormatError::at_path(
            f,
            "",
            format!(
                "a {f} transcript cannot be {}",
                match other {
                    Value::Array(_) => "a list",
                    Value::Object(_) => "an object",
                    _ => "this JSON value",
                }
            ),
        )),
    }
}

/// The turns a file's parser read, made ready: speakers trimmed (an empty
/// one is none; one over 256 bytes is refused, as in a job's own
/// utterances), empty turns dropped, and consecutive turns of one named
/// speaker merged into one: their texts joined by a space, from the
/// earliest start to the latest end. Turns without a speaker stay apart
/// (nothing says they are one person).
pub fn finish(
    format: TranscriptFormat,
    turns: Vec<Utterance>,
) -> Result<Vec<Utterance>, FormatError> {
    let mut out: Vec<Utterance> = Vec::with_capacity(turns.len());
    for mut t in turns {
        t.speaker = t
            .speaker
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty());
        if t.speaker
            .as_ref()
            .is_some_and(|s| s.len() > MAX_SPEAKER_BYTES)
        {
            return Err(FormatError::at_path(
                format,
                "",
                format!("a speaker name is over {MAX_SPEAKER_BYTES} bytes"),
            ));
        }
        if t.text.trim().is_empty() {
            continue;
        }
        match out.last_mut() {
            Some(prev) if prev.speaker.is_some() && prev.speaker == t.speaker => {
                prev.text.push(' ');
                prev.text.push_str(&t.text);
                prev.start_s = min_time(prev.start_s, t.start_s);
                prev.end_s = max_time(prev.end_s, t.end_s);
            }
            _ => out.push(t),
        }
    }
    Ok(out)
}

/// The longest speaker name a job may carry.
pub const MAX_SPEAKER_BYTES: usize = 256;

fn min_time(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, y) => x.or(y),
    }
}

fn max_time(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.max(y)),
        (x, y) => x.or(y),
    }
}

/// Cue text without markup: tags (`<b>`, `<i>`, `<font ...>`, `<c.x>`,
/// `<00:01.000>`), SubRip's `{\an8}`-style override blocks and HTML
/// character references, with runs of whitespace made one space. Linear in
/// the input: a tag or override is at most `MAX_TAG` bytes, so a run of
/// unclosed `<` costs no rescans.
pub fn strip_markup(s: &str) -> String {
    const MAX_TAG: usize = 512;
    let b = s.as_bytes();
    // The end of a `open ... close` span starting at `i`, if it closes
    // within MAX_TAG bytes before another `open`.
    let closes = |i: usize, open: u8, close: u8| -> Option<usize> {
        let window = &b[i + 1..(i + 1 + MAX_TAG).min(b.len())];
        let j = window.iter().position(|&x| x == close || x == open)?;
        (window[j] == close).then_some(i + 1 + j + 1)
    };
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < b.len() {
        // Delimiters are ASCII, so every index here is a char boundary.
        let skip = match b[i] {
            b'<' => closes(i, b'<', b'>'),
            b'{' if b.get(i + 1) == Some(&b'\\') => closes(i, b'{', b'}'),
            b'&' => {
                let name_end = (i + 1..(i + 10).min(b.len()))
                    .find(|&k| !(b[k].is_ascii_alphanumeric() || b[k] == b'#'))
                    .unwrap_or(b.len().min(i + 10));
                match (b.get(name_end), entity(&s[i + 1..name_end])) {
                    (Some(b';'), Some(decoded)) => {
                        out.push_str(decoded);
                        Some(name_end + 1)
                    }
                    _ => None,
                }
            }
            _ => None,
        };
        match skip {
            Some(next) => i = next,
            None => {
                // Copy up to the next delimiter (at least this byte's char).
                let next = (i + 1..b.len())
                    .find(|&k| matches!(b[k], b'<' | b'{' | b'&'))
                    .unwrap_or(b.len());
                out.push_str(&s[i..next]);
                i = next;
            }
        }
    }
    collapse_whitespace(&out)
}

/// Runs of whitespace made one space, and the ends trimmed.
pub fn collapse_whitespace(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The character references subtitle files use.
fn entity(name: &str) -> Option<&'static str> {
    Some(match name {
        "amp" => "&",
        "lt" => "<",
        "gt" => ">",
        "quot" => "\"",
        "apos" | "#39" => "'",
        "nbsp" => " ",
        "lrm" | "rlm" => "",
        _ => return None,
    })
}

#[cfg(test)]
mod tests;
