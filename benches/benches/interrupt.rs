//! Latency from a request to the guest being back in the host's hands
//! (target: under 1 ms).
//!
//! Four measurements: the interrupter alone (a thread blocked in its wait);
//! an uninstrumented guest blocked in `poll_oneoff` (sleeping an hour) until
//! `Guest::run` returns `Exit::Interrupted`; and an instrumented guest,
//! blocked in the same call or spinning in a loop, from
//! `PauseHandle::request` until `Guest::run` returns `Exit::Paused` with its
//! stack unwound. Each iteration starts afresh and waits 2 ms first, so the
//! request always meets a blocked call or a running loop.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use upstare_host::interrupt::Interrupter;
use upstare_host::{new_engine, Exit, Guest, GuestConfig, GuestModule, LoadOptions};

const SLEEPER: &str = r#"(module
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    (i32.store (i32.const 144) (i32.const 1))
    (i64.store (i32.const 152) (i64.const 3600000000000))
    (drop (call $poll (i32.const 128) (i32.const 256) (i32.const 1) (i32.const 512)))))"#;

/// Counts forever; its only update point is the loop header.
const SPINNER: &str = r#"(module
  (memory (export "memory") 1)
  (func (export "_start") (local $i i32)
    (loop $l (local.set $i (i32.add (local.get $i) (i32.const 1))) (br $l))))"#;

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
    let sleeper = wat::parse_str(SLEEPER).unwrap();
    let as_is = LoadOptions { instrument: false, ..LoadOptions::default() };
    let module = GuestModule::from_bytes_with(&engine, "sleeper.wasm".as_ref(), &sleeper, &as_is).unwrap();
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

    for (name, wat) in [("pause_guest_blocked_in_poll_oneoff", SLEEPER), ("pause_guest_in_a_loop", SPINNER)] {
        let module = GuestModule::from_bytes(&engine, "pausee.wasm".as_ref(), &wat::parse_str(wat).unwrap()).unwrap();
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let mut guest = Guest::new(&engine, &module, GuestConfig::new(vec!["pausee".into()])).unwrap();
                    let handle = guest.pause_handle().unwrap();
                    let runner = std::thread::spawn(move || {
                        let exit = guest.run();
                        assert!(matches!(exit, Exit::Paused), "{exit:?}");
                        Instant::now()
                    });
                    std::thread::sleep(Duration::from_millis(2));
                    let asked = handle.request();
                    total += runner.join().unwrap().duration_since(asked);
                }
                total
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
