//! The GPU kernels' PTX, kept between runs. NVRTC takes a tenth of a second or more to compile them
//! (115-160 ms on the 2-core build machine), in every process: next to the ~0.5 s it takes to copy
//! a 1b model, that is much of the margin the GPU path has. The driver keeps its own cache of the
//! machine code it makes from PTX, so a cached PTX starts in milliseconds.
//!
//! The file is named by a hash of the kernel source and the NVRTC version, so a new bone-tool or a
//! new CUDA compiles afresh. A cached file that lacks a kernel is ignored; one the driver refuses is
//! forgotten by the caller (see `Cuda::new`). Failing to write the cache is never an error.

use anyhow::Result;
use std::path::{Path, PathBuf};

/// Where the cache lives: `$BONE_TOOL_CACHE_DIR`, else `$XDG_CACHE_HOME/bone-tool`, else
/// `~/.cache/bone-tool` (on Windows `%LOCALAPPDATA%\bone-tool`). None (compile every time) with
/// `BONE_TOOL_NO_KERNEL_CACHE` set.
pub fn dir() -> Option<PathBuf> {
    if std::env::var_os("BONE_TOOL_NO_KERNEL_CACHE").is_some() {
        return None;
    }
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    let user = || if cfg!(windows) { var("LOCALAPPDATA") } else { var("HOME").map(|h| h.join(".cache")) };
    var("BONE_TOOL_CACHE_DIR").or_else(|| var("XDG_CACHE_HOME").or_else(user).map(|d| d.join("bone-tool")))
}

/// FNV-1a, 64 bits: a stable name for a source text (not a defence against anyone).
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// The cache file for this kernel source and NVRTC version.
pub fn file(dir: &Path, source: &str, nvrtc: (i32, i32)) -> PathBuf {
    dir.join(format!("kernels-{:016x}-nvrtc{}.{}.ptx", fnv1a(source), nvrtc.0, nvrtc.1))
}

/// PTX text, and whether it came from the cache.
pub struct CachedPtx {
    pub text: String,
    pub from_cache: bool,
}

/// The PTX for `source`: the cached text when it has an entry for every kernel in `entries`, else
/// what `compile` returns, which is then cached (written to a temporary file and renamed, so that a
/// reader never sees half a file).
pub fn ptx(
    dir: Option<&Path>,
    source: &str,
    nvrtc: (i32, i32),
    entries: &[&str],
    compile: impl FnOnce() -> Result<String>,
) -> Result<CachedPtx> {
    let path = dir.map(|d| file(d, source, nvrtc));
    if let Some(text) = path.as_ref().and_then(|p| std::fs::read_to_string(p).ok()) {
        if entries.iter().all(|e| text.contains(&format!(".entry {e}("))) {
            return Ok(CachedPtx { text, from_cache: true });
        }
    }
    let text = compile()?;
    if let Some(path) = path {
        let _ = store(&path, &text);
    }
    Ok(CachedPtx { text, from_cache: false })
}

fn store(path: &Path, text: &str) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Drop a cached PTX that the driver would not load.
pub fn forget(dir: Option<&Path>, source: &str, nvrtc: (i32, i32)) {
    if let Some(d) = dir {
        let _ = std::fs::remove_file(file(d, source, nvrtc));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: &str = "extern \"C\" __global__ void a() {} extern \"C\" __global__ void b() {}";
    const PTX: &str = ".version 9.0\n.entry a(\n)\n.entry b(\n)\n";

    fn never() -> Result<String> {
        panic!("compiled although the cache holds the kernels")
    }

    #[test]
    fn compiles_once_then_reads_the_cache() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Some(tmp.path());
        let first = ptx(dir, SRC, (13, 0), &["a", "b"], || Ok(PTX.into())).unwrap();
        assert!(!first.from_cache);
        let second = ptx(dir, SRC, (13, 0), &["a", "b"], never).unwrap();
        assert!(second.from_cache);
        assert_eq!(second.text, PTX);
        // only the finished file is left
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
    }

    #[test]
    fn another_source_or_nvrtc_compiles_afresh() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Some(tmp.path());
        ptx(dir, SRC, (13, 0), &["a", "b"], || Ok(PTX.into())).unwrap();
        let mut compiled = 0;
        for (src, v) in [(format!("{SRC} "), (13, 0)), (SRC.to_string(), (13, 1))] {
            ptx(dir, &src, v, &["a", "b"], || {
                compiled += 1;
                Ok(PTX.into())
            })
            .unwrap();
        }
        assert_eq!(compiled, 2);
    }

    #[test]
    fn a_cached_file_without_every_kernel_is_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Some(tmp.path());
        std::fs::write(file(tmp.path(), SRC, (13, 0)), ".entry a(\n)\n").unwrap();
        let got = ptx(dir, SRC, (13, 0), &["a", "b"], || Ok(PTX.into())).unwrap();
        assert!(!got.from_cache);
        assert_eq!(std::fs::read_to_string(file(tmp.path(), SRC, (13, 0))).unwrap(), PTX);
    }

    #[test]
    fn forget_removes_the_file_and_the_next_run_compiles() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Some(tmp.path());
        ptx(dir, SRC, (13, 0), &["a"], || Ok(PTX.into())).unwrap();
        forget(dir, SRC, (13, 0));
        assert!(!ptx(dir, SRC, (13, 0), &["a"], || Ok(PTX.into())).unwrap().from_cache);
    }

    #[test]
    fn no_cache_or_an_unwritable_one_is_no_error() {
        let got = ptx(None, SRC, (13, 0), &["a"], || Ok(PTX.into())).unwrap();
        assert!(!got.from_cache);
        // a file where the cache folder should be
        let tmp = tempfile::tempdir().unwrap();
        let blocked = tmp.path().join("cache");
        std::fs::write(&blocked, "").unwrap();
        let got = ptx(Some(&blocked), SRC, (13, 0), &["a"], || Ok(PTX.into())).unwrap();
        assert_eq!((got.text.as_str(), got.from_cache), (PTX, false));
        // and a compile error is passed on
        assert!(ptx(None, SRC, (13, 0), &["a"], || anyhow::bail!("refused")).is_err());
    }

    #[test]
    fn the_file_name_follows_the_source() {
        let d = Path::new("/c");
        assert_ne!(file(d, SRC, (13, 0)), file(d, &format!("{SRC}\n"), (13, 0)));
        assert_eq!(file(d, SRC, (13, 0)), file(d, SRC, (13, 0)));
        assert!(file(d, SRC, (12, 9)).to_str().unwrap().ends_with("-nvrtc12.9.ptx"));
    }
}
