//! The command line: bad input gets one line and exit status 2, the guest's
//! status becomes the host's, traps print a named backtrace.

use upstare_tests::{guest, run_host, TempDir};

fn assert_bad_input(args: &[&str], expected: &str) {
    let out = run_host(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "args {args:?}: stderr {err}");
    assert!(err.contains(expected), "args {args:?}: expected {expected:?} in {err:?}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line expected: {err:?}");
    assert!(err.starts_with("error: "), "{err:?}");
}

#[test]
fn missing_module_file() {
    assert_bad_input(&["no-such-module.wasm"], "cannot read no-such-module.wasm");
}

#[test]
fn file_that_is_not_wasm() {
    let dir = TempDir::new("notwasm");
    let path = dir.0.join("text.wasm");
    std::fs::write(&path, "hello").unwrap();
    assert_bad_input(&[path.to_str().unwrap()], "is not a WebAssembly module");
}

#[test]
fn truncated_module() {
    let dir = TempDir::new("truncated");
    let bytes = std::fs::read(guest("compute")).unwrap();
    let path = dir.0.join("cut.wasm");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    assert_bad_input(&[path.to_str().unwrap()], "is not a valid WebAssembly module");
}

#[test]
fn invalid_module() {
    let dir = TempDir::new("invalid");
    // Well-formed binary, but the body returns an i64 where its type
    // promises an i32 (`wat` assembles without validating).
    let module = wat::parse_str(r#"(module (func (export "_start") (result i32) i64.const 1))"#).unwrap();
    let path = dir.0.join("bad.wasm");
    std::fs::write(&path, module).unwrap();
    assert_bad_input(&[path.to_str().unwrap()], "type mismatch");
}

#[test]
fn import_the_host_does_not_provide() {
    let dir = TempDir::new("import");
    let wasm = wat::parse_str(
        r#"(module (import "env" "launch_rockets" (func)) (memory (export "memory") 1) (func (export "_start")))"#,
    )
    .unwrap();
    let path = dir.0.join("imports.wasm");
    std::fs::write(&path, wasm).unwrap();
    assert_bad_input(&[path.to_str().unwrap()], "imports `env::launch_rockets`, which upstare-host does not provide");
}

#[test]
fn module_without_start() {
    let dir = TempDir::new("nostart");
    let wasm = wat::parse_str(r#"(module (memory (export "memory") 1) (func (export "main")))"#).unwrap();
    let path = dir.0.join("lib.wasm");
    std::fs::write(&path, wasm).unwrap();
    assert_bad_input(&[path.to_str().unwrap()], "has no `_start` export");
}

#[test]
fn bad_flags() {
    let compute = guest("compute");
    let compute = compute.to_str().unwrap();
    assert_bad_input(&["--tcplisten", "nowhere", compute], "invalid --tcplisten address `nowhere`");
    assert_bad_input(&["--dir", "/no/such/dir", compute], "cannot open directory /no/such/dir for --dir");
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    assert_bad_input(&["--tcplisten", &addr, compute], &format!("cannot listen on {addr}"));
    let out = run_host(&["run"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn run_subcommand_is_the_default() {
    let compute = guest("compute");
    let compute = compute.to_str().unwrap();
    let short = run_host(&[compute, "3", "50"]);
    let long = run_host(&["run", compute, "3", "50"]);
    assert!(short.status.success() && long.status.success());
    assert!(!short.stdout.is_empty());
    assert_eq!(short.stdout, long.stdout);
}

#[test]
fn arguments_after_the_module_go_to_the_guest() {
    let out = run_host(&[guest("escape").to_str().unwrap(), "--dir", "-x"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains("--dir: refused"), "{stdout}");
    assert!(stdout.contains("-x: refused"), "{stdout}");
}

#[test]
fn help_describes_the_options() {
    let out = run_host(&["--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(text.contains("run"), "{text}");
    let out = run_host(&["run", "--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in ["--dir", "--env", "--tcplisten", "HOST[::GUEST]"] {
        assert!(text.contains(flag), "run --help lacks {flag}: {text}");
    }
}

#[test]
fn guest_exit_status_becomes_the_hosts() {
    let files = guest("files");
    let dir = TempDir::new("exit");
    let spec = format!("{}::/data", dir.0.display());
    let out = run_host(&["--dir", &spec, "--env", "EXIT_CODE=7", files.to_str().unwrap(), "/data"]);
    assert_eq!(out.status.code(), Some(7), "{out:?}");
}

#[test]
fn trap_prints_a_backtrace_with_function_names() {
    let out = run_host(&[guest("compute").to_str().unwrap(), "trap"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(134), "{err}");
    assert!(err.contains("guest trapped: wasm trap: wasm `unreachable` instruction executed"), "{err}");
    let order: Vec<usize> = ["trap_now", "trap_inner", "trap_middle", "trap_outer", "main"]
        .iter()
        .map(|name| err.find(&format!("- {name}\n")).unwrap_or_else(|| panic!("{name} missing from {err}")))
        .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "innermost first: {err}");
    // Source lines from the original's DWARF, through the instrumenter's
    // offset map: the trap, then each call. `main` is instrumented, the
    // others are copies whose calls were renumbered.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let source = std::fs::read_to_string(root.join("guest-examples/compute/compute.c")).unwrap();
    let line_of = |text: &str| source.lines().position(|l| l.contains(text)).expect("in compute.c") + 1;
    for (name, at) in [
        ("trap_now", "__builtin_trap();"),
        ("trap_inner", "return trap_now("),
        ("trap_middle", "return trap_inner("),
        ("trap_outer", "return trap_middle("),
        ("main", "return trap_outer("),
    ] {
        let line = line_of(at);
        let frame = err.split(&format!("- {name}\n")).nth(1).unwrap_or_default();
        let location = frame.lines().next().unwrap_or_default();
        assert!(location.ends_with(&format!("compute.c:{line}")), "{name} at {location:?}: {err}");
    }
}

/// A short run of the compute guest with its caches in `dir`.
fn compute_with_cache(dir: &std::path::Path) -> std::process::Output {
    upstare_tests::host_command()
        .env("UPSTARE_CACHE_DIR", dir)
        .args([guest("compute").to_str().unwrap(), "3", "20"])
        .output()
        .unwrap()
}

/// The instrumentation cache is an optimisation only: damaged entries are
/// ignored, the module is instrumented again, and the entry is rewritten.
#[test]
fn a_damaged_instrumentation_cache_entry_is_ignored_and_replaced() {
    let cache = TempDir::new("cache");
    let run = || compute_with_cache(&cache.0);
    let first = run();
    assert!(first.status.success());
    let entries: Vec<_> = std::fs::read_dir(&cache.0).unwrap().map(|e| e.unwrap().path()).filter(|p| p.is_file()).collect();
    assert_eq!(entries.len(), 1, "one entry per module: {entries:?}");
    let good = std::fs::read(&entries[0]).unwrap();
    let mut damaged = good.clone();
    let mid = damaged.len() / 2;
    damaged[mid] ^= 0xff;
    std::fs::write(&entries[0], &damaged).unwrap();
    let second = run();
    assert!(second.status.success(), "{}", String::from_utf8_lossy(&second.stderr));
    assert_eq!(second.stdout, first.stdout);
    assert_eq!(std::fs::read(&entries[0]).unwrap(), good, "the entry is written again");
}

/// Every file under `dir`, recursively.
fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// The machine code compiled from a module is cached beside it (wasmtime's
/// cache, in `compiled/`), so a restart does not compile again; an entry
/// that is not wasmtime's is compiled again, not run.
#[test]
fn compiled_code_is_cached_and_a_damaged_entry_is_compiled_again() {
    let cache = TempDir::new("compiled");
    let run = || compute_with_cache(&cache.0);
    let first = run();
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let compiled = files_under(&cache.0.join("compiled"));
    assert!(!compiled.is_empty(), "compiled code is cached under compiled/");
    for file in &compiled {
        std::fs::write(file, b"not compiled code").unwrap();
    }
    let second = run();
    assert!(second.status.success(), "{}", String::from_utf8_lossy(&second.stderr));
    assert_eq!(second.stdout, first.stdout);
}
