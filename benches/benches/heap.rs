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
//! `cargo bench -p upstare-benches --bench heap [-- ELEMENTS [BALLAST_MIB]]`
//! (defaults 500000 elements, that is 10^6 objects, and 1024 MiB).

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use upstare_host::control::{self, ControlSocket, Request, Response};
use upstare_host::supervise::{self, Identity};
use upstare_host::{new_engine, Guest, GuestConfig, GuestModule};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn request(stream: &mut TcpStream, line: &str) -> String {
    stream.write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut reply = String::new();
    reader.read_line(&mut reply).unwrap();
    reply.trim_end().to_string()
}

fn field(report: &str, label: &str) -> u64 {
    report
        .lines()
        .find_map(|l| l.strip_prefix(label))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no `{label}` in the report:\n{report}"))
}

fn main() {
    let mut numbers = std::env::args().skip(1).filter_map(|a| a.parse::<usize>().ok());
    let elements = numbers.next().unwrap_or(500_000);
    let ballast = numbers.next().unwrap_or(1024);

    let guests = root().join("target/bench-guests");
    let status = Command::new(root().join("guest-examples/build.sh"))
        .arg(&guests)
        .arg(root().join("tests/guests/chains"))
        .status()
        .unwrap();
    assert!(status.success(), "guest-examples/build.sh failed");
    let (v1, v2) = (guests.join("heapgraph.wasm"), guests.join("heapgraph-v2.wasm"));

    let engine = new_engine().unwrap();
    let module = GuestModule::load(&engine, &v1).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let socket_path = std::env::temp_dir().join(format!("upstare-bench-heap-{}.sock", std::process::id()));
    let socket = ControlSocket::bind(&socket_path).unwrap();
    let identity = Identity { module: v1.display().to_string(), hash: module.hash_hex() };
    let make_engine = engine.clone();
    std::thread::spawn(move || {
        let make = move || {
            let mut config = GuestConfig::new(vec!["heapgraph".into()]);
            config.listeners.push(listener);
            Guest::new(&make_engine, &module, config).map_err(|e| e.to_string())
        };
        let _ = supervise::run(make, identity, Some(socket), Duration::from_secs(5), None);
    });
    let mut client = loop {
        match TcpStream::connect(addr) {
            Ok(s) => break s,
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let started = Instant::now();
    assert_eq!(request(&mut client, &format!("BALLAST {ballast}")), format!("BALLAST {ballast}"));
    assert_eq!(request(&mut client, &format!("GROW {elements}")), format!("GREW {elements}"));
    let sum = request(&mut client, "SUM");
    println!(
        "heapgraph: {elements} list nodes, {elements} tree nodes, an array of {elements} records, {ballast} MiB of ballast (built in {:.1} s)",
        started.elapsed().as_secs_f64()
    );
    println!("{:<28} {:>10} {:>10} {:>10} {:>12}", "update", "pause us", "converted", "rewritten", "us/object");
    let mut none = 0;
    for (what, to) in [("same module (no type change)", &v1), ("to v2 (every object)", &v2), ("v2 again (no type change)", &v2)] {
        let reply = match control::request(&socket_path, &Request::Update(to.clone(), 10_000)).unwrap() {
            Response::Done { body, .. } => body.join("\n"),
            refused => panic!("update failed: {refused:?}"),
        };
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
        }
        let per = match converted {
            0 => "-".to_string(),
            n => format!("{:.3}", pause.saturating_sub(none) as f64 / n as f64),
        };
        println!("{what:<28} {pause:>10} {converted:>10} {rewritten:>10} {per:>12}");
        assert_eq!(request(&mut client, "SUM"), sum, "the structures after `{what}`");
    }
    let _ = std::fs::remove_file(&socket_path);
}
