//! Memory read bandwidth: the ceiling for memory-bound decoding. Every thread streams its share of a buffer
//! much larger than the last-level caches ([`default_probe_bytes`]), in each of a few access patterns, and the
//! best pattern is the figure: a probe slower than some reader of the same memory would not be the machine's
//! limit.

use crate::error::{Error, Result};
use crate::parallel;
use std::time::Instant;

/// Largest probe buffer (a probe needs a few times the last-level cache, not the machine's memory).
pub const MAX_BYTES: usize = 64 << 30;
/// Most repeats (each reads the buffer three times).
pub const MAX_REPEATS: usize = 1000;
/// Most threads.
pub const MAX_THREADS: usize = 4096;

/// Smallest default probe buffer, and the last-level cache assumed where the system does not say.
const MIN_DEFAULT_BYTES: usize = 1 << 30;
const ASSUMED_LLC_BYTES: usize = 32 << 20;

/// The last-level cache of this machine in bytes, every instance of it counted once (one per socket, or per
/// core complex on AMD): the sizes Linux reports for each CPU's highest cache level
/// (`/sys/devices/system/cpu/cpu*/cache/index*/`), summed over distinct `shared_cpu_list`s; `None` where
/// the system does not say.
pub fn last_level_cache_bytes() -> Option<usize> {
    let read = |p: std::path::PathBuf| std::fs::read_to_string(p).ok().map(|s| s.trim().to_string());
    let mut seen = std::collections::BTreeMap::new();
    for cpu in std::fs::read_dir("/sys/devices/system/cpu").ok()?.flatten() {
        let name = cpu.file_name();
        let name = name.to_string_lossy();
        if !name.strip_prefix("cpu").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())) {
            continue;
        }
        let Ok(caches) = std::fs::read_dir(cpu.path().join("cache")) else { continue };
        // This CPU's highest-level cache: (level, size, who shares it).
        let top = caches
            .flatten()
            .filter_map(|e| {
                let level = read(e.path().join("level"))?.parse::<u32>().ok()?;
                let size = parse_cache_size(&read(e.path().join("size"))?)?;
                Some((level, size, read(e.path().join("shared_cpu_list")).unwrap_or_default()))
            })
            .max_by_key(|&(level, size, _)| (level, size));
        if let Some((_, size, shared)) = top {
            seen.insert(if shared.is_empty() { name.into_owned() } else { shared }, size);
        }
    }
    seen.values().try_fold(0usize, |a, &b| a.checked_add(b)).filter(|&n| n > 0)
}

/// `"307200K"`, `"32M"` or a plain byte count as bytes.
fn parse_cache_size(s: &str) -> Option<usize> {
    let (digits, unit) = match s.as_bytes().last()? {
        b'K' => (&s[..s.len() - 1], 1 << 10),
        b'M' => (&s[..s.len() - 1], 1 << 20),
        b'G' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    digits.parse::<usize>().ok()?.checked_mul(unit)
}

/// The buffer a probe of DRAM reads by default: four times the last-level caches and at least 1 GiB, so that
/// the caches serve a negligible part of it and the fractions of bandwidth measured against it are fractions of
/// what memory delivers.
pub fn default_probe_bytes() -> usize {
    let llc = last_level_cache_bytes().unwrap_or(ASSUMED_LLC_BYTES);
    llc.saturating_mul(4).clamp(MIN_DEFAULT_BYTES, MAX_BYTES)
}

/// How many parts of its share each thread reads side by side, one pattern per entry.
const STREAMS: [usize; 3] = [1, 2, 4];

/// Best-of-`repeats` read bandwidth in GB/s (1e9 bytes/s) over a `bytes`-sized buffer with `threads` threads,
/// the best over [`STREAMS`]: each thread reads one contiguous share (as the kernels' row tasks do), split
/// into that many equal parts read side by side. A new buffer each call; [`Probe`] keeps one for many.
/// Sizes past [`MAX_BYTES`], [`MAX_REPEATS`] or [`MAX_THREADS`], and a buffer the allocator refuses, are errors.
pub fn measure_read_bandwidth(bytes: usize, threads: usize, repeats: usize) -> Result<f64> {
    const OP: &str = "measure_read_bandwidth";
    Probe::allocate(OP, bytes)?.measure_as(OP, threads, repeats)
}

/// A probe buffer, allocated and touched once, for measuring bandwidth many times over a run: touching a
/// buffer several times the last-level cache costs more than reading it.
pub struct Probe {
    buf: Vec<u64>,
}

impl Probe {
    /// A probe over `bytes` (rounded down to whole 8-byte words, at least 32 KiB); sizes past [`MAX_BYTES`]
    /// and a buffer the allocator refuses are errors.
    pub fn new(bytes: usize) -> Result<Probe> {
        Probe::allocate("BandwidthProbe", bytes)
    }

    /// [`Probe::new`], its errors under `op`.
    fn allocate(op: &'static str, bytes: usize) -> Result<Probe> {
        if bytes > MAX_BYTES {
            return Err(Error::invalid(op, format!("nbytes {bytes} is over the limit of {MAX_BYTES}")));
        }
        let words = (bytes / 8).max(1 << 12);
        let mut buf: Vec<u64> = Vec::new();
        buf.try_reserve_exact(words).map_err(|_| Error::invalid(op, format!("cannot allocate {bytes} bytes")))?;
        // Touch every page so the timed passes read memory, not the zero page.
        buf.extend(0..words as u64);
        Ok(Probe { buf })
    }

    /// The buffer's size in bytes.
    pub fn nbytes(&self) -> usize {
        self.buf.len() * 8
    }

    /// Best-of-`repeats` read bandwidth in GB/s over the buffer with `threads` threads (see
    /// [`measure_read_bandwidth`]); more than [`MAX_REPEATS`] or [`MAX_THREADS`] is an error.
    pub fn measure(&self, threads: usize, repeats: usize) -> Result<f64> {
        self.measure_as("BandwidthProbe.measure", threads, repeats)
    }

    /// [`Probe::measure`], its errors under `op`.
    fn measure_as(&self, op: &'static str, threads: usize, repeats: usize) -> Result<f64> {
        if repeats > MAX_REPEATS || threads > MAX_THREADS {
            return Err(Error::invalid(
                op,
                format!("repeats {repeats} / threads {threads} are over the limits {MAX_REPEATS} / {MAX_THREADS}"),
            ));
        }
        let (buf, words) = (&self.buf, self.buf.len());
        let threads = threads.max(1);
        let per_task = words.div_ceil(threads);
        let mut best = f64::INFINITY;
        for _ in 0..repeats.max(1) {
            for streams in STREAMS {
                let t = Instant::now();
                parallel::global().run(threads, threads, &|i| {
                    let lo = (i * per_task).min(words);
                    let hi = (lo + per_task).min(words);
                    std::hint::black_box(read_streams(&buf[lo..hi], streams));
                });
                best = best.min(t.elapsed().as_secs_f64());
            }
        }
        Ok((words * 8) as f64 / best / 1e9)
    }
}

/// Reads `s` as `streams` equal parts side by side, two cache lines of each in turn (a tail alone).
fn read_streams(s: &[u64], streams: usize) -> u64 {
    match streams {
        1 => xor_parts::<1>(s),
        2 => xor_parts::<2>(s),
        _ => xor_parts::<4>(s),
    }
}

/// Words per step of one stream: two cache lines.
const STEP: usize = 16;

fn xor_parts<const S: usize>(s: &[u64]) -> u64 {
    let part = s.len() / S / STEP * STEP;
    let parts: [&[u64]; S] = core::array::from_fn(|k| &s[k * part..(k + 1) * part]);
    let tail = sum_words_portable(&s[S * part..]);
    #[cfg(target_arch = "x86_64")]
    if crate::kernels::Isa::Avx2.is_supported() {
        // SAFETY: AVX2 is present.
        return tail ^ unsafe { xor_avx2::<S>(parts) };
    }
    parts.iter().fold(tail, |a, p| a ^ sum_words_portable(p))
}

/// XOR-reduces `S` equal slices (lengths a multiple of [`STEP`]) in lockstep with the widest vectors the
/// CPU has: the probe must be limited by memory, not by the instructions that read it. No software prefetch,
/// like the dense kernels: on AMD Zen 4 it made no consistent difference to the probe (-10 to +10 % from
/// run to run).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn xor_avx2<const S: usize>(parts: [&[u64]; S]) -> u64 {
    use core::arch::x86_64::*;
    let mut acc = [_mm256_setzero_si256(); 4];
    let len = parts[0].len();
    let mut off = 0;
    while off < len {
        for p in parts {
            let c = p.as_ptr().add(off);
            for (j, a) in acc.iter_mut().enumerate() {
                *a = _mm256_xor_si256(*a, _mm256_loadu_si256(c.add(4 * j) as *const __m256i));
            }
        }
        off += STEP;
    }
    let v = _mm256_xor_si256(_mm256_xor_si256(acc[0], acc[1]), _mm256_xor_si256(acc[2], acc[3]));
    let lanes: [u64; 4] = core::mem::transmute(v);
    lanes.iter().fold(0, |a, b| a ^ b)
}

/// Eight independent accumulators so the loop is bound by loads, not by an add chain (vectorised by LLVM).
fn sum_words_portable(s: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    let mut chunks = s.chunks_exact(8);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a = a.wrapping_add(*v);
        }
    }
    acc.iter().fold(chunks.remainder().iter().sum::<u64>(), |a, b| a.wrapping_add(*b))
}

#[cfg(test)]
mod tests {
    #[test]
    fn measures_a_positive_finite_bandwidth() {
        let gbs = super::measure_read_bandwidth(1 << 20, 2, 2).unwrap();
        assert!(gbs.is_finite() && gbs > 0.0);
        let probe = super::Probe::new(1 << 20).unwrap();
        assert_eq!(probe.nbytes(), 1 << 20);
        for _ in 0..2 {
            let gbs = probe.measure(2, 1).unwrap();
            assert!(gbs.is_finite() && gbs > 0.0);
        }
        assert!(probe.measure(1, usize::MAX).is_err() && probe.measure(usize::MAX, 1).is_err());
    }

    #[test]
    fn cache_sizes_parse_as_linux_writes_them() {
        assert_eq!(super::parse_cache_size("307200K"), Some(300 << 20));
        assert_eq!(super::parse_cache_size("32M"), Some(32 << 20));
        assert_eq!(super::parse_cache_size("4096"), Some(4096));
        assert_eq!(super::parse_cache_size("K"), None);
        assert_eq!(super::parse_cache_size("12Q"), None);
        assert_eq!(super::parse_cache_size(&format!("{}K", usize::MAX / 512)), None);
    }

    #[test]
    fn the_default_probe_outsizes_the_last_level_cache() {
        let bytes = super::default_probe_bytes();
        assert!(((1 << 30)..=super::MAX_BYTES).contains(&bytes));
        if let Some(llc) = super::last_level_cache_bytes() {
            assert!(bytes >= llc.saturating_mul(4).min(super::MAX_BYTES), "{bytes} against an LLC of {llc}");
        }
    }

    #[test]
    fn absurd_sizes_are_errors() {
        assert!(super::measure_read_bandwidth(1 << 60, 1, 1).is_err());
        assert!(super::measure_read_bandwidth(usize::MAX, 1, 1).is_err());
        assert!(super::measure_read_bandwidth(1 << 20, 1, usize::MAX).is_err());
        assert!(super::measure_read_bandwidth(1 << 20, usize::MAX, 1).is_err());
    }
}
