//! The core clock, for the examples that report core cycles.

use core::arch::asm;
use std::time::Instant;

/// Dependent `imul`s per timing.
const ITERS: u64 = 20_000_000;

/// Nanoseconds per core cycle, from a chain of dependent `imul`s (3-cycle latency on every current x86
/// core; a chain of small adds can be folded at rename on recent Intel cores).
pub fn ns_per_cycle() -> f64 {
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        let mut x = 3u64;
        // SAFETY: register arithmetic only.
        unsafe {
            asm!(
                "2:",
                "imul {x}, {x}", "imul {x}, {x}", "imul {x}, {x}", "imul {x}, {x}",
                "imul {x}, {x}", "imul {x}, {x}", "imul {x}, {x}", "imul {x}, {x}",
                "sub {n}, 8",
                "jnz 2b",
                x = inout(reg) x,
                n = inout(reg) ITERS * 8 => _,
                options(nostack, nomem),
            );
        }
        std::hint::black_box(x);
        best = best.min(t.elapsed().as_secs_f64() * 1e9 / (ITERS * 8 * 3) as f64);
    }
    best
}
