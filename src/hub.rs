//! Hugging Face Hub ids (`org/name`, `org/name@revision`) given where a folder is expected,
//! found in the local Hugging Face cache: the folder a model was trained from is usually there
//! already. bone-tool never downloads.

use crate::error::{input, Result};
use std::path::{Path, PathBuf};

/// The cache's root, as huggingface_hub finds it: `HF_HUB_CACHE`, else the older
/// `HUGGINGFACE_HUB_CACHE`, else `HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else
/// `~/.cache/huggingface/hub`.
pub fn cache_dir() -> Option<PathBuf> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    var("HF_HUB_CACHE")
        .or_else(|| var("HUGGINGFACE_HUB_CACHE"))
        .or_else(|| var("HF_HOME").map(|h| h.join("hub")))
        .or_else(|| var("XDG_CACHE_HOME").map(|c| c.join("huggingface/hub")))
        // `~` as Python expands it: USERPROFILE on Windows, HOME elsewhere
        .or_else(|| var(if cfg!(windows) { "USERPROFILE" } else { "HOME" }).map(|h| h.join(".cache/huggingface/hub")))
}

/// A Hub id and the revision asked for, when `arg` reads like one and is not a path that exists:
/// `name`, `org/name` or either with `@revision`; no leading `.`, `/` or `~`, no `--` or `..`.
pub fn parse_id(arg: &Path) -> Option<(String, Option<String>)> {
    if std::fs::symlink_metadata(arg).is_ok() {
        return None;
    }
    let s = arg.to_str()?;
    let (id, rev) = match s.split_once('@') {
        // a revision stays inside the repository's refs/ and snapshots/
        Some((id, rev)) if !rev.is_empty() && !rev.contains("..") && !rev.starts_with('/') && !rev.contains('\\') => {
            (id, Some(rev.to_string()))
        }
        Some(_) => return None,
        None => (s, None),
    };
    let parts: Vec<&str> = id.split('/').collect();
    let part_ok = |p: &&str| {
        !p.is_empty()
            && !p.starts_with(['.', '-'])
            && !p.contains("--")
            && !p.contains("..")
            && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    (parts.len() <= 2 && parts.iter().all(part_ok)).then(|| (id.to_string(), rev))
}

/// The snapshot folder of `id` at `rev` (default `main`) in the cache at `cache`: None when the
/// cache has no such repository, an error when it has it but not at that revision.
pub fn snapshot(cache: &Path, id: &str, rev: Option<&str>) -> Result<Option<PathBuf>> {
    let repo = cache.join(format!("models--{}", id.replace('/', "--")));
    let snapshots = repo.join("snapshots");
    if !snapshots.is_dir() {
        return Ok(None);
    }
    let mut revs: Vec<String> = std::fs::read_dir(&snapshots)
        .map(|rd| rd.filter_map(|e| e.ok()).filter(|e| e.path().is_dir()))
        .into_iter()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    revs.sort();
    let listed = || {
        let shown: Vec<&str> = revs.iter().take(4).map(String::as_str).collect();
        let more = if revs.len() > 4 { format!(" and {} more", revs.len() - 4) } else { String::new() };
        format!("{}{more}", shown.join(", "))
    };
    // a branch or tag the cache recorded (refs/main, refs/pr/1, …) names a commit hash
    let by_ref = |r: &str| std::fs::read_to_string(repo.join("refs").join(r)).ok().map(|h| h.trim().to_string());
    let chosen = match rev {
        Some(r) => by_ref(r).or_else(|| {
            let matching: Vec<&String> = revs.iter().filter(|h| h.starts_with(r)).collect();
            // a commit hash, or a prefix of one that names a single snapshot
            (r.len() >= 7 && matching.len() == 1).then(|| matching[0].clone())
        }),
        None => by_ref("main").or_else(|| (revs.len() == 1).then(|| revs[0].clone())),
    };
    let Some(hash) = chosen else {
        let r = rev.unwrap_or("main");
        return Err(input(if revs.is_empty() {
            format!("{id}: the Hugging Face cache has {} but no snapshot in it", repo.display())
        } else {
            format!(
                "{id}: the Hugging Face cache ({}) has no revision {r:?} of it: pass {id}@REVISION or the folder \
                 {}/REVISION, REVISION one of its snapshots: {}",
                repo.display(),
                snapshots.display(),
                listed()
            )
        }));
    };
    let folder = snapshots.join(&hash);
    if !folder.is_dir() {
        return Err(input(format!(
            "{id}: the Hugging Face cache names revision {hash} for {:?}, but {} is not there (a partial \
             download?): its snapshots are {}",
            rev.unwrap_or("main"),
            folder.display(),
            if revs.is_empty() { "none".to_string() } else { listed() }
        )));
    }
    Ok(Some(folder))
}

/// `arg` itself, or, when it is a Hub id found in the local cache or a cache's repository folder
/// (`…/models--org--name`), that snapshot's folder (saying so on stderr unless `quiet`). An id
/// that the cache lacks is returned as given, for the usual "no such folder" error and its hint.
pub fn resolve(arg: &Path, what: &str, quiet: bool) -> Result<PathBuf> {
    let (cache, id, rev) = match (parse_id(arg), cache_dir()) {
        (Some((id, rev)), Some(cache)) => (cache, id, rev),
        _ => match repo_folder(arg) {
            Some((cache, id)) => (cache, id, None),
            None => return Ok(arg.to_path_buf()),
        },
    };
    match snapshot(&cache, &id, rev.as_deref())? {
        Some(folder) => {
            if !quiet {
                eprintln!("{what} {}: the Hugging Face cache's {}", arg.display(), folder.display());
            }
            Ok(folder)
        }
        None => Ok(arg.to_path_buf()),
    }
}

/// Where the base an adapter records (`base_model_name_or_path`) is: a folder here, or its
/// snapshot in the local cache (the cache's note on stderr unless `quiet`); None when neither. For
/// merge and verify without --base, convert, and inspect.
pub fn recorded_base(name: &str, quiet: bool) -> Result<Option<PathBuf>> {
    let found = resolve(Path::new(name), RECORDED_BASE, quiet)?;
    Ok(found.exists().then_some(found))
}

/// How the notes name a base found through an adapter's `base_model_name_or_path`.
pub const RECORDED_BASE: &str = "base (the adapter's base_model_name_or_path)";

/// For a cache's repository folder (`<cache>/models--org--name`, holding `snapshots/`): the cache
/// and the id.
fn repo_folder(arg: &Path) -> Option<(PathBuf, String)> {
    let name = arg.file_name()?.to_str()?;
    let id = name.strip_prefix("models--")?.replace("--", "/");
    if !arg.join("snapshots").is_dir() {
        return None;
    }
    // (a bare `models--org--name` has the parent "": the working folder)
    let cache = arg.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    Some((cache.to_path_buf(), id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_told_from_paths() {
        for id in ["meta-llama/Llama-3.2-1B", "gpt2", "Qwen/Qwen2.5-0.5B@main", "org/name@refs/pr/1", "a_b/c.d"] {
            assert!(parse_id(Path::new(id)).is_some(), "{id}");
        }
        let (id, rev) = parse_id(Path::new("org/m@v1.0")).unwrap();
        assert_eq!((id.as_str(), rev.as_deref()), ("org/m", Some("v1.0")));
        for not in [
            "./model",
            "/abs/model",
            "~/model",
            "a/b/c",
            "org/",
            "../x",
            "org/a--b",
            "x@",
            "a b",
            "src",
            "o/m@/etc/x",
            "o/m@../x",
            "o/m@\\x",
            "o/m@refs\\main",
        ] {
            assert!(parse_id(Path::new(not)).is_none(), "{not}");
        }
    }

    #[test]
    fn a_snapshot_is_chosen_by_ref_by_hash_or_as_the_only_one() {
        let cache = tempfile::tempdir().unwrap();
        let c = cache.path();
        assert!(snapshot(c, "org/m", None).unwrap().is_none(), "not in the cache");
        let repo = c.join("models--org--m");
        let (old, new) = ("1111111aaaa", "2222222bbbb");
        std::fs::create_dir_all(repo.join("snapshots").join(old)).unwrap();
        assert_eq!(snapshot(c, "org/m", None).unwrap(), Some(repo.join("snapshots").join(old)), "the only one");
        std::fs::create_dir_all(repo.join("snapshots").join(new)).unwrap();
        let e = snapshot(c, "org/m", None).unwrap_err().to_string();
        assert!(e.contains("no revision \"main\"") && e.contains(old) && e.contains(new), "{e}");
        // huggingface_hub keeps a branch's commit in refs/BRANCH, a pull request's in refs/refs/pr/N
        std::fs::create_dir_all(repo.join("refs/refs/pr")).unwrap();
        std::fs::write(repo.join("refs/main"), format!("{new}\n")).unwrap();
        std::fs::write(repo.join("refs/refs/pr/1"), old).unwrap();
        assert_eq!(snapshot(c, "org/m", None).unwrap(), Some(repo.join("snapshots").join(new)));
        assert_eq!(snapshot(c, "org/m", Some("refs/pr/1")).unwrap(), Some(repo.join("snapshots").join(old)));
        assert_eq!(snapshot(c, "org/m", Some("1111111")).unwrap(), Some(repo.join("snapshots").join(old)));
        assert!(snapshot(c, "org/m", Some("111")).is_err(), "too short a prefix");
        assert!(snapshot(c, "org/m", Some("v9")).unwrap_err().to_string().contains("org/m@REVISION"));
        std::fs::write(repo.join("refs/main"), "3333333cccc").unwrap();
        let e = snapshot(c, "org/m", None).unwrap_err().to_string();
        assert!(e.contains("3333333cccc") && e.contains("partial"), "{e}");
    }
}
