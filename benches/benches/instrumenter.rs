//! The instrumenter's own speed on real modules, in bytes of code section
//! rewritten per second: the KV server guest and the SQLite workload (the
//! whole amalgamation), both built with the documented recipe. Their DWARF,
//! `linking` and `reloc.*` sections, most of the input's bytes, are read
//! past and left out of the output (the metadata refers to the original
//! module), so the rate is per byte of code; each run also prints whole
//! module sizes, so it can be restated per byte of input.
//!
//! `cargo bench -p upstare-benches --bench instrumenter`

mod common;

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("instrument");
    // One SQLite rewrite takes seconds: few samples, and no more time
    // than those take.
    group.sample_size(10).measurement_time(Duration::from_secs(20)).warm_up_time(Duration::from_secs(1));
    for guest in [common::kv_guest(), common::sqlite_guest()] {
        let wasm = std::fs::read(guest.build()).unwrap();
        let out = upstare_instrument::instrument(&wasm, &Default::default()).unwrap();
        println!(
            "{}: module {} bytes (code {}), instrumented {} bytes (code {}), {} functions, {} resume points",
            guest.name,
            wasm.len(),
            common::code_size(&wasm),
            out.wasm.len(),
            common::code_size(&out.wasm),
            out.metadata.functions.len(),
            out.metadata.functions.iter().map(|f| f.resume_points.len()).sum::<usize>(),
        );
        group.throughput(Throughput::Bytes(common::code_size(&wasm) as u64));
        group.bench_with_input(BenchmarkId::from_parameter(&guest.name), &wasm, |b, wasm| {
            b.iter(|| upstare_instrument::instrument(wasm, &Default::default()).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
