//! Models from the Hugging Face Hub: `hf://org/repo@revision/path` (a file)
//! or `hf://org/repo@revision` (a T5 directory: `config.json`,
//! `tokenizer.json`, and `model.safetensors` or the shards of
//! `model.safetensors.index.json`), through hf-hub 0.4, the client
//! candle's own examples use. It reads `HF_ENDPOINT` and `HF_HOME` (the
//! cache, shared with Python's huggingface_hub), and the token from
//! `HF_TOKEN` or `$HF_HOME/token`; files land in the Hub cache layout,
//! downloaded in chunks that a second run resumes, and a cached revision
//! is not asked for again.

use anyhow::{bail, Context, Result};
use hf_hub::api::tokio::{ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Repo, RepoType};
use std::path::{Path, PathBuf};

/// The files a T5 directory is read from besides its weights.
const T5_FILES: [&str; 2] = ["config.json", "tokenizer.json"];

#[derive(Debug, Clone, PartialEq)]
pub struct HubSource {
    pub repo: String,
    pub revision: String,
    /// A file in the repository; None for a T5 directory.
    pub path: Option<String>,
}

impl HubSource {
    /// `hf://org/repo@revision[/path]`; the revision is required, so that
    /// what is added is what was asked for (a branch is then pinned to its
    /// commit by [`download`]).
    pub fn parse(url: &str) -> Result<HubSource> {
        let rest = url
            .strip_prefix("hf://")
            .with_context(|| format!("{url}: a Hub source starts with hf://"))?;
        let (repo, after) = rest.split_once('@').with_context(|| {
            format!("{url}: name the revision, hf://org/repo@revision/path (a commit pins it)")
        })?;
        let (revision, path) = match after.split_once('/') {
            Some((r, p)) => (r, Some(p.trim_matches('/'))),
            None => (after, None),
        };
        let path = path.filter(|p| !p.is_empty()).map(str::to_string);
        let parts: Vec<&str> = repo.split('/').collect();
        let plain = |s: &str| {
            !s.is_empty()
                && s != "."
                && s != ".."
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        };
        if parts.len() != 2 || !parts.iter().all(|p| plain(p)) {
            bail!("{url}: the repository is org/name");
        }
        if !plain(revision) {
            bail!("{url}: `{revision}` is not a revision");
        }
        if let Some(p) = &path {
            if p.split('/').any(|s| !plain(s)) {
                bail!("{url}: `{p}` is not a file path in the repository");
            }
        }
        Ok(HubSource {
            repo: repo.to_string(),
            revision: revision.to_string(),
            path,
        })
    }

    /// The source pinned to a commit, as the catalog records it.
    pub fn pinned(&self, commit: &str) -> String {
        match &self.path {
            Some(p) => format!("hf://{}@{commit}/{p}", self.repo),
            None => format!("hf://{}@{commit}", self.repo),
        }
    }
}

/// Downloads the source into the Hub cache: the local file (or directory)
/// and the commit the revision resolved to.
pub async fn download(src: &HubSource) -> Result<(PathBuf, String)> {
    let mut builder =
        ApiBuilder::from_env().with_progress(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if let Some(token) = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()) {
        builder = builder.with_token(Some(token));
    }
    let api = builder.build().context("the Hub client")?;
    let repo = api.repo(Repo::with_revision(
        src.repo.clone(),
        RepoType::Model,
        src.revision.clone(),
    ));
    let mut got = Vec::new();
    match &src.path {
        Some(p) => got.push(fetch(&repo, src, p).await?),
        None => {
            for file in T5_FILES {
                got.push(fetch(&repo, src, file).await?);
            }
            // One file of weights, or the shards an index names.
            match fetch_status(&repo, src, "model.safetensors").await {
                Ok(local) => got.push(local),
                Err((Some(404), _)) => {
                    let index = fetch(&repo, src, "model.safetensors.index.json").await?;
                    let text = std::fs::read_to_string(&index)
                        .with_context(|| index.display().to_string())?;
                    let shards = recap_engine::models::t5::shard_names(&text)
                        .map_err(|e| anyhow::anyhow!("{}: {e}", index.display()))?;
                    for shard in shards {
                        got.push(fetch(&repo, src, &shard).await?);
                    }
                    got.push(index);
                }
                Err((_, e)) => return Err(e),
            }
        }
    }
    let first = got.first().context("nothing downloaded")?;
    let commit = snapshot_commit(first)
        .with_context(|| format!("{}: not in the Hub cache layout", first.display()))?;
    // Each file is resolved on its own (a cached one from the revision's
    // cached commit): a branch that moved between them mixes two commits.
    if let Some(other) = got
        .iter()
        .filter_map(|f| snapshot_commit(f))
        .find(|c| *c != commit)
    {
        bail!(
            "hf://{}@{}: its files came from two commits ({commit} and {other}); the revision moved: add it again pinned to one, hf://{}@{other}",
            src.repo,
            src.revision,
            src.repo
        );
    }
    let local = match &src.path {
        Some(_) => first.clone(),
        None => first
            .parent()
            .context("a snapshot file without a directory")?
            .to_path_buf(),
    };
    // A relative HF_HOME would make the catalog's path relative to the
    // models directory.
    let local = std::path::absolute(&local).context("the cached path")?;
    Ok((local, commit))
}

/// One file into the cache, checked; the Hub's status on failure.
async fn fetch_status(
    repo: &ApiRepo,
    src: &HubSource,
    file: &str,
) -> std::result::Result<PathBuf, (Option<u16>, anyhow::Error)> {
    let local = repo
        .get(file)
        .await
        .map_err(|e| (status(&e), explain(e, src, file)))?;
    check_blob(&local).map_err(|e| (None, e))?;
    Ok(local)
}

async fn fetch(repo: &ApiRepo, src: &HubSource, file: &str) -> Result<PathBuf> {
    fetch_status(repo, src, file).await.map_err(|(_, e)| e)
}

fn status(e: &ApiError) -> Option<u16> {
    match e {
        ApiError::RequestError(r) => r.status().map(|s| s.as_u16()),
        _ => None,
    }
}

/// What the Hub's answer means for the user: 401 and 404 name the fix.
fn explain(e: ApiError, src: &HubSource, file: &str) -> anyhow::Error {
    let what = format!("hf://{}@{}/{file}", src.repo, src.revision);
    let status = status(&e);
    match status {
        Some(401) | Some(403) => anyhow::anyhow!(
            "{what}: the Hub refused access ({}): set HF_TOKEN to a token that can read {}",
            status.unwrap_or_default(),
            src.repo
        ),
        Some(404) => anyhow::anyhow!(
            "{what}: not found on the Hub (404): check the repository, revision and path"
        ),
        _ => anyhow::anyhow!("{what}: {e}"),
    }
}

/// The commit of a file in the cache: `.../snapshots/<commit>/<file>`.
fn snapshot_commit(path: &Path) -> Option<String> {
    let mut dir = path.parent()?;
    loop {
        let parent = dir.parent()?;
        if parent.file_name()? == "snapshots" {
            return dir.file_name()?.to_str().map(str::to_string);
        }
        dir = parent;
    }
}

/// hf-hub names each blob by the Hub's ETag, which for a large (LFS) file
/// is its sha256: a download that does not hash to it is refused.
fn check_blob(local: &Path) -> Result<()> {
    let blob = std::fs::canonicalize(local).with_context(|| local.display().to_string())?;
    let Some(etag) = blob.file_name().and_then(|n| n.to_str()) else {
        return Ok(());
    };
    if etag.len() == 64 && etag.bytes().all(|b| b.is_ascii_hexdigit()) {
        let got = recap_engine::models::llm::sha256_file(&blob)?;
        if got != etag.to_ascii_lowercase() {
            bail!(
                "{}: the Hub gave sha256 {etag}, the file has {got}",
                local.display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_sources_parse_and_pin() {
        let s = HubSource::parse("hf://team/flan-t5-large@main").unwrap();
        assert_eq!(
            s,
            HubSource {
                repo: "team/flan-t5-large".into(),
                revision: "main".into(),
                path: None
            }
        );
        assert_eq!(s.pinned("abc"), "hf://team/flan-t5-large@abc");
        let s = HubSource::parse("hf://org/repo@v1.0/sub/model.Q4_K_M.gguf").unwrap();
        assert_eq!(s.path.as_deref(), Some("sub/model.Q4_K_M.gguf"));
        assert_eq!(s.pinned("c0"), "hf://org/repo@c0/sub/model.Q4_K_M.gguf");
        for bad in [
            "https://huggingface.co/org/repo",
            "hf://org/repo/model.gguf",
            "hf://repo@main/model.gguf",
            "hf://a/b/c@main/model.gguf",
            "hf://org/repo@/model.gguf",
            "hf://org/repo@main/../../etc/passwd",
            "hf://org/..@main/x",
        ] {
            assert!(HubSource::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_commit_is_read_from_the_snapshot_path() {
        let p = Path::new("/h/hub/models--o--r/snapshots/0123abcd/sub/m.gguf");
        assert_eq!(snapshot_commit(p).as_deref(), Some("0123abcd"));
        assert_eq!(snapshot_commit(Path::new("/tmp/m.gguf")), None);
    }
}
