//! Every example guest behaves the same when its whole stack is unwound and
//! rewound at every Nth update point (`upstare-host run --stress-pause N`)
//! as when it runs uninstrumented: the unwind/rewind machinery is invisible
//! to the program. N = 1 unwinds at every loop header and blocking call.

use upstare_tests::{guest, run_host, Server, TempDir};

const PERIODS: [u32; 3] = [1, 7, 1000];

/// The number of unwinds the host reported, from its stderr.
pub(crate) fn unwinds(stderr: &str) -> u64 {
    let line = stderr
        .lines()
        .find(|l| l.contains("--stress-pause"))
        .unwrap_or_else(|| panic!("no stress summary in {stderr:?}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "times").expect("summary ends with `N times`");
    words[at - 1].parse().unwrap()
}

#[test]
fn compute_under_stress_prints_what_a_plain_run_prints() {
    let compute = guest("compute");
    let compute = compute.to_str().unwrap();
    for n in PERIODS {
        // Unwinding costs time in the stack depth; at small periods a short
        // workload keeps the test quick while still unwinding deep stacks.
        let args: &[&str] = if n < 100 { &["2", "60"] } else { &[] };
        let plain = run_host(&[&["--no-instrument", compute], args].concat());
        assert!(plain.status.success());
        let n_str = n.to_string();
        let stressed = run_host(&[&["--stress-pause", n_str.as_str(), compute], args].concat());
        let stderr = String::from_utf8_lossy(&stressed.stderr);
        assert!(stressed.status.success(), "N={n}: {stderr}");
        assert_eq!(
            String::from_utf8_lossy(&stressed.stdout),
            String::from_utf8_lossy(&plain.stdout),
            "N={n}: output differs"
        );
        assert!(unwinds(&stderr) > 10, "N={n}: too few unwinds: {stderr}");
    }
}

#[test]
fn files_under_stress_prints_what_a_plain_run_prints() {
    let files = guest("files");
    let files = files.to_str().unwrap();
    let run = |extra: &[&str]| {
        // A fresh directory each time: the guest creates and renames files.
        let dir = TempDir::new("stress-files");
        let spec = format!("{}::/data", dir.0.display());
        let args = [extra, &["--dir", &spec, "--env", "GREETING=hi", files, "/data", "x y"]].concat();
        run_host(&args)
    };
    let plain = run(&["--no-instrument"]);
    assert!(plain.status.success());
    for n in PERIODS {
        let n_str = n.to_string();
        let stressed = run(&["--stress-pause", &n_str]);
        let stderr = String::from_utf8_lossy(&stressed.stderr);
        assert!(stressed.status.success(), "N={n}: {stderr}");
        assert_eq!(String::from_utf8_lossy(&stressed.stdout), String::from_utf8_lossy(&plain.stdout), "N={n}");
        assert!(unwinds(&stderr) > 0, "N={n}: no unwind happened: {stderr}");
    }
}

/// Requests in one run of the kv stress test: each waits for its own
/// poll() wake-up, an update point, so the unwinds are at least this many
/// over N.
const KV_REQUESTS: u64 = 50 * 2 + 50 + 2;

#[test]
fn kv_server_under_stress_serves_clients_correctly() {
    for n in PERIODS {
        let n_str = n.to_string();
        let (mut server, first) = Server::start(&guest("kv-server"), &["--stress-pause", &n_str], &[]);
        assert!(first.starts_with("kv: listening"), "N={n}: {first}");
        let mut a = server.client();
        let mut b = server.client();
        for i in 0..50 {
            assert_eq!(a.request(&format!("SET key{i} value {i}")), "OK", "N={n}");
            assert_eq!(b.request(&format!("GET key{i}")), format!("VALUE value {i}"), "N={n}");
        }
        // Pipelined: many requests in flight across several polls.
        for i in 0..50 {
            a.send(&format!("DEL key{i}"));
        }
        for _ in 0..50 {
            assert_eq!(a.read_line(), "DELETED", "N={n}");
        }
        assert_eq!(b.request("COUNT"), "COUNT 0", "N={n}");
        assert_eq!(a.request("QUIT"), "BYE", "N={n}");
        // The summary comes when the program ends, so end it cleanly.
        assert_eq!(b.request("SHUTDOWN"), "BYE", "N={n}");
        assert_eq!(server.wait(), Some(0), "N={n}: {}", server.stderr());
        assert_eq!(server.remaining_output(), "kv: shutdown\n", "N={n}");
        let stderr = server.stderr();
        let count = unwinds(&stderr);
        assert!(count >= (KV_REQUESTS / u64::from(n)).max(1), "N={n}: {count} unwinds: {stderr}");
    }
}

/// Recursion without any loop reaches an update point too: the entry of
/// every function on a call cycle is one, so a program deep in such a
/// computation pauses, and its result is unchanged.
#[test]
fn recursion_without_loops_is_paused_and_resumed() {
    let rec = guest("recurse");
    let rec = rec.to_str().unwrap();
    let plain = run_host(&["--no-instrument", rec, "22"]);
    assert!(plain.status.success());
    for n in PERIODS {
        let n_str = n.to_string();
        let stressed = run_host(&["--stress-pause", &n_str, rec, "22"]);
        let stderr = String::from_utf8_lossy(&stressed.stderr);
        assert!(stressed.status.success(), "N={n}: {stderr}");
        assert_eq!(stressed.stdout, plain.stdout, "N={n}");
        assert!(unwinds(&stderr) > 10, "N={n}: {stderr}");
    }
}

/// An interpreter whose `switch` cases each call a helper that can unwind:
/// the rewind of its block nest goes through one dispatch that branches out
/// to the right case, and the output is unchanged at every period.
#[test]
fn switch_interpreter_under_stress_prints_what_a_plain_run_prints() {
    let vm = guest("switchvm");
    let vm = vm.to_str().unwrap();
    let plain = run_host(&["--no-instrument", vm, "3"]);
    assert!(plain.status.success());
    assert_eq!(String::from_utf8_lossy(&plain.stdout).lines().count(), 3);
    for n in [1u32, 7] {
        let n_str = n.to_string();
        let stressed = run_host(&["--stress-pause", &n_str, vm, "3"]);
        let stderr = String::from_utf8_lossy(&stressed.stderr);
        assert!(stressed.status.success(), "N={n}: {stderr}");
        assert_eq!(String::from_utf8_lossy(&stressed.stdout), String::from_utf8_lossy(&plain.stdout), "N={n}");
        assert!(unwinds(&stderr) > 1000, "N={n}: too few unwinds: {stderr}");
    }
}
