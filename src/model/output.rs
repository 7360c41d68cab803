//! The atomic output folder and the streaming shard writer.
//!
//! Everything is written into `<out>.tmp-<random>` beside `--out`; only a complete, fsynced folder
//! is renamed into place. Dropping an uncommitted [`OutputDir`] (an error, a panic, Ctrl-C) removes
//! the temporary folder, so `--out` either does not exist or is complete.

use crate::error::{input, Result};
use crate::model::io_reason;
use anyhow::Context;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

pub struct OutputDir {
    out: PathBuf,
    tmp: PathBuf,
    force: bool,
    committed: bool,
}

impl OutputDir {
    /// Prepare `out`: refuse an existing one unless `force`, create the temporary folder beside it.
    pub fn create(out: &Path, force: bool) -> Result<OutputDir> {
        let shown = out.display();
        if out.exists() && !force {
            return Err(input(format!("{shown} already exists: choose another --out, or pass --force to replace it")));
        }
        let name = out
            .file_name()
            .ok_or_else(|| input(format!("--out {shown} does not name a folder")))?
            .to_string_lossy()
            .into_owned();
        let parent = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent)
            .map_err(|e| input(format!("cannot create {}: {}", parent.display(), io_reason(&e))))?;
        let tmp = parent.join(format!("{name}.tmp-{}", random_suffix()));
        std::fs::create_dir(&tmp).map_err(|e| {
            input(format!("cannot write the output beside {shown} (in {}): {}", parent.display(), io_reason(&e)))
        })?;
        Ok(OutputDir { out: out.to_path_buf(), tmp, force, committed: false })
    }

    /// The temporary folder that receives the files.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    pub fn final_path(&self) -> &Path {
        &self.out
    }

    /// Rename the finished folder into place (replacing an old `--out` only now, with `--force`).
    /// With `fsync`, the folder's entries are made durable first and the rename after.
    pub fn commit(mut self, fsync: bool) -> Result<()> {
        if fsync {
            sync_dir(&self.tmp)?;
        }
        if self.out.exists() && self.force {
            let old = self.tmp.with_file_name(format!(
                "{}.old-{}",
                self.out.file_name().unwrap_or_default().to_string_lossy(),
                random_suffix()
            ));
            std::fs::rename(&self.out, &old)
                .with_context(|| format!("cannot move the old {} aside", self.out.display()))?;
            std::fs::rename(&self.tmp, &self.out)
                .with_context(|| format!("cannot rename {} to {}", self.tmp.display(), self.out.display()))?;
            self.committed = true;
            let removed = if old.is_dir() { std::fs::remove_dir_all(&old) } else { std::fs::remove_file(&old) };
            removed.with_context(|| format!("new output is in place, but the old one is left at {}", old.display()))?;
        } else {
            std::fs::rename(&self.tmp, &self.out)
                .with_context(|| format!("cannot rename {} to {}", self.tmp.display(), self.out.display()))?;
            self.committed = true;
        }
        if let (true, Some(parent)) = (fsync, self.out.parent()) {
            let _ = sync_dir(if parent.as_os_str().is_empty() { Path::new(".") } else { parent });
        }
        Ok(())
    }
}

impl Drop for OutputDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|f| f.sync_all()).with_context(|| format!("cannot sync {}", dir.display()))
}

fn random_suffix() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.write_u32(std::process::id());
    format!("{:08x}", h.finish() as u32)
}

/// Writes one safetensors file: the header first, then the tensors' bytes in order.
pub struct ShardWriter {
    path: PathBuf,
    w: BufWriter<File>,
    written: u64,
    expected: u64,
}

impl ShardWriter {
    pub fn create(path: &Path, header: &[u8], data_bytes: u64) -> Result<ShardWriter> {
        let f = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
        let mut w = ShardWriter {
            path: path.to_path_buf(),
            w: BufWriter::with_capacity(8 << 20, f),
            written: 0,
            expected: header.len() as u64 + data_bytes,
        };
        w.write(header)?;
        Ok(w)
    }

    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.w.write_all(bytes).with_context(|| format!("cannot write {}", self.path.display()))?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// Copy `len` bytes at `at` of `src` to the end of this file, inside the kernel where it can
    /// (std's `io::copy` uses copy_file_range between files; the buffer is flushed first).
    pub fn copy_from(&mut self, src: &File, at: u64, len: u64) -> Result<()> {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = src.try_clone().context("cannot duplicate an input file handle")?;
        f.seek(SeekFrom::Start(at)).context("cannot seek in an input file")?;
        let copied = std::io::copy(&mut f.take(len), &mut self.w)
            .with_context(|| format!("cannot write {}", self.path.display()))?;
        anyhow::ensure!(copied == len, "input ended early: copied {copied} of {len} bytes to {}", self.path.display());
        self.written += len;
        Ok(())
    }

    /// Flush, check that exactly the planned number of bytes went in, and hand back the file for
    /// the caller to fsync.
    pub fn finish(self) -> Result<(File, PathBuf)> {
        anyhow::ensure!(
            self.written == self.expected,
            "internal error: wrote {} bytes to {}, planned {}",
            self.written,
            self.path.display(),
            self.expected
        );
        let path = self.path;
        let f = self
            .w
            .into_inner()
            .map_err(|e| e.into_error())
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok((f, path))
    }
}
