//! The load cache: the packed linear layers of a model, written to a file under a cache directory the first
//! time a model directory is loaded with given options, and read back on later loads instead of decoding and
//! packing the checkpoint again (packing is nearly all of a load; reading the packed bytes is what is left).
//!
//! ```text
//! <dir>/<16 hex digits: xxh3 of the key>.pack
//! header   "SPIPACK1", u64 n, the key (n bytes, UTF-8: build, ISA, options, directory, config, file identities)
//! records  one per linear layer: u64 × 13 (rows, cols, cols_pad, format, group, asym, tiled, nnz, and the
//!          element counts of values, masks, scales, minimums, bias; bias u64::MAX = none), then those arrays
//! index    u64 count, then per layer: u64 n, its key (n bytes), u64 offset, u64 length (0: not cached),
//!          u64 xxh3 of the record
//! trailer  u64 index offset, u64 index length, u64 xxh3 of the index, "SPIPEND1"
//! ```
//! All integers and arrays are little-endian (the cache is off on big-endian targets).
//!
//! The key names the build (a hash of the crate's sources, so a change to packing invalidates every entry),
//! the kernel ISA, the load options, the canonical model directory, its `config.json`, and the size,
//! modification and change times, inode and device of every weight file: a checkpoint replaced or edited in
//! place gets a new key. The file is read with positioned reads into owned memory, not mapped, so a file
//! truncated later cannot fault the process. Nothing read is trusted: the index and every record are checked
//! against their xxh3 digests, and every matrix against the invariants the kernels rely on
//! ([`PackedMatrix::from_raw`]). A damaged or mismatched file makes the load start over without it and
//! replace it. Files are written under a temporary name and renamed, so a reader sees a whole file or none;
//! the directory keeps the most recently used entries within a size budget.

use crate::error::{Error, Result};
use crate::formats::{PackedMatrix, RawMatrix, VALUE_PAD};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use xxhash_rust::xxh3::{xxh3_64, Xxh3};

const MAGIC: &[u8; 8] = b"SPIPACK1";
const END: &[u8; 8] = b"SPIPEND1";
const FIELDS: usize = 13;
const NO_BIAS: u64 = u64::MAX;
/// Largest index read (a model has a few hundred layers with keys of ~200 bytes).
const MAX_INDEX: u64 = 64 << 20;
/// Largest key header read.
const MAX_KEY: u64 = 16 << 20;
/// Bytes a cache write leaves free on its filesystem: 2 % of it, at least 1 GiB and at most 4 GiB (a large
/// shared disk need not sit on tens of idle gigabytes), so that filling the cache never makes another program's
/// writes (a training checkpoint, a log) fail.
fn reserve(total: u64) -> u64 {
    (total / 50).clamp(1 << 30, 4 << 30)
}

/// Whether writing `more` bytes keeps [`reserve`] free, given `avail` of `total` bytes available.
fn leaves_room(avail: u64, total: u64, more: u64) -> bool {
    avail.saturating_sub(more) >= reserve(total)
}

/// Bytes available to this user and the size of the filesystem holding `path`.
#[cfg(unix)]
fn disk_space(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let dir = path.parent()?;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs is plain integers, for which all zeros is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a valid out-parameter.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    let frag = st.f_frsize as u64;
    Some((st.f_bavail as u64 * frag, st.f_blocks as u64 * frag))
}

#[cfg(not(unix))]
fn disk_space(_: &Path) -> Option<(u64, u64)> {
    None
}

/// Temporary files older than this are from a process that died while writing.
const STALE_TMP: std::time::Duration = std::time::Duration::from_secs(3600);

/// Where the cache lives and how much of the disk it may use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheOptions {
    /// The cache directory (created if missing).
    pub dir: PathBuf,
    /// After a write, the least recently used files are removed until the `.pack` files total at most this.
    pub max_bytes: u64,
}

/// What the cache did during a load.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Outcome {
    /// No cache (not asked for, or not on this platform).
    #[default]
    Off,
    /// Every cached layer came from the cache.
    Hit,
    /// No entry existed; one was written.
    Written,
    /// An entry existed but was damaged or did not match; the load started over and replaced it.
    Rebuilt,
    /// The model loaded, but the cache could not be used (the reason).
    Failed(String),
}

impl Outcome {
    /// A short name: `off`, `hit`, `written`, `rebuilt` or `failed: <reason>`.
    pub fn describe(&self) -> String {
        match self {
            Outcome::Off => "off".into(),
            Outcome::Hit => "hit".into(),
            Outcome::Written => "written".into(),
            Outcome::Rebuilt => "rebuilt".into(),
            Outcome::Failed(why) => format!("failed: {why}"),
        }
    }
}

/// The layer a caller asks for: a record of another shape, or without the bias it needs, is damage.
#[derive(Clone, Copy, Debug)]
pub struct Expect {
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// Whether it has a bias (`rows` values).
    pub bias: bool,
}

/// An entry of the index: where a layer's record is and its digest.
#[derive(Clone, Copy)]
struct Slot {
    offset: u64,
    len: u64,
    hash: u64,
}

struct Writer {
    out: BufWriter<File>,
    pos: u64,
    index: Vec<(String, Slot)>,
    tmp: PathBuf,
    error: Option<String>,
}

enum Mode {
    Read { file: File, index: HashMap<String, Slot> },
    Write(Mutex<Writer>),
}

/// One load's use of a cache entry: reading an existing one, or writing a new one.
pub struct PackCache {
    mode: Mode,
    path: PathBuf,
    max_bytes: u64,
    damaged: AtomicBool,
}

/// The key of a load: everything that decides the packed layers (see the module docs).
pub fn key(options: &str, dir: &Path, config: &serde_json::Value, files: &[String]) -> String {
    let isa = crate::kernels::active_isa().map_or_else(|e| e.to_string(), |i| i.name().to_string());
    format!(
        "sparseinfer {} build {}\nisa {isa}\noptions {options}\ndir {}\nconfig {config}\nfiles\n{}\n",
        crate::VERSION,
        env!("SPARSEINFER_SOURCE_HASH"),
        dir.display(),
        files.join("\n")
    )
}

/// A weight file's identity for the key: size, modification and change times, inode, device.
pub fn file_identity(name: &str, file: &File) -> std::io::Result<String> {
    let m = file.metadata()?;
    Ok(format!(
        "{name} {} {}.{} {}.{} {} {}",
        m.len(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
        m.ino(),
        m.dev()
    ))
}

fn io_err<'a>(path: &'a Path, what: &str) -> impl Fn(std::io::Error) -> String + 'a {
    let what = what.to_string();
    move |e| format!("{what} {}: {e}", path.display())
}

impl PackCache {
    /// Opens the entry for `key` under `opts.dir`: for reading when a whole file with this key exists (and
    /// `rewrite` is false), else for writing a new one. `Err` holds why the cache cannot be used at all.
    pub fn open(opts: &CacheOptions, key: &str, rewrite: bool) -> std::result::Result<PackCache, String> {
        if cfg!(target_endian = "big") {
            return Err("the cache is little-endian only".into());
        }
        let path = opts.dir.join(format!("{:016x}.pack", xxh3_64(key.as_bytes())));
        create_private_dir(&opts.dir).map_err(io_err(&opts.dir, "creating"))?;
        check_private(&opts.dir)?;
        if !rewrite {
            if let Some((file, index)) = read_entry(&path, key) {
                // Recently used: eviction goes by modification time.
                let _ = file.set_modified(std::time::SystemTime::now());
                let mode = Mode::Read { file, index };
                return Ok(PackCache { mode, path, max_bytes: opts.max_bytes, damaged: AtomicBool::new(false) });
            }
        }
        let tmp = opts.dir.join(format!(
            "{:016x}.pack.tmp-{}-{}",
            xxh3_64(key.as_bytes()),
            std::process::id(),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
        ));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err(&tmp, "creating"))?;
        let mut header = MAGIC.to_vec();
        header.extend((key.len() as u64).to_le_bytes());
        header.extend(key.as_bytes());
        let out = BufWriter::with_capacity(1 << 20, file);
        let mut w = Writer { out, pos: 0, index: Vec::new(), tmp, error: None };
        w.put(&header);
        let mode = Mode::Write(Mutex::new(w));
        Ok(PackCache { mode, path, max_bytes: opts.max_bytes, damaged: AtomicBool::new(false) })
    }

    /// Whether reading found a record damaged or missing (the load should start over with `rewrite`).
    pub fn damaged(&self) -> bool {
        self.damaged.load(Ordering::Relaxed)
    }

    /// Whether this load reads an existing entry.
    pub fn reading(&self) -> bool {
        matches!(self.mode, Mode::Read { .. })
    }

    /// The layer under `key`: from the cache when reading, else from `build`, whose result is written when
    /// `cacheable` says it is worth caching. Reading a damaged or missing record marks the cache damaged and
    /// returns an error (the load starts over).
    pub fn layer(
        &self,
        key: &str,
        expect: Expect,
        build: impl FnOnce() -> Result<(PackedMatrix, Option<Vec<f32>>)>,
        cacheable: impl Fn(&PackedMatrix) -> bool,
    ) -> Result<(PackedMatrix, Option<Vec<f32>>)> {
        match &self.mode {
            Mode::Read { file, index } => match index.get(key) {
                Some(slot) if slot.len == 0 => build(),
                Some(slot) => read_record(file, *slot, expect).map_err(|why| {
                    self.damaged.store(true, Ordering::Relaxed);
                    Error::invalid("load cache", format!("{}: layer {key}: {why}", self.path.display()))
                }),
                None => {
                    self.damaged.store(true, Ordering::Relaxed);
                    Err(Error::invalid("load cache", format!("{}: no layer {key}", self.path.display())))
                }
            },
            Mode::Write(w) => {
                let (m, bias) = build()?;
                let mut w = w.lock().unwrap_or_else(|e| e.into_inner());
                if cacheable(&m) {
                    w.record(key, &m, bias.as_deref());
                } else {
                    let pos = w.pos;
                    w.index.push((key.to_string(), Slot { offset: pos, len: 0, hash: 0 }));
                }
                Ok((m, bias))
            }
        }
    }

    /// Ends a successful load: a written entry gets its index and its name, and the directory is trimmed to
    /// its budget. Returns what happened.
    pub fn finish(self, rebuilt: bool) -> Outcome {
        let w = match self.mode {
            Mode::Read { .. } => return Outcome::Hit,
            Mode::Write(w) => w.into_inner().unwrap_or_else(|e| e.into_inner()),
        };
        if w.pos > self.max_bytes {
            let why = format!("the entry ({} bytes) is over the cache's budget ({} bytes)", w.pos, self.max_bytes);
            return Outcome::Failed(why); // dropping the writer removes its file
        }
        let tmp = w.tmp.clone();
        match w.seal(&self.path) {
            Ok(()) => {
                if let Some(dir) = self.path.parent() {
                    trim(dir, self.max_bytes, &self.path);
                }
                if rebuilt {
                    Outcome::Rebuilt
                } else {
                    Outcome::Written
                }
            }
            Err(why) => {
                let _ = std::fs::remove_file(tmp);
                Outcome::Failed(why)
            }
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // A load that failed (or a sealed entry, already renamed) leaves no temporary file behind.
        let _ = std::fs::remove_file(&self.tmp);
    }
}

impl Writer {
    fn put(&mut self, bytes: &[u8]) {
        if self.error.is_none() {
            if let Err(e) = self.out.write_all(bytes) {
                self.error = Some(format!("writing {}: {e}", self.tmp.display()));
            }
            self.pos += bytes.len() as u64;
        }
    }

    fn record(&mut self, key: &str, m: &PackedMatrix, bias: Option<&[f32]>) {
        let raw = m.raw_header();
        let (data, masks, scales, mins) = m.raw_arrays();
        let fields: [u64; FIELDS] = [
            raw.rows as u64,
            raw.cols as u64,
            raw.cols_pad as u64,
            raw.format as u64,
            raw.group as u64,
            raw.asym as u64,
            raw.tiled as u64,
            raw.nnz as u64,
            data.len() as u64,
            masks.len() as u64,
            scales.len() as u64,
            mins.len() as u64,
            bias.map_or(NO_BIAS, |b| b.len() as u64),
        ];
        let head: Vec<u8> = fields.iter().flat_map(|f| f.to_le_bytes()).collect();
        let parts: [&[u8]; 6] =
            [&head, data, as_bytes(masks), as_bytes(&scales), as_bytes(&mins), as_bytes(bias.unwrap_or(&[]))];
        let size: u64 = parts.iter().map(|p| p.len() as u64).sum();
        if self.error.is_none() {
            if let Some((avail, total)) = disk_space(&self.tmp) {
                if !leaves_room(avail, total, size) {
                    self.error = Some(format!(
                        "not written: {} more bytes would leave less than {} of the disk free",
                        size,
                        reserve(total)
                    ));
                }
            }
        }
        let (offset, mut hasher) = (self.pos, Xxh3::new());
        for p in parts {
            hasher.update(p);
            self.put(p);
        }
        let slot = Slot { offset, len: self.pos - offset, hash: hasher.digest() };
        self.index.push((key.to_string(), slot));
    }

    fn seal(mut self, path: &Path) -> std::result::Result<(), String> {
        let mut index = (self.index.len() as u64).to_le_bytes().to_vec();
        for (key, s) in &self.index {
            index.extend((key.len() as u64).to_le_bytes());
            index.extend(key.as_bytes());
            for v in [s.offset, s.len, s.hash] {
                index.extend(v.to_le_bytes());
            }
        }
        let at = self.pos;
        self.put(&index);
        let mut trailer = Vec::with_capacity(32);
        for v in [at, index.len() as u64, xxh3_64(&index)] {
            trailer.extend(v.to_le_bytes());
        }
        trailer.extend(END);
        self.put(&trailer);
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        let tmp = self.tmp.clone();
        self.out.flush().map_err(io_err(&tmp, "writing"))?;
        self.out.get_ref().sync_all().map_err(io_err(&tmp, "syncing"))?;
        std::fs::rename(&tmp, path).map_err(io_err(&tmp, "renaming"))
    }
}

/// The bytes of a slice of plain numbers (little-endian targets only, see the module docs).
fn as_bytes<T: Copy>(v: &[T]) -> &[u8] {
    // SAFETY: T is u64 or f32 here: no padding, every byte initialised; the length covers exactly the slice.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// A zeroed vector of `n` plain numbers and its bytes to read into, or `None` when it cannot be allocated.
fn zeroed<T: Copy + Default>(n: usize) -> Option<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).ok()?;
    v.resize(n, T::default());
    Some(v)
}

fn as_bytes_mut<T: Copy>(v: &mut [T]) -> &mut [u8] {
    // SAFETY: as `as_bytes`; and every bit pattern is a valid u64 or f32.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// The index of a whole entry with this exact key, or `None` (missing, not a regular file, another key,
/// truncated, damaged).
fn read_entry(path: &Path, key: &str) -> Option<(File, HashMap<String, Slot>)> {
    let file = super::files::open_nonblocking(path, false).ok()?;
    let meta = file.metadata().ok()?;
    // SAFETY: geteuid has no preconditions.
    if !meta.is_file() || meta.uid() != unsafe { libc::geteuid() } {
        return None;
    }
    let len = meta.len();
    let u64_at = |at: u64| -> Option<u64> {
        let mut b = [0u8; 8];
        file.read_exact_at(&mut b, at).ok()?;
        Some(u64::from_le_bytes(b))
    };
    let mut magic = [0u8; 8];
    file.read_exact_at(&mut magic, 0).ok()?;
    let n = u64_at(8)?;
    if &magic != MAGIC || n != key.len() as u64 || n > MAX_KEY || 16 + n + 32 > len {
        return None;
    }
    let mut stored = vec![0u8; n as usize];
    file.read_exact_at(&mut stored, 16).ok()?;
    if stored != key.as_bytes() {
        return None;
    }
    let mut end = [0u8; 8];
    file.read_exact_at(&mut end, len - 8).ok()?;
    let (at, ilen, ihash) = (u64_at(len - 32)?, u64_at(len - 24)?, u64_at(len - 16)?);
    if &end != END || ilen > MAX_INDEX || at.checked_add(ilen)? != len - 32 || at < 16 + n {
        return None;
    }
    let mut raw = vec![0u8; ilen as usize];
    file.read_exact_at(&mut raw, at).ok()?;
    if xxh3_64(&raw) != ihash {
        return None;
    }
    let mut index = HashMap::new();
    let mut p = 0usize;
    let mut take = |k: usize| -> Option<&[u8]> {
        let s = raw.get(p..p.checked_add(k)?)?;
        p += k;
        Some(s)
    };
    let word = |s: &[u8]| u64::from_le_bytes(s.try_into().expect("8 bytes"));
    let count = word(take(8)?);
    for _ in 0..count {
        let k = word(take(8)?);
        let name = String::from_utf8(take(usize::try_from(k).ok()?)?.to_vec()).ok()?;
        let (offset, rlen, hash) = (word(take(8)?), word(take(8)?), word(take(8)?));
        if offset < 16 + n || offset.checked_add(rlen)? > at {
            return None;
        }
        index.insert(name, Slot { offset, len: rlen, hash });
    }
    Some((file, index))
}

/// One record, checked against its digest, the layer asked for and the packed-matrix invariants. Its header
/// is checked against `expect` before anything is allocated, so no record can make the load allocate more
/// than the largest packing of that shape.
fn read_record(file: &File, s: Slot, expect: Expect) -> std::result::Result<(PackedMatrix, Option<Vec<f32>>), String> {
    let mut head = [0u8; 8 * FIELDS];
    if s.len < head.len() as u64 {
        return Err("record shorter than its header".into());
    }
    file.read_exact_at(&mut head, s.offset).map_err(|e| e.to_string())?;
    let mut hasher = Xxh3::new();
    hasher.update(&head);
    let f: Vec<u64> = head.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect();
    let has_bias = f[12] != NO_BIAS;
    let (rows, cols) = (expect.rows as u64, expect.cols as u64);
    if (f[0], f[1], has_bias) != (rows, cols, expect.bias) {
        return Err(format!(
            "shape ({}, {}) with bias {has_bias}, expected ({rows}, {cols}) with bias {}",
            f[0], f[1], expect.bias
        ));
    }
    // The largest arrays any format packs a (rows, cols) matrix into: padding adds at most 127 columns, and a
    // tiled dense matrix stores whole tiles of 16 rows.
    let cells = rows.div_ceil(16).checked_mul(16 * (cols + 128)).ok_or("shape overflows")?;
    let limits = [
        cells.saturating_mul(4).saturating_add(VALUE_PAD as u64),
        cells / 4 + 16 * (cols + 128),
        cells / 32 + rows,
        cells / 32 + rows,
    ];
    if f[8..12].iter().zip(limits).any(|(n, most)| *n > most) || (has_bias && f[12] != rows) {
        return Err("array lengths exceed the layer's shape".into());
    }
    let counts = [f[8], f[9], f[10], f[11], if has_bias { f[12] } else { 0 }];
    let sizes = [1u64, 8, 4, 4, 4];
    let body = counts.iter().zip(sizes).try_fold(0u64, |a, (c, z)| a.checked_add(c.checked_mul(z)?));
    if body.and_then(|b| b.checked_add(head.len() as u64)) != Some(s.len) {
        return Err("array lengths do not add up to the record's length".into());
    }
    let size = |c: u64| usize::try_from(c).map_err(|_| "array too large".to_string());
    let alloc = "cannot allocate the layer".to_string();
    let mut data: Vec<u8> = zeroed(size(counts[0])?).ok_or(&alloc)?;
    let mut masks: Vec<u64> = zeroed(size(counts[1])?).ok_or(&alloc)?;
    let mut scales: Vec<f32> = zeroed(size(counts[2])?).ok_or(&alloc)?;
    let mut mins: Vec<f32> = zeroed(size(counts[3])?).ok_or(&alloc)?;
    let mut bias: Vec<f32> = zeroed(size(counts[4])?).ok_or(&alloc)?;
    let mut at = s.offset + head.len() as u64;
    for part in [
        &mut data[..],
        as_bytes_mut(&mut masks),
        as_bytes_mut(&mut scales),
        as_bytes_mut(&mut mins),
        as_bytes_mut(&mut bias),
    ] {
        file.read_exact_at(part, at).map_err(|e| e.to_string())?;
        hasher.update(part);
        at += part.len() as u64;
    }
    if hasher.digest() != s.hash {
        return Err("digest mismatch".into());
    }
    if bias.iter().any(|v| !v.is_finite()) {
        return Err("non-finite bias".into());
    }
    let usize_of = |v: u64| usize::try_from(v).map_err(|_| format!("field {v} out of range"));
    let flag = |v: u64| match v {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(format!("flag {v}")),
    };
    let raw = RawMatrix {
        rows: usize_of(f[0])?,
        cols: usize_of(f[1])?,
        cols_pad: usize_of(f[2])?,
        format: usize_of(f[3])?,
        group: usize_of(f[4])?,
        asym: flag(f[5])?,
        tiled: flag(f[6])?,
        nnz: usize_of(f[7])?,
        data,
        masks,
        scales,
        mins,
    };
    let m = PackedMatrix::from_raw(raw).map_err(|e| e.to_string())?;
    Ok((m, has_bias.then_some(bias)))
}

/// Refuses a cache directory that another user owns or may write to: its entries are trusted to be what this
/// user's loads wrote (their digests catch damage, not substitution).
fn check_private(dir: &Path) -> std::result::Result<(), String> {
    let meta = std::fs::metadata(dir).map_err(io_err(dir, "reading"))?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me || meta.mode() & 0o022 != 0 {
        return Err(format!("{} is not a directory only this user may write to", dir.display()));
    }
    Ok(())
}

/// Creates the cache directory readable by its owner only (it holds the weights of the models loaded).
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// Removes the least recently used `.pack` files until they total at most `max_bytes` (never `keep`), and
/// temporary files left by writers that died.
fn trim(dir: &Path, max_bytes: u64, keep: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let now = std::time::SystemTime::now();
    let mut packs = Vec::new();
    for e in entries.flatten() {
        let (path, Ok(meta)) = (e.path(), e.metadata()) else { continue };
        let name = e.file_name().to_string_lossy().into_owned();
        let modified = meta.modified().unwrap_or(now);
        if !meta.is_file() {
            continue;
        }
        if name.contains(".pack.tmp-") {
            if now.duration_since(modified).is_ok_and(|age| age > STALE_TMP) {
                let _ = std::fs::remove_file(&path);
            }
        } else if name.ends_with(".pack") {
            packs.push((modified, meta.len(), path));
        }
    }
    packs.sort();
    let mut total: u64 = packs.iter().map(|p| p.1).sum();
    for (_, len, path) in packs {
        if total <= max_bytes {
            break;
        }
        if path != keep && std::fs::remove_file(&path).is_ok() {
            total -= len;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::{Format, PackOptions};

    #[test]
    fn writes_leave_the_disk_its_reserve() {
        const GB: u64 = 1 << 30;
        // Small disks keep 1 GiB, medium ones 2 %, large ones 4 GiB.
        assert!(leaves_room(10 * GB, 20 * GB, 9 * GB) && !leaves_room(10 * GB, 20 * GB, 9 * GB + 1));
        assert!(leaves_room(10 * GB, 100 * GB, 8 * GB) && !leaves_room(10 * GB, 100 * GB, 9 * GB));
        assert!(leaves_room(30 * GB, 1000 * GB, 26 * GB) && !leaves_room(30 * GB, 1000 * GB, 27 * GB));
        assert!(!leaves_room(GB - 1, 20 * GB, 0));
        let (avail, total) = disk_space(&std::env::temp_dir().join("x")).expect("statvfs of the temp dir");
        assert!(total > 0 && avail <= total);
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("sparseinfer-pack-cache-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn matrix(rows: usize, cols: usize) -> PackedMatrix {
        let w: Vec<f32> = (0..rows * cols).map(|i| if i % 3 == 0 { 0.0 } else { (i % 17) as f32 - 8.0 }).collect();
        PackedMatrix::pack(&w, rows, cols, Format::SparseInt8, PackOptions::default()).unwrap()
    }

    #[test]
    fn a_record_of_another_shape_or_bias_is_damage() {
        let dir = scratch("shape");
        let opts = CacheOptions { dir: dir.clone(), max_bytes: u64::MAX };
        let w = PackCache::open(&opts, "key", false).unwrap();
        assert!(!w.reading());
        let expect = Expect { rows: 40, cols: 100, bias: true };
        w.layer("a", expect, || Ok((matrix(40, 100), Some(vec![0.5; 40]))), |_| true).unwrap();
        assert_eq!(w.finish(false), Outcome::Written);
        for (e, ok) in [
            (expect, true),
            (Expect { rows: 16, ..expect }, false),
            (Expect { cols: 64, ..expect }, false),
            (Expect { bias: false, ..expect }, false),
        ] {
            let r = PackCache::open(&opts, "key", false).unwrap();
            assert!(r.reading());
            let got = r.layer("a", e, || unreachable!("read, not built"), |_| true);
            assert_eq!(got.is_ok(), ok, "{e:?}");
            assert_eq!(r.damaged(), !ok);
            if let Ok((m, b)) = got {
                assert_eq!((m.to_dense(), b), (matrix(40, 100).to_dense(), Some(vec![0.5; 40])));
            }
        }
        // Another key is another file.
        assert!(!PackCache::open(&opts, "other key", false).unwrap().reading());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_header_claiming_more_than_the_shape_allows_is_refused_before_allocating() {
        let dir = scratch("alloc");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("record");
        let expect = Expect { rows: 40, cols: 100, bias: false };
        // rows, cols, cols_pad, format, group, asym, tiled, nnz, then 2^40 value bytes.
        let fields: [u64; FIELDS] = [40, 100, 128, 6, 128, 0, 0, 0, 1 << 40, 80, 40, 0, NO_BIAS];
        std::fs::write(&path, fields.iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
        let file = File::open(&path).unwrap();
        let slot = Slot { offset: 0, len: (8 * FIELDS) as u64 + (1 << 40) + 80 * 8 + 160, hash: 0 };
        let err = read_record(&file, slot, expect).unwrap_err();
        assert!(err.contains("exceed the layer's shape"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
