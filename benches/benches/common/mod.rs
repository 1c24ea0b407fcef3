//! What the benches share: building C guests with the documented recipe
//! (`bin/upstare-cc`), cached under `target/bench-guests` by a key of their
//! sources and flags; their Asyncify variants; locating SQLite's
//! amalgamation and Lua's sources; code-section sizes, medians and the
//! process's CPU clock; a guest served by the host library behind a control
//! socket, and the figures of an update's report.
//!
//! Each bench target includes this with `mod common;` and uses a part of it.
#![allow(dead_code)]

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Where built guests are kept between runs.
pub fn out_dir() -> PathBuf {
    let out = root().join("target/bench-guests");
    std::fs::create_dir_all(&out).unwrap_or_else(|e| panic!("cannot create {}: {e}", out.display()));
    out
}

/// The CPU-bound guests every bench of the guest code runs: name and source.
pub const CPU_GUESTS: [(&str, &str); 4] = [
    ("compute", "guest-examples/compute/compute.c"),
    ("nbody", "benches/guests/nbody.c"),
    ("interp", "benches/guests/interp.c"),
    ("kernels", "benches/guests/kernels.c"),
];

/// The module as `upstare-host` starts a program on it: the unwind-only
/// variant.
pub fn unwind_only(original: &[u8]) -> Vec<u8> {
    let options = upstare_instrument::Options { unwind_only: true, ..Default::default() };
    upstare_instrument::instrument(original, &options).unwrap().wasm
}

/// Panics unless valgrind runs (the instruction-counting benches need it).
pub fn require_valgrind() {
    let valgrind = Command::new("valgrind").arg("--version").output();
    assert!(valgrind.is_ok_and(|o| o.status.success()), "valgrind is needed: apt-get install valgrind");
}

/// Runs a command to success, or panics naming it.
pub fn run(cmd: &mut Command) {
    let status = cmd.status().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(status.success(), "{cmd:?} failed: {status}");
}

/// A C guest: its sources and the extra `upstare-cc` flags it is built with.
pub struct CGuest {
    /// Output name (`<name>.wasm`).
    pub name: String,
    /// Sources, absolute or relative to the repository root.
    pub sources: Vec<PathBuf>,
    /// Flags before the sources (compile and link flags alike).
    pub flags: Vec<String>,
    /// Flags after the sources (libraries).
    pub libs: Vec<String>,
}

/// Every guest gets a 1 MiB shadow stack: compute's and kv-server's own
/// `build.flags`, harmless for the others, and SQLite's recursive parser
/// and query planner are then never near wasm-ld's 64 KiB default.
const STACK: &str = "-Wl,-z,stack-size=1048576";

impl CGuest {
    /// A guest from one source with the common flags only.
    pub fn single(name: &str, source: &str) -> Self {
        CGuest { name: name.into(), sources: vec![root().join(source)], flags: vec![STACK.into()], libs: Vec::new() }
    }

    /// Builds the guest unless a build with the same sources and flags is
    /// already there, and returns the module's path. The key covers the
    /// sources' contents and every flag, so editing either rebuilds;
    /// SQLite takes minutes on a busy machine, hence the cache.
    pub fn build(&self) -> PathBuf {
        let mut h = DefaultHasher::new();
        for src in &self.sources {
            std::fs::read(src).unwrap_or_else(|e| panic!("cannot read {}: {e}", src.display())).hash(&mut h);
        }
        self.flags.hash(&mut h);
        self.libs.hash(&mut h);
        std::fs::read(root().join("bin/upstare-cc")).unwrap_or_default().hash(&mut h);
        let out = out_dir().join(format!("{}-{:016x}.wasm", self.name, h.finish()));
        if !out.exists() {
            let partial = out.with_extension("partial");
            run(Command::new(root().join("bin/upstare-cc"))
                .args(&self.flags)
                .args(&self.sources)
                .args(&self.libs)
                .arg("-o")
                .arg(&partial));
            std::fs::rename(&partial, &out).unwrap();
        }
        out
    }
}

/// The imports the instrumenter treats as blocking, which Asyncify must
/// treat as possible unwind points too for the comparison to be fair.
fn asyncify_imports() -> String {
    upstare_instrument::WASI_BLOCKING
        .iter()
        .map(|n| format!("wasi_snapshot_preview1.{n}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The module after Binaryen's `wasm-opt --asyncify -O2`, built next to it
/// once (the original's name carries the key of its build).
pub fn asyncify(original: &Path) -> PathBuf {
    let out = original.with_extension("asyncify.wasm");
    if !out.exists() {
        let partial = original.with_extension("asyncify.partial");
        run(Command::new("wasm-opt")
            .arg("--asyncify")
            .arg(format!("--pass-arg=asyncify-imports@{}", asyncify_imports()))
            .arg("-O2")
            .arg(original)
            .arg("-o")
            .arg(&partial)
            .stderr(std::process::Stdio::null()));
        std::fs::rename(&partial, &out).unwrap();
    }
    out
}

/// The directory of SQLite's amalgamation (`sqlite3.c`, `sqlite3.h`) in
/// the sources of the `libsqlite3-sys` crate, which `cargo metadata` on
/// `benches/sqlite-source` fetches (without building it) and locates.
pub fn sqlite_dir() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("sqlite-source/Cargo.toml");
    upstare_tests::releases::crate_dir(&manifest, "libsqlite3-sys").join("sqlite3")
}

/// The Lua workload guest ([`upstare_tests::releases::lua_recipe`]: Lua's
/// core and its base, table, string and math libraries, driven by
/// `tests/releases/lua-workload.c`), with the benches' stack.
pub fn lua_guest() -> CGuest {
    let (sources, recipe, libs) = upstare_tests::releases::lua_recipe();
    let flags = std::iter::once(STACK.to_string()).chain(recipe).collect();
    CGuest { name: "lua".into(), sources, flags, libs: libs.iter().map(|l| l.to_string()).collect() }
}

/// The SQLite workload guest (`benches/guests/sqlite-workload.c` linked
/// with the amalgamation), with the flags that make SQLite build for
/// wasm32-wasi: no threads, no extension loading, and wasi-libc's
/// emulations of `mmap`, `getpid` and process clocks.
pub fn sqlite_guest() -> CGuest {
    let dir = sqlite_dir();
    let mut flags = vec![STACK.to_string(), format!("-I{}", dir.display())];
    flags.extend(upstare_tests::releases::SQLITE_WASI_FLAGS.iter().map(|f| f.to_string()));
    CGuest {
        name: "sqlite".into(),
        sources: vec![dir.join("sqlite3.c"), root().join("benches/guests/sqlite-workload.c")],
        flags,
        libs: upstare_tests::releases::SQLITE_WASI_LIBS.iter().map(|l| l.to_string()).collect(),
    }
}

/// The KV server guest with its own `build.flags`.
pub fn kv_guest() -> CGuest {
    let flags_file = root().join("guest-examples/kv-server/build.flags");
    let text = std::fs::read_to_string(&flags_file).unwrap_or_else(|e| panic!("cannot read {}: {e}", flags_file.display()));
    let flags = text.lines().filter(|l| !l.trim_start().starts_with('#')).flat_map(|l| l.split_whitespace()).map(String::from);
    CGuest {
        name: "kv-server".into(),
        sources: vec![root().join("guest-examples/kv-server/kv.c")],
        flags: ["-Wall", "-Wextra"].map(String::from).into_iter().chain(flags).collect(),
        libs: Vec::new(),
    }
}

/// Size of the code section's payload.
pub fn code_size(wasm: &[u8]) -> usize {
    for payload in wasmparser::Parser::new(0).parse_all(wasm) {
        if let Ok(wasmparser::Payload::CodeSectionStart { size, .. }) = payload {
            return size as usize;
        }
    }
    0
}

/// The median (the upper one of an even count).
pub fn median<T: Ord + Copy>(mut v: Vec<T>) -> T {
    v.sort();
    v[v.len() / 2]
}

/// CPU time the process has used so far, on all its threads. wasmtime
/// compiles a module's functions in parallel, so the wall time of a compile
/// depends on how its largest functions fall on the threads; the CPU time is
/// the work done.
pub fn process_cpu_time() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// Milliseconds, for printing.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Geometric mean of ratios.
pub fn geomean(v: &[f64]) -> f64 {
    (v.iter().map(|r| r.ln()).sum::<f64>() / v.len() as f64).exp()
}

/// A guest run by the host library as `upstare-host` runs it (its
/// supervisor and control socket), on a loopback listener.
pub struct Served {
    /// The guest's listener.
    pub addr: std::net::SocketAddr,
    /// The control socket, for `upstare_host::control::request`.
    pub socket: PathBuf,
}

impl Served {
    /// Starts `module` with `args` on a thread of its own.
    pub fn start(module: &Path, args: &[&str], tag: &str) -> Served {
        Self::start_with(module, args, tag, |_| {})
    }

    /// [`Served::start`] with the guest's configuration changed by `tweak`.
    pub fn start_with(
        module: &Path,
        args: &[&str],
        tag: &str,
        tweak: impl FnOnce(&mut upstare_host::GuestConfig) + Send + 'static,
    ) -> Served {
        use upstare_host::control::ControlSocket;
        use upstare_host::supervise::{self, Identity};
        use upstare_host::{new_engine, Guest, GuestConfig, GuestModule};

        let engine = new_engine().unwrap();
        let loaded = GuestModule::load(&engine, module).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let socket = std::env::temp_dir().join(format!("upstare-bench-{tag}-{}.sock", std::process::id()));
        let control = ControlSocket::bind(&socket).unwrap();
        let identity = Identity { module: module.display().to_string(), hash: loaded.hash_hex() };
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        std::thread::spawn(move || {
            let make = move || {
                let mut config = GuestConfig::new(args);
                config.listeners.push(listener);
                tweak(&mut config);
                Guest::new(&engine, &loaded, config).map_err(|e| e.to_string())
            };
            let _ = supervise::run(make, identity, Some(control), Duration::from_secs(5), None);
        });
        Served { addr, socket }
    }

    /// A client, once the guest accepts connections.
    pub fn connect(&self) -> std::net::TcpStream {
        loop {
            match std::net::TcpStream::connect(self.addr) {
                Ok(s) => return s,
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// Updates the guest to `to` as `upstare-host update` does; the report.
    pub fn update(&self, to: &Path, timeout_ms: u64) -> String {
        use upstare_host::control::{self, Request, Response};
        match control::request(&self.socket, &Request::Update(to.to_path_buf(), timeout_ms)).unwrap() {
            Response::Done { body, .. } => body.join("\n"),
            refused => panic!("update failed: {refused:?}"),
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// The first number after `label` in an update's report (`pause: `).
pub fn report_field(report: &str, label: &str) -> u64 {
    report
        .lines()
        .find_map(|l| l.strip_prefix(label))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no `{label}` in the report:\n{report}"))
}
