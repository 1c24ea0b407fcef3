//! Pause and resume latency against stack depth and memory size.
//!
//! The guest recurses to a given depth and spins in a loop at the bottom,
//! over a memory of a given size (every page written first, so it is
//! resident). Measured, per case, median of the rounds:
//! - request to paused: from `PauseHandle::request` until `Guest::run`
//!   has returned `Exit::Paused`, the stack unwound and its frames read;
//! - paused to running: from `Guest::run` called again until the rewind
//!   has popped the last frame (the guest is back in its loop).
//!
//! `cargo bench -p upstare-benches --bench pause [-- ROUNDS]` (default 20).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::channel;
use std::sync::Arc;
use std::time::{Duration, Instant};

use upstare_host::{new_engine, Exit, Guest, GuestConfig, GuestModule, GUEST_THREAD_STACK};

fn guest_wat(depth: u32, pages: u32) -> String {
    format!(
        r#"(module
  (memory (export "memory") {pages})
  (func $down (param $d i32)
    (if (i32.gt_u (local.get $d) (i32.const 0))
      (then (call $down (i32.sub (local.get $d) (i32.const 1))))
      (else (loop $spin (br $spin)))))
  (func (export "_start")
    (memory.fill (i32.const 0) (i32.const 1) (i32.mul (memory.size) (i32.const 65536)))
    (call $down (i32.const {depth}))))"#
    )
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let rounds: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(20);
    let engine = new_engine().unwrap();
    println!("{rounds} rounds per case; median");
    println!("{:>6} {:>9} {:>18} {:>18} {:>12}", "frames", "memory", "request->paused", "paused->running", "both");
    for depth in [1u32, 32, 1000] {
        for (label, pages) in [("1 MiB", 16u32), ("64 MiB", 1024), ("1 GiB", 16384)] {
            let wasm = wat::parse_str(guest_wat(depth - 1, pages)).unwrap();
            let module = GuestModule::from_bytes(&engine, "pause.wasm".as_ref(), &wasm).unwrap();
            let mut guest = Guest::new(&engine, &module, GuestConfig::new(vec!["pause".into()])).unwrap();
            let pause = guest.pause_handle().unwrap();
            let (paused_tx, paused_rx) = channel();
            let resuming = Arc::new(AtomicBool::new(false));
            let resuming_guest = resuming.clone();
            let runner = std::thread::Builder::new()
                .stack_size(GUEST_THREAD_STACK)
                .spawn(move || {
                    let mut exit = guest.run();
                    for _ in 0..=rounds {
                        assert!(matches!(exit, Exit::Paused), "{exit:?}");
                        paused_tx.send(Instant::now()).unwrap();
                        // Wait for the go-ahead, then time the resume.
                        while !resuming_guest.swap(false, Ordering::SeqCst) {
                            std::hint::spin_loop();
                        }
                        paused_tx.send(Instant::now()).unwrap();
                        exit = guest.run();
                    }
                })
                .unwrap();
            // Let it fill its memory and reach the loop.
            std::thread::sleep(Duration::from_millis(100 + u64::from(pages) / 20));
            let (mut to_paused, mut to_running) = (Vec::new(), Vec::new());
            for round in 0..=rounds {
                let asked = pause.request();
                let paused = paused_rx.recv().unwrap();
                resuming.store(true, Ordering::SeqCst);
                let resumed_from = paused_rx.recv().unwrap();
                while !pause.frame_stack_empty() {
                    std::hint::spin_loop();
                }
                let running = Instant::now();
                if round > 0 {
                    to_paused.push(paused.duration_since(asked));
                    to_running.push(running.duration_since(resumed_from));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            // The last round leaves it running: one more pause ends the thread.
            pause.request();
            runner.join().unwrap();
            let (p, r) = (median(to_paused), median(to_running));
            println!(
                "{depth:>6} {label:>9} {:>15.1} us {:>15.1} us {:>9.1} us",
                p.as_secs_f64() * 1e6,
                r.as_secs_f64() * 1e6,
                (p + r).as_secs_f64() * 1e6
            );
        }
    }
}
