//! A validating reader of `*.safetensors` files and sharded model directories.
//!
//! The file format (https://github.com/huggingface/safetensors):
//!
//! ```text
//! ┌──────────────┬───────────────────────────────┬──────────────────────────────┐
//! │ u64 LE: n    │ n bytes of UTF-8 JSON header  │ data: tensors back to back   │
//! └──────────────┴───────────────────────────────┴──────────────────────────────┘
//! header: {"name": {"dtype": "F32", "shape": [r, c], "data_offsets": [begin, end]}, ..., "__metadata__": {...}}
//! ```
//!
//! Offsets are relative to the start of the data section. Every header is checked before any tensor is
//! read: offsets inside the file, `end - begin == numel × dtype size`, no two tensors overlapping. A file
//! that lies gets [`Error::InvalidInput`] naming the file and tensor, never an out-of-bounds read.
//!
//! Tensors are read with positioned reads (`pread`) into owned buffers, not memory-mapped: the model copies
//! every weight it keeps while loading, so a map saved no copy, and a file truncated by another process while
//! mapped kills the process with SIGBUS on the next touch, where a read returns an error.

use crate::error::{Error, Result};
use crate::runtime::files::{ModelDir, MAX_JSON_BYTES};
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const OP: &str = "safetensors";
/// Headers larger than this are refused (the format's own reference limit is 100 MB).
const MAX_HEADER: u64 = 100 << 20;

/// Element types a tensor may have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    /// IEEE f32.
    F32,
    /// IEEE f16.
    F16,
    /// bfloat16.
    BF16,
    /// Signed 8-bit.
    I8,
    /// Unsigned 8-bit.
    U8,
    /// Signed 32-bit.
    I32,
    /// Signed 64-bit.
    I64,
    /// Boolean (1 byte).
    Bool,
}

impl Dtype {
    fn parse(s: &str) -> Option<Dtype> {
        Some(match s {
            "F32" => Dtype::F32,
            "F16" => Dtype::F16,
            "BF16" => Dtype::BF16,
            "I8" => Dtype::I8,
            "U8" => Dtype::U8,
            "I32" => Dtype::I32,
            "I64" => Dtype::I64,
            "BOOL" => Dtype::Bool,
            _ => return None,
        })
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
            Dtype::I8 | Dtype::U8 | Dtype::Bool => 1,
            Dtype::I64 => 8,
        }
    }

    /// The safetensors name (`"F32"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "F32",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::I8 => "I8",
            Dtype::U8 => "U8",
            Dtype::I32 => "I32",
            Dtype::I64 => "I64",
            Dtype::Bool => "BOOL",
        }
    }
}

#[derive(Clone, Debug)]
struct Entry {
    dtype: Dtype,
    shape: Vec<usize>,
    begin: usize,
    end: usize,
}

/// One open `.safetensors` file with a validated header.
pub struct SafeTensors {
    path: PathBuf,
    file: File,
    data_start: u64,
    entries: HashMap<String, Entry>,
}

/// A tensor read from its file: its dtype, shape and raw little-endian bytes.
#[derive(Clone, Debug)]
pub struct TensorView<'a> {
    /// Element type.
    pub dtype: Dtype,
    /// Shape (row-major).
    pub shape: &'a [usize],
    /// `numel × dtype.size()` bytes.
    pub bytes: Vec<u8>,
}

impl TensorView<'_> {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The values as f32 (from F32, F16 or BF16).
    pub fn to_f32(&self, name: &str) -> Result<Vec<f32>> {
        let b = &self.bytes[..];
        Ok(match self.dtype {
            Dtype::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            Dtype::BF16 => {
                b.chunks_exact(2).map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16)).collect()
            }
            Dtype::F16 => b.chunks_exact(2).map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect(),
            d => {
                return Err(Error::invalid(
                    OP,
                    format!("tensor {name:?} has dtype {}, expected F32, F16 or BF16", d.name()),
                ))
            }
        })
    }
}

/// IEEE half to single, exactly (kept here, where checkpoints are read, for its callers).
pub use crate::formats::f16_to_f32;

impl SafeTensors {
    /// Opens and validates a file (a regular file only).
    pub fn open(path: &Path) -> Result<SafeTensors> {
        SafeTensors::from_file(crate::runtime::files::open_regular(path)?, path)
    }

    /// Validates an open file; `path` names it in errors.
    pub fn from_file(file: File, path: &Path) -> Result<SafeTensors> {
        let shown = path.display().to_string();
        let io = |e| Error::Io { op: format!("reading {shown}"), source: e };
        let file_len = file.metadata().map_err(io)?.len();
        let bad = |msg: String| Error::invalid(OP, format!("{shown}: {msg}"));
        if file_len < 8 {
            return Err(bad(format!("file is {file_len} bytes, too short for a safetensors header")));
        }
        let mut first = [0u8; 8];
        file.read_exact_at(&mut first, 0).map_err(io)?;
        let n = u64::from_le_bytes(first);
        if n > MAX_HEADER {
            // Not echoing n: in a file that is not safetensors these are its first bytes.
            return Err(bad(format!("header length is over {MAX_HEADER} bytes (not a safetensors file?)")));
        }
        if 8 + n > file_len {
            return Err(bad(format!(
                "header length {n} does not fit in a {file_len}-byte file (truncated or not safetensors)"
            )));
        }
        let data_start = 8 + n;
        let mut raw = vec![0u8; n as usize];
        file.read_exact_at(&mut raw, 8).map_err(io)?;
        let header: serde_json::Value =
            serde_json::from_slice(&raw).map_err(|e| bad(format!("header is not valid JSON: {e}")))?;
        let obj = header.as_object().ok_or_else(|| bad("header is not a JSON object".into()))?;
        let data_len = usize::try_from(file_len - data_start).unwrap_or(usize::MAX);
        let mut entries = HashMap::new();
        for (name, v) in obj {
            if name == "__metadata__" {
                continue;
            }
            let e = parse_entry(v).map_err(|m| bad(format!("tensor {name:?}: {m}")))?;
            if e.end > data_len {
                return Err(bad(format!(
                    "tensor {name:?} ends at byte {} of a {data_len}-byte data section (file truncated?)",
                    e.end
                )));
            }
            entries.insert(name.clone(), e);
        }
        let mut spans: Vec<(usize, usize, &String)> = entries.iter().map(|(k, e)| (e.begin, e.end, k)).collect();
        spans.sort();
        for w in spans.windows(2) {
            if w[1].0 < w[0].1 {
                return Err(bad(format!("tensors {:?} and {:?} overlap", w[0].2, w[1].2)));
            }
        }
        Ok(SafeTensors { path: path.to_path_buf(), file, data_start, entries })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.entries.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// A tensor's dtype and shape, if present (nothing is read).
    pub fn meta(&self, name: &str) -> Option<(Dtype, &[usize])> {
        self.entries.get(name).map(|e| (e.dtype, &e.shape[..]))
    }

    /// A tensor read from the file, if present. A file cut short since it was opened is an error naming it.
    pub fn get(&self, name: &str) -> Result<Option<TensorView<'_>>> {
        let Some(e) = self.entries.get(name) else { return Ok(None) };
        let n = e.end - e.begin;
        let mut bytes = Vec::new();
        bytes.try_reserve_exact(n).map_err(|_| super::out_of_memory(name, n))?;
        bytes.resize(n, 0);
        self.file.read_exact_at(&mut bytes, self.data_start + e.begin as u64).map_err(|source| Error::Io {
            op: format!("reading tensor {name:?} of {} (was the file changed while loading?)", self.path.display()),
            source,
        })?;
        Ok(Some(TensorView { dtype: e.dtype, shape: &e.shape, bytes }))
    }
}

fn parse_entry(v: &serde_json::Value) -> std::result::Result<Entry, String> {
    let dtype_s = v.get("dtype").and_then(|d| d.as_str()).ok_or("missing \"dtype\"")?;
    let dtype = Dtype::parse(dtype_s).ok_or_else(|| format!("unsupported dtype {dtype_s:?}"))?;
    let shape: Vec<usize> = v
        .get("shape")
        .and_then(|s| s.as_array())
        .ok_or("missing \"shape\"")?
        .iter()
        .map(|d| d.as_u64().map(|d| d as usize).ok_or("shape holds a non-integer"))
        .collect::<std::result::Result<_, _>>()?;
    let offs = v.get("data_offsets").and_then(|s| s.as_array()).ok_or("missing \"data_offsets\"")?;
    if offs.len() != 2 {
        return Err("\"data_offsets\" must hold two integers".into());
    }
    let begin = offs[0].as_u64().ok_or("bad data_offsets")? as usize;
    let end = offs[1].as_u64().ok_or("bad data_offsets")? as usize;
    let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or("shape overflows")?;
    let want = numel.checked_mul(dtype.size()).ok_or("shape overflows")?;
    if end < begin || end - begin != want {
        return Err(format!(
            "data_offsets [{begin}, {end}] hold {} bytes but shape {shape:?} of {dtype_s} needs {want}",
            end.saturating_sub(begin)
        ));
    }
    Ok(Entry { dtype, shape, begin, end })
}

/// All weights of a model directory: one `model.safetensors`, or shards listed in
/// `model.safetensors.index.json`, or every `*.safetensors` file in the directory.
#[derive(Clone)]
pub struct WeightStore {
    files: Arc<Vec<SafeTensors>>,
    index: Arc<HashMap<String, usize>>,
}

impl WeightStore {
    /// Each weight file's identity (size, times, inode, device) for the load cache's key.
    pub fn identities(&self) -> std::io::Result<Vec<String>> {
        // The file's name, not the path as the caller spelled the directory: one model, one entry.
        let name = |f: &SafeTensors| f.path.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        self.files.iter().map(|f| crate::runtime::pack_cache::file_identity(&name(f), &f.file)).collect()
    }

    /// Opens every weight file of `dir`: the shards listed in `model.safetensors.index.json`, else every
    /// `*.safetensors` file. Each must resolve inside the directory and be a regular file.
    pub fn open_dir(dir: &ModelDir) -> Result<WeightStore> {
        const INDEX: &str = "model.safetensors.index.json";
        let names: Vec<String> = match dir.read_json(INDEX, MAX_JSON_BYTES)? {
            Some(v) => {
                let bad = |m: &str| Error::invalid(OP, format!("{}: {m}", dir.shown(INDEX)));
                let map =
                    v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| bad("no \"weight_map\" object"))?;
                let mut names = Vec::new();
                for (tensor, file) in map {
                    let file =
                        file.as_str().ok_or_else(|| bad(&format!("weight_map[{tensor:?}] is not a file name")))?;
                    names.push(file.to_string());
                }
                names.sort();
                names.dedup();
                names
            }
            None => dir.names_with_extension("safetensors")?,
        };
        if names.is_empty() {
            return Err(Error::invalid(OP, format!("{}: no *.safetensors weight files", dir.shown(""))));
        }
        // Two names may be links to one file: open each real file once.
        let mut seen = std::collections::HashSet::new();
        let mut files = Vec::new();
        for name in &names {
            let real =
                dir.resolve(name)?.ok_or_else(|| Error::invalid(OP, format!("{}: no such file", dir.shown(name))))?;
            if seen.insert(real) {
                files.push(SafeTensors::from_file(dir.open_required(name)?, Path::new(&dir.shown(name)))?);
            }
        }
        let mut index = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            for name in f.entries.keys() {
                index.insert(name.clone(), i);
            }
        }
        Ok(WeightStore { files: Arc::new(files), index: Arc::new(index) })
    }

    /// A tensor read from whichever file has it, if any.
    pub fn get(&self, name: &str) -> Result<Option<TensorView<'_>>> {
        match self.index.get(name) {
            Some(&i) => self.files[i].get(name),
            None => Ok(None),
        }
    }

    /// A tensor's dtype and shape, if any file has it (nothing is read).
    pub fn meta(&self, name: &str) -> Option<(Dtype, &[usize])> {
        self.index.get(name).and_then(|&i| self.files[i].meta(name))
    }

    /// Whether a tensor exists.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.index.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// A required tensor with an expected shape.
    pub fn tensor(&self, name: &str, shape: &[usize]) -> Result<TensorView<'_>> {
        let missing = || Error::invalid(OP, format!("tensor {name:?} is missing from the checkpoint"));
        let (_, stored) = self.meta(name).ok_or_else(missing)?;
        // Checked before reading, so a wrong config never sizes a read.
        if stored != shape {
            return Err(Error::invalid(
                OP,
                format!("tensor {name:?} has shape {stored:?}, the config implies {shape:?}"),
            ));
        }
        self.get(name)?.ok_or_else(missing)
    }

    /// A required float tensor with an expected shape, as f32.
    pub fn f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        self.tensor(name, shape)?.to_f32(name)
    }

    /// A small integer tensor (I64 or I32) as i64 values (shapes stored as tensors).
    pub fn int_values(&self, name: &str) -> Result<Vec<i64>> {
        let t = self
            .get(name)?
            .ok_or_else(|| Error::invalid(OP, format!("tensor {name:?} is missing from the checkpoint")))?;
        match t.dtype {
            Dtype::I64 => {
                Ok(t.bytes.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes"))).collect())
            }
            Dtype::I32 => {
                Ok(t.bytes.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")) as i64).collect())
            }
            d => Err(Error::invalid(OP, format!("tensor {name:?} has dtype {}, expected I64 or I32", d.name()))),
        }
    }

    /// The dtype most float tensors are stored in (for "load as stored").
    pub fn main_float_dtype(&self) -> Dtype {
        let mut count: HashMap<&'static str, usize> = HashMap::new();
        for f in self.files.iter() {
            for e in f.entries.values() {
                if matches!(e.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
                    *count.entry(e.dtype.name()).or_default() += e.end - e.begin;
                }
            }
        }
        match count.into_iter().max_by_key(|(_, n)| *n).map(|(d, _)| d) {
            Some("BF16") => Dtype::BF16,
            Some("F16") => Dtype::F16,
            _ => Dtype::F32,
        }
    }
}
