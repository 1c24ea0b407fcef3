//! The host's WASI layer checked against wasmtime's own: each guest of
//! `tests/guests/wasi_*.c` runs under the real `upstare-host --no-instrument`
//! and under the `wasmtime-wasi` crate's preview1 implementation, each time
//! in a fresh scratch copy of the same tree, preopened as `/a` and `/b`. Both
//! runs must print the same stdout, byte for byte, exit with the same status,
//! and leave the trees alike; the file outside the preopens must be left
//! untouched by both.
//!
//! Where the two differ on purpose, [`EXPECTED_DIFFERENCES`] names the line
//! and what each host prints, with the reason (the README's WASI section
//! says the same); every other line must be identical.
//!
//! The random guest draws its sizes and offsets from a seed, a fresh one
//! each run unless `UPSTARE_WASIDIFF_SEED` gives it; a failure prints it.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::OnceLock;

use upstare_tests::{guest, host_command, TempDir};
use wasmtime_wasi::p1::WasiP1Ctx;

/// A line on which the hosts differ on purpose: the guest, the line's label
/// (up to its `": "`), what upstare-host prints after it, what wasmtime
/// prints, and why.
struct Expected {
    guest: &'static str,
    label: &'static str,
    upstare: &'static str,
    wasmtime: &'static str,
    reason: &'static str,
}

const EXPECTED_DIFFERENCES: &[Expected] = &[
    Expected {
        guest: "wasi_files",
        label: "writev",
        upstare: "6",
        wasmtime: "2",
        reason: "a writev to a file writes every buffer; wasmtime's preview1 writes only the first non-empty one, a short write POSIX allows",
    },
    Expected {
        guest: "wasi_files",
        label: "write to read-only created",
        upstare: "EBADF",
        wasmtime: "1",
        reason: "O_CREAT|O_RDONLY creates the file and opens it for reading only, as POSIX says; wasmtime's fd can write",
    },
    Expected {
        guest: "wasi_files",
        label: "read-only created",
        upstare: "file size 0 nlink 1",
        wasmtime: "file size 1 nlink 1",
        reason: "the write the line before made or refused",
    },
    Expected {
        guest: "wasi_files",
        label: "read dir",
        upstare: "EISDIR",
        wasmtime: "EBADF",
        reason: "a directory fd used as a file is EISDIR, as read(2) on Linux says; wasmtime answers EBADF (the fd lacks the right)",
    },
    Expected {
        guest: "wasi_files",
        label: "write dir",
        upstare: "EISDIR",
        wasmtime: "EBADF",
        reason: "as for reading",
    },
    Expected {
        guest: "wasi_files",
        label: "seek dir",
        upstare: "EISDIR",
        wasmtime: "EBADF",
        reason: "as for reading",
    },
    Expected {
        guest: "wasi_files",
        label: "ftruncate dir",
        upstare: "EISDIR",
        wasmtime: "EBADF",
        reason: "as for reading",
    },
    Expected {
        guest: "wasi_files",
        label: "fsync dir",
        upstare: "ok",
        wasmtime: "EBADF",
        reason: "fsync on a directory makes its entries durable, as on Linux; wasmtime refuses it",
    },
    Expected {
        guest: "wasi_files",
        label: "fd_allocate",
        upstare: "ok",
        wasmtime: "ENOTSUP",
        reason: "fd_allocate grows the file to cover the range; wasmtime no longer implements it",
    },
    Expected {
        guest: "wasi_files",
        label: "process cputime",
        upstare: "ok",
        wasmtime: "EBADF",
        reason: "the CPU-time clocks preview1 defines are the host's; wasmtime provides none",
    },
    Expected {
        guest: "wasi_files",
        label: "thread cputime",
        upstare: "ok",
        wasmtime: "EBADF",
        reason: "as for the process clock",
    },
    Expected {
        guest: "wasi_files",
        label: "open O_SYNC",
        upstare: "ok",
        wasmtime: "ENOTSUP",
        reason: "O_SYNC, O_DSYNC and O_RSYNC open the host file with the same flag; wasmtime refuses them",
    },
    Expected {
        guest: "wasi_files",
        label: "write O_SYNC",
        upstare: "2",
        wasmtime: "EBADF",
        reason: "the fd the line before opened or not",
    },
    Expected {
        guest: "wasi_files",
        label: "fdstat O_SYNC",
        upstare: "type 4 flags 16",
        wasmtime: "EBADF",
        reason: "the fd the line before opened or not",
    },
    Expected {
        guest: "wasi_files",
        label: "open O_DSYNC",
        upstare: "ok",
        wasmtime: "ENOTSUP",
        reason: "as for O_SYNC",
    },
    Expected {
        guest: "wasi_files",
        label: "fdstat O_DSYNC",
        upstare: "type 4 flags 2",
        wasmtime: "EBADF",
        reason: "as for O_SYNC",
    },
    Expected {
        guest: "wasi_files",
        label: "seek past the largest offset",
        upstare: "EINVAL",
        wasmtime: "9223372036854775808",
        reason: "a seek answers what the host OS says, EINVAL past the largest offset; wasmtime keeps its own position, unchecked",
    },
    Expected {
        guest: "wasi_files",
        label: "position after",
        upstare: "1",
        wasmtime: "0",
        reason: "the seek the line before refused; wasmtime's position no longer fits an off_t",
    },
    Expected {
        guest: "wasi_dirs",
        label: "fd_readdir on a file fd",
        upstare: "ENOTDIR",
        wasmtime: "EBADF",
        reason: "listing a file is ENOTDIR, as fdopendir(3) says; wasmtime answers EBADF (the fd lacks the right)",
    },
    Expected {
        guest: "wasi_dirs",
        label: "open nofollow dir symlink",
        upstare: "ENOTDIR",
        wasmtime: "ELOOP",
        reason: "the OS's answer (Linux checks O_DIRECTORY before refusing the symlink); wasmtime answers ELOOP",
    },
];

/// Paths that would leave the sandbox are refused by both hosts, with
/// ENOTCAPABLE by upstare-host (as its README promises, and as WASI names
/// the case) and with EPERM by wasmtime. A line that differs only so is
/// the same refusal.
fn same_refusal(upstare: &str, wasmtime: &str) -> bool {
    upstare.contains("ENOTCAPABLE") && upstare.replace("ENOTCAPABLE", "EPERM") == wasmtime
}

/// What the outside file holds; no guest may change it.
const OUTSIDE: &str = "OUTSIDE\n";

/// The tree every run starts from: `a/` and `b/` are preopened, `outside.txt`
/// sits beside them, reachable only by leaving the sandbox.
fn make_tree(root: &Path) {
    use std::os::unix::fs::symlink;
    let a = root.join("a");
    let b = root.join("b");
    for d in [a.join("sub"), a.join("empty"), b.clone()] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(root.join("outside.txt"), OUTSIDE).unwrap();
    std::fs::write(a.join("hello.txt"), "hello, world\n").unwrap();
    std::fs::write(a.join("sub/nested.txt"), "nested\n").unwrap();
    std::fs::write(b.join("other.txt"), "other\n").unwrap();
    symlink("hello.txt", a.join("link-to-hello")).unwrap();
    symlink("missing", a.join("dangling")).unwrap();
    symlink("loop2", a.join("loop1")).unwrap();
    symlink("loop1", a.join("loop2")).unwrap();
    symlink("../outside.txt", a.join("out-rel")).unwrap();
    symlink(root.join("outside.txt"), a.join("out-abs")).unwrap();
    symlink("..", a.join("up")).unwrap();
    // A FIFO, listed and stat'ed (never opened: that could block).
    let status = std::process::Command::new("mkfifo").arg(a.join("fifo")).status().expect("mkfifo (coreutils) runs");
    assert!(status.success(), "mkfifo failed");
}

/// Names, kinds, contents and link targets under `dir`, sorted, with
/// `root` written as `$ROOT` so two scratch trees compare equal.
fn describe_tree(dir: &Path, root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            let name = path.strip_prefix(dir).unwrap().display().to_string();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let what = if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&path).unwrap().display().to_string();
                format!("symlink {}", target.replace(&root.display().to_string(), "$ROOT"))
            } else if meta.is_dir() {
                stack.push(path.clone());
                "dir".to_string()
            } else if !meta.is_file() {
                "other".to_string()
            } else {
                let bytes = std::fs::read(&path).unwrap();
                format!("file {} bytes {:016x}", bytes.len(), fnv1a(&bytes))
            };
            out.insert(name, what);
        }
    }
    out
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100000001b3))
}

/// What one run produced.
#[derive(Debug)]
struct Run {
    stdout: String,
    status: i32,
    stderr: String,
    tree: BTreeMap<String, String>,
}

const ENV: &[(&str, &str)] = &[("DIFF_VAR", "a value with spaces")];

/// Runs `name` under `upstare-host --no-instrument` in a fresh tree.
fn run_upstare(name: &str, args: &[&str]) -> Run {
    let scratch = TempDir::new("wasidiff-upstare");
    make_tree(&scratch.0);
    let wasm = guest(name);
    let mut command = host_command();
    command.arg("--no-instrument");
    command.arg("--dir").arg(format!("{}::/a", scratch.0.join("a").display()));
    command.arg("--dir").arg(format!("{}::/b", scratch.0.join("b").display()));
    for (k, v) in ENV {
        command.arg("--env").arg(format!("{k}={v}"));
    }
    command.arg(&wasm).args(args).current_dir(&scratch.0).stdin(Stdio::null());
    let out = command.output().expect("upstare-host runs");
    finish(&scratch.0, out.stdout, out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The status a wasmtime run reports when the guest trapped (the trap goes
/// first in its stderr); upstare-host exits with 134 then, so a trap never
/// passes for the other host's status.
const TRAPPED: i32 = -134;

fn engine() -> &'static wasmtime::Engine {
    static ENGINE: OnceLock<wasmtime::Engine> = OnceLock::new();
    ENGINE.get_or_init(wasmtime::Engine::default)
}

/// Runs `name` under wasmtime-wasi's preview1, in this process, in a
/// fresh tree preopened the same way.
fn run_wasmtime(name: &str, args: &[&str]) -> Run {
    use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
    use wasmtime_wasi::{FsPerms, WasiCtxBuilder};

    let scratch = TempDir::new("wasidiff-wasmtime");
    make_tree(&scratch.0);
    let wasm = guest(name);
    let stdout = MemoryOutputPipe::new(1 << 24);
    let stderr = MemoryOutputPipe::new(1 << 20);
    let mut argv = vec![wasm.display().to_string()];
    argv.extend(args.iter().map(|a| a.to_string()));
    let mut builder = WasiCtxBuilder::new();
    builder.args(&argv).stdout(stdout.clone()).stderr(stderr.clone());
    for (k, v) in ENV {
        builder.env(k, v);
    }
    builder.preopened_dir(scratch.0.join("a"), "/a", FsPerms::ReadWrite).unwrap();
    builder.preopened_dir(scratch.0.join("b"), "/b", FsPerms::ReadWrite).unwrap();
    let ctx = builder.build_p1();

    let module = wasmtime::Module::from_file(engine(), &wasm).unwrap();
    let mut linker: wasmtime::Linker<WasiP1Ctx> = wasmtime::Linker::new(engine());
    wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |t| t).unwrap();
    let mut store = wasmtime::Store::new(engine(), ctx);
    let instance = linker.instantiate(&mut store, &module).unwrap();
    let start = instance.get_typed_func::<(), ()>(&mut store, "_start").unwrap();
    let mut trap = None;
    let status = match start.call(&mut store, ()) {
        Ok(()) => 0,
        Err(e) => match e.downcast_ref::<wasmtime_wasi::I32Exit>() {
            Some(exit) => exit.0,
            None => {
                trap = Some(format!("{e:?}"));
                TRAPPED
            }
        },
    };
    drop(store);
    let stderr = trap.unwrap_or_default() + &String::from_utf8_lossy(&stderr.contents());
    finish(&scratch.0, stdout.contents().to_vec(), status, stderr)
}

fn finish(root: &Path, stdout: Vec<u8>, status: i32, stderr: String) -> Run {
    let outside = std::fs::read_to_string(root.join("outside.txt")).unwrap_or_else(|e| format!("unreadable: {e}"));
    assert_eq!(outside, OUTSIDE, "the file outside the preopens was changed");
    let leftovers: Vec<String> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !["a", "b", "outside.txt"].contains(&n.as_str()))
        .collect();
    assert!(leftovers.is_empty(), "the guest created {leftovers:?} outside the preopens");
    let mut tree = describe_tree(&root.join("a"), root);
    for (k, v) in describe_tree(&root.join("b"), root) {
        tree.insert(format!("/b/{k}"), v);
    }
    Run { stdout: String::from_utf8(stdout).expect("guest output is UTF-8"), status, stderr, tree }
}

/// Runs `name` under both hosts and compares; `context` goes into every
/// failure message (the seed, for the random guest).
fn differential(name: &str, args: &[&str], context: &str) {
    let ours = run_upstare(name, args);
    let theirs = run_wasmtime(name, args);
    let show = |r: &Run| format!("status {}\n--- stdout\n{}--- stderr\n{}", r.status, r.stdout, r.stderr);
    let both = format!("{context}\n=== upstare-host\n{}\n=== wasmtime-wasi\n{}", show(&ours), show(&theirs));
    assert_eq!(ours.status, theirs.status, "{name}: exit statuses differ\n{both}");
    let a: Vec<&str> = ours.stdout.lines().collect();
    let b: Vec<&str> = theirs.stdout.lines().collect();
    let mut problems = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..a.len().max(b.len()) {
        let (x, y) = (a.get(i).copied().unwrap_or("<none>"), b.get(i).copied().unwrap_or("<none>"));
        if x == y {
            continue;
        }
        let label = x.split_once(": ").map_or(x, |(l, _)| l);
        let expected = EXPECTED_DIFFERENCES.iter().find(|e| e.guest == name && e.label == label);
        match expected {
            _ if same_refusal(x, y) => {}
            Some(e) if x == format!("{label}: {}", e.upstare) && y == format!("{label}: {}", e.wasmtime) => {
                seen.insert(e.label);
            }
            _ => problems.push(format!("line {}:\n  upstare-host:   {x}\n  wasmtime-wasi:  {y}", i + 1)),
        }
    }
    // An expected difference that no longer shows is stale: the list only
    // says what really differs.
    for e in EXPECTED_DIFFERENCES.iter().filter(|e| e.guest == name && !seen.contains(e.label)) {
        problems.push(format!(
            "expected difference `{}` ({}) no longer shows: no line where upstare-host prints `{}` and wasmtime `{}`",
            e.label, e.reason, e.upstare, e.wasmtime
        ));
    }
    assert!(problems.is_empty(), "{name}: outputs differ\n{}\n\n{both}", problems.join("\n"));
    if ours.stdout.ends_with('\n') != theirs.stdout.ends_with('\n') {
        panic!("{name}: the outputs end differently\n{both}");
    }
    let tree_diff: Vec<String> = ours
        .tree
        .keys()
        .chain(theirs.tree.keys())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .filter(|k| ours.tree.get(*k) != theirs.tree.get(*k))
        .map(|k| format!("  {k}: upstare-host {:?}, wasmtime-wasi {:?}", ours.tree.get(k), theirs.tree.get(k)))
        .collect();
    assert!(tree_diff.is_empty(), "{name}: the trees the runs left differ ({context})\n{}", tree_diff.join("\n"));
}

#[test]
fn files_clocks_and_random_agree_with_wasmtime() {
    differential("wasi_files", &["one", "two words", ""], "");
}

#[test]
fn directories_links_and_escapes_agree_with_wasmtime() {
    differential("wasi_dirs", &[], "");
}

#[test]
fn random_reads_writes_and_seeks_agree_with_wasmtime() {
    let seed = match std::env::var("UPSTARE_WASIDIFF_SEED") {
        Ok(s) => s.parse::<u64>().expect("UPSTARE_WASIDIFF_SEED is a number"),
        Err(_) => fastrand::u64(..),
    };
    eprintln!("wasi_random seed {seed} (set UPSTARE_WASIDIFF_SEED={seed} to repeat)");
    let context = format!("seed {seed}: UPSTARE_WASIDIFF_SEED={seed} repeats this run");
    differential("wasi_random", &[&seed.to_string(), "300"], &context);
}

/// Out-of-range enum arguments: upstare-host answers EINVAL and the guest
/// runs on; wasmtime traps. Bad input from a guest is an errno, never the
/// end of the program (README, "Against wasmtime").
#[test]
fn out_of_range_enums_are_einval_where_wasmtime_traps() {
    for (case, call) in [("clock", "clock_time_get clock 9"), ("advice", "fd_advise advice 9"), ("whence", "fd_seek whence 7")] {
        let ours = run_upstare("wasi_badenum", &[case]);
        assert_eq!((ours.status, ours.stdout.as_str()), (0, format!("{call}: EINVAL\n").as_str()), "{case}: {}", ours.stderr);
        let theirs = run_wasmtime("wasi_badenum", &[case]);
        assert_eq!(theirs.status, TRAPPED, "{case}: wasmtime no longer traps; the README's table is stale: {theirs:?}");
        assert!(theirs.stderr.contains("Invalid enum value"), "{case}: {}", theirs.stderr);
    }
}
