//! Latency from `InterruptHandle::interrupt()` to a blocked guest call
//! returning to the host (target: under 1 ms).
//!
//! Two measurements: the interrupter alone (a thread blocked in its wait),
//! and a real guest blocked in `poll_oneoff` (sleeping an hour) until
//! `Guest::run` returns `Exit::Interrupted`. Each iteration blocks afresh
//! and waits 2 ms first, so the request always meets a blocked call.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use upstare_host::interrupt::Interrupter;
use upstare_host::{new_engine, Exit, Guest, GuestConfig, GuestModule};

const SLEEPER: &str = r#"(module
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    (i32.store (i32.const 144) (i32.const 1))
    (i64.store (i32.const 152) (i64.const 3600000000000))
    (drop (call $poll (i32.const 128) (i32.const 256) (i32.const 1) (i32.const 512)))))"#;

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("interrupt_to_return");
    group.sample_size(30).measurement_time(Duration::from_secs(4));

    group.bench_function("interrupter_wait", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let interrupter = Interrupter::new().unwrap();
                let handle = interrupter.handle();
                let waiter = std::thread::spawn(move || {
                    interrupter.wait(&[], None).unwrap();
                    Instant::now()
                });
                std::thread::sleep(Duration::from_millis(2));
                let asked = Instant::now();
                handle.interrupt();
                total += waiter.join().unwrap().duration_since(asked);
            }
            total
        })
    });

    let engine = new_engine().unwrap();
    let module = GuestModule::from_bytes(&engine, "sleeper.wasm".as_ref(), &wat::parse_str(SLEEPER).unwrap()).unwrap();
    group.bench_function("guest_blocked_in_poll_oneoff", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let mut guest = Guest::new(&engine, &module, GuestConfig::new(vec!["sleeper".into()])).unwrap();
                let handle = guest.interrupt_handle();
                let runner = std::thread::spawn(move || {
                    let exit = guest.run();
                    assert!(matches!(exit, Exit::Interrupted { call: "poll_oneoff" }), "{exit:?}");
                    Instant::now()
                });
                std::thread::sleep(Duration::from_millis(2));
                let asked = Instant::now();
                handle.interrupt();
                total += runner.join().unwrap().duration_since(asked);
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
