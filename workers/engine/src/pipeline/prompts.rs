//! Prompt templates, versioned under `workers/engine/prompts/`, and the
//! model's own chat template, both rendered with minijinja.

use crate::summarizer::EngineError;
use minijinja::{context, Environment, Error, ErrorKind};
use recap_job::SummaryKind;

pub const PROMPT_VERSION: &str = "v1";

/// Lines of the prompts' own scaffolding, removed when a model echoes them.
pub const SCAFFOLDING: [&str; 3] = ["Meeting transcript:", "Partial summaries:", "\"\"\""];

/// The files of the prompt version's folder, by name (`build.rs`).
mod files {
    include!(concat!(env!("OUT_DIR"), "/prompt_files.rs"));
}

/// A file of the prompt version's folder. Evaluated in constants, so that
/// a missing file stops the build.
const fn file(name: &str) -> &'static str {
    let mut i = 0;
    while i < files::FILES.len() {
        if same(files::FILES[i].0.as_bytes(), name.as_bytes()) {
            return files::FILES[i].1;
        }
        i += 1;
    }
    panic!("a file of the prompt folder is missing")
}

const fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

const SYSTEM: &str = file("system.txt");
const USER: &str = file("user.txt");
const USER_TRANSCRIPT_FIRST: &str = file("user_transcript_first.txt");
const REDUCE: &str = file("reduce.txt");
const FLAN: &str = file("flan.txt");

/// Every kind's instruction file is in the folder, checked at build time.
const _: () = {
    let mut i = 0;
    while i < SummaryKind::ALL.len() {
        file(SummaryKind::ALL[i].spec().prompt_file);
        i += 1;
    }
};

/// A kind's instruction: the file its definition names.
pub fn instruction(kind: SummaryKind) -> &'static str {
    file(kind.spec().prompt_file).trim()
}

pub fn system() -> &'static str {
    SYSTEM.trim()
}

fn render_str(template: &str, transcript: &str, instruction: &str) -> Result<String, EngineError> {
    let env = Environment::new();
    env.render_str(template, context! { transcript, instruction })
        .map(|s| s.trim().to_string())
        .map_err(|e| EngineError::Template(e.to_string()))
}

/// The task of one call: the kind's instruction, or the user's question.
pub fn task(kind: SummaryKind, query: Option<&str>) -> String {
    match query {
        Some(q) => format!("{} Answer in a few sentences.", q.trim()),
        None => instruction(kind).to_string(),
    }
}

/// The user turn for a task over (a chunk of) a transcript: the task first,
/// then the fenced transcript (small models continue a transcript that ends
/// the prompt, and copy one that leads it).
pub fn user_turn(transcript: &str, task: &str) -> Result<String, EngineError> {
    render_str(USER, transcript, task)
}

/// The transcript-first user turn, cut where the task begins: (transcript
/// part, task part). Every kind asked of one transcript shares the first
/// part, which `GgufModel::summarize` prefills once.
pub fn user_turn_parts(transcript: &str, task: &str) -> Result<(String, String), EngineError> {
    // A private-use character no transcript is expected to hold.
    const SLOT: &str = "\u{E001}recap-task\u{E001}";
    let full = render_str(USER_TRANSCRIPT_FIRST, transcript, SLOT)?;
    let Some((prefix, after)) = full.split_once(SLOT) else {
        return Err(EngineError::Template(
            "the user template dropped the task".into(),
        ));
    };
    Ok((prefix.to_string(), format!("{}{after}", task.trim())))
}

/// The user turn that merges partial summaries.
pub fn reduce_turn(partials: &str, task: &str) -> Result<String, EngineError> {
    render_str(REDUCE, partials, task)
}

/// The whole input of a seq2seq (FLAN-T5) model.
pub fn flan_input(transcript: &str, task: &str) -> Result<String, EngineError> {
    render_str(FLAN, transcript, task)
}

/// A model's chat template (Jinja, as shipped in GGUF metadata or
/// tokenizer_config.json), compiled once.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
}

fn raise_exception(msg: String) -> Result<String, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

impl ChatTemplate {
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<ChatTemplate, EngineError> {
        let mut env = Environment::new();
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned("chat".to_string(), source.to_string())
            .map_err(|e| EngineError::Template(format!("chat template does not compile: {e}")))?;
        Ok(ChatTemplate {
            env,
            bos: bos.to_string(),
            eos: eos.to_string(),
        })
    }

    /// The prompt for a system and a user message, ready for generation.
    pub fn render(&self, system: &str, user: &str) -> Result<String, EngineError> {
        let messages = vec![
            context! { role => "system", content => system },
            context! { role => "user", content => user },
        ];
        self.env
            .get_template("chat")
            .and_then(|t| {
                t.render(context! {
                    messages,
                    add_generation_prompt => true,
                    bos_token => &self.bos,
                    eos_token => &self.eos,
                })
            })
            .map_err(|e| EngineError::Template(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn chatml_renders_with_generation_prompt() {
        let t = ChatTemplate::new(CHATML, "<s>", "</s>").unwrap();
        let p = t.render("sys", "hello").unwrap();
        assert_eq!(p, "<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn raise_exception_is_an_error_not_a_panic() {
        let t = ChatTemplate::new("{{ raise_exception('no system role') }}", "", "").unwrap();
        assert!(t
            .render("a", "b")
            .unwrap_err()
            .to_string()
            .contains("no system role"));
        assert!(ChatTemplate::new("{% if %}", "", "").is_err());
    }

    #[test]
    fn both_prompt_orders_fence_the_transcript() {
        // Task first (small models), or transcript first so that all kinds
        // share a prefix, the task then ending the turn.
        let u = user_turn("Alice: hi", &task(SummaryKind::Short, None)).unwrap();
        assert!(
            u.find("one sentence").unwrap() < u.find("Alice: hi").unwrap(),
            "{u}"
        );
        assert!(u.ends_with("\"\"\""), "{u}");
        let (a, b) = user_turn_parts("Alice: hi", &task(SummaryKind::Short, None)).unwrap();
        let v = format!("{a}{b}");
        assert!(
            v.find("Alice: hi").unwrap() < v.find("one sentence").unwrap(),
            "{v}"
        );
        assert!(v.starts_with("Meeting transcript:"), "{v}");
        assert!(
            a.contains("Alice: hi") && !a.contains("one sentence"),
            "{a}"
        );
        let (a2, _) = user_turn_parts("Alice: hi", &task(SummaryKind::Decisions, None)).unwrap();
        assert_eq!(a, a2, "kinds share the transcript part");
        assert!(reduce_turn("part one", &task(SummaryKind::Decisions, None))
            .unwrap()
            .contains("part one"));
        for k in SummaryKind::ALL {
            assert!(!instruction(k).is_empty());
        }
    }
}
