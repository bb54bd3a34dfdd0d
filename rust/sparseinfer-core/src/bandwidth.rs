//! Memory read bandwidth, measured the way a matvec reads weights: every thread streams its own slice of a
//! buffer much larger than the last-level cache. This is the ceiling for memory-bound decoding.

use crate::parallel;
use std::time::Instant;

/// Best-of-`repeats` read bandwidth in GB/s (1e9 bytes/s) over a `bytes`-sized buffer with `threads` threads.
pub fn measure_read_bandwidth(bytes: usize, threads: usize, repeats: usize) -> f64 {
    let words = (bytes / 8).max(1 << 12);
    // Touch every page so the timed passes read memory, not the zero page.
    let buf: Vec<u64> = (0..words as u64).collect();
    let threads = threads.max(1);
    let tasks = threads * 16;
    let per_task = words.div_ceil(tasks);
    let mut best = f64::INFINITY;
    for _ in 0..repeats.max(1) {
        let t = Instant::now();
        parallel::global().run(tasks, threads, &|i| {
            let lo = (i * per_task).min(words);
            let hi = (lo + per_task).min(words);
            std::hint::black_box(sum_words(&buf[lo..hi]));
        });
        best = best.min(t.elapsed().as_secs_f64());
    }
    (words * 8) as f64 / best / 1e9
}

/// XOR-reduces a slice with the widest vectors the CPU has: the probe must be limited by memory, not by
/// the instructions that read it.
fn sum_words(s: &[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if crate::kernels::Isa::Avx2.is_supported() {
        // SAFETY: AVX2 is present.
        return unsafe { xor_avx2(s) };
    }
    sum_words_portable(s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn xor_avx2(s: &[u64]) -> u64 {
    use core::arch::x86_64::*;
    let mut acc = [_mm256_setzero_si256(); 4];
    let mut chunks = s.chunks_exact(16);
    for c in &mut chunks {
        // Software prefetch a few lines ahead, as the kernels do: it lifts one core's stream rate.
        _mm_prefetch::<_MM_HINT_T0>((c.as_ptr() as *const i8).wrapping_add(1024));
        for (j, a) in acc.iter_mut().enumerate() {
            *a = _mm256_xor_si256(*a, _mm256_loadu_si256(c.as_ptr().add(4 * j) as *const __m256i));
        }
    }
    let v = _mm256_xor_si256(_mm256_xor_si256(acc[0], acc[1]), _mm256_xor_si256(acc[2], acc[3]));
    let lanes: [u64; 4] = core::mem::transmute(v);
    lanes.iter().chain(chunks.remainder()).fold(0, |a, b| a ^ b)
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
        let gbs = super::measure_read_bandwidth(1 << 20, 2, 2);
        assert!(gbs.is_finite() && gbs > 0.0);
    }
}
