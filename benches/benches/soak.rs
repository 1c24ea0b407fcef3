//! Soak: many live updates of a loaded server, and what they leave behind.
//!
//! The real `upstare-host` binary serves the example KV server (v1) with a
//! control socket; clients on loopback keep setting and reading back keys
//! on their own connections the whole time (every reply checked), and idle
//! connections stay open. The server is updated v1 -> v2 -> v1 -> ...
//! through the control socket, as `upstare-host update` does, UPDATES
//! times; an update refused (the old version runs on) is counted, printed
//! and tried again. The targets: no failed request, no dropped connection,
//! every update applied, and the program memory growing by less than 16 MiB
//! after the first 500 updates (fresh memory is reused, see
//! `host/src/fresh.rs`).
//!
//! Every 500 updates (and at the end) a line gives the program memory and
//! its fresh areas (`upstare-host status`), the host process's resident
//! memory, requests served, and the pauses of those updates.
//!
//! ```sh
//! cargo build --release --bins
//! cargo bench -p upstare-benches --bench soak [-- UPDATES [CLIENTS]]   # defaults 10000, 4
//! ```

use std::time::Instant;

use upstare_host::control::{self, Request, Response};
use upstare_tests::{guest, Client, Control, Load, Server, UpdateReport};

/// The growth allowed after the first 500 updates.
const GROWTH_LIMIT: u64 = 16 << 20;
/// Updates before memory is expected to have settled.
const WARM_UP: usize = 500;
const IDLE_CONNECTIONS: usize = 16;
/// How long one update may wait for the server to reach a point where it
/// can move (see the a_hundred_updates test in tests/e2e/update.rs).
const UPDATE_TIMEOUT_MS: u64 = 20_000;
/// How often one update may be refused before the run fails.
const MAX_RETRIES: usize = 3;

fn resident_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn percentile(sorted: &[u64], p: usize) -> u64 {
    sorted.get((sorted.len() * p / 100).min(sorted.len().saturating_sub(1))).copied().unwrap_or(0)
}

fn main() {
    let mut numbers = std::env::args().skip(1).filter_map(|a| a.parse::<usize>().ok());
    let updates = numbers.next().unwrap_or(10_000);
    let clients = numbers.next().unwrap_or(4);

    let control = Control::new("soak");
    let (server, first) = Server::start(&guest("kv-server"), &["--control", &control.path()], &[]);
    assert_eq!(first.trim(), "kv: listening on fd 3");
    let (v1, v2) = (guest("kv-server"), guest("kv-server-v2"));
    let mut idle: Vec<Client> = (0..IDLE_CONNECTIONS).map(|_| server.client()).collect();
    let load = Load::start(server.port, clients, 50);
    load.wait_for_requests(100);
    let socket = std::path::PathBuf::from(control.path());

    let start = control.memory();
    let rss_start = resident_kib(server.pid());
    println!(
        "soak: {updates} updates v1 <-> v2 of the KV server, {clients} clients under load, {IDLE_CONNECTIONS} idle connections"
    );
    println!(
        "{:>6} {:>12} {:>12} {:>10} {:>9} {:>10} {:>9} {:>9} {:>9}",
        "update", "memory B", "fresh used", "fresh free", "RSS MiB", "requests", "pause p50", "p99 us", "max us"
    );
    let started = Instant::now();
    let mut refusals = Vec::new();
    let mut pauses: Vec<u64> = Vec::new();
    let mut all_pauses: Vec<u64> = Vec::new();
    let mut warm = None;
    for i in 0..updates {
        let to = [&v2, &v1][i % 2];
        // A refused update leaves the old version running: it is counted
        // and tried again, so every update of the run is applied in the end.
        for attempt in 0.. {
            match control::request(&socket, &Request::Update(to.clone(), UPDATE_TIMEOUT_MS)) {
                Ok(Response::Done { body, .. }) => {
                    let report = UpdateReport::parse(&body.join("\n")).unwrap_or_else(|e| panic!("update {i}: {e}"));
                    pauses.push(report.count("pause", "us"));
                    break;
                }
                other => {
                    println!("update {i}, attempt {attempt}: {other:?}");
                    refusals.push(format!("update {i}: {other:?}"));
                    assert!(attempt < MAX_RETRIES, "update {i} refused {} times", attempt + 1);
                }
            }
        }
        let done = i + 1;
        if done == WARM_UP {
            warm = Some(control.memory());
        }
        if done % 500 == 0 || done == updates {
            let memory = control.memory();
            pauses.sort_unstable();
            println!(
                "{done:>6} {:>12} {:>12} {:>10} {:>9} {:>10} {:>9} {:>9} {:>9}",
                memory.size,
                memory.fresh_used,
                memory.fresh_free,
                resident_kib(server.pid()) / 1024,
                load.requests(),
                percentile(&pauses, 50),
                percentile(&pauses, 99),
                pauses.last().copied().unwrap_or(0)
            );
            all_pauses.append(&mut pauses);
        }
    }
    let elapsed = started.elapsed();
    load.wait_for_requests(100);
    let end = control.memory();
    let rss_end = resident_kib(server.pid());
    let dropped =
        idle.iter_mut().map(|c| c.try_request("COUNT")).filter(|r| !r.as_ref().is_ok_and(|r| r.starts_with("COUNT "))).count();
    let outcome = load.stop();

    all_pauses.sort_unstable();
    println!(
        "{updates} updates applied in {:.0} s ({:.1} per second), {} refused and tried again; pause median {} us, p99 {} us, max {} us",
        elapsed.as_secs_f64(),
        updates as f64 / elapsed.as_secs_f64().max(1e-9),
        refusals.len(),
        percentile(&all_pauses, 50),
        percentile(&all_pauses, 99),
        all_pauses.last().copied().unwrap_or(0)
    );
    println!(
        "requests: {} answered correctly, {} failed; idle connections dropped: {dropped} of {IDLE_CONNECTIONS}",
        outcome.requests,
        outcome.failures.len()
    );
    let growth = warm.map(|w| end.size.saturating_sub(w.size));
    println!(
        "program memory: {} B at the start, {} after {WARM_UP} updates, {} B at the end; growth after {WARM_UP} updates: {}",
        start.size,
        warm.map_or("-".into(), |w| format!("{} B", w.size)),
        end.size,
        growth.map_or("-".into(), |g| format!("{g} B"))
    );
    println!("host resident memory: {} MiB at the start, {} MiB at the end", rss_start / 1024, rss_end / 1024);

    assert!(outcome.failures.is_empty(), "failed requests: {:?}", outcome.failures);
    assert_eq!(dropped, 0, "idle connections dropped");
    if let Some(growth) = growth {
        assert!(growth < GROWTH_LIMIT, "memory grew by {growth} bytes after {WARM_UP} updates");
    }
}
