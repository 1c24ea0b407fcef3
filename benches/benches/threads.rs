//! Pausing and updating multi-threaded programs, against the number of
//! threads; and the cost of instrumentation on a threads guest.
//!
//! The thread-pool example server (`guest-examples/pool-server`, v1) runs
//! under the host library exactly as `upstare-host` runs it, with 1, 8 and
//! 64 workers: half of them serving an idle connection (blocked in
//! `read`), the others waiting for work on a condition variable (a futex
//! wait), the main thread in `accept`. Per case, median of the rounds:
//! - request to paused: a checkpoint's pause, from the request until every
//!   thread has unwound and parked (the snapshot's own writing excluded);
//! - update pause: an update to v2 or back to v1 (the types do not change),
//!   from the program paused to every thread ready in the new version.
//!
//! Then two threaded programs run by the `upstare-host` binary,
//! instrumented and as it is, side by side in rounds: the ratio of their
//! medians. zstd 1.5.7's own multi-threaded compression
//! (`tests/releases/zstd-mt.c`, 4 worker threads), a real program busy in
//! its workers; and `tests/guests/threads/counter.c` (4 threads adding
//! under a mutex), which measures little but the host's futex waits.
//!
//! `cargo bench -p upstare-benches --bench threads [-- ROUNDS]` (default 10).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::{median, report_field as field, root, CGuest, Served};

fn pool(version: u32) -> std::path::PathBuf {
    CGuest {
        name: format!("pool-v{version}"),
        sources: vec![root().join("guest-examples/pool-server/pool.c")],
        flags: ["--threads", "-Wall", "-Wextra"].map(String::from).into_iter().chain([format!("-DPOOL_VERSION={version}")]).collect(),
        libs: Vec::new(),
    }
    .build()
}

/// A checkpoint's "paused N us", from `upstare-host checkpoint`'s summary.
fn checkpoint_pause(served: &Served, path: &Path) -> u64 {
    use upstare_host::control::{self, Request, Response};
    match control::request(&served.socket, &Request::Checkpoint(path.to_path_buf())).unwrap() {
        Response::Done { summary: Some(s), .. } => {
            s.split("paused ").nth(1).and_then(|v| v.split(' ').next()).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{s}"))
        }
        other => panic!("checkpoint failed: {other:?}"),
    }
}

fn main() {
    let rounds: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(10);
    let (v1, v2) = (pool(1), pool(2));
    println!("pool server, {rounds} rounds per case; median (min)");
    println!("{:>8} {:>22} {:>22}", "threads", "request->paused (us)", "update pause (us)");
    let snap = std::env::temp_dir().join(format!("upstare-bench-threads-{}.snap", std::process::id()));
    for workers in [1usize, 8, 64] {
        let served = Served::start(&v1, &["pool", &workers.to_string()], &format!("threads-{workers}"));
        // Half the workers hold a connection and wait in `read`.
        let idle: Vec<_> = (0..workers / 2).map(|_| served.connect()).collect();
        std::thread::sleep(Duration::from_millis(300));
        let (mut paused, mut updates) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            // Running again after the last update, not still paused by it.
            std::thread::sleep(Duration::from_millis(20));
            paused.push(checkpoint_pause(&served, &snap));
            let to = if round % 2 == 0 { &v2 } else { &v1 };
            updates.push(field(&served.update(to, 5000), "pause: "));
        }
        eprintln!("{workers} workers: request->paused {paused:?}, update pauses {updates:?}");
        let show = |v: &Vec<u64>| format!("{} ({})", median(v.clone()), v.iter().min().unwrap());
        println!("{:>8} {:>22} {:>22}", 1 + workers, show(&paused), show(&updates));
        drop(idle);
    }
    let _ = std::fs::remove_file(&snap);

    threaded_overhead(rounds);
}

/// Runs `module ARGS` with the release `upstare-host`, instrumented and as
/// it is, alternately for `rounds` rounds after one of each (instrumenting
/// and compiling are cached after it): the medians, as it is and
/// instrumented.
fn instrumented_against_as_is(module: &Path, args: &[&str], rounds: usize) -> (Duration, Duration) {
    let host = root().join("target/release/upstare-host");
    assert!(host.exists(), "build the host first: cargo build --release -p upstare-host");
    let time = |flags: &[&str]| {
        let started = Instant::now();
        let out = Command::new(&host).args(flags).arg(module).args(args).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        started.elapsed()
    };
    time(&[]);
    time(&["--no-instrument"]);
    let (mut plain, mut instrumented) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        plain.push(time(&["--no-instrument"]));
        instrumented.push(time(&[]));
    }
    (median(plain), median(instrumented))
}

fn threaded_overhead(rounds: usize) {
    let show = |what: &str, (p, i): (Duration, Duration)| {
        println!(
            "{what}: as it is {:.1} ms, instrumented {:.1} ms, ratio {:.3}",
            p.as_secs_f64() * 1e3,
            i.as_secs_f64() * 1e3,
            i.as_secs_f64() / p.as_secs_f64()
        );
    };
    // zstd's own pool of 4 threads compressing 16 MiB, 4 times over, and
    // checking each frame: a real threaded program, busy in its workers.
    let zstd = upstare_tests::releases::zstd_mt("1.5.7", &[]);
    show("zstd-mt (zstd 1.5.7, 4 worker threads, 16 MiB x 4)", instrumented_against_as_is(&zstd, &["4", "16", "4"], rounds));
    let counter = CGuest {
        name: "counter".into(),
        sources: vec![root().join("tests/guests/threads/counter.c")],
        flags: vec!["--threads".into()],
        libs: Vec::new(),
    }
    .build();
    show("counter (4 threads x 100000 mutex increments)", instrumented_against_as_is(&counter, &[], rounds));
}
