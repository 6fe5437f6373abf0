//! WebVTT (W3C, "WebVTT: The Web Video Text Tracks Format") and SubRip:
//! blocks separated by blank lines, each a cue of a timing line
//! (`start --> end`) and its text.

use super::{strip_markup, FormatError, TranscriptFormat};
use crate::{split_speaker, Utterance};

/// A file starts with `WEBVTT`, alone or followed by a space or a tab.
pub(super) fn is_webvtt(body: &str) -> bool {
    body.strip_prefix("WEBVTT")
        .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\n', '\r']))
}

/// A SubRip file starts with a counter line and then a timing line that
/// reads as one.
pub(super) fn looks_like_srt(body: &str) -> bool {
    let mut lines = body.lines().map(str::trim);
    let (Some(counter), Some(line)) = (lines.next(), lines.next()) else {
        return false;
    };
    !counter.is_empty()
        && counter.chars().all(|c| c.is_ascii_digit())
        && timing(line, &[',', '.'], TranscriptFormat::Srt, 2).is_ok()
}

/// Detection of WebVTT: the signature, and a timing line somewhere (a
/// text that merely begins with the word is not a caption file).
pub(super) fn looks_like_webvtt(body: &str) -> bool {
    is_webvtt(body) && body.contains("-->")
}

/// The file's lines with their 1-based numbers, in blocks separated by
/// blank lines.
fn blocks(body: &str) -> Vec<Vec<(usize, &str)>> {
    let mut out: Vec<Vec<(usize, &str)>> = Vec::new();
    let mut current: Vec<(usize, &str)> = Vec::new();
    for (i, line) in body.split('\n').enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() {
            if !current.is_empty() {
                out.push(std::mem::take(&mut current));
            }
        } else {
            current.push((i + 1, line));
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// A timestamp in seconds: `[hh:]mm:ss.ttt` (WebVTT) or `hh:mm:ss,mmm`
/// (SubRip); `sep` is the fraction separator the format uses.
fn timestamp(s: &str, seps: &[char]) -> Option<f64> {
    let (clock, frac) = s.split_once(seps)?;
    if frac.len() != 3 || !frac.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let parts: Vec<&str> = clock.split(':').collect();
    let num = |p: &str, max_len: usize| -> Option<u64> {
        (!p.is_empty() && p.len() <= max_len && p.chars().all(|c| c.is_ascii_digit()))
            .then(|| p.parse().ok())
            .flatten()
    };
    let (h, m, sec) = match parts.as_slice() {
        [m, sec] if m.len() == 2 && sec.len() == 2 => (0, num(m, 2)?, num(sec, 2)?),
        [h, m, sec] if m.len() == 2 && sec.len() == 2 => (num(h, 6)?, num(m, 2)?, num(sec, 2)?),
        _ => return None,
    };
    if m > 59 || sec > 59 {
        return None;
    }
    let ms: u64 = frac.parse().ok()?;
    // Whole milliseconds, divided once: the same f64 as `ms / 1000.0`.
    Some(((h * 3600 + m * 60 + sec) * 1000 + ms) as f64 / 1000.0)
}

/// `start --> end [settings]`: the cue's times, or why they cannot be read.
fn timing(
    line: &str,
    seps: &[char],
    format: TranscriptFormat,
    n: usize,
) -> Result<(f64, f64), FormatError> {
    let (start, rest) = line
        .split_once("-->")
        .ok_or_else(|| FormatError::at_line(format, n, "a timing line needs `-->`"))?;
    let end = rest.split_whitespace().next().unwrap_or("");
    let read = |s: &str| {
        timestamp(s.trim(), seps).ok_or_else(|| {
            FormatError::at_line(format, n, format!("`{}` is not a timestamp", s.trim()))
        })
    };
    let (start, end) = (read(start)?, read(end)?);
    if end < start {
        return Err(FormatError::at_line(
            format,
            n,
            format!("the cue ends ({end} s) before it starts ({start} s)"),
        ));
    }
    Ok((start, end))
}

/// A cue's text as turns: each `<v Name>` voice span is a turn of that
/// speaker; text without a voice tag is one turn, whose `Name: text`
/// prefix (Zoom's form) names the speaker.
fn voice_turns(payload: &str, start: f64, end: f64) -> Vec<Utterance> {
    let turn = |speaker: Option<String>, text: &str| {
        let text = strip_markup(text);
        let (speaker, text) = match speaker {
            Some(s) => (Some(s), text),
            None => match split_speaker(&text) {
                Some((s, rest)) => (Some(s.to_string()), rest.to_string()),
                None => (None, text),
            },
        };
        Utterance {
            speaker,
            start_s: Some(start),
            end_s: Some(end),
            text,
        }
    };
    let mut out = Vec::new();
    let mut rest = payload;
    let mut speaker: Option<String> = None;
    while let Some(i) = next_voice_tag(rest) {
        let tag = &rest[i + 2..];
        let Some(close) = tag.find('>') else { break };
        let before = &rest[..i];
        if !strip_markup(before).is_empty() {
            out.push(turn(speaker.clone(), before));
        }
        // `<v.class1.class2 Name>`: the annotation after the classes.
        let name = tag[..close]
            .trim_start_matches(|c: char| c != ' ' && c != '\t')
            .trim();
        speaker = (!name.is_empty()).then(|| strip_markup(name));
        rest = &tag[close + 1..];
        // This voice's span ends at `</v>` or at the next voice, whichever
        // comes first (the search stops there: no rescans).
        let span = next_voice_tag(rest).unwrap_or(rest.len());
        if let Some(end_tag) = rest[..span].find("</v>") {
            out.push(turn(speaker.clone(), &rest[..end_tag]));
            rest = &rest[end_tag + 4..];
            speaker = None;
        }
    }
    if !strip_markup(rest).is_empty() {
        out.push(turn(speaker, rest));
    }
    out
}

/// Where the next voice tag starts: `<v` followed by a space, a tab or a
/// class (`<v.loud Name>`); other tags starting with `v` are not voices.
fn next_voice_tag(s: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = s[from..].find("<v") {
        let at = from + i;
        if s[at + 2..].starts_with([' ', '\t', '.']) {
            return Some(at);
        }
        from = at + 2;
    }
    None
}

/// Reads a WebVTT file: the header block, then cues, `NOTE`, `STYLE` and
/// `REGION` blocks. A cue is an optional identifier line, the timing line
/// and at least one line of text.
pub(super) fn parse_webvtt(body: &str) -> Result<Vec<Utterance>, FormatError> {
    const F: TranscriptFormat = TranscriptFormat::WebVtt;
    let body = body.trim_start();
    if !is_webvtt(body) {
        return Err(FormatError::at_line(
            F,
            1,
            "a WebVTT file starts with `WEBVTT`",
        ));
    }
    let mut out = Vec::new();
    // The first block is the signature line and its header.
    for block in blocks(body).into_iter().skip(1) {
        let first = block[0].1;
        let keyword = first.split([' ', '\t']).next().unwrap_or("");
        if matches!(keyword, "NOTE" | "STYLE" | "REGION") && !first.contains("-->") {
            continue;
        }
        // A block without a timing line in its first two lines is no cue;
        // WebVTT's parser skips it.
        let Some(at) = block.iter().take(2).position(|(_, l)| l.contains("-->")) else {
            continue;
        };
        let (tn, tline) = block[at];
        let (start, end) = timing(tline, &['.'], F, tn)?;
        let payload: Vec<&str> = block[at + 1..].iter().map(|(_, l)| *l).collect();
        let turns = voice_turns(&payload.join(" "), start, end);
        if turns.iter().all(|t| t.text.trim().is_empty()) {
            return Err(FormatError::at_line(F, tn, "a cue without text"));
        }
        out.extend(turns);
    }
    Ok(out)
}

/// Reads a SubRip file: blocks of a counter, a timing line
/// (`00:00:01,000 --> 00:00:04,000`) and the text lines. A `.` for the
/// `,` is read too, as many tools write it.
pub(super) fn parse_srt(body: &str) -> Result<Vec<Utterance>, FormatError> {
    const F: TranscriptFormat = TranscriptFormat::Srt;
    let mut out = Vec::new();
    for block in blocks(body) {
        let (n, first) = block[0];
        let at = block
            .iter()
            .take(2)
            .position(|(_, l)| l.contains("-->"))
            .ok_or_else(|| FormatError::at_line(F, n, "a cue without a timing line"))?;
        if at == 1 && !first.trim().chars().all(|c| c.is_ascii_digit()) {
            return Err(FormatError::at_line(
                F,
                n,
                format!("`{}` is not a cue counter", first.trim()),
            ));
        }
        let (tn, tline) = block[at];
        let (start, end) = timing(tline, &[',', '.'], F, tn)?;
        let text: Vec<&str> = block[at + 1..].iter().map(|(_, l)| *l).collect();
        let text = strip_markup(&text.join(" "));
        if text.is_empty() {
            return Err(FormatError::at_line(F, tn, "a cue without text"));
        }
        let (speaker, text) = match split_speaker(&text) {
            Some((s, rest)) => (Some(s.to_string()), rest.to_string()),
            None => (None, text),
        };
        out.push(Utterance {
            speaker,
            start_s: Some(start),
            end_s: Some(end),
            text,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_follow_each_format() {
        assert_eq!(timestamp("00:01.500", &['.']), Some(1.5));
        assert_eq!(timestamp("01:02:03.004", &['.']), Some(3723.004));
        assert_eq!(timestamp("100:00:00.000", &['.']), Some(360000.0));
        assert_eq!(timestamp("00:00:01,250", &[',', '.']), Some(1.25));
        for bad in [
            "",
            "1.000",
            "0:01.000",
            "00:1.000",
            "00:60.000",
            "00:00:01.00",
            "00:00:01.0000",
            "00:61:00.000",
            "aa:bb.ccc",
            "00:00:01",
            "-1:00.000",
            "00:00.-10",
        ] {
            assert_eq!(timestamp(bad, &['.']), None, "{bad}");
        }
        // WebVTT's separator is `.` only.
        assert_eq!(timestamp("00:00:01,250", &['.']), None);
    }
}
