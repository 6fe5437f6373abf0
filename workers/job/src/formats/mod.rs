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
    if cues::is_webvtt(body) {
        return TranscriptFormat::WebVtt;
    }
    if cues::looks_like_srt(body) {
        return TranscriptFormat::Srt;
    }
    if body.starts_with(['{', '[']) {
        if let Some(f) = serde_json::from_str::<Value>(body)
            .ok()
            .as_ref()
            .and_then(detect_json)
        {
            return f;
        }
    }
    TranscriptFormat::Text
}

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
        Value::Array(items) => {
            // recap's utterances time themselves in `start_s`/`end_s`;
            // diarization output in `start`/`end` (and may carry more keys).
            let diarized = items.iter().any(|i| {
                i.as_object().is_some_and(|o| {
                    o.contains_key("start") || o.contains_key("end") || o.contains_key("words")
                })
            });
            Some(if diarized {
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
        TranscriptFormat::WebVtt => cues::parse_webvtt(body).map(merge_turns),
        TranscriptFormat::Srt => cues::parse_srt(body).map(merge_turns),
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
    let detected = detect_json(value);
    let format = match format.or(detected) {
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
        (TranscriptFormat::Whisper, _) => asr::parse_whisper(value).map(merge_turns),
        (TranscriptFormat::AwsTranscribe, _) => asr::parse_aws(value).map(merge_turns),
        (TranscriptFormat::Diarized, _) => asr::parse_diarized(value).map(merge_turns),
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

/// Merges consecutive turns of one named speaker into one: their texts
/// joined by a space, the first one's start and the last one's end.
/// Turns without a speaker stay apart (nothing says they are one person).
pub fn merge_turns(turns: Vec<Utterance>) -> Vec<Utterance> {
    let mut out: Vec<Utterance> = Vec::with_capacity(turns.len());
    for t in turns {
        if t.text.trim().is_empty() {
            continue;
        }
        match out.last_mut() {
            Some(prev) if prev.speaker.is_some() && prev.speaker == t.speaker => {
                prev.text.push(' ');
                prev.text.push_str(&t.text);
                prev.end_s = t.end_s.or(prev.end_s);
                prev.start_s = prev.start_s.or(t.start_s);
            }
            _ => out.push(t),
        }
    }
    out
}

/// Cue text without markup: tags (`<b>`, `<i>`, `<font ...>`, `<c.x>`,
/// `<00:01.000>`), SubRip's `{\an8}`-style override blocks and HTML
/// character references, with runs of whitespace made one space.
pub fn strip_markup(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '<' => {
                // A tag runs to the next '>'; a lone '<' is text.
                let rest: String = chars.clone().take_while(|&c| c != '>').collect();
                if chars.clone().nth(rest.chars().count()).is_some() && !rest.contains('<') {
                    for _ in 0..=rest.chars().count() {
                        chars.next();
                    }
                } else {
                    out.push(c);
                }
            }
            '{' if chars.peek() == Some(&'\\') => {
                let rest: String = chars.clone().take_while(|&c| c != '}').collect();
                if chars.clone().nth(rest.chars().count()).is_some() {
                    for _ in 0..=rest.chars().count() {
                        chars.next();
                    }
                } else {
                    out.push(c);
                }
            }
            '&' => {
                let name: String = chars
                    .clone()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '#')
                    .take(8)
                    .collect();
                let after = chars.clone().nth(name.chars().count());
                match (entity(&name), after) {
                    (Some(decoded), Some(';')) => {
                        for _ in 0..=name.chars().count() {
                            chars.next();
                        }
                        out.push_str(decoded);
                    }
                    _ => out.push(c),
                }
            }
            _ => out.push(c),
        }
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
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
