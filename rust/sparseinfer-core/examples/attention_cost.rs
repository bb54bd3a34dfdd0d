//! What one decode step's attention over the cache costs a core, on every path this CPU has, the scalar
//! reference included.
//!
//!     cargo run --release -p sparseinfer-core --example attention_cost [ISA ...]
//!
//! One thread runs one layer's attention for one new token, the way `runtime::ops::attention` does per key/value
//! head: the scores of the head's queries over the cached key panels, the softmax numerators, the weighted sum of
//! the values, for f32, f16 and int8 caches (int8 without the per-position rescaling the caller adds: its queries
//! are scaled down instead, so the scores stay in range). The figures are microseconds per layer and nanoseconds
//! per query and cached position; a short context's cache stays in the caches, a long one's partly not.

use sparseinfer_core::kernels::vector::{self, key_panels, KvElem, VectorOps, F16};
use sparseinfer_core::kernels::{self, Isa};
use std::time::Instant;

/// One model's attention shape: key/value heads, queries per key/value head, head width.
struct Shape {
    name: &'static str,
    kv_heads: usize,
    group: usize,
    head_dim: usize,
}

/// Cached keys (as panels) and values of every key/value head, in one element type.
struct Cache<T> {
    keys: Vec<Vec<T>>,
    values: Vec<Vec<T>>,
}

fn cache<T: KvElem + Default>(s: &Shape, len: usize, x: &mut impl FnMut() -> f32, of: impl Fn(f32) -> T) -> Cache<T> {
    let mut c = Cache { keys: Vec::new(), values: Vec::new() };
    for _ in 0..s.kv_heads {
        let k: Vec<T> = (0..len * s.head_dim).map(|_| of(x())).collect();
        c.keys.push(key_panels(&k, len, s.head_dim));
        c.values.push((0..len * s.head_dim).map(|_| of(x())).collect());
    }
    c
}

/// Seconds of the best of a few rounds of `calls` layer steps.
fn time(calls: usize, mut step: impl FnMut()) -> f64 {
    let mut best = f64::MAX;
    for round in 0..5 {
        let t = Instant::now();
        for _ in 0..calls {
            step();
        }
        if round > 0 {
            best = best.min(t.elapsed().as_secs_f64() / calls as f64);
        }
    }
    best
}

fn layer<T: KvElem>(
    ops: VectorOps,
    s: &Shape,
    len: usize,
    c: &Cache<T>,
    q: &[f32],
    scores: fn(&VectorOps) -> vector::Scores<T>,
    weighted: fn(&VectorOps) -> vector::Weighted<T>,
) -> f64 {
    let (m, hd) = (s.group, s.head_dim);
    let (mut p, mut o) = (vec![0.0f32; m * len], vec![0.0f32; m * hd]);
    let calls = (4_000_000 / (s.kv_heads * m * len * hd)).max(4);
    time(calls, || {
        for g in 0..s.kv_heads {
            scores(&ops)(&q[g * m * hd..(g + 1) * m * hd], m, &c.keys[g], 0..len, &mut p);
            for row in p.chunks_exact_mut(len) {
                let sum = (ops.exp_shifted)(row);
                row.iter_mut().for_each(|v| *v /= sum);
            }
            weighted(&ops)(&p, m, &c.values[g], hd, 0, &mut o);
            std::hint::black_box(&o);
        }
    })
}

fn main() {
    let mut s = 0x2545_F491_4F6C_DD1Du64;
    let mut x = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
    };
    let shapes = [
        Shape { name: "1b (16 kv heads of 128)", kv_heads: 16, group: 1, head_dim: 128 },
        Shape { name: "smollm2-135m (3 kv heads of 64, 3 queries each)", kv_heads: 3, group: 3, head_dim: 64 },
    ];
    let only: Vec<String> = std::env::args().skip(1).collect();
    let isas: Vec<Isa> = kernels::available_isas()
        .into_iter()
        .filter(|i| only.is_empty() || only.iter().any(|n| n == i.name()))
        .collect();
    println!("one thread; per layer and decoded token: microseconds, and nanoseconds per query and cached position");
    for shape in &shapes {
        for len in [144, 1024] {
            let q: Vec<f32> = (0..shape.kv_heads * shape.group * shape.head_dim).map(|_| x() * 0.2).collect();
            let f32s = cache(shape, len, &mut x, |v| v);
            let f16s = cache(shape, len, &mut x, F16::saturating);
            let i8s = cache(shape, len, &mut x, |v| (v * 127.0).round() as i8);
            let q8: Vec<f32> = q.iter().map(|v| v / 127.0).collect();
            let per = (shape.kv_heads * shape.group * len) as f64;
            for &isa in isas.iter().filter(|i| only.is_empty() || only.iter().any(|o| o == i.name())) {
                kernels::set_isa(Some(isa)).expect("an available ISA");
                let ops = vector::ops();
                let t = [
                    layer(ops, shape, len, &f32s, &q, |o| o.scores, |o| o.weighted),
                    layer(ops, shape, len, &f16s, &q, |o| o.scores_f16, |o| o.weighted_f16),
                    layer(ops, shape, len, &i8s, &q8, |o| o.scores_i8, |o| o.weighted_i8),
                ];
                let cells: Vec<String> =
                    t.iter().map(|s| format!("{:>8.1} us {:>6.2} ns", s * 1e6, s * 1e9 / per)).collect();
                println!(
                    "{:<48} {len:>5} positions {:>8}   f32 {}   f16 {}   i8 {}",
                    shape.name,
                    isa.name(),
                    cells[0],
                    cells[1],
                    cells[2]
                );
            }
        }
    }
}
