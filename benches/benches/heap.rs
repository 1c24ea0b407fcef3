//! Pause of an update that converts heap objects, and of one that converts
//! none in the same heap.
//!
//! The heapgraph test guest (`tests/guests/chains/heapgraph`) runs under
//! the host library as `upstare-host` runs it; a client grows its list and
//! tree to N elements each (2N heap objects, 3N pointers, one array of N
//! records) and adds a ballast allocation so the heap is big. Then, through
//! the control socket: an update to the same module (no type changes: the
//! tracer does not run), an update to version 2 (every list node, tree node
//! and the array gain a member: all converted), and an update to version 2
//! again (nothing to convert). Each update's report gives its pause and the
//! heap figures; a client checks the structures after each.
//!
//! Then back to version 1 and to version 2 again, ROUNDS - 1 times (both
//! convert every object), and the fastest and median converting pauses.
//!
//! `cargo bench -p upstare-benches --bench heap [-- ELEMENTS [BALLAST_MIB [ROUNDS]]]`
//! (defaults 500000 elements, that is 10^6 objects, 1024 MiB and 3 rounds).

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Instant;

mod common;
use common::{report_field as field, root, Served};

fn request(stream: &mut TcpStream, line: &str) -> String {
    stream.write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut reply = String::new();
    reader.read_line(&mut reply).unwrap();
    reply.trim_end().to_string()
}

/// Minor page faults of this process so far (the host runs in it): an
/// update's share, read around it, is mostly its pause's (the module is
/// compiled already).
fn minor_faults() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name, which is in parentheses: minflt is the 8th.
    stat.rsplit(')').next().and_then(|rest| rest.split_whitespace().nth(7)).and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn main() {
    let mut numbers = std::env::args().skip(1).filter_map(|a| a.parse::<usize>().ok());
    let elements = numbers.next().unwrap_or(500_000);
    let ballast = numbers.next().unwrap_or(1024);
    let rounds = numbers.next().unwrap_or(3).max(1);

    let guests = root().join("target/bench-guests");
    let status = Command::new(root().join("guest-examples/build.sh"))
        .arg(&guests)
        .arg(root().join("tests/guests/chains"))
        .status()
        .unwrap();
    assert!(status.success(), "guest-examples/build.sh failed");
    let (v1, v2) = (guests.join("heapgraph.wasm"), guests.join("heapgraph-v2.wasm"));

    let served = Served::start(&v1, &["heapgraph"], "heap");
    let mut client = served.connect();
    let started = Instant::now();
    assert_eq!(request(&mut client, &format!("BALLAST {ballast}")), format!("BALLAST {ballast}"));
    assert_eq!(request(&mut client, &format!("GROW {elements}")), format!("GREW {elements}"));
    let sum = request(&mut client, "SUM");
    println!(
        "heapgraph: {elements} list nodes, {elements} tree nodes, an array of {elements} records, {ballast} MiB of ballast (built in {:.1} s)",
        started.elapsed().as_secs_f64()
    );
    println!("{:<28} {:>10} {:>10} {:>10} {:>12} {:>8}", "update", "pause us", "converted", "rewritten", "us/object", "faults");
    let mut none = 0;
    let mut converting = Vec::new();
    // Back and forth after the first three: the machine is shared, so one
    // converting pause says little; the fastest of several says more.
    let mut steps = vec![("same module (no type change)", &v1), ("to v2 (every object)", &v2), ("v2 again (no type change)", &v2)];
    for _ in 1..rounds {
        steps.extend([("back to v1 (every object)", &v1), ("to v2 (every object)", &v2)]);
    }
    for (what, to) in steps {
        let faults = minor_faults();
        let reply = served.update(to, 10_000);
        let faults = minor_faults() - faults;
        let (pause, converted) = (field(&reply, "pause: "), field(&reply, "heap: "));
        let rewritten = reply
            .lines()
            .find_map(|l| l.strip_prefix("heap: "))
            .and_then(|l| l.split(", ").nth(1))
            .and_then(|p| p.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
        if converted == 0 {
            none = none.max(pause);
        } else {
            converting.push(pause);
        }
        let per = match converted {
            0 => "-".to_string(),
            n => format!("{:.3}", pause.saturating_sub(none) as f64 / n as f64),
        };
        println!("{what:<28} {pause:>10} {converted:>10} {rewritten:>10} {per:>12} {faults:>8}");
        assert_eq!(request(&mut client, "SUM"), sum, "the structures after `{what}`");
    }
    converting.sort_unstable();
    println!(
        "converting pauses: fastest {} us, median {} us, slowest {} us ({} updates)",
        converting[0],
        converting[converting.len() / 2],
        converting[converting.len() - 1],
        converting.len()
    );
}
