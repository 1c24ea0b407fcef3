//! How long a guest's `fork()` takes against the size of its memory, and
//! how long pausing and updating a program takes against its number of
//! processes.
//!
//! `tests/guests/processes/forktime.c` allocates and writes N MiB, then
//! forks ROUNDS times (each child exits at once) and prints the parent's
//! time in `fork()`: the unwind, the child's memory, its store and
//! instance, and the rewind. Run by the release `upstare-host` binary for
//! 1, 10, 100 and 1024 MiB, with each `--fork-memory` (`copy`, `cow`), and
//! each once more with the parent writing its whole memory again after
//! every fork (what copy-on-write makes a parent pay, and the next fork
//! copy), timed too. The first fork of a process is reported apart: the
//! child's memory comes from pages the kernel has not handed out before.
//!
//! The prefork example server (`guest-examples/prefork-server`) runs
//! under the host library exactly as `upstare-host` runs it, with 1, 8 and
//! 64 workers, half of them serving an idle connection (blocked in `recv`),
//! the others in `accept`, the master in `waitpid`; it is updated to v2
//! and back to v1 (no type changes) in turns. Per case, median of the
//! rounds: request to paused (from the update's pause request until every
//! process has unwound and parked) and the update's pause (from then until
//! every process is ready in the new version), both from the report.
//!
//! `cargo bench -p upstare-benches --bench processes [-- ROUNDS] [pause]`
//! (default 10 rounds; `pause` runs the second part only), after
//! `cargo build --release -p upstare-host`.

use std::process::Command;
use std::time::Duration;

mod common;
use common::{median, report_field as field, root, CGuest, Served};

fn main() {
    let rounds: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(10);
    if std::env::args().any(|a| a == "pause") {
        return pause_and_update(rounds);
    }
    let forktime = CGuest {
        name: "forktime".into(),
        sources: vec![root().join("tests/guests/processes/forktime.c")],
        // Room for 1 GiB of heap.
        flags: vec!["-Wl,--max-memory=2147483648".into()],
        libs: Vec::new(),
    }
    .build();
    let host = root().join("target/release/upstare-host");
    assert!(host.exists(), "build the host first: cargo build --release -p upstare-host");
    // One host run: `rounds` forks after the first, each line's figures.
    let run = |mib: u64, memory: &str, rewrite: bool| -> (u64, Vec<u64>, Vec<u64>) {
        let mut cmd = Command::new(&host);
        cmd.args(["--fork-memory", memory]).arg(&forktime).arg(mib.to_string()).arg((rounds + 1).to_string());
        if rewrite {
            cmd.arg("rewrite");
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let (mut forks, mut writes) = (Vec::new(), Vec::new());
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let (what, us) = line.split_once(' ').unwrap_or_else(|| panic!("{line}"));
            let us: u64 = us.parse().unwrap_or_else(|_| panic!("{line}"));
            match what {
                "fork" => forks.push(us),
                "write" => writes.push(us),
                _ => panic!("{line}"),
            }
        }
        assert_eq!(forks.len(), rounds + 1, "one line per fork");
        (forks[0], forks[1..].to_vec(), writes)
    };
    let show = |v: &[u64]| format!("{} ({})", median(v.to_vec()), v.iter().min().unwrap());
    println!("fork of a process with N MiB written, {rounds} rounds per size after the first fork; median (min), us");
    println!(
        "{:>6} {:>6} {:>12} {:>18} {:>8} | {:>18} {:>18}",
        "MiB", "memory", "first fork", "fork", "GiB/s", "fork, rewriting", "rewrite"
    );
    for mib in [1u64, 10, 100, 1024] {
        // The variants of one size run back to back, so that they share
        // the machine's mood.
        for memory in ["copy", "cow"] {
            let (first, forks, _) = run(mib, memory, false);
            let (_, forks_rewriting, writes) = run(mib, memory, true);
            let rate = (mib as f64 / 1024.0) / (median(forks.clone()) as f64 / 1e6);
            println!(
                "{mib:>6} {memory:>6} {first:>12} {:>18} {rate:>8.1} | {:>18} {:>18}",
                show(&forks),
                show(&forks_rewriting),
                show(&writes)
            );
        }
    }
    pause_and_update(rounds);
}

fn prefork(version: u32) -> std::path::PathBuf {
    CGuest {
        name: format!("prefork-v{version}"),
        sources: vec![root().join("guest-examples/prefork-server/prefork.c")],
        flags: vec!["-Wall".into(), "-Wextra".into(), format!("-DPREFORK_VERSION={version}")],
        libs: Vec::new(),
    }
    .build()
}

fn pause_and_update(rounds: usize) {
    let (v1, v2) = (prefork(1), prefork(2));
    println!();
    println!("prefork server, updated v1 <-> v2, {rounds} rounds per case; median (min)");
    println!("{:>10} {:>22} {:>22}", "processes", "request->paused (us)", "update pause (us)");
    for workers in [1usize, 8, 64] {
        let served = Served::start_with(&v1, &["prefork", &workers.to_string()], &format!("processes-{workers}"), move |config| {
            config.max_processes = workers + 1;
        });
        // Half the workers hold a connection and wait in `recv`.
        let idle: Vec<_> = (0..workers / 2).map(|_| served.connect()).collect();
        std::thread::sleep(Duration::from_millis(300 + 10 * workers as u64));
        let (mut paused, mut updates) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            // Running again after the last update, not still paused by it.
            std::thread::sleep(Duration::from_millis(20));
            let to = if round % 2 == 0 { &v2 } else { &v1 };
            let report = served.update(to, 5000);
            assert!(report.contains(&format!("processes: {} moved", workers + 1)), "{report}");
            paused.push(field(&report, "request to paused: "));
            updates.push(field(&report, "pause: "));
        }
        eprintln!("{workers} workers: request->paused {paused:?}, update pauses {updates:?}");
        let show = |v: &Vec<u64>| format!("{} ({})", median(v.clone()), v.iter().min().unwrap());
        println!("{:>10} {:>22} {:>22}", 1 + workers, show(&paused), show(&updates));
        drop(idle);
    }
}
