//! What one 64-column chunk of each integer format costs a core, in core cycles, on every x86 path this CPU has.
//!
//!     cargo run --release -p sparseinfer-core --example chunk_cost [--rows K] [ISA ...]
//!
//! With ISA names (`avx2`, `avxvnni`, `avx512`), only those paths are timed. `--rows K` times a prefill step
//! instead of a matvec: `K` activation rows against the matrix, the figure then per chunk and activation row.
//! One thread computes `W x` over and over for a matrix that stays in L2, so memory does not bound it: the
//! figure is the kernel's own cost per chunk (mask, expansion, products, scaling), the ceiling on what one
//! core can stream. A decode step is memory-bound only where the cores' combined rate exceeds the bandwidth:
//! `cores · 64 · bytes per weight · clock / cycles per chunk` against the read bandwidth; a matvec line gives
//! the per-core part (`GB/s per core`): on a CPU whose bandwidth per core is below it the format decodes at the
//! memory's rate, so of two formats the one with fewer bytes wins there, and the faster kernel above. A dense format
//! costs the same per chunk at any sparsity; a sparse one pays per chunk however few values it holds, so its
//! figure hardly moves with sparsity.

#[cfg(target_arch = "x86_64")]
#[path = "common/clock.rs"]
mod clock;

#[cfg(target_arch = "x86_64")]
fn run() {
    use sparseinfer_core::kernels::{self, Isa};
    use sparseinfer_core::{parallel, Format, PackOptions, PackedMatrix};
    use std::time::Instant;

    // 1024 x 2048: ~0.9 MB of sparse int8 at 70 %, within every current x86 core's L2 (or its share of L3).
    let (rows, cols) = (1024, 2048);
    let chunks = (rows * cols / 64) as f64;
    let ns = clock::ns_per_cycle();
    parallel::set_num_threads(1);
    let mut s = 0x2545_F491_4F6C_DD1Du64;
    let mut rnd = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let k = match args.iter().position(|a| a == "--rows") {
        Some(i) => {
            let k = args.get(i + 1).and_then(|v| v.parse::<usize>().ok()).filter(|&k| k > 0).expect("--rows K");
            args.drain(i..i + 2);
            k
        }
        None => 1,
    };
    let x: Vec<f32> = (0..k * cols).map(|_| (rnd() * 2.0 - 1.0) as f32).collect();
    let per = if k > 1 { " and activation row" } else { "" };
    println!(
        "clock {:.2} GHz, one thread, {rows}x{cols}, {k} activation row(s), cycles per 64-column chunk{per}",
        1.0 / ns
    );
    let cases = [
        (Format::DenseInt8, 0.0),
        (Format::DenseInt4, 0.0),
        (Format::SparseInt8, 0.5),
        (Format::SparseInt8, 0.7),
        (Format::SparseInt8, 0.9),
        (Format::SparseInt4, 0.7),
    ];
    let weights: Vec<Vec<f32>> = cases
        .iter()
        .map(|&(_, p)| (0..rows * cols).map(|_| if rnd() < p { 0.0 } else { (rnd() * 2.0 - 1.0) as f32 }).collect())
        .collect();
    let only = args;
    let chosen = |i: Isa| i != Isa::Scalar && (only.is_empty() || only.iter().any(|n| n == i.name()));
    for isa in kernels::available_isas().into_iter().filter(|&i| chosen(i)) {
        kernels::set_isa(Some(isa)).expect("an available ISA");
        for (&(format, p), w) in cases.iter().zip(&weights) {
            // Packed under the ISA, so the layout is the one its kernels read (tiles on AVX-512 VNNI).
            let m = PackedMatrix::pack(w, rows, cols, format, PackOptions::default()).expect("finite weights");
            let mut y = vec![0.0; k * rows];
            let calls = (400 / k).max(8);
            let mut best = f64::MAX;
            for round in 0..6 {
                let t = Instant::now();
                for _ in 0..calls {
                    if k == 1 {
                        kernels::matvec(&m, &x, &mut y).expect("shapes match");
                    } else {
                        kernels::matmul(&m, &x, k, &mut y, None).expect("shapes match");
                    }
                }
                // The first round warms the caches.
                if round > 0 {
                    best = best.min(t.elapsed().as_secs_f64() * 1e9 / calls as f64);
                }
            }
            let cycles = best / ns / chunks / k as f64;
            let isa_now = kernels::active_isa().expect("an active ISA");
            let name = kernels::kernel_name_on(isa_now, &m, kernels::Activations::Int8, k);
            let bytes = m.nbytes() as f64 / (rows * cols) as f64;
            // The most one core streams from memory with this kernel (a matvec reads every byte once).
            let stream =
                if k == 1 { format!("{:>5.1} GB/s per core", 64.0 * bytes / cycles / ns) } else { String::new() };
            println!(
                "{:>9} {:>12} {:>4.0} % {:>6.2} cycles  {bytes:>5.2} bytes/weight  {stream:>17}  {name}",
                isa.name(),
                format.name(),
                p * 100.0,
                cycles,
            );
        }
    }
}

fn main() {
    #[cfg(target_arch = "x86_64")]
    run();
    #[cfg(not(target_arch = "x86_64"))]
    println!("chunk_cost times the x86 paths; nothing to do on this architecture");
}
