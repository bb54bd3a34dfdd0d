//! Throughput of the instructions the x86 kernels are built from, in core cycles per instruction.
//!
//!     cargo run --release -p sparseinfer-core --example isa_probe
//!
//! The numbers behind the VNNI kernels' shape. On AMD Zen 5 (the EPYC of the benchmarks in
//! docs/benchmarks) `vpdpbusd` and FMA issue two per cycle, `vpexpandb` one per 1.5 cycles, and a 64-byte
//! load that straddles two cache lines takes two load slots (1.0 against 0.5 cycles). The sparse int8
//! loop (docs/benchmarks/kernels.md) needs ~4 cycles per 64-column chunk from L2/L3, more than any one of
//! these: its loads (mask, values, activations, scale) and the streaming of the weights bound it, not
//! its arithmetic.
//!
//! Each instruction runs eight times per `asm!` loop iteration into eight destinations (for `vpdpbusd` and
//! FMA eight accumulator chains: enough for latency 4 at two per cycle), timed against a chain of dependent
//! `imul`s (3 cycles each on every current x86 core), so the figures are in core cycles whatever the clock. Needs AVX-512 (F, BW, VBMI, VBMI2, VNNI); prints a note and exits otherwise.

#[cfg(target_arch = "x86_64")]
#[path = "common/clock.rs"]
mod clock;

#[cfg(target_arch = "x86_64")]
mod probe {
    use core::arch::asm;
    use std::time::Instant;

    const ITERS: u64 = 20_000_000;

    /// The probe's table (masks, and the source of the load probes), on a cache-line boundary.
    #[repr(C, align(64))]
    struct Table([u64; 512]);

    /// Runs `$body` (eight independent instructions) `ITERS` times and prints cycles per instruction.
    macro_rules! probe {
        ($name:expr, $cyc:expr, $masks:expr, $body:expr) => {{
            let masks: &[u64; 512] = $masks;
            let mut best = f64::MAX;
            for _ in 0..5 {
                let t = Instant::now();
                // SAFETY: reads the 4096-byte table below byte 8·248 + 525 (the index wraps at 256), clobbers only the
                // declared vector and mask registers; the CPU has the features (checked by the caller).
                unsafe {
                    asm!(
                        "vpxord zmm8, zmm8, zmm8",
                        "vpternlogd zmm9, zmm9, zmm9, 0xFF",
                        "xor {i}, {i}",
                        "/* mask table {m} */",
                        "2:",
                        $body,
                        "add {i}, 8",
                        "and {i}, 255",
                        "dec {n}",
                        "jnz 2b",
                        "vzeroupper",
                        m = in(reg) masks.as_ptr(),
                        i = out(reg) _,
                        n = inout(reg) ITERS => _,
                        out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _,
                        out("zmm4") _, out("zmm5") _, out("zmm6") _, out("zmm7") _,
                        out("zmm8") _, out("zmm9") _,
                        out("k1") _, out("k2") _, out("k3") _, out("k4") _,
                        options(nostack, readonly),
                    );
                }
                best = best.min(t.elapsed().as_secs_f64() * 1e9 / (ITERS * 8) as f64);
            }
            println!("{:<50} {:5.2} cycles", $name, best / $cyc);
        }};
    }

    /// `$op zmmN, zmm8, zmm9` for N = 0..8: eight register-only instructions.
    macro_rules! reg8 {
        ($op:literal) => {
            concat!(
                $op,
                " zmm0, zmm8, zmm9\n",
                $op,
                " zmm1, zmm8, zmm9\n",
                $op,
                " zmm2, zmm8, zmm9\n",
                $op,
                " zmm3, zmm8, zmm9\n",
                $op,
                " zmm4, zmm8, zmm9\n",
                $op,
                " zmm5, zmm8, zmm9\n",
                $op,
                " zmm6, zmm8, zmm9\n",
                $op,
                " zmm7, zmm8, zmm9"
            )
        };
    }

    /// Eight zero-masked `$op zmmN{kK}{z}, zmm9`, each with a fresh mask loaded from the table by `$kmov`.
    macro_rules! masked8 {
        ($kmov:literal, $op:literal) => {
            concat!(
                $kmov,
                " k1, [{m} + 8*{i}]\n",
                $op,
                " zmm0{{k1}}{{z}}, zmm9\n",
                $kmov,
                " k2, [{m} + 8*{i} + 8]\n",
                $op,
                " zmm1{{k2}}{{z}}, zmm9\n",
                $kmov,
                " k3, [{m} + 8*{i} + 16]\n",
                $op,
                " zmm2{{k3}}{{z}}, zmm9\n",
                $kmov,
                " k4, [{m} + 8*{i} + 24]\n",
                $op,
                " zmm3{{k4}}{{z}}, zmm9\n",
                $kmov,
                " k1, [{m} + 8*{i} + 32]\n",
                $op,
                " zmm4{{k1}}{{z}}, zmm9\n",
                $kmov,
                " k2, [{m} + 8*{i} + 40]\n",
                $op,
                " zmm5{{k2}}{{z}}, zmm9\n",
                $kmov,
                " k3, [{m} + 8*{i} + 48]\n",
                $op,
                " zmm6{{k3}}{{z}}, zmm9\n",
                $kmov,
                " k4, [{m} + 8*{i} + 56]\n",
                $op,
                " zmm7{{k4}}{{z}}, zmm9"
            )
        };
    }

    pub fn run() {
        let ok = ["avx512f", "avx512bw", "avx512vbmi", "avx512vbmi2", "avx512vnni"].iter().all(|f| match *f {
            "avx512f" => is_x86_feature_detected!("avx512f"),
            "avx512bw" => is_x86_feature_detected!("avx512bw"),
            "avx512vbmi" => is_x86_feature_detected!("avx512vbmi"),
            "avx512vbmi2" => is_x86_feature_detected!("avx512vbmi2"),
            _ => is_x86_feature_detected!("avx512vnni"),
        });
        if !ok {
            println!("isa_probe needs AVX-512 F/BW/VBMI/VBMI2/VNNI; this CPU lacks one of them");
            return;
        }
        // Masks with ~30 % of bits set (the density of a 70 %-sparse chunk), different every time.
        let mut s = 0x2545_F491_4F6C_DD1Du64;
        let masks = Table(core::array::from_fn(|_| {
            (0..64).fold(0u64, |m, b| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                if s % 10 < 3 {
                    m | 1 << b
                } else {
                    m
                }
            })
        }));
        let ones = Table([u64::MAX; 512]);
        let cyc = super::clock::ns_per_cycle();
        println!("core clock ~{:.2} GHz (from a dependent imul chain)", 1.0 / cyc);
        println!("throughput per instruction (eight per loop iteration):");
        probe!("vpdpbusd zmm (int8 dot, 64 bytes)", cyc, &masks.0, reg8!("vpdpbusd"));
        probe!("vfmadd231ps zmm", cyc, &masks.0, reg8!("vfmadd231ps"));
        probe!("vpermb zmm (byte permute)", cyc, &masks.0, reg8!("vpermb"));
        probe!("vpexpandb zmm, a new mask each time", cyc, &masks.0, masked8!("kmovq", "vpexpandb"));
        probe!("vpexpandb zmm, all-ones masks", cyc, &ones.0, masked8!("kmovq", "vpexpandb"));
        probe!("vpcompressb zmm, a new mask each time", cyc, &masks.0, masked8!("kmovq", "vpcompressb"));
        probe!("vexpandps zmm (16 lanes), a new mask each time", cyc, &masks.0, masked8!("kmovw", "vexpandps"));
        probe!("vpexpandw zmm (32 lanes), a new mask each time", cyc, &masks.0, masked8!("kmovd", "vpexpandw"));
        probe!(
            "vpmovzxbw zmm, ymm (bytes to words)",
            cyc,
            &masks.0,
            "vpmovzxbw zmm0, ymm9\nvpmovzxbw zmm1, ymm9\nvpmovzxbw zmm2, ymm9\nvpmovzxbw zmm3, ymm9\n\
             vpmovzxbw zmm4, ymm9\nvpmovzxbw zmm5, ymm9\nvpmovzxbw zmm6, ymm9\nvpmovzxbw zmm7, ymm9"
        );
        probe!("vpandd zmm (a logic op)", cyc, &masks.0, reg8!("vpandd"));
        probe!("vpermt2ps zmm (two-table float permute)", cyc, &masks.0, reg8!("vpermt2ps"));
        probe!(
            "vexpandps + vfmadd231ps zmm (a sparse f32 step)",
            cyc,
            &masks.0,
            "kmovw k1, [{m} + 8*{i}]\nvexpandps zmm0{{k1}}{{z}}, zmm9\nvfmadd231ps zmm4, zmm0, zmm8\n\
             kmovw k2, [{m} + 8*{i} + 8]\nvexpandps zmm1{{k2}}{{z}}, zmm9\nvfmadd231ps zmm5, zmm1, zmm8\n\
             kmovw k3, [{m} + 8*{i} + 16]\nvexpandps zmm2{{k3}}{{z}}, zmm9\nvfmadd231ps zmm6, zmm2, zmm8\n\
             kmovw k4, [{m} + 8*{i} + 24]\nvexpandps zmm3{{k4}}{{z}}, zmm9\nvfmadd231ps zmm7, zmm3, zmm8\n\
             kmovw k1, [{m} + 8*{i} + 32]\nvexpandps zmm0{{k1}}{{z}}, zmm9\nvfmadd231ps zmm4, zmm0, zmm8\n\
             kmovw k2, [{m} + 8*{i} + 40]\nvexpandps zmm1{{k2}}{{z}}, zmm9\nvfmadd231ps zmm5, zmm1, zmm8\n\
             kmovw k3, [{m} + 8*{i} + 48]\nvexpandps zmm2{{k3}}{{z}}, zmm9\nvfmadd231ps zmm6, zmm2, zmm8\n\
             kmovw k4, [{m} + 8*{i} + 56]\nvexpandps zmm3{{k4}}{{z}}, zmm9\nvfmadd231ps zmm7, zmm3, zmm8"
        );
        probe!(
            "vfmadd231ps zmm, m32{1to16} (embedded broadcast)",
            cyc,
            &masks.0,
            "vfmadd231ps zmm0, zmm8, [{m} + 8*{i}]{{1to16}}\nvfmadd231ps zmm1, zmm8, [{m} + 8*{i} + 8]{{1to16}}\n\
             vfmadd231ps zmm2, zmm8, [{m} + 8*{i} + 16]{{1to16}}\nvfmadd231ps zmm3, zmm8, [{m} + 8*{i} + 24]{{1to16}}\n\
             vfmadd231ps zmm4, zmm8, [{m} + 8*{i} + 32]{{1to16}}\nvfmadd231ps zmm5, zmm8, [{m} + 8*{i} + 40]{{1to16}}\n\
             vfmadd231ps zmm6, zmm8, [{m} + 8*{i} + 48]{{1to16}}\nvfmadd231ps zmm7, zmm8, [{m} + 8*{i} + 56]{{1to16}}"
        );
        probe!(
            "vbroadcastss zmm, m32 (separate broadcast load)",
            cyc,
            &masks.0,
            "vbroadcastss zmm0, [{m} + 8*{i}]\nvbroadcastss zmm1, [{m} + 8*{i} + 8]\nvbroadcastss zmm2, [{m} + 8*{i} + 16]\n\
             vbroadcastss zmm3, [{m} + 8*{i} + 24]\nvbroadcastss zmm4, [{m} + 8*{i} + 32]\n\
             vbroadcastss zmm5, [{m} + 8*{i} + 40]\nvbroadcastss zmm6, [{m} + 8*{i} + 48]\nvbroadcastss zmm7, [{m} + 8*{i} + 56]"
        );
        probe!(
            "vmovdqu64 zmm, m512 within one cache line",
            cyc,
            &masks.0,
            "vmovdqu64 zmm0, [{m} + 8*{i}]\nvmovdqu64 zmm1, [{m} + 8*{i} + 64]\nvmovdqu64 zmm2, [{m} + 8*{i} + 128]\n\
             vmovdqu64 zmm3, [{m} + 8*{i} + 192]\nvmovdqu64 zmm4, [{m} + 8*{i} + 256]\nvmovdqu64 zmm5, [{m} + 8*{i} + 320]\n\
             vmovdqu64 zmm6, [{m} + 8*{i} + 384]\nvmovdqu64 zmm7, [{m} + 8*{i} + 448]"
        );
        probe!(
            "vmovdqu64 zmm, m512 straddling two lines",
            cyc,
            &masks.0,
            "vmovdqu64 zmm0, [{m} + 8*{i} + 13]\nvmovdqu64 zmm1, [{m} + 8*{i} + 77]\nvmovdqu64 zmm2, [{m} + 8*{i} + 141]\n\
             vmovdqu64 zmm3, [{m} + 8*{i} + 205]\nvmovdqu64 zmm4, [{m} + 8*{i} + 269]\nvmovdqu64 zmm5, [{m} + 8*{i} + 333]\n\
             vmovdqu64 zmm6, [{m} + 8*{i} + 397]\nvmovdqu64 zmm7, [{m} + 8*{i} + 461]"
        );
        probe!(
            "kmovq k, m64 + vpblendmb zmm (mask cost alone)",
            cyc,
            &masks.0,
            "kmovq k1, [{m} + 8*{i}]\nvpblendmb zmm0{{k1}}, zmm8, zmm9\nkmovq k2, [{m} + 8*{i} + 8]\n\
             vpblendmb zmm1{{k2}}, zmm8, zmm9\nkmovq k3, [{m} + 8*{i} + 16]\nvpblendmb zmm2{{k3}}, zmm8, zmm9\n\
             kmovq k4, [{m} + 8*{i} + 24]\nvpblendmb zmm3{{k4}}, zmm8, zmm9\nkmovq k1, [{m} + 8*{i} + 32]\n\
             vpblendmb zmm4{{k1}}, zmm8, zmm9\nkmovq k2, [{m} + 8*{i} + 40]\nvpblendmb zmm5{{k2}}, zmm8, zmm9\n\
             kmovq k3, [{m} + 8*{i} + 48]\nvpblendmb zmm6{{k3}}, zmm8, zmm9\nkmovq k4, [{m} + 8*{i} + 56]\n\
             vpblendmb zmm7{{k4}}, zmm8, zmm9"
        );
    }
}

fn main() {
    #[cfg(target_arch = "x86_64")]
    probe::run();
    #[cfg(not(target_arch = "x86_64"))]
    println!("isa_probe measures x86 instructions; nothing to do on this architecture");
}
