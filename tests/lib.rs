//! Shared pieces of the end-to-end tests: where the guests and the host
//! binary are, running the binary, and a line-protocol TCP client.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::time::{Duration, Instant};

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
/// which the test command runs first).
pub fn host_bin() -> PathBuf {
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
    Command::new(host_bin())
        .args(args)
        .output()
        .expect("upstare-host runs")
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A guest server running under `upstare-host`, killed when dropped.
pub struct Server {
    child: Child,
    stdout: BufReader<ChildStdout>,
    /// The loopback port it listens on.
    pub port: u16,
}

impl Server {
    /// Starts `upstare-host --tcplisten 127.0.0.1:PORT EXTRA... GUEST ARGS...`
    /// and waits for the guest's first line of output (its "listening" line).
    pub fn start(guest_path: &PathBuf, extra: &[&str], args: &[&str]) -> (Self, String) {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let mut child = Command::new(host_bin())
            .arg("--tcplisten")
            .arg(&listen)
            .args(extra)
            .arg(guest_path)
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("upstare-host starts");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        stdout.read_line(&mut first).expect("server prints a first line");
        (Server { child, stdout, port }, first)
    }

    /// Connects a new client.
    pub fn client(&self) -> Client {
        Client::connect(self.port)
    }

    /// Waits for the host to exit and returns its status code.
    pub fn wait(mut self) -> Option<i32> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
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
