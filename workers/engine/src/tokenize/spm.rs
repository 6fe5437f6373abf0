//! SentencePiece-style tokenization from GGUF metadata (`tokenizer.ggml.model
//! = llama`; Gemma's), as llama.cpp's `llm_tokenizer_spm` does it: spaces
//! become `▁`, the text splits into UTF-8 characters, and the adjacent pair
//! whose joined piece has the highest score merges first (the leftmost on a
//! tie) until no joined pair is in the vocabulary; pieces missing from the
//! vocabulary fall back to `<0xXX>` byte tokens. Hand-written rather than a
//! BPE from the `tokenizers` crate with merges derived from the scores, so
//! that tie-breaking is llama.cpp's exactly.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

pub struct Spm {
    ids: HashMap<String, u32>,
    scores: Vec<f32>,
    byte_ids: [Option<u32>; 256],
    /// Special tokens split out before the pieces (longest first).
    specials_all: Vec<(String, u32)>,
    /// Those split out even with special parsing off (user-defined tokens).
    specials_user: Vec<(String, u32)>,
    pub add_space_prefix: bool,
    pub tokens: Vec<String>,
    pub control: Vec<bool>,
}

#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: isize,
    next: isize,
}

struct Bigram {
    left: usize,
    right: usize,
    score: f32,
    size: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Bigram {
    // A max-heap: higher score first, then the leftmost.
    fn cmp(&self, o: &Self) -> Ordering {
        self.score
            .total_cmp(&o.score)
            .then_with(|| o.left.cmp(&self.left))
    }
}

const TYPE_UNKNOWN: i64 = 2;
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;
const TYPE_BYTE: i64 = 6;

impl Spm {
    pub fn new(
        tokens: Vec<String>,
        scores: Vec<f32>,
        types: &[i64],
        add_space_prefix: bool,
    ) -> Spm {
        let ids: HashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let mut byte_ids = [None; 256];
        for (i, t) in tokens.iter().enumerate() {
            if types.get(i) == Some(&TYPE_BYTE)
                || (t.len() == 6 && t.starts_with("<0x") && t.ends_with('>'))
            {
                if let Ok(b) = u8::from_str_radix(&t[3..5], 16) {
                    byte_ids[b as usize].get_or_insert(i as u32);
                }
            }
        }
        let special = |want: &dyn Fn(i64) -> bool| {
            let mut v: Vec<(String, u32)> = tokens
                .iter()
                .enumerate()
                .filter(|(i, t)| !t.is_empty() && types.get(*i).is_some_and(|&ty| want(ty)))
                .map(|(i, t)| (t.clone(), i as u32))
                .collect();
            v.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
            v
        };
        let specials_all =
            special(&|ty| matches!(ty, TYPE_UNKNOWN | TYPE_CONTROL | TYPE_USER_DEFINED));
        let specials_user = special(&|ty| ty == TYPE_USER_DEFINED);
        let control = (0..tokens.len())
            .map(|i| matches!(types.get(i), Some(&TYPE_CONTROL) | Some(&TYPE_UNKNOWN)))
            .collect();
        Spm {
            ids,
            scores,
            byte_ids,
            specials_all,
            specials_user,
            add_space_prefix,
            tokens,
            control,
        }
    }

    /// Ids of `text` (no BOS). `parse_special`: special-token text maps to
    /// its id; off, only user-defined tokens do (as in llama.cpp).
    pub fn encode(&self, text: &str, parse_special: bool) -> Vec<u32> {
        enum Frag<'a> {
            Raw(&'a str),
            Token(u32),
        }
        let mut frags = vec![Frag::Raw(text)];
        let specials = if parse_special {
            &self.specials_all
        } else {
            &self.specials_user
        };
        for (piece, id) in specials {
            let mut next = Vec::with_capacity(frags.len());
            for f in frags {
                match f {
                    Frag::Raw(s) if s.contains(piece.as_str()) => {
                        let mut rest = s;
                        while let Some(i) = rest.find(piece.as_str()) {
                            if i > 0 {
                                next.push(Frag::Raw(&rest[..i]));
                            }
                            next.push(Frag::Token(*id));
                            rest = &rest[i + piece.len()..];
                        }
                        if !rest.is_empty() {
                            next.push(Frag::Raw(rest));
                        }
                    }
                    other => next.push(other),
                }
            }
            frags = next;
        }
        let mut out = Vec::new();
        let mut prev_special = true;
        for f in frags {
            match f {
                Frag::Token(id) => {
                    out.push(id);
                    prev_special = true;
                }
                Frag::Raw(s) => {
                    let mut t = String::new();
                    if self.add_space_prefix && prev_special {
                        t.push(' ');
                    }
                    t.push_str(s);
                    self.pieces(&t.replace(' ', "\u{2581}"), &mut out);
                    prev_special = false;
                }
            }
        }
        out
    }

    fn pieces(&self, text: &str, out: &mut Vec<u32>) {
        if text.is_empty() {
            return;
        }
        let mut symbols: Vec<Symbol> = Vec::new();
        for (i, (start, c)) in text.char_indices().enumerate() {
            symbols.push(Symbol {
                start,
                len: c.len_utf8(),
                prev: i as isize - 1,
                next: i as isize + 1,
            });
        }
        if let Some(last) = symbols.last_mut() {
            last.next = -1;
        }
        let mut heap = BinaryHeap::new();
        let mut rev_merge: HashMap<(usize, usize), (usize, usize)> = HashMap::new();
        let try_add = |left: isize,
                       right: isize,
                       symbols: &[Symbol],
                       heap: &mut BinaryHeap<Bigram>,
                       rev: &mut HashMap<(usize, usize), (usize, usize)>| {
            if left < 0 || right < 0 {
                return;
            }
            let (l, r) = (symbols[left as usize], symbols[right as usize]);
            let piece = &text[l.start..r.start + r.len];
            if let Some(&id) = self.ids.get(piece) {
                heap.push(Bigram {
                    left: left as usize,
                    right: right as usize,
                    score: self.scores.get(id as usize).copied().unwrap_or(0.0),
                    size: piece.len(),
                });
                rev.insert((l.start, piece.len()), (left as usize, right as usize));
            }
        };
        for i in 1..symbols.len() {
            try_add(
                i as isize - 1,
                i as isize,
                &symbols,
                &mut heap,
                &mut rev_merge,
            );
        }
        while let Some(b) = heap.pop() {
            let (l, r) = (symbols[b.left], symbols[b.right]);
            // Skip bigrams a merge has made stale.
            if l.len == 0 || r.len == 0 || l.len + r.len != b.size {
                continue;
            }
            symbols[b.left].len += r.len;
            symbols[b.right].len = 0;
            symbols[b.left].next = r.next;
            if r.next >= 0 {
                symbols[r.next as usize].prev = b.left as isize;
            }
            let left = symbols[b.left];
            try_add(
                left.prev,
                b.left as isize,
                &symbols,
                &mut heap,
                &mut rev_merge,
            );
            try_add(
                b.left as isize,
                left.next,
                &symbols,
                &mut heap,
                &mut rev_merge,
            );
        }
        let mut i: isize = 0;
        while i >= 0 && (i as usize) < symbols.len() {
            let s = symbols[i as usize];
            self.resegment(text, s.start, s.len, &rev_merge, &symbols, out);
            i = s.next;
        }
    }

    fn resegment(
        &self,
        text: &str,
        start: usize,
        len: usize,
        rev: &HashMap<(usize, usize), (usize, usize)>,
        symbols: &[Symbol],
        out: &mut Vec<u32>,
    ) {
        let piece = &text[start..start + len];
        if let Some(&id) = self.ids.get(piece) {
            out.push(id);
            return;
        }
        match rev.get(&(start, len)) {
            Some(&(l, r)) => {
                let (ls, rs) = (symbols[l].start, symbols[r].start);
                self.resegment(text, ls, rs - ls, rev, symbols, out);
                self.resegment(text, rs, start + len - rs, rev, symbols, out);
            }
            None => {
                for b in piece.bytes() {
                    if let Some(id) = self.byte_ids[b as usize] {
                        out.push(id);
                    }
                }
            }
        }
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            let i = id as usize;
            if self.control.get(i).copied().unwrap_or(false) {
                continue;
            }
            let Some(t) = self.tokens.get(i) else {
                continue;
            };
            if t.len() == 6 && t.starts_with("<0x") && t.ends_with('>') {
                if let Ok(b) = u8::from_str_radix(&t[3..5], 16) {
                    bytes.push(b);
                    continue;
                }
            }
            bytes.extend_from_slice(t.replace('\u{2581}', " ").as_bytes());
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}
