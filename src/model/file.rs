//! One safetensors file, opened read-only: its validated header, and positional reads of its data.
//!
//! The header is checked by the `safetensors` crate (size limit, JSON, offsets contiguous and
//! matching shape × dtype, data ending exactly at the end of the file) before any offset is trusted.
//! Data is read with `pread` into the caller's buffers, so a model's pages never pile up in memory.

use crate::error::{input, Result};
use anyhow::Context;
use safetensors::tensor::{Metadata, SafeTensorError};
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// One tensor of a file, as its header declares it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Absolute byte range in the file.
    pub start: u64,
    pub end: u64,
}

impl TensorEntry {
    pub fn len_bytes(&self) -> u64 {
        self.end - self.start
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// A block of zeros that is in no file: PEFT's initial block on a module its config targets
    /// but the adapter file has no block for (no bytes; [`TensorEntry::is_zeros`]).
    pub fn zeros(name: String, shape: Vec<usize>) -> TensorEntry {
        TensorEntry { name, dtype: Dtype::F32, shape, start: 0, end: 0 }
    }

    /// Whether this is a [`TensorEntry::zeros`] block (a tensor in a file with elements has bytes).
    pub fn is_zeros(&self) -> bool {
        self.len_bytes() == 0 && self.numel() > 0
    }
}

#[derive(Debug)]
pub struct SafetensorsFile {
    pub path: PathBuf,
    file: File,
    /// Tensors in the order of their data in the file.
    pub tensors: Vec<TensorEntry>,
    by_name: HashMap<String, usize>,
    pub len: u64,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<SafetensorsFile> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let len = file.metadata().with_context(|| format!("cannot stat {}", path.display()))?.len();
        // Only the header's pages are touched; the mapping itself costs no memory.
        // SAFETY: the file is opened read-only and only read through this map while it lives; a
        // concurrent writer could change bytes under us, as with every mmap-based reader.
        let map = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?;
        let (n, meta) = SafeTensors::read_metadata(&map).map_err(|e| header_error(path, len, &map, e))?;
        let data_start = 8 + n as u64;
        let mut tensors: Vec<TensorEntry> = meta
            .offset_keys()
            .into_iter()
            .map(|name| {
                let info = meta.info(&name).expect("offset_keys come from the same header");
                TensorEntry {
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: data_start + info.data_offsets.0 as u64,
                    end: data_start + info.data_offsets.1 as u64,
                    name,
                }
            })
            .collect();
        tensors.sort_by_key(|t| (t.start, t.end));
        let by_name = tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        drop(map);
        Ok(SafetensorsFile { path: path.to_path_buf(), file, tensors, by_name, len })
    }

    pub fn get(&self, name: &str) -> Option<&TensorEntry> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// Read `buf.len()` bytes at absolute offset `at`.
    pub fn read_at(&self, at: u64, buf: &mut [u8]) -> Result<()> {
        crate::sys::read_exact_at(&self.file, buf, at)
            .with_context(|| format!("{}: cannot read {} bytes at offset {at}", self.path.display(), buf.len()))
    }

    /// Read a float tensor (F32, F16, BF16) as f32 values.
    /// A float tensor's values as f32 ([`TensorEntry::zeros`] gives zeros, reading nothing).
    pub fn read_f32(&self, t: &TensorEntry) -> Result<Vec<f32>> {
        if t.is_zeros() {
            return Ok(vec![0f32; t.numel()]);
        }
        let float = crate::ops::dtype::Float::from_dtype(t.dtype).ok_or_else(|| {
            input(format!("{}: {:?} has dtype {:?}, expected F32, BF16 or F16", self.path.display(), t.name, t.dtype))
        })?;
        let bytes = self.read_tensor(t)?;
        let mut out = vec![0f32; t.numel()];
        float.decode(&bytes, &mut out);
        Ok(out)
    }

    /// Read a whole tensor's bytes.
    pub fn read_tensor(&self, t: &TensorEntry) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; t.len_bytes() as usize];
        self.read_at(t.start, &mut buf)?;
        Ok(buf)
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Map `len` bytes at absolute offset `start` read-only (the kernel reads ahead; no copy into
    /// a buffer). Dropping the map releases its pages from this process, so memory stays bounded
    /// by what is in flight.
    pub fn map_range(&self, start: u64, len: usize) -> Result<TensorBytes> {
        if len == 0 {
            return Ok(TensorBytes::Shared { data: Default::default(), off: 0, len: 0 });
        }
        anyhow::ensure!(start + len as u64 <= self.len, "{}: range beyond the end of the file", self.path.display());
        let page = 4096u64;
        let aligned = start / page * page;
        let off = (start - aligned) as usize;
        // SAFETY: read-only mapping of a file opened read-only; see `open`.
        let map = unsafe { memmap2::MmapOptions::new().offset(aligned).len(off + len).map(&self.file) }
            .with_context(|| format!("cannot map {} bytes of {}", len, self.path.display()))?;
        #[cfg(unix)]
        let _ = map.advise(memmap2::Advice::Sequential);
        // Fault every page in here, on the reader's thread (which mostly waits for the compute
        // stage), rather than one fault at a time in the compute stage (Linux 5.14+; else ignored).
        #[cfg(target_os = "linux")]
        let _ = map.advise(memmap2::Advice::PopulateRead);
        Ok(TensorBytes::Mapped { map, off, len })
    }
}

/// Bytes of a tensor: mapped from its file, read into a buffer of a pool, or a range of a buffer
/// held in memory.
pub enum TensorBytes {
    Mapped { map: memmap2::Mmap, off: usize, len: usize },
    Read(Pooled),
    Shared { data: std::sync::Arc<Vec<u8>>, off: usize, len: usize },
}

impl TensorBytes {
    pub fn bytes(&self) -> &[u8] {
        match self {
            TensorBytes::Mapped { map, off, len } => &map[*off..*off + *len],
            TensorBytes::Read(p) => &p.data[..p.len],
            TensorBytes::Shared { data, off, len } => &data[*off..*off + *len],
        }
    }
}

/// A buffer that goes back to its pool when dropped (the reader reuses it: no fresh pages).
pub struct Pooled {
    data: Vec<u8>,
    len: usize,
    home: std::sync::mpsc::Sender<Vec<u8>>,
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let _ = self.home.send(std::mem::take(&mut self.data));
    }
}

impl SafetensorsFile {
    /// `len` bytes at absolute offset `start`, read with `pread` into `buf` (grown as needed),
    /// which goes back to `home` once the bytes are dropped. No mapping is made or removed: a
    /// process whose other threads map and unmap memory (a GPU driver starting) does not wait
    /// for them.
    pub fn read_range(
        &self,
        start: u64,
        len: usize,
        mut buf: Vec<u8>,
        home: std::sync::mpsc::Sender<Vec<u8>>,
    ) -> Result<TensorBytes> {
        if buf.len() < len {
            buf.resize(len, 0);
        }
        // in 1 MB reads side by side: one thread copies out of the page cache at well below the
        // memory's bandwidth
        use rayon::prelude::*;
        const CHUNK: usize = 1 << 20;
        buf[..len]
            .par_chunks_mut(CHUNK)
            .enumerate()
            .try_for_each(|(k, b)| self.read_at(start + (k * CHUNK) as u64, b))?;
        Ok(TensorBytes::Read(Pooled { data: buf, len, home }))
    }
}

/// Turn the crate's error into one line that says what is wrong with which file.
fn header_error(path: &Path, len: u64, bytes: &[u8], e: SafeTensorError) -> anyhow::Error {
    let p = path.display();
    let what = match e {
        SafeTensorError::HeaderTooSmall => {
            format!("{len} bytes is too short for a safetensors header (need at least 8)")
        }
        SafeTensorError::HeaderTooLarge => {
            "header length is beyond the 100 MB safetensors limit (corrupt or not a safetensors file)".to_string()
        }
        SafeTensorError::InvalidHeaderLength => {
            format!("header length points beyond the end of the file ({len} bytes): the file is truncated or not safetensors")
        }
        SafeTensorError::InvalidHeader(_) => "header is not valid UTF-8".to_string(),
        SafeTensorError::InvalidHeaderDeserialization(err) => format!("header is not valid safetensors JSON: {err}"),
        SafeTensorError::InvalidOffset(name) => {
            format!("tensor {name:?} has data offsets that overlap, leave a gap or run backwards")
        }
        SafeTensorError::TensorInvalidInfo => bad_byte_range(bytes)
            .unwrap_or_else(|| "a tensor's byte range does not match its shape and dtype".to_string()),
        SafeTensorError::MetadataIncompleteBuffer => {
            format!("the tensors' data does not end at the end of the file ({len} bytes): truncated, or extra bytes")
        }
        SafeTensorError::ValidationOverflow => {
            bad_byte_range(bytes).unwrap_or_else(|| "a tensor's shape overflows when multiplied out".to_string())
        }
        SafeTensorError::MisalignedSlice => "a tensor of sub-byte elements does not fill whole bytes".to_string(),
        other => format!("invalid safetensors file: {other:?}"),
    };
    input(format!("{p}: {what}"))
}

/// Which tensor's data offsets disagree with its shape and dtype, and by how much, read from the
/// header again: the crate's `TensorInvalidInfo` names none.
fn bad_byte_range(bytes: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Info {
        dtype: Dtype,
        shape: Vec<usize>,
        data_offsets: (usize, usize),
    }
    let n = usize::try_from(u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?)).ok()?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(bytes.get(8..8usize.checked_add(n)?)?).ok()?;
    header.into_iter().filter(|(name, _)| name != "__metadata__").find_map(|(name, v)| {
        let info: Info = serde_json::from_value(v).ok()?;
        let bits = info.shape.iter().try_fold(info.dtype.bitsize(), |a, &d| a.checked_mul(d));
        let (s, e) = info.data_offsets;
        let span = e.checked_sub(s);
        let want = bits.map(|b| b.div_ceil(8));
        (span != want || bits.is_some_and(|b| b % 8 != 0)).then(|| {
            let want = want
                .map_or("more bytes than a size can hold (the shape overflows)".to_string(), |w| format!("{w} bytes"));
            format!(
                "tensor {name:?} ({:?} {:?}) needs {want}, but its data_offsets [{s}, {e}] span {}",
                info.dtype,
                info.shape,
                span.map_or("backwards".to_string(), |b| format!("{b} bytes"))
            )
        })
    })
}

/// The header of a file holding `tensors` in this order, contiguous, with Hugging Face's
/// `{"format":"pt"}` metadata, padded with spaces to a multiple of 8 bytes. Returns the 8-byte
/// length prefix and the JSON together.
pub fn build_header(tensors: &[(String, Dtype, Vec<usize>)]) -> Result<Vec<u8>> {
    use safetensors::tensor::TensorInfo;
    let mut offset = 0usize;
    let infos = tensors
        .iter()
        .map(|(name, dtype, shape)| {
            let size = shape.iter().product::<usize>() * dtype.bitsize() / 8;
            let info = TensorInfo { dtype: *dtype, shape: shape.clone(), data_offsets: (offset, offset + size) };
            offset += size;
            (name.clone(), info)
        })
        .collect();
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let meta = Metadata::new(Some(metadata), infos).map_err(|e| anyhow::anyhow!("building header: {e:?}"))?;
    let mut json = serde_json::to_vec(&meta)?;
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pooled_read_has_the_files_bytes_and_its_buffer_comes_back_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let header = build_header(&[("w".into(), Dtype::U8, vec![100])]).unwrap();
        let data: Vec<u8> = (0..100u8).collect();
        std::fs::write(&path, [header, data.clone()].concat()).unwrap();
        let f = SafetensorsFile::open(&path).unwrap();
        let start = f.get("w").unwrap().start;
        let (home, pool) = std::sync::mpsc::channel();
        // a recycled buffer larger than asked for, with old bytes in it
        let bytes = f.read_range(start + 10, 20, vec![0xAA; 64], home.clone()).unwrap();
        assert_eq!(bytes.bytes(), &data[10..30]);
        assert!(pool.try_recv().is_err(), "not back while the bytes live");
        drop(bytes);
        let back = pool.try_recv().expect("back in the pool once dropped");
        assert_eq!(back.len(), 64, "the same buffer, not a new one");
        // a smaller buffer grows
        let bytes = f.read_range(start, 100, back, home).unwrap();
        assert_eq!(bytes.bytes(), &data[..]);
    }

    #[test]
    fn a_tensor_whose_bytes_disagree_with_its_shape_is_named_with_both_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.safetensors");
        // a well-formed header for two tensors, then w's shape edited to claim more than its bytes
        let good = build_header(&[("a".into(), Dtype::F32, vec![2]), ("w".into(), Dtype::BF16, vec![3, 4])]).unwrap();
        let json = std::str::from_utf8(&good[8..]).unwrap().replace("[3,4]", "[3,5]");
        let file = [&(json.len() as u64).to_le_bytes()[..], json.as_bytes(), &[0u8; 8 + 24]].concat();
        std::fs::write(&path, file).unwrap();
        let err = SafetensorsFile::open(&path).expect_err("the crate rejects it").to_string();
        assert!(err.starts_with(&format!("{}: ", path.display())), "{err}");
        assert!(
            err.contains(r#"tensor "w" (BF16 [3, 5]) needs 30 bytes, but its data_offsets [8, 32] span 24 bytes"#),
            "{err}"
        );
        assert!(!err.contains('\n'), "one line: {err}");
    }
}
