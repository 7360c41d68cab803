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
    /// Prepare `out`: refuse an existing one unless `force`, clear what an interrupted run left
    /// beside it, check that `needed` bytes fit, create the temporary folder beside it.
    pub fn create(out: &Path, force: bool, needed: u64) -> Result<OutputDir> {
        let shown = out.display();
        if out.exists() && !force {
            return Err(input(format!("{shown} already exists: choose another --out, or pass --force to replace it")));
        }
        let name = out
            .file_name()
            .ok_or_else(|| input(format!("--out {shown} does not name a folder")))?
            .to_string_lossy()
            .into_owned();
        let parent = crate::model::folder_of(out);
        std::fs::create_dir_all(&parent)
            .map_err(|e| input(format!("cannot create {}: {}", parent.display(), io_reason(&e))))?;
        clear_leftovers(&parent, &name, out);
        if let Some(avail) = crate::sys::free_bytes(&parent) {
            // a little room for directory entries and the side files' rounding to blocks
            if needed.saturating_add(1 << 20) > avail {
                return Err(input(format!(
                    "not enough free space in {}: the output needs {needed} bytes, {avail} are available",
                    parent.display()
                )));
            }
        }
        // The writer's pid is part of the name: a later run can tell a live writer from a dead one.
        let tmp = parent.join(format!("{name}.tmp-{}-{}", std::process::id(), random_suffix()));
        std::fs::create_dir(&tmp).map_err(|e| {
            input(format!("cannot write the output beside {shown} (in {}): {}", parent.display(), io_reason(&e)))
        })?;
        Ok(OutputDir { out: out.to_path_buf(), tmp, force, committed: false })
    }

    /// The temporary folder that receives the files.
    pub fn path(&self) -> &Path {
        &self.tmp
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
        if fsync {
            let _ = sync_dir(&crate::model::folder_of(&self.out));
        }
        Ok(())
    }
}

/// Remove the temporary folders that runs killed before they finished left beside `out`
/// (`<name>.tmp-<pid>-*` whose pid is gone), and put back an old output that a `--force` run killed
/// between its two renames had moved aside (`<name>.old-*` while `<name>` is missing). Says so.
fn clear_leftovers(parent: &Path, name: &str, out: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    for e in entries.filter_map(|e| e.ok()) {
        let file = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        if let Some(rest) = file.strip_prefix(&format!("{name}.tmp-")).filter(|_| path.is_dir()) {
            let owner = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
            let alive = match owner {
                Some(pid) => crate::sys::process_exists(pid),
                // not named by this version: leave it unless it is old
                None => e
                    .metadata()
                    .and_then(|m| m.modified())
                    .map_or(true, |t| t.elapsed().unwrap_or_default().as_secs() < 600),
            };
            if !alive && std::fs::remove_dir_all(&path).is_ok() {
                eprintln!("note: removed {}, left by an interrupted run", path.display());
            }
        } else if file.starts_with(&format!("{name}.old-")) && !out.exists() {
            if std::fs::rename(&path, out).is_ok() {
                eprintln!(
                    "note: restored {} from {}, moved aside by an interrupted --force run",
                    out.display(),
                    path.display()
                );
            }
        } else if file.starts_with(&format!("{name}.old-")) && std::fs::remove_dir_all(&path).is_ok() {
            eprintln!("note: removed {}, left by an interrupted --force run", path.display());
        }
    }
}

impl Drop for OutputDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// Make a folder's entries (new names, renames) durable. Windows cannot open a folder as a file,
/// and NTFS journals its entries itself: nothing to do there.
fn sync_dir(dir: &Path) -> Result<()> {
    if cfg!(windows) {
        return Ok(());
    }
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
    /// With `flush_behind`: the file's bytes before this offset have been handed to the disk.
    kicked: u64,
    flush_behind: Option<u64>,
}

impl ShardWriter {
    pub fn create(path: &Path, header: &[u8], data_bytes: u64) -> Result<ShardWriter> {
        let f = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
        let mut w = ShardWriter {
            path: path.to_path_buf(),
            w: BufWriter::with_capacity(8 << 20, f),
            written: 0,
            expected: header.len() as u64 + data_bytes,
            kicked: 0,
            flush_behind: None,
        };
        w.write(header)?;
        Ok(w)
    }

    /// Start writing the file's pages to disk every `every` bytes as they are written
    /// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`), so that the fsync at the end finds most of
    /// them written and the page cache does not fill with dirty pages.
    pub fn flush_behind(&mut self, every: u64) {
        self.flush_behind = Some(every);
    }

    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.w.write_all(bytes).map_err(|e| self.write_error(e))?;
        self.written += bytes.len() as u64;
        self.kick();
        Ok(())
    }

    fn kick(&mut self) {
        let Some(every) = self.flush_behind else { return };
        let in_file = self.written - self.w.buffer().len() as u64;
        if in_file - self.kicked >= every {
            // Linux only: elsewhere the fsync at the end writes the whole file
            #[cfg(target_os = "linux")]
            {
                use std::os::unix::io::AsRawFd;
                // SAFETY: an open file descriptor; the call only starts writeback of that range.
                // Its failure is not an error: the fsync at the end writes what it did not.
                unsafe {
                    libc::sync_file_range(
                        self.w.get_ref().as_raw_fd(),
                        self.kicked as libc::off64_t,
                        (in_file - self.kicked) as libc::off64_t,
                        libc::SYNC_FILE_RANGE_WRITE,
                    );
                }
            }
            self.kicked = in_file;
        }
    }

    /// Copy `len` bytes at `at` of `src` to the end of this file, through memory: copy_file_range
    /// is Linux's. The source is read at explicit offsets, as on Linux.
    #[cfg(not(target_os = "linux"))]
    pub fn copy_from(&mut self, src: &File, at: u64, len: u64) -> Result<()> {
        self.copy_through_memory(src, at, at + len)
    }

    /// Copy `len` bytes at `at` of `src` to the end of this file, inside the kernel where it can
    /// (copy_file_range; the buffer is flushed first). The source is read at explicit offsets and
    /// its file position is never used, so several writers may copy from one input at once.
    #[cfg(target_os = "linux")]
    pub fn copy_from(&mut self, src: &File, at: u64, len: u64) -> Result<()> {
        use std::os::unix::io::AsRawFd;
        self.w.flush().map_err(|e| self.write_error(e))?;
        let (mut off_in, end) = (at as libc::loff_t, at + len);
        while (off_in as u64) < end {
            let want = ((end - off_in as u64) as usize).min(1 << 30);
            // SAFETY: both descriptors are open files owned by the caller and by self; off_in is a
            // valid pointer, and a null out-offset means "at the output's position, advancing it".
            let n = unsafe {
                libc::copy_file_range(
                    src.as_raw_fd(),
                    &mut off_in,
                    self.w.get_ref().as_raw_fd(),
                    std::ptr::null_mut(),
                    want,
                    0,
                )
            };
            if n > 0 {
                self.written += n as u64;
                self.kick();
                continue;
            }
            if n == 0 {
                anyhow::bail!(
                    "input ended early: {} of {len} bytes copied to {}",
                    off_in as u64 - at,
                    self.path.display()
                );
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                // not supported between these files: copy through memory
                Some(libc::EXDEV | libc::ENOSYS | libc::EINVAL | libc::EOPNOTSUPP | libc::EPERM | libc::EBADF) => {
                    return self.copy_through_memory(src, off_in as u64, end);
                }
                _ => return Err(self.write_error(e)),
            }
        }
        Ok(())
    }

    fn copy_through_memory(&mut self, src: &File, mut at: u64, end: u64) -> Result<()> {
        let mut buf = vec![0u8; (end - at).min(8 << 20) as usize];
        while at < end {
            let n = ((end - at) as usize).min(buf.len());
            crate::sys::read_exact_at(src, &mut buf[..n], at).context("cannot read an input file")?;
            self.write(&buf[..n])?;
            at += n as u64;
        }
        Ok(())
    }

    fn write_error(&self, e: std::io::Error) -> anyhow::Error {
        let folder = crate::model::folder_of(&self.path);
        let folder = folder.display();
        if crate::sys::disk_full(&e) {
            anyhow::anyhow!(
                "the disk holding {folder} is full after {} of the {} bytes of {}",
                self.written,
                self.expected,
                self.path.display()
            )
        } else {
            anyhow::Error::new(e).context(format!("cannot write {}", self.path.display()))
        }
    }

    /// Flush, check that exactly the planned number of bytes went in, and hand back the file for
    /// the caller to fsync.
    pub fn finish(mut self) -> Result<(File, PathBuf)> {
        self.w.flush().map_err(|e| self.write_error(e))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Starting writeback behind the writes changes nothing in the file, whether the bytes come
    /// through the buffer or are copied file to file, and it keeps up with what has been written.
    #[test]
    fn flushing_behind_writes_the_same_file() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        let src_bytes: Vec<u8> = (0..3_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
        std::fs::write(&src, &src_bytes).unwrap();
        let header = b"{\"x\":1}".to_vec();
        let chunks = [1usize, 4095, 70_000, 9 << 20, 5];
        let body: Vec<u8> = chunks.iter().flat_map(|&n| std::iter::repeat_n(n as u8, n)).collect();
        let copied = 1_234_567u64..2_900_000;
        let total = body.len() as u64 + (copied.end - copied.start);
        let mut expected = header.clone();
        expected.extend(&body);
        expected.extend(&src_bytes[copied.start as usize..copied.end as usize]);
        for every in [None, Some(1), Some(4096), Some(1 << 20)] {
            let path = tmp.path().join(format!("out-{every:?}"));
            let mut w = ShardWriter::create(&path, &header, total).unwrap();
            if let Some(n) = every {
                w.flush_behind(n);
            }
            let mut at = 0;
            for n in chunks {
                w.write(&body[at..at + n]).unwrap();
                at += n;
            }
            w.copy_from(&File::open(&src).unwrap(), copied.start, copied.end - copied.start).unwrap();
            let in_file = w.written - w.w.buffer().len() as u64;
            match every {
                None => assert_eq!(w.kicked, 0),
                Some(n) => assert!(in_file - w.kicked < n && w.kicked > 0, "{every:?}: {} of {in_file}", w.kicked),
            }
            let (f, _) = w.finish().unwrap();
            f.sync_all().unwrap();
            assert!(std::fs::read(&path).unwrap() == expected, "{every:?}");
        }
    }
}
