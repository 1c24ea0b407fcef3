//! How long a guest's `fork()` takes against the size of its memory.
//!
//! `tests/guests/processes/forktime.c` allocates and writes N MiB, then
//! forks ROUNDS times (each child exits at once) and prints the parent's
//! time in `fork()`: the unwind, the copy of the memory into the child's,
//! the child's store and instance, and the rewind. Run by the release
//! `upstare-host` binary for 1, 10, 100 and 1024 MiB. The first fork of a
//! process is reported apart: the child's memory comes from pages the
//! kernel has not handed out before.
//!
//! `cargo bench -p upstare-benches --bench processes [-- ROUNDS]` (default
//! 10), after `cargo build --release -p upstare-host`.

use std::process::Command;

mod common;
use common::{median, root, CGuest};

fn main() {
    let rounds: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(10);
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
    println!("fork of a process with N MiB written, {rounds} rounds per size");
    println!("{:>8} {:>12} {:>12} {:>12} {:>10}", "MiB", "first (us)", "median (us)", "min (us)", "GiB/s");
    for mib in [1u64, 10, 100, 1024] {
        let out = Command::new(&host).arg(&forktime).arg(mib.to_string()).arg((rounds + 1).to_string()).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let times: Vec<u64> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.strip_prefix("fork ").and_then(|t| t.parse().ok()).unwrap_or_else(|| panic!("{l}")))
            .collect();
        assert_eq!(times.len(), rounds + 1, "one line per fork");
        let (first, rest) = (times[0], times[1..].to_vec());
        let min = *rest.iter().min().unwrap();
        let med = median(rest);
        let rate = (mib as f64 / 1024.0) / (med as f64 / 1e6);
        println!("{mib:>8} {first:>12} {med:>12} {min:>12} {rate:>10.1}");
    }
}
