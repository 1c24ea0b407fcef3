//! Pause time of a live update of a loaded server.
//!
//! The example KV server (v1) runs under the host library exactly as
//! `upstare-host` runs it (its supervisor and control socket); clients fill
//! it with about 100 MB of keys and values on the heap and leave 50
//! connections open. Then it is updated v1 -> v2 -> v1 -> ... through the
//! control socket, as `upstare-host update` does, and each update's report
//! gives its pause (from paused to the new version ready to resume: frames
//! moved, new instance created over the same memory, state written, the
//! verified rewind) and its preparation time (planning, relinking,
//! instrumenting and compiling while the server runs). Between updates a
//! client checks the server still has its keys.
//!
//! The memory is not copied: the report of the process's resident memory
//! before and after the updates shows it.
//!
//! `cargo bench -p upstare-benches --bench update [-- UPDATES [MEGABYTES]]`
//! (defaults 20 updates, 100 MB).

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::Command;

mod common;
use common::{report_field as field, root, Served};

const VALUE_SIZE: usize = 4096;
const IDLE_CONNECTIONS: usize = 50;

fn resident_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Sends `lines` pipelined on one connection and reads as many replies.
fn exchange(stream: &mut TcpStream, lines: &[String]) -> Vec<String> {
    let mut batch = String::new();
    for l in lines {
        batch.push_str(l);
        batch.push('\n');
    }
    stream.write_all(batch.as_bytes()).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    (0..lines.len())
        .map(|_| {
            let mut reply = String::new();
            reader.read_line(&mut reply).unwrap();
            reply.trim_end().to_string()
        })
        .collect()
}

fn main() {
    let mut numbers = std::env::args().skip(1).filter_map(|a| a.parse::<usize>().ok());
    let updates = numbers.next().unwrap_or(20);
    let megabytes = numbers.next().unwrap_or(100);

    let guests = root().join("target/bench-guests");
    let status = Command::new(root().join("guest-examples/build.sh")).arg(&guests).status().unwrap();
    assert!(status.success(), "guest-examples/build.sh failed");
    let v1 = guests.join("kv-server.wasm");
    let v2 = guests.join("kv-server-v2.wasm");

    let served = Served::start(&v1, &["kv", "--max-conns", "200"], "update");
    let addr = served.addr;
    let mut client = served.connect();

    let keys = megabytes * (1 << 20) / VALUE_SIZE;
    let value = "v".repeat(VALUE_SIZE - 1);
    for chunk in (0..keys).collect::<Vec<_>>().chunks(256) {
        let lines: Vec<String> = chunk.iter().map(|k| format!("SET key{k} {value}")).collect();
        assert!(exchange(&mut client, &lines).iter().all(|r| r == "OK"));
    }
    let idle: Vec<TcpStream> = (0..IDLE_CONNECTIONS).map(|_| TcpStream::connect(addr).unwrap()).collect();
    assert_eq!(exchange(&mut client, &["COUNT".into()]), vec![format!("COUNT {keys}")]);
    let rss_before = resident_kib();

    println!("kv server: {keys} keys of {VALUE_SIZE} bytes ({megabytes} MB of values), {} open connections", idle.len() + 1);
    println!("{:>3} {:>14} {:>10} {:>12} {:>7}", "#", "to", "pause us", "prepare ms", "frames");
    let mut pauses = Vec::new();
    for i in 0..updates {
        let to = if i % 2 == 0 { &v2 } else { &v1 };
        let reply = served.update(to, 2000);
        let pause = field(&reply, "pause: ");
        println!(
            "{:>3} {:>14} {:>10} {:>12} {:>7}",
            i + 1,
            to.file_name().unwrap().to_string_lossy(),
            pause,
            field(&reply, "prepare: "),
            field(&reply, "frames: ")
        );
        pauses.push(pause);
        let probe = format!("key{}", i * 7919 % keys);
        let got = exchange(&mut client, &[format!("GET {probe}")]);
        assert_eq!(got[0].len(), "VALUE ".len() + value.len(), "{probe} lost after update {}", i + 1);
    }
    let rss_after = resident_kib();
    // The heap still grows past the fresh pages the updates placed above
    // it: malloc takes the next pages as a new segment.
    let more: Vec<String> = (0..2048).map(|k| format!("SET more{k} {value}")).collect();
    assert!(exchange(&mut client, &more).iter().all(|r| r == "OK"));
    assert_eq!(exchange(&mut client, &["COUNT".into()]), vec![format!("COUNT {}", keys + 2048)]);
    pauses.sort_unstable();
    println!(
        "pause: median {} us, min {} us, max {} us over {updates} updates",
        pauses[pauses.len() / 2],
        pauses[0],
        pauses[pauses.len() - 1]
    );
    println!(
        "resident memory of the host process: {} MiB before the updates, {} MiB after",
        rss_before / 1024,
        rss_after / 1024
    );
    drop(idle);
}
