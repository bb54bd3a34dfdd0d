//! x86-64 SIMD kernels, compiled for baseline x86-64 and enabled per function with `#[target_feature]`.

/// An unaligned 64-byte load that LLVM cannot fold into the instruction using it (an `asm!` block is opaque).
/// The expand instructions must get their source in a register: AMD Zen 4 runs the memory forms of
/// `vpexpandb/w` and `vexpandps` as microcode, several times slower than a load plus the register form, which
/// costs Intel nothing. Use only inside `#[target_feature(enable = "avx512f")]` functions.
macro_rules! load512_nofold {
    ($p:expr) => {{
        let r: core::arch::x86_64::__m512i;
        // SAFETY: the caller guarantees 64 readable bytes at $p (VALUE_PAD covers the packed tails).
        core::arch::asm!(
            "vmovdqu64 {r}, [{p}]",
            r = out(zmm_reg) r,
            p = in(reg) $p as *const u8,
            options(pure, readonly, nostack, preserves_flags)
        );
        r
    }};
}

use crate::formats::PackedMatrix;
use crate::kernels::simd::RowScales;

pub(crate) mod amx;
pub(crate) mod avx2;
pub(crate) mod avx2_int;
pub(crate) mod avx512;
pub(crate) mod vnni;

/// Scale `g` of a row, converted with F16C when the matrix's scales are half.
#[inline]
#[target_feature(enable = "f16c")]
pub(crate) unsafe fn scale(s: &RowScales, g: usize) -> f32 {
    if s.half {
        f16c(*s.d16.add(g))
    } else {
        *s.d.add(g)
    }
}

/// Minimum `g` of a row (asymmetric matrices), as [`scale`].
#[inline]
#[target_feature(enable = "f16c")]
pub(crate) unsafe fn min(s: &RowScales, g: usize) -> f32 {
    if s.half {
        f16c(*s.m16.add(g))
    } else {
        *s.m.add(g)
    }
}

/// Groups per row up to which the integer-activation kernels convert a row's half scales to f32 once, before
/// its chunk loop ([`staged_row_scales`]); longer rows convert each scale where a chunk reads it.
/// 512 covers rows of 16384 columns at 32-column groups (an 8B model's widest) in 2 KiB of stack per row.
pub(crate) const STAGED_GROUPS: usize = 512;

/// A row's scales for a chunk loop: [`RowScales::of`], with half scales of a row of at most [`STAGED_GROUPS`]
/// groups converted to f32 into `buf` (eight per conversion, for the AVX2 and AVX-512 kernels alike), so each
/// chunk broadcasts its scale from L1 as it would an f32 one instead of converting it (a word broadcast and a
/// conversion per chunk cost the dense int4 loop, which port 5 binds, more than the bytes they save).
#[inline]
#[target_feature(enable = "avx2,f16c")]
pub(crate) unsafe fn staged_row_scales(
    m: &PackedMatrix,
    r: usize,
    buf: &mut [core::mem::MaybeUninit<f32>; STAGED_GROUPS],
) -> RowScales {
    use core::arch::x86_64::*;
    let mut s = RowScales::of(m, r);
    let groups = m.groups();
    if s.half && groups <= STAGED_GROUPS {
        let dst = buf.as_mut_ptr() as *mut f32;
        let mut g = 0;
        while g + 8 <= groups {
            _mm256_storeu_ps(dst.add(g), _mm256_cvtph_ps(_mm_loadu_si128(s.d16.add(g) as *const __m128i)));
            g += 8;
        }
        while g < groups {
            *dst.add(g) = f16c(*s.d16.add(g));
            g += 1;
        }
        // The minimums, if any, are read from `mins` (the f32 grid, always kept).
        (s.d, s.half) = (dst, false);
    }
    s
}

#[inline]
#[target_feature(enable = "f16c")]
unsafe fn f16c(h: u16) -> f32 {
    use core::arch::x86_64::*;
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32)))
}

/// AVX2 path requirements.
pub fn avx2_supported() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
        && is_x86_feature_detected!("bmi2")
        && is_x86_feature_detected!("popcnt")
}

/// AVX-VNNI path requirements: the AVX2 path and the VEX-encoded `vpdpbusd`.
pub fn avxvnni_supported() -> bool {
    avx2_supported() && is_x86_feature_detected!("avxvnni")
}

/// AVX-512 path requirements (VBMI2 provides the byte/word expand that decodes the sparse formats, GFNI the
/// dense int4 nibble unpack; every CPU with VBMI2 so far has GFNI: Intel since Ice Lake, AMD since Zen 4).
pub fn avx512_supported() -> bool {
    avx2_supported()
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512dq")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vbmi2")
        && is_x86_feature_detected!("gfni")
}

/// AVX-512 VNNI (`vpdpbusd`), used by the integer-activation kernels on top of the AVX-512 path. Their
/// functions also enable VBMI, so it is checked too (every CPU with VBMI2 has it).
pub fn vnni_supported() -> bool {
    avx512_supported() && is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vbmi")
}

/// The kernel-relevant features this CPU reports.
pub fn features() -> Vec<&'static str> {
    let mut f = Vec::new();
    macro_rules! probe {
        ($($name:tt),*) => {$(
            if is_x86_feature_detected!($name) {
                f.push($name);
            }
        )*};
    }
    probe!(
        "sse4.2",
        "popcnt",
        "bmi2",
        "avx",
        "avx2",
        "fma",
        "f16c",
        "avxvnni",
        "avx512f",
        "avx512bw",
        "avx512dq",
        "avx512vl",
        "avx512vbmi",
        "avx512vbmi2",
        "avx512vnni",
        "gfni",
        "avx512bf16",
        "avx512fp16"
    );
    f
}
