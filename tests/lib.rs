//! Shared pieces of the end-to-end tests: where the guests and the host
//! binary are, running the binary, and a line-protocol TCP client.

pub mod csmith;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub mod random_pauses;
pub mod releases;

/// A guest built by this crate's build script.
pub fn guest(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("UPSTARE_GUESTS")).join(format!("{name}.wasm"));
    assert!(path.exists(), "guest {name} was not built: {} is missing", path.display());
    path
}

/// The names of the example guests under `guest-examples/`.
pub fn example_guest_names() -> Vec<String> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../guest-examples");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .expect("guest-examples/ is readable")
        .filter_map(|e| {
            let e = e.ok()?;
            let name = e.file_name().into_string().ok()?;
            (e.path().is_dir() && name != "include").then_some(name)
        })
        .collect();
    names.sort();
    names
}

/// The `upstare-host` binary of this build (built by `cargo build --bins`,
/// which the test command runs first), or the one in
/// `$UPSTARE_TEST_BIN_DIR` when that is set: binaries kept aside, for a
/// target directory other builds write to meanwhile.
pub fn host_bin() -> PathBuf {
    if let Some(dir) = std::env::var_os("UPSTARE_TEST_BIN_DIR") {
        let bin = PathBuf::from(dir).join("upstare-host");
        assert!(bin.exists(), "{} is missing (UPSTARE_TEST_BIN_DIR)", bin.display());
        return bin;
    }
    let exe = std::env::current_exe().expect("current test executable");
    // target/<profile>/deps/e2e-<hash> -> target/<profile>/upstare-host
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join("upstare-host"))
        .expect("test executable sits in target/<profile>/deps");
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build --bins` (scripts/test does)",
        bin.display()
    );
    bin
}

/// Runs `upstare-host ARGS` to completion.
pub fn run_host(args: &[&str]) -> Output {
    host_command().args(args).output().expect("upstare-host runs")
}

/// `upstare-host` as the tests run it: instrumented modules are cached in
/// [`instrument_cache`], not the user's cache, and default control sockets
/// go to this test process's own runtime directory, not the user's.
pub fn host_command() -> Command {
    let mut command = Command::new(host_bin());
    command.env("UPSTARE_CACHE_DIR", instrument_cache()).env("XDG_RUNTIME_DIR", runtime_dir());
    command
}

/// The suite's instrumentation cache, beside the binaries it belongs to
/// (`cargo clean` removes it). Entries are named by content and written
/// through a rename, so parallel tests share it safely.
pub fn instrument_cache() -> PathBuf {
    host_bin().with_file_name("upstare-test-cache")
}

/// How in-process tests load a guest: instrumented, through the suite's
/// cache as [`host_command`]'s hosts do.
pub fn instrumented() -> upstare_host::LoadOptions {
    upstare_host::LoadOptions { cache_dir: Some(instrument_cache()), ..upstare_host::LoadOptions::default() }
}

/// This test process's runtime directory (mode 0700, as XDG asks). A
/// process cannot remove it at exit, so each run removes those of earlier
/// runs whose process is gone.
fn runtime_dir() -> PathBuf {
    use std::os::unix::fs::DirBuilderExt;
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let prefix = "upstare-test-runtime-";
        let tmp = std::env::temp_dir();
        for entry in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
            let name = entry.file_name();
            let pid = name.to_str().and_then(|n| n.strip_prefix(prefix)).and_then(|p| p.parse::<u32>().ok());
            if pid.is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists()) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        let dir = tmp.join(format!("{prefix}{}", std::process::id()));
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir).expect("create the runtime directory");
        dir
    })
    .clone()
}

/// A guest server running under `upstare-host`, killed when dropped.
pub struct Server {
    child: Child,
    stdout: BufReader<ChildStdout>,
    stderr: HostStderr,
    /// The loopback port it listens on.
    pub port: u16,
}

/// What the host prints on stderr, read as it comes so the pipe never
/// fills, kept for assertions.
struct HostStderr {
    text: Arc<Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl HostStderr {
    /// Reads `child`'s stderr up to its `listening on ADDR` line, returning
    /// the port, then goes on reading in the background.
    fn listening(child: &mut Child) -> (Self, u16) {
        let mut lines = BufReader::new(child.stderr.take().expect("stderr is piped"));
        let text = Arc::new(Mutex::new(String::new()));
        let mut port = None;
        let mut line = String::new();
        while port.is_none() {
            line.clear();
            let n = lines.read_line(&mut line).expect("read the host's stderr");
            assert!(n > 0, "the host exited before it listened: {}", text.lock().unwrap());
            text.lock().unwrap().push_str(&line);
            port = listening_port(&line);
        }
        let reader = std::thread::spawn({
            let text = text.clone();
            move || {
                let mut rest = String::new();
                while matches!(lines.read_line(&mut rest), Ok(n) if n > 0) {
                    text.lock().unwrap().push_str(&rest);
                    rest.clear();
                }
            }
        });
        (HostStderr { text, reader: Some(reader) }, port.unwrap())
    }
}

/// The port of an `upstare-host: listening on ADDR (guest fd N)` line.
pub fn listening_port(line: &str) -> Option<u16> {
    let addr = line.strip_prefix("upstare-host: listening on ")?.split(' ').next()?;
    addr.parse::<std::net::SocketAddr>().ok().map(|a| a.port())
}

impl Server {
    /// Starts `upstare-host --tcplisten 127.0.0.1:0 EXTRA... GUEST ARGS...`,
    /// learns its port from the host's stderr, and waits for the guest's
    /// first line of output (its "listening" line).
    pub fn start(guest_path: &PathBuf, extra: &[&str], args: &[&str]) -> (Self, String) {
        let mut command = host_command();
        command.args(["--tcplisten", "127.0.0.1:0"]).args(extra).arg(guest_path).args(args);
        let mut server = Self::spawn(&mut command);
        let mut first = String::new();
        server.stdout.read_line(&mut first).expect("server prints a first line");
        (server, first)
    }

    /// Starts a host command that listens (`run`, or `restore` with
    /// `--tcplisten 127.0.0.1:0`), and returns once it does.
    pub fn spawn(command: &mut Command) -> Self {
        let mut child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("upstare-host starts");
        let (stderr, port) = HostStderr::listening(&mut child);
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Server { child, stdout, stderr, port }
    }

    /// Everything the host printed on stderr so far; all of it once the
    /// host has exited ([`Server::wait`]).
    pub fn stderr(&self) -> String {
        self.stderr.text.lock().unwrap().clone()
    }

    /// The host's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Connects a new client.
    pub fn client(&self) -> Client {
        Client::connect(self.port)
    }

    /// Waits for the host to exit and returns its status code; its stderr
    /// is then complete.
    pub fn wait(&mut self) -> Option<i32> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                if let Some(reader) = self.stderr.reader.take() {
                    reader.join().expect("the stderr reader does not panic");
                }
                return status.code();
            }
            assert!(Instant::now() < deadline, "server did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the host at once, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The guest's next line of output (without its newline).
    pub fn next_line(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("read the guest's stdout");
        line.trim_end_matches('\n').to_string()
    }

    /// The rest of the guest's stdout, after it exited.
    pub fn remaining_output(&mut self) -> String {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut self.stdout, &mut s).unwrap();
        s
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client of a line protocol: one request line, one response line.
pub struct Client {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Client {
    /// Connects to a loopback port.
    pub fn connect(port: u16) -> Self {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to the guest");
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        stream.set_nodelay(true).unwrap();
        Client {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        }
    }

    /// Sends one line and reads one line back, without the newline.
    pub fn request(&mut self, line: &str) -> String {
        self.send(line);
        self.read_line()
    }

    /// Sends one line.
    pub fn send(&mut self, line: &str) {
        self.writer.write_all(format!("{line}\n").as_bytes()).expect("send");
    }

    /// Sends bytes as they are: part of a line, or more than one.
    pub fn send_raw(&mut self, bytes: &str) {
        self.writer.write_all(bytes.as_bytes()).expect("send");
        self.writer.flush().expect("send");
    }

    /// Reads one line, without the newline.
    pub fn read_line(&mut self) -> String {
        let mut s = String::new();
        self.reader.read_line(&mut s).expect("receive");
        s.trim_end_matches('\n').to_string()
    }
}

/// Compiles a C file natively with the system C compiler, for differential
/// tests against the wasm build of the same source.
pub fn native_build(src: &str, name: &str) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::env::temp_dir().join(format!("upstare-native-{name}-{}", std::process::id()));
    let status = Command::new("cc")
        .args(["-O2", "-o"])
        .arg(&out)
        .arg(root.join(src))
        .arg("-I")
        .arg(root.join("guest-examples/include"))
        .arg("-lm")
        .status()
        .expect("a native C compiler (cc) is installed");
    assert!(status.success(), "native build of {src} failed");
    out
}

/// A fresh temporary directory, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Creates it.
    pub fn new(tag: &str) -> Self {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("upstare-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process killed when dropped, so a failing test leaves no host
/// running behind it.
pub struct KillOnDrop(pub Child);

impl KillOnDrop {
    /// Spawns `cmd`.
    pub fn spawn(cmd: &mut Command) -> Self {
        KillOnDrop(cmd.spawn().expect("the process starts"))
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// ---- live updates: versions, a controlled host, load, reports -------------

/// The further versions of the example guests: the output names listed in
/// `guest-examples/<name>/versions` (see `guest-examples/build.sh`), as
/// `(guest, version)` pairs, sorted.
pub fn example_guest_versions() -> Vec<(String, String)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../guest-examples");
    let mut versions = Vec::new();
    for guest in example_guest_names() {
        let Ok(text) = std::fs::read_to_string(dir.join(&guest).join("versions")) else { continue };
        for line in text.lines() {
            match line.split_whitespace().next() {
                Some(name) if !name.starts_with('#') => versions.push((guest.clone(), name.to_string())),
                _ => {}
            }
        }
    }
    versions.sort();
    versions
}

/// Every version chain in the repository, each in the order it is built:
/// the first version of an example (`guest-examples/NAME`) or of a
/// test-only chain (`tests/guests/chains/NAME`), then the further versions
/// its `versions` file lists. A guest without further versions is a chain
/// of one.
pub fn version_chains() -> Vec<Vec<String>> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut chains = Vec::new();
    for root in [manifest.join("../guest-examples"), manifest.join("guests/chains")] {
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
            .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_dir() && p.file_name().is_some_and(|n| n != "include"))
            .collect();
        dirs.sort();
        for dir in dirs {
            let mut chain = vec![dir.file_name().unwrap().to_str().unwrap().to_string()];
            let text = std::fs::read_to_string(dir.join("versions")).unwrap_or_default();
            chain.extend(
                text.lines()
                    .filter_map(|l| l.split_whitespace().next())
                    .filter(|name| !name.starts_with('#'))
                    .map(str::to_string),
            );
            chains.push(chain);
        }
    }
    chains
}

/// The `upstare-patchgen` binary of this build, beside `upstare-host`.
pub fn patchgen_bin() -> PathBuf {
    let bin = host_bin().with_file_name("upstare-patchgen");
    assert!(bin.exists(), "{} is missing: build it with `cargo build --bins` (scripts/test does)", bin.display());
    bin
}

/// What `upstare-patchgen OLD NEW` says of an update: its exit status and
/// the reasons it prints for a refusal.
pub struct Verdict {
    /// Its exit status.
    pub status: Option<i32>,
    /// What follows each `refused: `.
    pub refusals: Vec<String>,
    /// Everything it printed, for messages.
    pub text: String,
}

impl Verdict {
    /// Runs `upstare-patchgen OLD NEW`.
    pub fn of(old: &std::path::Path, new: &std::path::Path) -> Self {
        let out = Command::new(patchgen_bin()).arg(old).arg(new).output().expect("upstare-patchgen runs");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let refusals = text.lines().filter_map(|l| l.strip_prefix("refused: ")).map(str::to_string).collect();
        Verdict { status: out.status.code(), refusals, text: format!("{text}{}", String::from_utf8_lossy(&out.stderr)) }
    }
}

/// The SHA-256 of a file, in hex, by coreutils' `sha256sum` (independent of
/// the host's own hashing).
pub fn sha256_file(path: &std::path::Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().expect("sha256sum (coreutils) is installed");
    assert!(out.status.success(), "sha256sum {} failed", path.display());
    let text = String::from_utf8(out.stdout).unwrap();
    text.split_whitespace().next().expect("sha256sum prints a digest").to_string()
}

/// Waits up to 10 s for a file (a control socket, say) to appear.
pub fn wait_for_path(path: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        assert!(Instant::now() < deadline, "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A host's control socket, in a temporary directory of its own, and the
/// control commands that go through it.
pub struct Control {
    dir: TempDir,
}

impl Control {
    /// A fresh place for a control socket.
    pub fn new(tag: &str) -> Self {
        Control { dir: TempDir::new(tag) }
    }

    /// The socket's path, for `--control`.
    pub fn path(&self) -> String {
        self.dir.0.join("control.sock").to_str().expect("temporary paths are UTF-8").to_string()
    }

    /// The temporary directory, for other files of the test.
    pub fn dir(&self) -> &std::path::Path {
        &self.dir.0
    }

    /// `upstare-host update --control SOCKET NEW`.
    pub fn update(&self, new: &std::path::Path) -> Output {
        run_host(&["update", "--control", &self.path(), new.to_str().unwrap()])
    }

    /// `upstare-host checkpoint --control SOCKET` into this directory, as
    /// `NAME.snap`, read back.
    pub fn checkpoint(&self, name: &str) -> upstare_host::Snapshot {
        let path = self.dir.0.join(format!("{name}.snap"));
        let out = run_host(&["checkpoint", "--control", &self.path(), path.to_str().unwrap()]);
        assert!(out.status.success(), "checkpoint failed: {}", String::from_utf8_lossy(&out.stderr));
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        upstare_host::Snapshot::decode(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// `upstare-host rollback --control SOCKET`.
    pub fn rollback(&self) -> Output {
        run_host(&["rollback", "--control", &self.path()])
    }

    /// The `version: sha256:<hex>` of `upstare-host status`: the digest of
    /// the version running now.
    pub fn running_version(&self) -> String {
        self.status_line("version: sha256:")
    }

    /// What follows `prefix` on its line of `upstare-host status`.
    pub fn status_line(&self, prefix: &str) -> String {
        status_line(&self.status(), prefix)
    }

    /// The output of `upstare-host status`.
    pub fn status(&self) -> String {
        let out = run_host(&["status", "--control", &self.path()]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(out.status.success(), "status failed: {}{}", text, String::from_utf8_lossy(&out.stderr));
        text
    }

    /// The program's memory as `status` reports it: its size, and the bytes
    /// of fresh memory (reserved by updates) in use and free for reuse.
    pub fn memory(&self) -> MemoryFigures {
        let status = self.status();
        let number = |prefix: &str, at: usize| -> u64 {
            let line = status_line(&status, prefix);
            line.split_whitespace().nth(at).and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("bad status line {line:?}"))
        };
        MemoryFigures {
            size: number("memory: ", 0),
            fresh_used: number("fresh memory: ", 0),
            fresh_free: number("fresh memory: ", 4),
        }
    }
}

/// What follows `prefix` on its line of a `status` output.
fn status_line(status: &str, prefix: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("status has no `{prefix}` line: {status}"))
        .trim()
        .to_string()
}

/// A program's memory, from `upstare-host status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryFigures {
    /// Bytes of linear memory.
    pub size: u64,
    /// Bytes of fresh memory holding a version's data, or not yet free.
    pub fresh_used: u64,
    /// Bytes of fresh memory free for the next update.
    pub fresh_free: u64,
}

/// The report `upstare-host update` (and `rollback`) prints on success:
///
/// ```text
/// updated to NEW.wasm (sha256:<hex>)
/// functions: <n> changed, <n> added, <n> removed, <n> unchanged
/// globals: <n> kept, <n> moved, <n> transformed, <n> added, <n> removed
/// frames: <n> mapped
/// pause: <n> us
/// ```
#[derive(Debug)]
pub struct UpdateReport {
    /// The digest in the first line's `(sha256:<hex>)`.
    pub sha256: String,
    /// `(line, what) -> n`, e.g. `("functions", "changed") -> 3`.
    pub counts: std::collections::BTreeMap<(String, String), u64>,
}

impl UpdateReport {
    /// The counts every report has, by line.
    pub const EXPECTED: &'static [(&'static str, &'static [&'static str])] = &[
        ("functions", &["changed", "added", "removed", "unchanged"]),
        ("globals", &["kept", "moved", "transformed", "added", "removed"]),
        ("frames", &["mapped"]),
        ("heap", &["objects converted", "pointers rewritten"]),
        ("pause", &["us"]),
    ];

    /// Parses a successful command's stdout; every count of [`Self::EXPECTED`]
    /// must be there.
    pub fn parse(stdout: &str) -> Result<Self, String> {
        let mut lines = stdout.lines();
        let first = lines.next().ok_or("empty report")?;
        let sha256 = first
            .rsplit_once("(sha256:")
            .and_then(|(_, rest)| rest.strip_suffix(')'))
            .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| format!("first line has no (sha256:<hex>): {first:?}"))?
            .to_string();
        let mut counts = std::collections::BTreeMap::new();
        for line in lines {
            let Some((label, rest)) = line.split_once(": ") else { continue };
            for item in rest.split(", ") {
                let (n, what) = item.split_once(' ').ok_or_else(|| format!("bad count {item:?} in {line:?}"))?;
                let n: u64 = n.parse().map_err(|_| format!("bad number {n:?} in {line:?}"))?;
                counts.insert((label.to_string(), what.to_string()), n);
            }
        }
        for (label, whats) in Self::EXPECTED {
            for what in *whats {
                if !counts.contains_key(&(label.to_string(), what.to_string())) {
                    return Err(format!("report has no `{label}: <n> {what}`:\n{stdout}"));
                }
            }
        }
        Ok(UpdateReport { sha256, counts })
    }

    /// One count, e.g. `count("globals", "added")`.
    pub fn count(&self, label: &str, what: &str) -> u64 {
        self.counts[&(label.to_string(), what.to_string())]
    }
}

/// The stdout of a command that must have succeeded, parsed as a report.
pub fn expect_report(out: &Output) -> UpdateReport {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "expected success, got {}; stdout: {stdout}; stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    UpdateReport::parse(&stdout).unwrap_or_else(|e| panic!("{e}"))
}

/// The one-line reason of a command that must have failed with `code`, after
/// `error: `.
pub fn expect_error(out: &Output, code: i32) -> String {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(code),
        "expected exit status {code}; stdout: {}; stderr: {err}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(err.trim_end().lines().count(), 1, "one line on stderr: {err}");
    err.trim_end().strip_prefix("error: ").unwrap_or_else(|| panic!("stderr starts with `error: `: {err}")).to_string()
}

impl Client {
    /// Sends one line and reads one line back, or says what went wrong.
    pub fn try_request(&mut self, line: &str) -> Result<String, String> {
        self.writer.write_all(format!("{line}\n").as_bytes()).map_err(|e| format!("send {line:?}: {e}"))?;
        let mut s = String::new();
        match self.reader.read_line(&mut s) {
            Ok(0) => Err(format!("connection closed before the reply to {line:?}")),
            Ok(_) => Ok(s.trim_end_matches('\n').to_string()),
            Err(e) => Err(format!("receive the reply to {line:?}: {e}")),
        }
    }
}

/// A line for a load client to send on its connection, and where its reply goes.
type LoadCommand = (String, std::sync::mpsc::Sender<Result<String, String>>);

/// One client of a [`Load`]: how to reach its thread, and the thread, which
/// returns the keys it set with their last values.
struct LoadClient {
    commands: std::sync::mpsc::Sender<LoadCommand>,
    thread: std::thread::JoinHandle<Vec<(String, String)>>,
}

/// Load on a key-value server: clients on loopback, each on its own thread
/// and its own connection, setting and getting keys of their own in a loop
/// and checking every reply. Failures are recorded, not panicked on.
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    requests: std::sync::Arc<std::sync::atomic::AtomicU64>,
    failures: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    clients: Vec<LoadClient>,
}

/// What a [`Load`] did, once stopped.
#[derive(Debug)]
pub struct LoadOutcome {
    /// Requests answered correctly.
    pub requests: u64,
    /// Every wrong reply, dropped connection or timeout.
    pub failures: Vec<String>,
    /// Each key the clients set, with the last value set.
    pub stored: Vec<(String, String)>,
}

impl Load {
    /// Connects `clients` clients to `port` (all connected when this
    /// returns), each cycling through `keys` keys named `load<client>-<k>`.
    pub fn start(port: u16, clients: usize, keys: usize) -> Self {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let requests = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let failures = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let clients = (0..clients)
            .map(|c| {
                let mut client = Client::connect(port);
                let (commands, rx) = std::sync::mpsc::channel::<LoadCommand>();
                let (stop, requests, failures) = (stop.clone(), requests.clone(), failures.clone());
                let thread = std::thread::spawn(move || {
                    let mut stored = std::collections::BTreeMap::new();
                    let fail = |what: String| failures.lock().unwrap().push(format!("client {c}: {what}"));
                    let mut n = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        if let Ok((line, reply)) = rx.try_recv() {
                            let _ = reply.send(client.try_request(&line));
                        }
                        let key = format!("load{c}-{}", n as usize % keys.max(1));
                        let value = format!("v{n} of {c}");
                        let checks = [(format!("SET {key} {value}"), "OK".to_string()), (format!("GET {key}"), format!("VALUE {value}"))];
                        for (request, expected) in checks {
                            match client.try_request(&request) {
                                Ok(got) if got == expected => {
                                    requests.fetch_add(1, Ordering::SeqCst);
                                }
                                Ok(got) => {
                                    fail(format!("{request:?} got {got:?}, expected {expected:?}"));
                                    return stored.into_iter().collect();
                                }
                                Err(e) => {
                                    fail(e);
                                    return stored.into_iter().collect();
                                }
                            }
                            stored.insert(key.clone(), value.clone());
                        }
                        n += 1;
                    }
                    stored.into_iter().collect()
                });
                LoadClient { commands, thread }
            })
            .collect();
        Load { stop, requests, failures, clients }
    }

    /// Requests answered correctly so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Failures so far.
    pub fn failures(&self) -> Vec<String> {
        self.failures.lock().unwrap().clone()
    }

    /// Waits until `more` further requests have been answered (at most 30 s).
    pub fn wait_for_requests(&self, more: u64) {
        let target = self.requests() + more;
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.requests() < target {
            assert!(self.failures().is_empty(), "load failed: {:?}", self.failures());
            assert!(Instant::now() < deadline, "the load made no progress: {} of {target} requests", self.requests());
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Sends `line` on client `n`'s own connection, between two of its
    /// requests, and returns the reply.
    pub fn command(&self, n: usize, line: &str) -> Result<String, String> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.clients[n].commands.send((line.to_string(), tx)).map_err(|_| format!("client {n} has stopped"))?;
        rx.recv_timeout(Duration::from_secs(30)).map_err(|_| format!("client {n} did not send {line:?}"))?
    }

    /// Stops every client, checks that none failed and that a new client
    /// reads back every key `seeded` before the load and every key the load
    /// stored, and says what the clients did.
    pub fn stop_and_check(self, port: u16, seeded: &[(String, String)]) -> LoadOutcome {
        let outcome = self.stop();
        assert!(outcome.failures.is_empty(), "{:?}", outcome.failures);
        let missing = [missing_keys(port, seeded), missing_keys(port, &outcome.stored)].concat();
        assert!(missing.is_empty(), "keys lost: {missing:?}");
        outcome
    }

    /// Stops every client and says what they did.
    pub fn stop(self) -> LoadOutcome {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let mut stored = Vec::new();
        for client in self.clients {
            stored.extend(client.thread.join().expect("load clients record failures, never panic"));
        }
        let failures = self.failures.lock().unwrap().clone();
        LoadOutcome { requests: self.requests.load(std::sync::atomic::Ordering::SeqCst), failures, stored }
    }
}

/// The keys in `expected` that a new client on `port` does not read back
/// with their value, as `key: got` lines.
pub fn missing_keys(port: u16, expected: &[(String, String)]) -> Vec<String> {
    let mut client = Client::connect(port);
    expected
        .iter()
        .filter_map(|(k, v)| {
            let got = client.try_request(&format!("GET {k}")).unwrap_or_else(|e| e);
            (got != format!("VALUE {v}")).then(|| format!("{k}: {got}"))
        })
        .collect()
}

// ---- updates that wait for frames -------------------------------------------

impl Control {
    /// `upstare-host update --control SOCKET --timeout MS NEW`, and how long
    /// it took.
    pub fn update_with_timeout(&self, new: &std::path::Path, ms: u64) -> (Output, Duration) {
        let started = Instant::now();
        let out = run_host(&["update", "--control", &self.path(), "--timeout", &ms.to_string(), new.to_str().unwrap()]);
        (out, started.elapsed())
    }
}

/// Client threads that each repeat a step (a request, a connection) until
/// stopped, counting the steps done; a step's error is recorded and ends
/// its thread. Failures are recorded, not panicked on.
pub struct ClientThreads {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    done: std::sync::Arc<std::sync::atomic::AtomicU64>,
    failures: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl ClientThreads {
    /// `clients` threads, each running the step `new_step()` makes (on
    /// this thread, so it may connect first).
    pub fn start<S>(clients: usize, new_step: impl Fn() -> S) -> Self
    where
        S: FnMut() -> Result<(), String> + Send + 'static,
    {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let done = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let failures = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let threads = (0..clients)
            .map(|_| {
                let (stop, done, failures, mut step) = (stop.clone(), done.clone(), failures.clone(), new_step());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        if let Err(e) = step() {
                            failures.lock().unwrap().push(e);
                            return;
                        }
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        ClientThreads { stop, done, failures, threads }
    }

    /// Waits until `more` steps are done (or one failed); panics after 10 s.
    pub fn wait_for(&self, more: u64) {
        use std::sync::atomic::Ordering;
        let target = self.done.load(Ordering::Relaxed) + more;
        for _ in 0..1000 {
            if self.done.load(Ordering::Relaxed) >= target || !self.failures.lock().unwrap().is_empty() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("the clients made no progress");
    }

    /// Stops the clients; returns how many steps were done, and the
    /// failures.
    pub fn stop(self) -> (u64, Vec<String>) {
        use std::sync::atomic::Ordering;
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        let failures = self.failures.lock().unwrap().clone();
        (self.done.load(Ordering::Relaxed), failures)
    }
}
