//! The upstream WASI preview1 conformance suite (`tests/wasi-testsuite`),
//! run through the real `upstare-host` binary the way its specification
//! says: each test from a scratch copy of its directory tree, preopened as
//! the guest's `/`, with its arguments and environment; its exit status and
//! stdout must be the ones its spec names. Modules run instrumented, as a
//! user runs them.
//!
//! Prints one line per test and `N passed, M failed`. Fails when a test
//! fails that `expected-failures.txt` does not list, and when a listed test
//! passes (the list only shrinks).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use upstare_tests::{host_command, TempDir};

/// Longer than any test needs; a test that blocks is a failure, not a hang.
const TEST_DEADLINE: Duration = Duration::from_secs(30);

fn suite_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("wasi-testsuite")
}

/// One test: its module and what its spec asks.
#[derive(Debug)]
struct Case {
    /// `suite/name`, as the expected-failures list names it.
    id: String,
    wasm: PathBuf,
    root: Option<PathBuf>,
    dirs: Vec<PathBuf>,
    args: Vec<String>,
    env: Vec<(String, String)>,
    exit_code: i32,
    stdout: Option<String>,
}

fn cases() -> Vec<Case> {
    let mut out = Vec::new();
    for suite in ["c", "rust", "assemblyscript"] {
        let dir = suite_root().join("tests").join(suite).join("testsuite/wasm32-wasip1");
        let mut wasms: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "wasm"))
            .collect();
        wasms.sort();
        for wasm in wasms {
            let name = wasm.file_stem().unwrap().to_str().unwrap().to_string();
            let spec: serde_json::Value = match std::fs::read_to_string(wasm.with_extension("json")) {
                Ok(text) => serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}.json: {e}")),
                Err(_) => serde_json::json!({}),
            };
            assert!(spec.get("operations").is_none(), "{name}: the runner does not know `operations` specs yet");
            let strings = |key: &str| -> Vec<String> {
                spec.get(key).and_then(|v| v.as_array()).map_or_else(Vec::new, |a| {
                    a.iter().map(|s| s.as_str().expect("a string").to_string()).collect()
                })
            };
            let env = spec.get("env").and_then(|e| e.as_object()).map_or_else(Vec::new, |m| {
                m.iter().map(|(k, v)| (k.clone(), v.as_str().expect("a string").to_string())).collect()
            });
            out.push(Case {
                id: format!("{suite}/{name}"),
                root: spec.get("root").and_then(|r| r.as_str()).map(|r| dir.join(r)),
                dirs: strings("dirs").into_iter().map(|d| dir.join(d)).collect(),
                args: strings("args"),
                env,
                exit_code: spec.get("exit_code").and_then(|c| c.as_i64()).unwrap_or(0) as i32,
                stdout: spec.get("stdout").and_then(|s| s.as_str()).map(str::to_string),
                wasm,
            });
        }
    }
    out
}

/// `None` when the test passes, else what went wrong, in one line.
fn run(case: &Case) -> Option<String> {
    let scratch = TempDir::new("wasi-suite");
    let copy = |from: &Path| -> PathBuf {
        let to = scratch.0.join(from.file_name().unwrap());
        let status = Command::new("cp").arg("-a").arg(from).arg(&to).status().expect("cp (coreutils) runs");
        assert!(status.success(), "cannot copy {}", from.display());
        to
    };
    let mut command = host_command();
    if let Some(root) = &case.root {
        command.arg("--dir").arg(format!("{}::/", copy(root).display()));
    }
    for dir in &case.dirs {
        let name = dir.file_name().unwrap().to_str().unwrap().to_string();
        command.arg("--dir").arg(format!("{}::{name}", copy(dir).display()));
    }
    for (k, v) in &case.env {
        command.arg("--env").arg(format!("{k}={v}"));
    }
    command.arg(&case.wasm).args(&case.args).current_dir(&scratch.0);
    let mut child = command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("upstare-host starts");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > TEST_DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            return Some(format!("still running after {} s", TEST_DEADLINE.as_secs()));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let first_error = stderr.lines().find(|l| !l.trim().is_empty()).unwrap_or("").to_string();
    if status.code() != Some(case.exit_code) {
        return Some(format!("exit status {:?}, expected {}: {first_error}", status.code(), case.exit_code));
    }
    match &case.stdout {
        Some(expected) if String::from_utf8_lossy(&out.stdout) != *expected => {
            Some(format!("stdout {:?}, expected {expected:?}", String::from_utf8_lossy(&out.stdout)))
        }
        _ => None,
    }
}

/// `suite/name: reason` lines; `#` starts a comment.
fn expected_failures() -> BTreeMap<String, String> {
    let path = suite_root().join("expected-failures.txt");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (id, reason) = l.split_once(": ").unwrap_or_else(|| panic!("expected-failures.txt: `{l}` has no reason"));
            (id.to_string(), reason.to_string())
        })
        .collect()
}

#[test]
fn the_wasi_testsuite_passes_on_upstare_host() {
    let cases = cases();
    assert_eq!(cases.len(), 72, "the suite has 72 preview1 tests");
    let expected = expected_failures();
    for id in expected.keys() {
        assert!(cases.iter().any(|c| &c.id == id), "expected-failures.txt names `{id}`, which is no test");
    }
    // Two at a time: the machine has two cores, and most time is the host
    // instrumenting and compiling each module.
    let results = Mutex::new(BTreeMap::new());
    let next = Mutex::new(cases.iter());
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| loop {
                let Some(case) = next.lock().unwrap().next() else { return };
                let outcome = run(case);
                results.lock().unwrap().insert(case.id.clone(), outcome);
            });
        }
    });
    let results = results.into_inner().unwrap();
    let (mut passed, mut failed, mut surprises) = (0, 0, Vec::new());
    for (id, outcome) in &results {
        match (outcome, expected.get(id)) {
            (None, None) => {
                passed += 1;
                println!("pass  {id}");
            }
            (None, Some(_)) => {
                passed += 1;
                println!("pass  {id} (listed as an expected failure: remove it from the list)");
                surprises.push(format!("{id} passes but is listed as an expected failure"));
            }
            (Some(why), Some(reason)) => {
                failed += 1;
                println!("FAIL  {id}: {why} (expected: {reason})");
            }
            (Some(why), None) => {
                failed += 1;
                println!("FAIL  {id}: {why}");
                surprises.push(format!("{id} fails: {why}"));
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    assert!(surprises.is_empty(), "{} unexpected outcomes:\n{}", surprises.len(), surprises.join("\n"));
}
