//! Memory read bandwidth: the ceiling for memory-bound decoding. Every thread streams its share of a buffer
//! much larger than the last-level cache, in each of a few access patterns, and the best pattern is the
//! figure: a probe slower than some reader of the same memory would not be the machine's limit. (On an AMD
//! Zen 4 VM the earlier probe, 16 short prefetched streams per thread, read 22-30 GB/s while our dense
//! kernels read up to 46; this one read 31-34 next to 33 for the dense f32 kernel.)

use crate::error::{Error, Result};
use crate::parallel;
use std::time::Instant;

/// Largest probe buffer (a probe needs a few times the last-level cache, not the machine's memory).
pub const MAX_BYTES: usize = 64 << 30;
/// Most repeats (each reads the buffer three times).
pub const MAX_REPEATS: usize = 1000;
/// Most threads.
pub const MAX_THREADS: usize = 4096;

/// How many parts of its share each thread reads side by side, one pattern per entry.
const STREAMS: [usize; 3] = [1, 2, 4];

/// Best-of-`repeats` read bandwidth in GB/s (1e9 bytes/s) over a `bytes`-sized buffer with `threads` threads,
/// the best over [`STREAMS`]: each thread reads one contiguous share (as the kernels' row tasks do), split
/// into that many equal parts read side by side.
/// Sizes past [`MAX_BYTES`], [`MAX_REPEATS`] or [`MAX_THREADS`], and a buffer the allocator refuses, are errors.
pub fn measure_read_bandwidth(bytes: usize, threads: usize, repeats: usize) -> Result<f64> {
    const OP: &str = "measure_read_bandwidth";
    if bytes > MAX_BYTES {
        return Err(Error::invalid(OP, format!("nbytes {bytes} is over the limit of {MAX_BYTES}")));
    }
    if repeats > MAX_REPEATS || threads > MAX_THREADS {
        return Err(Error::invalid(
            OP,
            format!("repeats {repeats} / threads {threads} are over the limits {MAX_REPEATS} / {MAX_THREADS}"),
        ));
    }
    let words = (bytes / 8).max(1 << 12);
    let mut buf: Vec<u64> = Vec::new();
    buf.try_reserve_exact(words).map_err(|_| Error::invalid(OP, format!("cannot allocate {bytes} bytes")))?;
    // Touch every page so the timed passes read memory, not the zero page.
    buf.extend(0..words as u64);
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
    }

    #[test]
    fn absurd_sizes_are_errors() {
        assert!(super::measure_read_bandwidth(1 << 60, 1, 1).is_err());
        assert!(super::measure_read_bandwidth(usize::MAX, 1, 1).is_err());
        assert!(super::measure_read_bandwidth(1 << 20, 1, usize::MAX).is_err());
        assert!(super::measure_read_bandwidth(1 << 20, usize::MAX, 1).is_err());
    }
}
