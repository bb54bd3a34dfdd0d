//! Intel AMX (`tdpbssd`, Sapphire Rapids and later) for many activation rows at once (prefill, encoders) on
//! the tiled sparse integer formats and the symmetric dense ones.
//!
//! A tiled quad ([`crate::formats::tiles`]) expands to 64 bytes that are 16 weight rows × 4 columns, which is
//! one row of an AMX `B` operand (K/4 rows of N = 16 columns × 4 bytes). So each weight tile (16 rows) is
//! expanded once per call into signed int8 `B` tiles, one per 64-column chunk (16 quads, 1 KiB), kept in L1/L2,
//! and every block of 16 activation rows meets them with one `tdpbssd` per chunk: 16 × 16 × 64 exact integer
//! products into a 16 × 16 i32 tile. The expansion is the same `vpexpandb` work the VNNI kernel does per quad,
//! but done once per call instead of once per four activation rows. Dense rows are decoded to bytes and
//! transposed into the same operand (a gather per quad).
//!
//! The scaling is the VNNI tiled kernel's: per-block activations (`Activations::Int8`) convert each chunk's exact
//! sums and multiply-add them with the chunk's activation scale (times the 16 rows' group scale); per-row
//! activations add whole scale groups in the tile before converting. Groups of 32 columns take a second tile
//! configuration whose `tdpbssd` spans 32 columns (activation tiles 16 rows × 32 bytes, weight tiles the 8 quads
//! of a chunk's half), so each product sums one scale group. The weights are made signed while
//! expanding (the stored codes are unsigned, `q + z`), so no zero-point correction is needed: the sums are
//! `Σ q·x` exactly, which the VNNI kernels reach only after subtracting a rounded f32 correction.
//!
//! Stable Rust has no AMX intrinsics, so the tile instructions are `asm!` blocks. Linux hands out the tile
//! state only on request (`arch_prctl(ARCH_REQ_XCOMP_PERM)`, once per process, see [`supported`]); each thread
//! loads the tile configuration at the start of a call and releases the tiles at its end.

use super::vnni::{int4_pair_codes, int8_quad_codes, SI4_NARROW, SI4_WIDE, TILE_TOKEN_MAX_COLS};
use crate::formats::tiles::{QUAD, TILE};
use crate::formats::{f32_to_bf16, Format, PackedMatrix, CHUNK};
use crate::kernels::aligned::Aligned;
use crate::kernels::simd::{scale_mode, ROW};
use crate::kernels::QuantActs;
use core::arch::asm;
use core::arch::x86_64::*;
use std::sync::OnceLock;

/// The fewest activation rows a call on `m` sends here; fewer run the VNNI kernels, which read the weights once
/// per four rows without expanding them to memory. Dense rows cost more to expand (a gather per quad).
pub(crate) fn min_rows(m: &PackedMatrix) -> usize {
    if m.tiled {
        16
    } else {
        64
    }
}

/// Bytes of one expanded chunk: 16 quads of 64 bytes, an AMX `B` tile.
const B_TILE: usize = 16 * 64;

/// Whether this CPU has AMX-TILE and AMX-INT8 and the kernel granted this process the tile state. Asked once;
/// `SPARSEINFER_AMX=0` turns it off (to compare with the VNNI kernels).
pub(crate) fn supported() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        if std::env::var("SPARSEINFER_AMX").is_ok_and(|v| v.trim() == "0") || !super::vnni_supported() {
            return false;
        }
        // Leaf 7 exists on every CPU with AVX-512.
        let edx = __cpuid_count(7, 0).edx;
        let (tile, int8) = (edx & (1 << 24) != 0, edx & (1 << 25) != 0);
        tile && int8 && request_tile_state()
    })
}

/// Asks Linux for the AMX tile data state (XFEATURE 18). Without it the first tile instruction faults.
#[cfg(target_os = "linux")]
fn request_tile_state() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain syscall with integer arguments; failure (old kernel, refused) is a return value.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

#[cfg(not(target_os = "linux"))]
fn request_tile_state() -> bool {
    false
}

/// Whether AMX-BF16 (`tdpbf16ps`) is usable too.
pub(crate) fn bf16_supported() -> bool {
    supported() && __cpuid_count(7, 0).edx & (1 << 22) != 0
}

/// Whether these kernels serve `m`: the tiled sparse formats and the symmetric dense ones, with scale groups
/// of whole or half chunks (or one scale per row). Per-row activations add a whole group (or row) in each i32,
/// which holds `127 · 127 · cols` up to [`TILE_TOKEN_MAX_COLS`] columns.
pub(crate) fn supports(m: &PackedMatrix, token: bool) -> bool {
    let layout = if m.tiled {
        matches!(m.format, Format::SparseInt8 | Format::SparseInt4 | Format::DenseInt8 | Format::DenseInt4)
    } else {
        matches!(m.format, Format::DenseInt8 | Format::DenseInt4) && !m.asym
    };
    layout
        && (scale_mode(m) == ROW || m.group.is_multiple_of(CHUNK) || m.group == CHUNK / 2)
        && (!token || m.cols_pad <= TILE_TOKEN_MAX_COLS)
        && super::vnni::supports(m, token)
        && supported()
}

/// The tile configuration: all eight tiles 16 rows × 64 bytes. The matmul uses `tmm0` for activations
/// (16 rows × 64 bytes, alternating with `tmm1`), `tmm2` and `tmm3` for two weight tiles (16 quads × 64 bytes),
/// `tmm4..tmm7` for two sets of their 16 × 16 i32 sums ([`tile_sums`]); attention ([`bf16_scores`],
/// [`bf16_weighted`]) `tmm0` for queries or probabilities, `tmm2` and `tmm3` for keys or values, `tmm4..tmm7`
/// for scores or outputs.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn new() -> TileConfig {
        let mut c = [0u8; 64];
        c[0] = 1; // palette 1
        for t in 0..8 {
            c[16 + 2 * t] = 64; // bytes per row (u16, little-endian)
            c[48 + t] = 16; // rows
        }
        TileConfig(c)
    }

    /// The matmul's configuration for 32-column scale groups: `tmm0`/`tmm1` 16 activation rows × 32 bytes,
    /// `tmm2`/`tmm3` 8 quads × 64 bytes (half a chunk's `B` tile), sums as in [`TileConfig::new`].
    fn half() -> TileConfig {
        let mut c = TileConfig::new();
        for t in 0..2 {
            c.0[16 + 2 * t] = 32;
            c.0[48 + 2 + t] = 8;
        }
        c
    }
}

/// Loads the configuration on entry and releases the tiles on every exit, so no thread keeps tile state
/// (8 KiB more in every context switch and signal frame) outside a call.
pub(crate) struct Tiles;

impl Tiles {
    /// # Safety
    /// [`supported`] or [`bf16_supported`] must hold.
    pub(crate) unsafe fn acquire() -> Tiles {
        Tiles::acquire_with(TileConfig::new())
    }

    /// # Safety
    /// As [`Tiles::acquire`].
    unsafe fn acquire_with(cfg: TileConfig) -> Tiles {
        asm!("ldtilecfg [{0}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly, preserves_flags));
        Tiles
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: only built by `acquire`, after the configuration was loaded.
        unsafe { asm!("tilerelease", options(nostack, nomem, preserves_flags)) };
    }
}

/// Weight tiles handled together by [`Block`]: two, each with its own accumulator, and two sets of
/// accumulators taken by turns from one segment to the next (`tmm4`/`tmm5`, `tmm6`/`tmm7`), so a segment's
/// products need not wait for the one before to be stored. With one accumulator every product waited for the
/// one before and for its store.
const TILES_AT_ONCE: usize = 2;

/// `S[j] = Σ A·B[j]` over activation chunks `c0..c1` for the `nt` (one or two) weight tiles `j` whose expanded
/// chunks start at `b[j]`: 16 activation rows of codes at `a` (rows `stride` bytes apart), each tile's 16 × 16
/// i32 sums stored at `out[j]`, accumulated in set `SET` (0: `tmm4`/`tmm5`, 1: `tmm6`/`tmm7`). A chunk here is
/// `64 / H` columns: `H` = 2 under [`TileConfig::half`] (32-column groups), whose chunk `c` is the half `c % 2`
/// of 64-column chunk `c / 2`, as 32 activation bytes per row and 8 of the weight chunk's 16 quads. The
/// activation tile is loaded once per chunk for both, into `tmm0` and `tmm1` by turns; weight tile `j` goes to
/// `tmm2 + j`.
#[inline(always)]
unsafe fn tile_sums<const SET: u8, const H: usize>(
    a: *const i8,
    stride: usize,
    b: &[*const i8; TILES_AT_ONCE],
    nt: usize,
    c0: usize,
    c1: usize,
    out: &[*mut i32; TILES_AT_ONCE],
) {
    macro_rules! sums {
        ($t0:literal, $t1:literal) => {{
            macro_rules! chunk {
                ($a:literal, $c:expr) => {{
                    let c = $c;
                    asm!(
                        concat!("tileloadd ", $a, ", [{a} + {s}*1]"),
                        "tileloadd tmm2, [{b0} + {q}*1]",
                        concat!("tdpbssd ", $t0, ", ", $a, ", tmm2"),
                        a = in(reg) a.add(c * CHUNK / H),
                        s = in(reg) stride,
                        b0 = in(reg) b[0].add(c * B_TILE / H),
                        q = in(reg) 64usize,
                        options(nostack, readonly, preserves_flags)
                    );
                    if nt > 1 {
                        asm!(
                            "tileloadd tmm3, [{b1} + {q}*1]",
                            concat!("tdpbssd ", $t1, ", ", $a, ", tmm3"),
                            b1 = in(reg) b[1].add(c * B_TILE / H),
                            q = in(reg) 64usize,
                            options(nostack, readonly, preserves_flags)
                        );
                    }
                }};
            }
            asm!(concat!("tilezero ", $t0), concat!("tilezero ", $t1), options(nostack, nomem, preserves_flags));
            let mut c = c0;
            while c + 1 < c1 {
                chunk!("tmm0", c);
                chunk!("tmm1", c + 1);
                c += 2;
            }
            if c < c1 {
                chunk!("tmm0", c);
            }
            asm!(
                concat!("tilestored [{o} + {s}*1], ", $t0),
                o = in(reg) out[0],
                s = in(reg) 64usize,
                options(nostack, preserves_flags)
            );
            if nt > 1 {
                asm!(
                    concat!("tilestored [{o} + {s}*1], ", $t1),
                    o = in(reg) out[1],
                    s = in(reg) 64usize,
                    options(nostack, preserves_flags)
                );
            }
        }};
    }
    if SET == 0 {
        sums!("tmm4", "tmm5")
    } else {
        sums!("tmm6", "tmm7")
    }
}

/// Expanded weights a thread keeps at once (L2-sized): every block of 16 activation rows meets all of them
/// before the next ones are expanded, so the activations stream from memory once per group, not once per tile.
const GROUP_BYTES: usize = 1 << 20;

/// A thread's expanded weight group: the `B` tiles, and (dense matrices with scale groups) each tile's group
/// scales as the tiled layout keeps them (`tiles × groups × 16`).
struct Expanded {
    b: Aligned<i8>,
    d: Vec<f32>,
}

thread_local! {
    /// Kept between calls: a fresh megabyte per call would be mapped and faulted in every time.
    static EXPANDED: core::cell::RefCell<Expanded> =
        core::cell::RefCell::new(Expanded { b: Aligned::empty(), d: Vec::new() });
}

/// 16 × 16 i32 sums as `tilestored` writes them.
#[repr(C, align(64))]
struct Sums([i32; TILE * TILE]);

/// Computes rows `r0..r1` (`r0` a multiple of 16) for the `k` activation rows in `q`.
///
/// # Safety
/// [`supports`] must hold for `m`; `q` holds the codes and block scales of `k` rows built for `m`; `y` is valid
/// for writes at `a·rows + r` for every `a < k` and `r0 <= r < r1`.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi,avx512vbmi2,popcnt,fma")]
pub(crate) unsafe fn rows(m: &PackedMatrix, r0: usize, r1: usize, q: &QuantActs, k: usize, y: *mut f32) {
    if scale_mode(m) != ROW && m.group < CHUNK {
        rows_with::<2>(m, r0, r1, q, k, y)
    } else {
        rows_with::<1>(m, r0, r1, q, k, y)
    }
}

/// [`rows`] with `H` products per 64-column chunk: 2 for 32-column groups ([`TileConfig::half`]), else 1.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi,avx512vbmi2,popcnt,fma")]
unsafe fn rows_with<const H: usize>(m: &PackedMatrix, r0: usize, r1: usize, q: &QuantActs, k: usize, y: *mut f32) {
    let (cp, chunks) = (m.cols_pad, m.chunks());
    assert!(r0.is_multiple_of(TILE) && r1 <= m.rows && q.xq.len() >= k * cp && q.sx.len() >= k * chunks);
    // The last block of fewer than 16 activation rows reads a zero-padded copy.
    let full = k / TILE * TILE;
    let mut tail = Aligned::<i8>::zeroed(if full < k { TILE * cp } else { 0 });
    let mut tail_sx = vec![0.0f32; if full < k { TILE * chunks } else { 0 }];
    if full < k {
        tail[..(k - full) * cp].copy_from_slice(&q.xq[full * cp..k * cp]);
        tail_sx[..(k - full) * chunks].copy_from_slice(&q.sx[full * chunks..k * chunks]);
    }
    let (t0, t1) = (r0 / TILE, r1.div_ceil(TILE));
    let per_group = (GROUP_BYTES / (chunks * B_TILE)).clamp(1, t1 - t0);
    let (groups, grouped) = (m.groups(), scale_mode(m) != ROW);
    // Tile scales as f32 when the tiled layout keeps them so; else each tile's scales go to `e.d`, converted from
    // the half tile scales or gathered from the row layout's f32 grid.
    let own_scales = m.tiled && !m.tile_scales.is_empty();
    EXPANDED.with_borrow_mut(|e| {
        if e.b.len() < per_group * chunks * B_TILE {
            e.b = Aligned::zeroed(per_group * chunks * B_TILE);
        }
        if grouped && !own_scales {
            e.d.resize(per_group * groups * TILE, 0.0);
        }
        // Written by the tile stores before they are read: zeroed once per call, not once per block.
        let mut sums: [[Sums; TILES_AT_ONCE]; 2] =
            core::array::from_fn(|_| core::array::from_fn(|_| Sums([0; TILE * TILE])));
        let [s0, s1] = &mut sums;
        let sums_at = [s0.each_mut().map(|s| s.0.as_mut_ptr()), s1.each_mut().map(|s| s.0.as_mut_ptr())];
        let _tiles = Tiles::acquire_with(if H == 2 { TileConfig::half() } else { TileConfig::new() });
        for g0 in (t0..t1).step_by(per_group) {
            let g1 = (g0 + per_group).min(t1);
            for t in g0..g1 {
                let i = t - g0;
                if m.tiled {
                    expand_tile(m, t, e.b.as_mut_ptr().add(i * chunks * B_TILE));
                } else {
                    expand_dense_tile(m, t, e.b.as_mut_ptr().add(i * chunks * B_TILE));
                }
                if grouped && !own_scales {
                    let d = &mut e.d[i * groups * TILE..(i + 1) * groups * TILE];
                    if m.tiled {
                        // Half tile scales, laid out as `e.d` is: sixteen conversions at a time.
                        let h = m.tile_scales16.as_ptr().add(t * groups * TILE);
                        for (j, d) in d.chunks_exact_mut(TILE).enumerate() {
                            let v = _mm512_cvtph_ps(_mm256_loadu_si256(h.add(j * TILE) as *const __m256i));
                            _mm512_storeu_ps(d.as_mut_ptr(), v);
                        }
                    } else {
                        for (j, d) in d.iter_mut().enumerate() {
                            let (g, r) = (j / TILE, t * TILE + j % TILE);
                            *d = if r < m.rows { m.scale_at(r * groups + g) } else { 0.0 };
                        }
                    }
                }
            }
            for a0 in (0..k).step_by(TILE) {
                let (xq, sx) = if a0 < full {
                    (q.xq.as_ptr().add(a0 * cp), q.sx.as_ptr().add(a0 * chunks))
                } else {
                    (tail.as_ptr(), tail_sx.as_ptr())
                };
                let n = (k - a0).min(TILE);
                for t in (g0..g1).step_by(TILES_AT_ONCE) {
                    let nt = (g1 - t).min(TILES_AT_ONCE);
                    let mut bt = [core::ptr::null(); TILES_AT_ONCE];
                    let mut d16 = [core::ptr::null(); TILES_AT_ONCE];
                    for j in 0..nt {
                        bt[j] = e.b.as_ptr().add((t + j - g0) * chunks * B_TILE);
                        d16[j] = if own_scales {
                            m.tile_scales.as_ptr().wrapping_add((t + j) * groups * TILE)
                        } else {
                            e.d.as_ptr().wrapping_add((t + j - g0) * groups * TILE)
                        };
                    }
                    let tiles = Block { m, t, nt, r1, b: &bt, d16: &d16, sums: sums_at };
                    if q.token {
                        tiles.run::<true, H>(xq, sx, y.add(a0 * m.rows), n);
                    } else {
                        tiles.run::<false, H>(xq, sx, y.add(a0 * m.rows), n);
                    }
                }
            }
        }
    });
}

/// Expands weight tile `t` into signed int8 `B` tiles, one per chunk, at `b` (`chunks × 1 KiB`).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi2,popcnt")]
unsafe fn expand_tile(m: &PackedMatrix, t: usize, b: *mut i8) {
    let quads = m.cols_pad / QUAD;
    let masks = m.tile_masks(t).as_ptr();
    let mut p = m.data.as_ptr().add(m.row_offsets[t]);
    let out = |quad: usize| b.add(quad * 64) as *mut __m512i;
    // A tiled dense matrix's masks are full: the expansion copies its codes.
    match m.format {
        Format::SparseInt8 | Format::DenseInt8 => {
            // Stored codes are `q ^ 0x80`, pruned lanes expand to 0x80: flipping the top bit gives `q` and 0.
            let flip = _mm512_set1_epi8(-128);
            for quad in 0..quads {
                _mm512_store_si512(out(quad), _mm512_xor_si512(int8_quad_codes(&mut p, *masks.add(quad)), flip));
            }
        }
        _ => {
            // Nibbles are `q + 8`, pruned lanes expand to 8.
            let eight = _mm512_set1_epi8(8);
            let narrow = m.tile_narrow[t];
            for quad in (0..quads).step_by(2) {
                let (m0, m1) = (*masks.add(quad), *masks.add(quad + 1));
                let (c0, c1) = if narrow {
                    int4_pair_codes::<SI4_NARROW>(&mut p, m0, m1)
                } else {
                    int4_pair_codes::<SI4_WIDE>(&mut p, m0, m1)
                };
                _mm512_store_si512(out(quad), _mm512_sub_epi8(c0, eight));
                _mm512_store_si512(out(quad + 1), _mm512_sub_epi8(c1, eight));
            }
        }
    }
}

/// Dense weight rows `16t..16t + 16` (rows past the matrix as zeros) as signed int8 `B` tiles at `b`: each
/// chunk's 16 rows are decoded to bytes, then every quad gathers its 4 bytes from each row.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn expand_dense_tile(m: &PackedMatrix, t: usize, b: *mut i8) {
    let mut rows = Sums([0; TILE * TILE]);
    let scratch = rows.0.as_mut_ptr() as *mut __m512i;
    let int8 = m.format == Format::DenseInt8;
    let (low, eight) = (_mm256_set1_epi8(0x0F), _mm512_set1_epi8(8));
    let across = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(64),
    );
    for c in 0..m.chunks() {
        for i in 0..TILE {
            let r = t * TILE + i;
            let v = if r >= m.rows {
                _mm512_setzero_si512()
            } else if int8 {
                _mm512_loadu_si512(m.data.as_ptr().add(m.row_start(r) + c * CHUNK) as *const __m512i)
            } else {
                // Byte j of the chunk's 32: column j in the low nibble, column 32 + j in the high one, `q + 8`.
                let h = _mm256_loadu_si256(m.data.as_ptr().add(m.row_start(r) + c * CHUNK / 2) as *const __m256i);
                let (lo, hi) = (_mm256_and_si256(h, low), _mm256_and_si256(_mm256_srli_epi16::<4>(h), low));
                _mm512_sub_epi8(_mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi), eight)
            };
            _mm512_store_si512(scratch.add(i), v);
        }
        for quad in 0..TILE {
            let idx = _mm512_add_epi32(across, _mm512_set1_epi32((quad * QUAD) as i32));
            let v = _mm512_i32gather_epi32::<1>(idx, rows.0.as_ptr() as *const _);
            _mm512_store_si512(b.add(c * B_TILE + quad * 64) as *mut __m512i, v);
        }
    }
}

/// Weight tiles `t..t + nt` (their rows below `r1`), expanded at `b[j]` with group scales at `d16[j]`
/// (`groups × 16` each).
struct Block<'a> {
    m: &'a PackedMatrix,
    t: usize,
    nt: usize,
    r1: usize,
    b: &'a [*const i8; TILES_AT_ONCE],
    d16: &'a [*const f32; TILES_AT_ONCE],
    /// Two sets of sums of the tiles (16 × 16 i32 each), one being written while the other is scaled.
    sums: [[*mut i32; TILES_AT_ONCE]; 2],
}

impl Block<'_> {
    /// These tiles against 16 activation rows of codes at `xq` (`cols_pad` apart) and block scales at `sx`
    /// (`chunks` apart), of which the first `n` are real; writes `n` rows of `y` (`rows` apart). `H`: products
    /// per 64-column chunk ([`tile_sums`]).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,fma")]
    unsafe fn run<const TOKEN: bool, const H: usize>(&self, xq: *const i8, sx: *const f32, y: *mut f32, n: usize) {
        let Block { m, t, nt, r1, b, d16, .. } = *self;
        let (cp, chunks) = (m.cols_pad, m.chunks());
        // Columns per product.
        let width = CHUNK / H;
        let grouped = scale_mode(m) != ROW;
        // Products per scale segment: per-block activations convert every product; per-row ones a whole group
        // (or row).
        let seg = match (TOKEN, grouped) {
            (false, _) => 1,
            (true, true) => m.group / width,
            (true, false) => H * chunks,
        };
        let sp = self.sums;
        let mut acc = [[_mm512_setzero_ps(); TILE]; TILES_AT_ONCE];
        // Scales segment `c0`'s sums (from `sums[buf]`) into the accumulators. Per-row weight scales multiply
        // once at the end, so the sums need only the activation scale (none per segment for per-row ones).
        let scale = |acc: &mut [[__m512; TILE]; TILES_AT_ONCE], buf: usize, c0: usize| {
            for (j, acc) in acc.iter_mut().enumerate().take(nt) {
                let sums = sp[buf][j];
                if grouped {
                    let d = _mm512_loadu_ps(d16[j].add((c0 * width / m.group) * TILE));
                    for (i, a) in acc.iter_mut().enumerate() {
                        let v = _mm512_cvtepi32_ps(_mm512_load_si512(sums.add(i * TILE) as *const __m512i));
                        let s = if TOKEN { d } else { _mm512_mul_ps(_mm512_set1_ps(*sx.add(i * chunks + c0 / H)), d) };
                        *a = _mm512_fmadd_ps(v, s, *a);
                    }
                } else {
                    for (i, a) in acc.iter_mut().enumerate() {
                        let v = _mm512_cvtepi32_ps(_mm512_load_si512(sums.add(i * TILE) as *const __m512i));
                        *a = if TOKEN {
                            _mm512_add_ps(v, *a)
                        } else {
                            _mm512_fmadd_ps(v, _mm512_set1_ps(*sx.add(i * chunks + c0 / H)), *a)
                        };
                    }
                }
            }
        };
        // Segment i's products run (into sums[i % 2]) while segment i - 1's sums are scaled.
        let segments = H * chunks / seg;
        for i in 0..segments {
            let c0 = i * seg;
            if i % 2 == 0 {
                tile_sums::<0, H>(xq, cp, b, nt, c0, c0 + seg, &sp[0]);
            } else {
                tile_sums::<1, H>(xq, cp, b, nt, c0, c0 + seg, &sp[1]);
            }
            if i > 0 {
                scale(&mut acc, (i - 1) % 2, c0 - seg);
            }
        }
        scale(&mut acc, (segments - 1) % 2, (segments - 1) * seg);
        for (j, acc) in acc.iter().enumerate().take(nt) {
            let tile = t + j;
            let rows_here = (r1 - tile * TILE).min(TILE);
            let lanes: __mmask16 = if rows_here == TILE { !0 } else { (1u16 << rows_here) - 1 };
            let row_scale = if grouped {
                _mm512_set1_ps(1.0)
            } else {
                _mm512_maskz_loadu_ps(lanes, m.scales.as_ptr().add(tile * TILE))
            };
            for (i, &a) in acc.iter().enumerate().take(n) {
                let mut v = a;
                if !grouped {
                    v = _mm512_mul_ps(v, row_scale);
                }
                if TOKEN {
                    v = _mm512_mul_ps(v, _mm512_set1_ps(*sx.add(i * chunks)));
                }
                _mm512_mask_storeu_ps(y.add(i * m.rows + tile * TILE), lanes, v);
            }
        }
    }
}

// -- attention in bf16 ---------------------------------------------------------------------------------------

/// [`f32_to_bf16`] over `src` into `dst`, compiled for AVX-512 so the loop vectorizes.
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) unsafe fn to_bf16(src: &[f32], dst: &mut [u16]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = f32_to_bf16(s);
    }
}

/// Keys of positions `0..n` (position `p`'s `hd` values at `keys[p · stride..]`) as `tdpbf16ps` `B` tiles for
/// scores: per 16-position block and 32-dimension step, 16 rows (dimension pairs) of 16 positions × 2.
/// Positions past `n` are zero, up to a multiple of 32.
pub(crate) fn key_tiles(keys: &[f32], stride: usize, n: usize, hd: usize) -> Vec<u16> {
    let (blocks, steps) = (n.div_ceil(32) * 2, hd / 32);
    let mut out = vec![0u16; blocks * steps * 512];
    for p in 0..n {
        let block = &mut out[(p / 16) * steps * 512 + 2 * (p % 16)..];
        for (d, &v) in keys[p * stride..][..hd].iter().enumerate() {
            // Dimension d is row (d % 32) / 2 of step d / 32, element 2·(p % 16) + d % 2.
            block[(d / 32) * 512 + (d % 32) / 2 * 32 + d % 2] = f32_to_bf16(v);
        }
    }
    out
}

/// Values of positions `0..n` (position `p`'s `hd` values at `values[p · stride..]`) as `tdpbf16ps` `B` tiles
/// for the weighted sum: per 32-position step and 16 dimensions, 16 rows (position pairs) of 16 dimensions × 2.
/// Positions past `n` are zero.
pub(crate) fn value_tiles(values: &[f32], stride: usize, n: usize, hd: usize) -> Vec<u16> {
    let (steps, parts) = (n.div_ceil(32), hd / 16);
    let mut out = vec![0u16; steps * parts * 512];
    for pos in 0..n {
        // Position pos is row (pos % 32) / 2 of its step, element 2·dimension + pos % 2.
        let step = &mut out[(pos / 32) * parts * 512 + (pos % 32) / 2 * 32 + pos % 2..];
        for (c, part) in values[pos * stride..][..hd].chunks_exact(16).enumerate() {
            for (i, &x) in part.iter().enumerate() {
                step[c * 512 + 2 * i] = f32_to_bf16(x);
            }
        }
    }
    out
}

/// `out[16·tiles × 16·blocks]` (rows `stride` floats apart) = `Q·Kᵀ` for `tiles` (one to four) tiles of 16
/// query rows of `hd` bf16 at `q` (rows `hd` apart, tiles one after another) and key blocks `0..blocks` of `kt`
/// ([`key_tiles`]). Each key tile, read from L2 when the keys are long, is loaded once for every query tile (into
/// `tmm4..tmm7`); the query tiles, small enough for L1, are loaded again for each key block.
///
/// # Safety
/// The tiles are held ([`Tiles`]); `hd` is a multiple of 32; `q` holds `16·tiles × hd` values, `kt` at least
/// `blocks` blocks, `out` `16·tiles` rows of `stride >= 16·blocks` floats.
pub(crate) unsafe fn bf16_scores(
    q: *const u16,
    tiles: usize,
    hd: usize,
    kt: *const u16,
    blocks: usize,
    out: *mut f32,
    stride: usize,
) {
    let steps = hd / 32;
    // Query tile `i` of step `s` into `$a`, times the key tile in `$k`, into `$t`.
    macro_rules! product {
        ($t:literal, $a:literal, $k:literal, $i:expr, $s:expr) => {
            asm!(
                concat!("tileloadd ", $a, ", [{q} + {qs}*1]"),
                concat!("tdpbf16ps ", $t, ", ", $a, ", ", $k),
                q = in(reg) q.add($i * 16 * hd + $s * 32),
                qs = in(reg) hd * 2,
                options(nostack, readonly, preserves_flags)
            )
        };
    }
    macro_rules! store {
        ($t:literal, $i:expr, $b:expr) => {
            asm!(
                concat!("tilestored [{o} + {s}*1], ", $t),
                o = in(reg) out.add($i * 16 * stride + $b * 16),
                s = in(reg) stride * 4,
                options(nostack, preserves_flags)
            )
        };
    }
    // The key tile of step `s` of block `b` into `$k`, then every query tile's product with it.
    macro_rules! step {
        ($k:literal, $b:expr, $s:expr) => {{
            let (b, s) = ($b, $s);
            asm!(
                concat!("tileloadd ", $k, ", [{k} + {ks}*1]"),
                k = in(reg) kt.add((b * steps + s) * 512),
                ks = in(reg) 64usize,
                options(nostack, readonly, preserves_flags)
            );
            product!("tmm4", "tmm0", $k, 0, s);
            if tiles > 1 {
                product!("tmm5", "tmm1", $k, 1, s);
            }
            if tiles > 2 {
                product!("tmm6", "tmm0", $k, 2, s);
            }
            if tiles > 3 {
                product!("tmm7", "tmm1", $k, 3, s);
            }
        }};
    }
    for b in 0..blocks {
        asm!(
            "tilezero tmm4",
            "tilezero tmm5",
            "tilezero tmm6",
            "tilezero tmm7",
            options(nostack, nomem, preserves_flags)
        );
        // Key tiles alternate between tmm2 and tmm3 by step, query tiles between tmm0 and tmm1, so a load need
        // not wait for the product reading the one before.
        let mut s = 0;
        while s + 1 < steps {
            step!("tmm2", b, s);
            step!("tmm3", b, s + 1);
            s += 2;
        }
        if s < steps {
            step!("tmm2", b, s);
        }
        store!("tmm4", 0, b);
        if tiles > 1 {
            store!("tmm5", 1, b);
        }
        if tiles > 2 {
            store!("tmm6", 2, b);
        }
        if tiles > 3 {
            store!("tmm7", 3, b);
        }
    }
}

/// `out[16 × hd]` (rows `hd` floats apart) = `P·V` for 16 rows of bf16 probabilities at `p` (rows `p_stride`
/// values apart) over 32-position steps `0..steps` of `vt` ([`value_tiles`]).
///
/// # Safety
/// The tiles are held ([`Tiles`]); `hd` is a multiple of 16; `p` holds 16 rows of `32·steps` values,
/// `vt` at least `steps` steps, `out` 16 × hd floats.
pub(crate) unsafe fn bf16_weighted(
    p: *const u16,
    p_stride: usize,
    vt: *const u16,
    hd: usize,
    steps: usize,
    out: *mut f32,
) {
    let parts = hd / 16;
    // Up to four 16-dimension parts at once, in tmm4..tmm7.
    // Value tiles alternate between tmm2 and tmm3 as in [`bf16_scores`].
    macro_rules! part {
        ($t:literal, $b:literal, $v:expr) => {
            asm!(
                concat!("tileloadd ", $b, ", [{v} + {s}*1]"),
                concat!("tdpbf16ps ", $t, ", tmm0, ", $b),
                v = in(reg) $v,
                s = in(reg) 64usize,
                options(nostack, readonly, preserves_flags)
            )
        };
    }
    for c0 in (0..parts).step_by(4) {
        let nc = (parts - c0).min(4);
        asm!(
            "tilezero tmm4",
            "tilezero tmm5",
            "tilezero tmm6",
            "tilezero tmm7",
            options(nostack, nomem, preserves_flags)
        );
        for t in 0..steps {
            asm!(
                "tileloadd tmm0, [{p} + {s}*1]",
                p = in(reg) p.add(t * 32),
                s = in(reg) p_stride * 2,
                options(nostack, readonly, preserves_flags)
            );
            let v = |c: usize| vt.add((t * parts + c0 + c) * 512);
            part!("tmm4", "tmm2", v(0));
            if nc > 1 {
                part!("tmm5", "tmm3", v(1));
            }
            if nc > 2 {
                part!("tmm6", "tmm2", v(2));
            }
            if nc > 3 {
                part!("tmm7", "tmm3", v(3));
            }
        }
        macro_rules! store {
            ($t:literal, $c:expr) => {
                asm!(
                    concat!("tilestored [{o} + {s}*1], ", $t),
                    o = in(reg) out.add((c0 + $c) * 16),
                    s = in(reg) hd * 4,
                    options(nostack, preserves_flags)
                )
            };
        }
        store!("tmm4", 0);
        if nc > 1 {
            store!("tmm5", 1);
        }
        if nc > 2 {
            store!("tmm6", 2);
        }
        if nc > 3 {
            store!("tmm7", 3);
        }
    }
}
