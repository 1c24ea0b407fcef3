//! The KV server under a loopback load: each variant serves, in turn, the
//! same closed-loop load for the same time, round after round, and the
//! medians over the rounds of its throughput and its p99 latency are
//! compared with the original's.
//!
//! The load: `CONNECTIONS` clients, one thread each, each with one request
//! in flight (send a line, wait for its reply), 80% `GET` and 20% `SET` on
//! `KEYS` keys set beforehand, for `TRIAL` per variant and round. Latency is
//! from the request's write to its reply's last byte, as a client sees it.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use upstare_host::{Engine, Exit, Guest, GuestConfig, GuestModule, Stdio, GUEST_THREAD_STACK};

use super::Variants;
use crate::common::{median, ms};

const CONNECTIONS: usize = 8;
const KEYS: u32 = 10_000;
const TRIAL: Duration = Duration::from_millis(1500);

/// What one variant did in one trial.
struct Trial {
    requests_per_sec: f64,
    p99: Duration,
}

/// A request line for the n-th operation of a client, from its own
/// generator state: 4 in 5 are `GET`s.
fn request(state: &mut u32) -> String {
    *state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
    let r = *state >> 8;
    let key = r % KEYS;
    if r.is_multiple_of(5) {
        format!("SET key{key} value-{r}\n")
    } else {
        format!("GET key{key}\n")
    }
}

fn connect(addr: SocketAddr) -> (BufReader<TcpStream>, TcpStream) {
    let stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("cannot connect to the kv guest at {addr}: {e}"));
    stream.set_nodelay(true).unwrap();
    (BufReader::new(stream.try_clone().unwrap()), stream)
}

fn reply(reader: &mut BufReader<TcpStream>, line: &mut String) {
    line.clear();
    reader.read_line(line).unwrap();
    assert!(line.ends_with('\n'), "kv guest closed the connection mid-load");
}

/// One client's share of a trial: latencies of every request it completed
/// before the deadline.
fn client(addr: SocketAddr, seed: u32, start: Arc<Barrier>, until: Duration) -> Vec<Duration> {
    let (mut reader, mut writer) = connect(addr);
    let mut state = seed;
    let mut line = String::new();
    let mut latencies = Vec::new();
    start.wait();
    let begin = Instant::now();
    while begin.elapsed() < until {
        let req = request(&mut state);
        let sent = Instant::now();
        writer.write_all(req.as_bytes()).unwrap();
        reply(&mut reader, &mut line);
        latencies.push(sent.elapsed());
    }
    latencies
}

/// Starts the module as a server on a fresh loopback port, fills the
/// store, applies the load, shuts the server down and checks it exited.
fn trial(engine: &Engine, module: &GuestModule) -> Trial {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut config = GuestConfig::new(vec!["kv-server".into()]);
    config.listeners.push(listener);
    config.stdout = Stdio::Fd(std::fs::File::create("/dev/null").unwrap().into());
    let mut guest = Guest::new(engine, module, config).unwrap();
    let server = std::thread::Builder::new().stack_size(GUEST_THREAD_STACK).spawn(move || guest.run()).unwrap();

    // Fill the store, pipelined, so that every GET finds its key.
    let (mut reader, mut writer) = connect(addr);
    let fill: String = (0..KEYS).map(|k| format!("SET key{k} value-{k}\n")).collect();
    writer.write_all(fill.as_bytes()).unwrap();
    let mut line = String::new();
    for _ in 0..KEYS {
        reply(&mut reader, &mut line);
        assert_eq!(line, "OK\n");
    }

    let start = Arc::new(Barrier::new(CONNECTIONS + 1));
    let clients: Vec<_> = (0..CONNECTIONS as u32)
        .map(|i| {
            let start = start.clone();
            std::thread::spawn(move || client(addr, 7 + i * 7919, start, TRIAL))
        })
        .collect();
    start.wait();
    let begin = Instant::now();
    let mut latencies: Vec<Duration> = clients.into_iter().flat_map(|c| c.join().unwrap()).collect();
    let elapsed = begin.elapsed();

    writer.write_all(b"SHUTDOWN\n").unwrap();
    reply(&mut reader, &mut line);
    assert_eq!(line, "BYE\n");
    let exit = server.join().unwrap();
    assert!(matches!(exit, Exit::Status(0)), "kv guest failed: {exit:?}");

    latencies.sort();
    Trial {
        requests_per_sec: latencies.len() as f64 / elapsed.as_secs_f64(),
        p99: latencies[latencies.len() * 99 / 100],
    }
}

/// Runs the interleaved trials and prints the comparison.
pub fn compare(engine: &Engine, v: &Variants, rounds: usize) {
    let modules = [("original", &v.original), ("upstare", &v.upstare), ("full", &v.full), ("asyncify", &v.asyncify)];
    let mut trials: [Vec<Trial>; 4] = Default::default();
    trial(engine, &v.original); // warm-up
    for _ in 0..rounds {
        for (list, (_, module)) in trials.iter_mut().zip(modules) {
            list.push(trial(engine, module));
        }
    }
    println!(
        "kv-server: {CONNECTIONS} connections, one request in flight each, 80% GET / 20% SET on {KEYS} keys, \
         {} ms per trial; median of {rounds} interleaved trials",
        TRIAL.as_millis()
    );
    println!(
        "{:<9} {:>10} {:>7} {:>10} {:>7} | {:>8} {:>6}",
        "variant", "req/s", "ratio", "p99", "ratio", "code", "ratio"
    );
    // Medians of throughput in whole requests per second, so they sort.
    let rps = |t: &[Trial]| median(t.iter().map(|t| t.requests_per_sec as u64).collect()) as f64;
    let p99 = |t: &[Trial]| median(t.iter().map(|t| t.p99).collect());
    let (base_rps, base_p99) = (rps(&trials[0]), p99(&trials[0]));
    for (i, (name, _)) in modules.iter().enumerate() {
        let (r, p) = (rps(&trials[i]), p99(&trials[i]));
        println!(
            "{name:<9} {r:>10.0} {:>6.3}x {:>8.3}ms {:>6.3}x | {:>8} {:>5.2}x",
            r / base_rps,
            ms(p),
            p.as_secs_f64() / base_p99.as_secs_f64(),
            v.code[i],
            v.code[i] as f64 / v.code[0] as f64,
        );
    }
}
