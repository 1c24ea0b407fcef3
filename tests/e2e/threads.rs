//! Threaded programs: what `upstare-cc --threads` builds, and the host
//! running one as the wasi-threads proposal says, instrumented or not.

use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

use std::time::Duration;

use upstare_tests::{guest, host_command, run_host, Client, Control, Server};
use wasmtime::{Config, Engine, Extern, Instance, Linker, Module, SharedMemory, Store};
use wasmtime_wasi::WasiCtxBuilder;
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;

/// What every thread of a reference run shares.
struct Program {
    engine: Engine,
    module: Module,
    /// `argv`, the module's path first.
    args: Vec<String>,
    memory: SharedMemory,
    stdout: MemoryOutputPipe,
    next_tid: AtomicI32,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

/// A new instance of the program in its own store, as every thread gets
/// one: the shared memory imported, and `wasi::thread-spawn` starting
/// another thread that calls `wasi_thread_start(tid, arg)` in an instance
/// of its own.
fn instantiate(program: &Arc<Program>) -> (Store<WasiP1Ctx>, Instance) {
    let ctx = WasiCtxBuilder::new().args(&program.args).stdout(program.stdout.clone()).build_p1();
    let mut store = Store::new(&program.engine, ctx);
    let mut linker: Linker<WasiP1Ctx> = Linker::new(&program.engine);
    wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |t| t).unwrap();
    linker.define(&store, "env", "memory", Extern::SharedMemory(program.memory.clone())).unwrap();
    let spawner = program.clone();
    linker
        .func_wrap("wasi", "thread-spawn", move |arg: i32| -> i32 {
            let tid = spawner.next_tid.fetch_add(1, Ordering::SeqCst);
            let program = spawner.clone();
            let thread = std::thread::spawn(move || {
                let (mut store, instance) = instantiate(&program);
                let start = instance.get_typed_func::<(i32, i32), ()>(&mut store, "wasi_thread_start").unwrap();
                start.call(&mut store, (tid, arg)).unwrap();
            });
            spawner.threads.lock().unwrap().push(thread);
            tid
        })
        .unwrap();
    let instance = linker.instantiate(&mut store, &program.module).unwrap();
    (store, instance)
}

/// Runs a wasi-threads module as the wasi-threads proposal says, in this
/// process, with wasmtime: one shared memory, a store and an instance per
/// thread on an OS thread of its own. The reference for what a threaded
/// guest prints. Returns main's exit status and what the program printed.
fn run_reference(path: &Path, args: &[&str]) -> (i32, String) {
    let mut config = Config::new();
    config.wasm_threads(true).shared_memory(true);
    let engine = Engine::new(&config).unwrap();
    let module = Module::from_file(&engine, path).unwrap();
    let memory = module.imports().find_map(|i| i.ty().memory().filter(|m| m.is_shared()).cloned()).expect("a shared memory import");
    let memory = SharedMemory::new(&engine, memory).unwrap();
    let program = Arc::new(Program {
        engine,
        module,
        args: [path.to_str().unwrap()].iter().chain(args).map(|a| a.to_string()).collect(),
        memory,
        stdout: MemoryOutputPipe::new(1 << 20),
        next_tid: AtomicI32::new(1),
        threads: Mutex::new(Vec::new()),
    });
    let (mut store, instance) = instantiate(&program);
    let start = instance.get_typed_func::<(), ()>(&mut store, "_start").unwrap();
    let status = match start.call(&mut store, ()) {
        Ok(()) => 0,
        Err(e) => e.downcast_ref::<wasmtime_wasi::I32Exit>().map(|exit| exit.0).unwrap_or_else(|| panic!("{path:?} trapped: {e:?}")),
    };
    for thread in std::mem::take(&mut *program.threads.lock().unwrap()) {
        thread.join().unwrap();
    }
    (status, String::from_utf8_lossy(&program.stdout.contents()).into_owned())
}

/// `upstare-cc --threads` builds a wasi-threads module from POSIX threads
/// code: it imports a shared memory and `wasi::thread-spawn` and exports
/// `wasi_thread_start` (the entry of every thread but the first), and it
/// computes what it should when run as wasi-threads says (four threads
/// adding under one mutex). The host runs it to the same output,
/// instrumented, as it is, and unwound and rewound at every update point
/// of every thread.
#[test]
fn a_threads_guest_runs_under_the_host_as_under_the_reference() {
    let counter = guest("counter");
    let mut config = wasmtime::Config::new();
    config.wasm_threads(true).shared_memory(true);
    let engine = wasmtime::Engine::new(&config).unwrap();
    let module = wasmtime::Module::from_file(&engine, &counter).unwrap();
    let memory = module.imports().find(|i| i.module() == "env" && i.name() == "memory").expect("imports env::memory");
    assert!(memory.ty().memory().is_some_and(|m| m.is_shared()), "a shared memory");
    assert!(module.imports().any(|i| i.module() == "wasi" && i.name() == "thread-spawn"), "imports wasi::thread-spawn");
    assert!(module.get_export("wasi_thread_start").is_some(), "exports wasi_thread_start");
    let reference = run_reference(&counter, &[]);
    assert_eq!(reference, (0, "count=400000\n".to_string()), "the threads' increments, none lost");

    let path = counter.to_str().unwrap();
    for flags in [&[][..], &["--no-instrument"], &["--stress-pause", "7"]] {
        let out = run_host(&[flags, &[path]].concat());
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!((out.status.code().unwrap_or(-1), stdout), reference, "{flags:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    // Eight threads unwound and rewound at every 7th update point each,
    // as many times as they wait or loop: the same count.
    let out = run_host(&["--stress-pause", "7", path, "8"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "count=800000\n", "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0));
}

/// A `pthread_create` past `--max-threads` fails with EAGAIN in the guest
/// (which reports it), and the host says why on stderr.
#[test]
fn threads_past_the_limit_are_refused_with_a_reason() {
    let counter = guest("counter");
    let out = run_host(&["--max-threads", "2", counter.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "the guest saw pthread_create fail: {stderr}");
    assert!(stderr.contains("counter: pthread_create failed"), "{stderr}");
    assert!(
        stderr.contains("upstare-host: thread-spawn refused: the program already runs 2 threads besides its main one (--max-threads)"),
        "{stderr}"
    );
    let out = run_host(&["--max-threads", "0", counter.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "a limit of no threads is bad input: {stderr}");
    assert!(stderr.contains("invalid value '0' for '--max-threads <N>': expected a number of threads from 1 to 4096"), "{stderr}");
}

/// A thread other than main ends the whole program: its `exit(7)` is the
/// program's status, its trap is a trap (134), even while main waits for it
/// in `pthread_join`; a thread that returns lets main go on.
#[test]
fn any_thread_ends_the_program() {
    let ends = guest("ends");
    let path = ends.to_str().unwrap();
    for flags in [&[][..], &["--no-instrument"]] {
        let out = run_host(&[flags, &[path, "return"]].concat());
        assert_eq!(out.status.code(), Some(0), "{flags:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "main: starting a worker (return)\nmain: the worker returned\n");
        let out = run_host(&[flags, &[path, "exit"]].concat());
        assert_eq!(out.status.code(), Some(7), "{flags:?}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "main: starting a worker (exit)\n");
        let out = run_host(&[flags, &[path, "trap"]].concat());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(134), "{flags:?}: {stderr}");
        assert!(stderr.contains("unreachable"), "the trap is reported: {stderr}");
    }
}

/// A thread-pool server of `version` with `workers` workers and a control
/// socket; waits for its first line.
fn start_pool(version: &str, workers: usize, control: &Control) -> Server {
    let (server, first) = Server::start(&guest(version), &["--control", &control.path()], &[&workers.to_string()]);
    assert!(first.starts_with("pool v"), "{first}");
    server
}

/// Heap objects whose type changes, which worker threads hold only in
/// their frames while they wait in `read()`, in a wasm local and in a
/// frame's linear memory (the `sessions` chain: each connection's `struct
/// session` gains a member ahead of its name): the update converts them
/// and rewrites both, and each connection goes on with its count and its
/// name, the new member counting from zero; closed, each session is freed
/// through the rewritten pointer, and the server serves on. A pointer left
/// at the old copy would read the name's bytes as the new member, or free
/// the old copy a second time; one not rewritten at all refuses the
/// update, as it did when only the main thread's frames were typed.
#[test]
fn heap_objects_that_workers_hold_in_their_frames_are_converted_and_the_frames_rewritten() {
    let control = Control::new("sessions");
    let (server, first) = Server::start(&guest("sessions"), &["--control", &control.path()], &[]);
    assert!(first.starts_with("sessions v1: 4 workers"), "{first}");
    let mut clients: Vec<Client> = (0..3).map(|_| Client::connect(server.port)).collect();
    let mut names = Vec::new();
    for c in &mut clients {
        assert!(c.request("COUNT").starts_with("v1 LINES 1 NAME conn-"));
        let reply = c.request("COUNT");
        let (lines, name) = reply.split_once(" NAME ").unwrap_or_else(|| panic!("{reply}"));
        assert_eq!(lines, "v1 LINES 2");
        names.push(name.to_string());
    }
    let out = control.update(&guest("sessions-v2"));
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}{report}", String::from_utf8_lossy(&out.stderr));
    assert!(report.contains("threads: 5 moved to the new version together"), "{report}");
    // Two places in each connection's worker hold its session: `worker`'s
    // frame in memory and `serve`'s local.
    assert!(report.contains("heap: 3 objects converted, 6 pointers rewritten"), "{report}");
    for (c, name) in clients.iter_mut().zip(&names) {
        assert_eq!(c.request("COUNT"), format!("v2 LINES 3 BYTES 6 NAME {name}"));
        assert_eq!(c.request("COUNT"), format!("v2 LINES 4 BYTES 12 NAME {name}"));
    }
    drop(clients);
    for _ in 0..6 {
        let mut c = Client::connect(server.port);
        assert!(c.request("COUNT").starts_with("v2 LINES 1 BYTES 6 NAME conn-"), "a new connection after the old ones closed");
    }
}

/// A worker that traps after the program was paused and resumed (by a
/// checkpoint) ends the program with status 134, main waiting in
/// `pthread_join` meanwhile.
#[test]
fn a_trap_in_a_thread_after_a_resume_ends_the_program() {
    let control = Control::new("ends-resumed");
    let host = host_command()
        .args(["--control", &control.path()])
        .arg(guest("ends"))
        .arg("trap-later")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    upstare_tests::wait_for_path(std::path::Path::new(&control.path()));
    let snapshot = control.checkpoint("ends");
    assert_eq!(snapshot.threads.len(), 1, "the worker was paused with main");
    let out = host.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(134), "{stderr}");
    assert!(stderr.contains("unreachable"), "{stderr}");
}

/// The version number in a `WHO` reply (`WORKER 3 V2 ...`), and the worker.
fn who(reply: &str) -> (usize, u32) {
    let mut words = reply.split(' ');
    assert_eq!(words.next(), Some("WORKER"), "{reply}");
    let worker = words.next().and_then(|w| w.parse().ok()).unwrap_or_else(|| panic!("{reply}"));
    let version = words.next().and_then(|v| v.strip_prefix('V')).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{reply}"));
    (worker, version)
}

/// `WHO` on `n` connections open at once: each is served by a worker of
/// its own. Returns (worker, version) of each.
fn every_worker(port: u16, n: usize) -> Vec<(usize, u32)> {
    let mut clients: Vec<Client> = (0..n).map(|_| Client::connect(port)).collect();
    let mut seen: Vec<(usize, u32)> = clients.iter_mut().map(|c| who(&c.request("WHO"))).collect();
    seen.sort();
    seen
}

/// The thread-pool server with 8 workers, updated v1 -> v2 -> v3 while 16
/// clients connect, add and ask who serves them, over and over: no request
/// fails and no connection drops, every thread moves at once (no reply
/// after an update returned comes from the old version, on any worker),
/// the total of every addition survives both updates, and v3's new field
/// in the queue's element type starts at zero for connections v2 queued.
#[test]
fn the_pool_server_updates_every_worker_at_once_under_load() {
    let control = Control::new("pool-load");
    let server = start_pool("pool-server", 8, &control);
    assert!(control.status().contains("instances: 9"), "main and 8 workers: {}", control.status());
    let port = server.port;
    // The version the clients must see from now on.
    let floor = Arc::new(AtomicI32::new(1));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..16)
        .map(|_| {
            let (floor, stop) = (floor.clone(), stop.clone());
            std::thread::spawn(move || {
                let (mut adds, mut connections) = (0u64, 0u64);
                while !stop.load(Ordering::SeqCst) {
                    let mut c = Client::connect(port);
                    connections += 1;
                    for _ in 0..3 {
                        let at_least = floor.load(Ordering::SeqCst) as u32;
                        assert!(c.request("ADD 1").starts_with("TOTAL "), "an addition failed");
                        adds += 1;
                        let (_, version) = who(&c.request("WHO"));
                        assert!(version >= at_least, "a reply from v{version} after the update to v{at_least} returned");
                    }
                }
                (adds, connections)
            })
        })
        .collect();
    for (version, name) in [(2, "pool-server-v2"), (3, "pool-server-v3")] {
        std::thread::sleep(Duration::from_millis(300));
        let out = control.update(&guest(name));
        let report = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "update to {name}: {}{report}", String::from_utf8_lossy(&out.stderr));
        assert!(report.contains("threads: 9 moved to the new version together"), "{report}");
        floor.store(version, Ordering::SeqCst);
        let seen = every_worker(port, 8);
        assert_eq!(seen.iter().map(|(w, _)| *w).collect::<Vec<_>>(), (0..8).collect::<Vec<_>>(), "8 workers serve 8 connections");
        assert!(seen.iter().all(|(_, v)| *v == version as u32), "every worker runs v{version}: {seen:?}");
    }
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::SeqCst);
    let (mut adds, mut connections) = (0, 0);
    for c in clients {
        let (a, n) = c.join().expect("no client failed");
        adds += a;
        connections += n;
    }
    assert!(connections > 16, "the clients reconnected through the updates ({connections} connections)");
    let mut c = Client::connect(port);
    assert_eq!(c.request("ADD 0"), format!("TOTAL {adds}"), "every addition counted once");
    let reply = c.request("WHO");
    assert!(reply.contains(" V3 SERVED ") && reply.contains(" CONN "), "{reply}");
}

/// Idle workers wait in a condition variable (a futex wait) for work: an
/// update pauses them there and they wait on in the new version, which
/// serves the next connections on every worker.
#[test]
fn workers_waiting_on_a_condition_variable_are_updated_where_they_wait() {
    let control = Control::new("pool-idle");
    let server = start_pool("pool-server", 8, &control);
    // Every worker has reached its wait: none is serving anyone.
    std::thread::sleep(Duration::from_millis(200));
    // `status` says where each thread is: main in `accept`, each worker in
    // the futex wait under `pthread_cond_wait`.
    let status = control.status();
    assert!(status.contains("instance 0: running, in `sock_accept`"), "{status}");
    let waiting = status.lines().filter(|l| l.ends_with(": thread, running, in `memory.atomic.wait`")).count();
    assert_eq!(waiting, 8, "{status}");
    let out = control.update(&guest("pool-server-v2"));
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stderr), String::from_utf8_lossy(&out.stdout));
    let seen = every_worker(server.port, 8);
    assert_eq!(seen, (0..8).map(|w| (w, 2)).collect::<Vec<_>>());
}

/// A running 8-worker server checkpointed and restored in another process:
/// the shared total carries over, and all 8 workers serve again. The
/// checkpointed server runs on too: each of its threads resumed, on the
/// full variant of the module, which they started without.
#[test]
fn a_checkpointed_pool_server_restores_with_every_worker() {
    let control = Control::new("pool-checkpoint");
    let mut server = start_pool("pool-server", 8, &control);
    let mut c = server.client();
    assert_eq!(c.request("ADD 40"), "TOTAL 40");
    drop(c);
    let snapshot = control.checkpoint("pool");
    assert_eq!(snapshot.threads.len(), 8, "every worker is in the snapshot");
    assert_eq!(every_worker(server.port, 8), (0..8).map(|w| (w, 1)).collect::<Vec<_>>(), "the checkpointed server's workers");
    assert_eq!(server.client().request("ADD 1"), "TOTAL 41");
    server.kill();
    let path = control.dir().join("pool.snap");
    let restored = Server::spawn(host_command().args(["restore", "--tcplisten", "127.0.0.1:0", path.to_str().unwrap()]));
    let mut c = restored.client();
    assert_eq!(c.request("ADD 2"), "TOTAL 42");
    drop(c);
    let seen = every_worker(restored.port, 8);
    assert_eq!(seen, (0..8).map(|w| (w, 1)).collect::<Vec<_>>());
}

/// A program paused through the library: every worker is parked, each
/// with the function it stopped in, named from the module's name section
/// (the module as built: the instrumented one has more imports ahead of
/// its functions), as main's is.
#[test]
fn a_paused_program_names_where_each_thread_stopped() {
    use upstare_host::threads::ThreadState;
    use upstare_host::{new_engine, Exit, Guest, GuestConfig, GuestModule};
    let engine = new_engine().unwrap();
    let module = GuestModule::load(&engine, &guest("pool-server")).unwrap();
    let mut config = GuestConfig::new(vec!["pool".into(), "4".into()]);
    config.listeners.push(std::net::TcpListener::bind("127.0.0.1:0").unwrap());
    let mut program = Guest::new(&engine, &module, config).unwrap();
    let pause = program.pause_handle().expect("instrumented");
    let asker = std::thread::spawn(move || {
        // The workers have started and wait for connections.
        std::thread::sleep(Duration::from_millis(300));
        pause.request();
    });
    assert!(matches!(program.run(), Exit::Paused));
    asker.join().unwrap();
    let threads = program.threads();
    assert_eq!(threads.len(), 4, "{threads:?}");
    // wasi-libc's names: the workers wait in `pthread_cond_wait`'s futex
    // wait, main in `accept`'s WASI call.
    let waiting = |t: &upstare_host::threads::ThreadStatus| {
        t.state == ThreadState::Parked && t.paused_in.as_deref() == Some("__wasilibc_futex_wait") && t.in_call.is_none()
    };
    assert!(threads.iter().all(waiting), "{threads:?}");
    assert_eq!(program.paused_in().as_deref(), Some("__wasi_sock_accept"));
    // The workers stay parked with the program, which is dropped paused.
}

/// The zstd release whose own multi-threaded compression the tests run.
const ZSTD_MT_RELEASE: &str = "1.5.7";

/// The hash of the frame in a line of `zstd-mt` (`... frame fnv1a HEX, ...`).
fn zstd_frame(line: &str) -> &str {
    line.split("frame fnv1a ").nth(1).and_then(|rest| rest.split(',').next()).unwrap_or_else(|| panic!("no frame hash in {line:?}"))
}

/// The number right after `prefix` in a summary line of `text`.
fn number_after(text: &str, prefix: &str) -> u64 {
    text.split(prefix)
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number after {prefix:?} in {text}"))
}

/// Asserts a run of `zstd-mt` ended with status 0 and printed `expected`.
fn assert_zstd_run(out: &std::process::Output, expected: &str, what: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{what}: {stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), expected, "{what}: {stderr}");
}

/// zstd's own thread pool (`lib/common/pool.c`, built with
/// ZSTD_MULTITHREAD), which nobody here wrote, compressing 4 MiB in 8 jobs
/// on 4 workers: the host prints what the reference prints, instrumented
/// or not. The workers are real threads: zstd starts all 4 (with room for
/// 3 its pool cannot start and the compression fails, the host saying
/// why), and without them the frame is another one.
#[test]
fn zstd_compresses_on_its_own_thread_pool_under_the_host_as_under_the_reference() {
    let zstd = upstare_tests::releases::zstd_mt(ZSTD_MT_RELEASE, &[]);
    let path = zstd.to_str().unwrap();
    let (status, reference) = run_reference(&zstd, &["4", "4"]);
    assert_eq!(status, 0, "{reference}");
    assert!(
        reference.starts_with("zstd 1.5.7, 4 workers, round 1: 4194304 -> ")
            && reference.contains(" bytes in 8 jobs, frame fnv1a ")
            && reference.ends_with(", roundtrip ok\n")
            && reference.lines().count() == 1,
        "{reference}"
    );
    for flags in [&[][..], &["--no-instrument"], &["--max-threads", "4"]] {
        assert_zstd_run(&run_host(&[flags, &[path, "4", "4"]].concat()), &reference, &format!("{flags:?}"));
    }

    let out = run_host(&["--max-threads", "3", path, "4", "4"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("upstare-host: thread-spawn refused: the program already runs 3 threads besides its main one"), "{stderr}");
    assert!(stderr.contains("zstd-mt: compress: Allocation error"), "the pool could not start: {stderr}");

    let out = run_host(&[path, "0", "4"]);
    let single = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(single.starts_with("zstd 1.5.7, 0 workers, round 1: 4194304 -> ") && single.contains(" in 0 jobs, "), "{single}");
    assert_ne!(zstd_frame(&single), zstd_frame(&reference), "one thread compresses to another frame");
}

/// zstd's pool paused and resumed at every 31st update point of each of
/// its threads (mid-job, or waiting for work or for a job to finish) and
/// of main: the same frame, the same roundtrip.
#[test]
fn zstd_thread_pool_paused_at_every_nth_point_compresses_the_same() {
    let zstd = upstare_tests::releases::zstd_mt(ZSTD_MT_RELEASE, &[]);
    let (status, reference) = run_reference(&zstd, &["4", "2"]);
    assert_eq!(status, 0, "{reference}");
    let out = run_host(&["--stress-pause", "31", zstd.to_str().unwrap(), "4", "2"]);
    assert_zstd_run(&out, &reference, "--stress-pause 31");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(number_after(&stderr, "unwound and rewound ") > 10_000, "{stderr}");
}

/// zstd's compression updated while it runs, its 4 workers moving with
/// main each time: onto its own module at every 10000th update point of
/// main with every function treated as changed (`--stress-update`; a
/// worker blocked in its futex wait moves by the rules for changed code
/// too), and by `upstare-host update`, while it compresses round after
/// round, onto itself and then onto the driver's next version (which says
/// "verified" where the first said "ok"). Every update is applied and
/// every frame is right.
#[test]
fn zstd_thread_pool_updated_while_it_compresses_compresses_the_same() {
    let zstd = upstare_tests::releases::zstd_mt(ZSTD_MT_RELEASE, &[]);
    let next = upstare_tests::releases::zstd_mt(ZSTD_MT_RELEASE, &["ZSTD_MT_V2"]);
    let path = zstd.to_str().unwrap();
    let dir = upstare_tests::TempDir::new("zstd-mt");
    let stdout = dir.0.join("stdout");

    let (status, reference) = run_reference(&zstd, &["4", "2", "2"]);
    assert_eq!(status, 0, "{reference}");
    // Its stdout a file: a write to a file never waits (see
    // `stress_update.rs`).
    let out = host_command()
        .args(["--stress-update", "10000", path, "4", "2", "2"])
        .stdout(std::fs::File::create(&stdout).unwrap())
        .output()
        .unwrap();
    let out = std::process::Output { stdout: std::fs::read(&stdout).unwrap(), ..out };
    assert_zstd_run(&out, &reference, "--stress-update 10000");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let points = number_after(&stderr, "--stress-update 10000: ");
    assert!(points > 100, "{stderr}");
    assert!(stderr.contains(&format!("{points} points: {points} moved, 0 retreated, 0 waited, 0 refused")), "{stderr}");

    // Rounds until the file `stop` exists.
    let control = Control::new("zstd-mt");
    let mut host = upstare_tests::KillOnDrop::spawn(
        host_command()
            .args(["--control", &control.path(), "--dir", &format!("{}::/run", dir.0.display()), path, "4", "4", "1000000", "/run/stop"])
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::process::Stdio::piped()),
    );
    let rounds = || std::fs::read_to_string(&stdout).unwrap().lines().count();
    let wait_for_rounds = |n: usize| {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while rounds() < n {
            assert!(std::time::Instant::now() < deadline, "zstd-mt printed {} rounds of {n}", rounds());
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_for_rounds(1);
    for (module, changed) in [(&zstd, 0), (&next, 1)] {
        let out = control.update(module);
        let report = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{}{report}", String::from_utf8_lossy(&out.stderr));
        assert!(report.contains(&format!("functions: {changed} changed, 0 added, 0 removed")), "{report}");
        assert!(report.contains("threads: 5 moved to the new version together"), "{report}");
    }
    // A round compressed after the last update, then the end.
    wait_for_rounds(rounds() + 2);
    std::fs::write(dir.0.join("stop"), "").unwrap();
    let status = host.0.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(host.0.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(0), "{stderr}");
    // Each line the reference's first, but for its round, and the next
    // version's word from some round on.
    let (_, first) = run_reference(&zstd, &["4", "4"]);
    let printed = std::fs::read_to_string(&stdout).unwrap();
    let updated = printed.lines().position(|l| l.ends_with(" verified")).unwrap_or_else(|| panic!("no round of the next version: {printed}"));
    for (i, line) in printed.lines().enumerate() {
        let mut expected = first.trim_end().replace("round 1:", &format!("round {}:", i + 1));
        if i >= updated {
            expected = expected.replace("roundtrip ok", "roundtrip verified");
        }
        assert_eq!(line, expected, "{stderr}");
    }
}
