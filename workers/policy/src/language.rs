//! A small stopword-based language guess, enough to catch a summary in the
//! wrong language (small models drift into English or into the prompt's
//! language). Hand-written: the few languages and one question asked here
//! do not justify a language-identification crate and its tables.

const STOPWORDS: [(&str, &[&str]); 6] = [
    (
        "en",
        &[
            "the", "and", "to", "of", "a", "in", "is", "that", "for", "on", "with", "was", "we",
            "will", "it", "be", "are", "this",
        ],
    ),
    (
        "fr",
        &[
            "le", "la", "les", "et", "de", "des", "du", "un", "une", "est", "que", "pour", "dans",
            "nous", "sur", "pas", "il", "au",
        ],
    ),
    (
        "de",
        &[
            "der", "die", "das", "und", "zu", "den", "ist", "nicht", "mit", "wir", "ein", "eine",
            "von", "auf", "für", "sich", "es", "im",
        ],
    ),
    (
        "es",
        &[
            "el", "la", "los", "las", "y", "de", "que", "en", "un", "una", "es", "por", "para",
            "con", "no", "se", "del", "al",
        ],
    ),
    (
        "it",
        &[
            "il", "la", "di", "che", "e", "un", "una", "per", "non", "sono", "con", "del", "della",
            "al", "si", "è", "gli", "le",
        ],
    ),
    (
        "nl",
        &[
            "de", "het", "een", "en", "van", "is", "dat", "op", "te", "niet", "met", "voor",
            "zijn", "we", "er", "ook", "aan", "bij",
        ],
    ),
];

/// The most likely language code of `text`, or None when too little text
/// or no stopwords were seen.
pub fn guess(text: &str) -> Option<&'static str> {
    let words: Vec<String> = text
        .split(|c: char| !c.is_alphabetic())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect();
    if words.len() < 5 {
        return None;
    }
    let mut best: Option<(&str, usize)> = None;
    for (lang, stops) in STOPWORDS {
        let hits = words.iter().filter(|w| stops.contains(&w.as_str())).count();
        if hits > 0 && best.is_none_or(|(_, b)| hits > b) {
            best = Some((lang, hits));
        }
    }
    best.map(|(l, _)| l)
}

/// Whether `text` reads as `language` (a BCP 47 tag). Unknown languages and
/// too-short texts pass: the check only refuses what it can recognise.
pub fn matches(text: &str, language: &str) -> bool {
    let want = language
        .split('-')
        .next()
        .unwrap_or(language)
        .to_lowercase();
    if !STOPWORDS.iter().any(|(l, _)| *l == want) {
        return true;
    }
    guess(text).is_none_or(|g| g == want)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guesses() {
        assert_eq!(
            guess("We agreed that the launch will be on Friday and the team is ready."),
            Some("en")
        );
        assert_eq!(
            guess("Nous avons décidé que le lancement est pour vendredi et la date est fixée."),
            Some("fr")
        );
        assert_eq!(
            guess("Wir haben beschlossen, dass der Start am Freitag ist und die Planung steht."),
            Some("de")
        );
        assert_eq!(guess("ok"), None);
    }

    #[test]
    fn matching() {
        assert!(matches(
            "We agreed that the launch will be on Friday.",
            "en-GB"
        ));
        assert!(!matches(
            "We agreed that the launch will be on Friday and the rest of it.",
            "fr"
        ));
        assert!(matches("anything at all goes here for it", "ja"));
    }
}
