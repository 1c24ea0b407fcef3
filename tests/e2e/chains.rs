//! One verdict: what `upstare-patchgen OLD NEW` says is what
//! `upstare-host update NEW` does to a program running OLD, for every
//! consecutive pair of every version chain in the repository (the examples'
//! and the test-only chains in `tests/guests/chains/`). Each update is real:
//! planned, relinked, instrumented, compiled, instantiated and rewound into
//! by the host binary. Also the relink chain itself, live: what each
//! version prints once updated.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;

use upstare_tests::{
    expect_error, guest, host_command, sha256_file, version_chains, wait_for_path, Control,
    KillOnDrop, Verdict,
};

fn patchgen(old: &str, new: &str) -> Verdict {
    Verdict::of(&guest(old), &guest(new))
}

/// The host flags and guest arguments that keep the first version of a
/// chain running long enough to be updated.
fn how_to_run(chain: &str) -> (&'static [&'static str], &'static [&'static str]) {
    match chain {
        "compute" => (&[], &["4000", "2000"]),
        "kv-server" | "poll-server" | "recv-server" | "heapgraph" | "heapsmall" | "sessions" => {
            (&["--tcplisten", "127.0.0.1:0"], &[])
        }
        "pool-server" | "prefork-server" => (&["--tcplisten", "127.0.0.1:0"], &["4"]),
        "spin" => (&[], &["2000000000"]),
        "relink" => (
            &[
                "--dir",
                concat!(env!("CARGO_MANIFEST_DIR"), "/guests/chains/relink::/data"),
            ],
            &[],
        ),
        other => panic!("add how to run the chain `{other}` to how_to_run"),
    }
}

/// A host running `version` of `chain` with a control socket.
fn start(chain: &str, version: &str, control: &Control) -> KillOnDrop {
    let (flags, args) = how_to_run(chain);
    let running = KillOnDrop::spawn(
        host_command()
            .args(["--control", &control.path()])
            .args(flags)
            .arg(guest(version))
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    wait_for_path(Path::new(&control.path()));
    running
}

/// Reasons an update may still be refused after patchgen found it safe:
/// the running program's state, which patchgen does not see (its `--help`
/// says so): frames that cannot move, pointers to a global whose type
/// changed, a heap the tracer cannot convert, and a C transformer that
/// fails, rolled back.
const DECIDED_AT_UPDATE_TIME: &[&str] = &[
    "cannot move to the new version",
    "whose type changed",
    "and it was rolled back",
    "the heap cannot be converted",
];

#[test]
fn patchgen_and_update_agree_on_every_consecutive_pair_of_every_chain() {
    let chains = version_chains();
    assert!(
        chains.iter().any(|c| c[0] == "relink"),
        "the test-only chains are found: {chains:?}"
    );
    let mut pairs = 0;
    for chain in &chains {
        for pair in chain.windows(2) {
            let (old, new) = (&pair[0], &pair[1]);
            let verdict = patchgen(old, new);
            let control = Control::new(&format!("chain-{new}"));
            let mut running = start(&chain[0], old, &control);
            // Short: a frame that cannot move is refused either way.
            let (out, _) = control.update_with_timeout(&guest(new), 300);
            let what = format!("{old} -> {new}: patchgen said {}", verdict.text);
            match verdict.status {
                Some(0) => match out.status.code() {
                    Some(0) => {
                        // Long enough for the new code to run a while: a
                        // wrong relink tends to trap at its first use.
                        std::thread::sleep(std::time::Duration::from_millis(100));
                        assert_eq!(
                            control.running_version(),
                            sha256_file(&guest(new)),
                            "{what}"
                        );
                    }
                    _ => {
                        let reason = expect_error(&out, 1);
                        assert!(
                            reason.starts_with("update refused: "),
                            "{what}; update: {reason}"
                        );
                        assert!(
                            DECIDED_AT_UPDATE_TIME.iter().any(|r| reason.contains(r)),
                            "{what}; update: {reason}"
                        );
                    }
                },
                Some(1) => {
                    assert!(!verdict.refusals.is_empty(), "{what}");
                    assert_eq!(
                        expect_error(&out, 1),
                        format!("update refused: {}", verdict.refusals.join("; ")),
                        "{what}"
                    );
                    assert_eq!(
                        control.running_version(),
                        sha256_file(&guest(old)),
                        "{what}: the old version runs on"
                    );
                }
                _ => panic!("{what}"),
            }
            assert!(
                running.0.try_wait().unwrap().is_none(),
                "{what}: the program runs on"
            );
            pairs += 1;
        }
    }
    assert!(pairs >= 13, "{pairs} pairs");
}

/// The guest's stdout, line by line.
struct Lines(BufReader<std::process::ChildStdout>);

impl Lines {
    /// The next line starting with `prefix`, skipping others (a program
    /// prints on while it is updated).
    fn next_starting(&mut self, prefix: &str) -> String {
        for _ in 0..1000 {
            let mut line = String::new();
            assert!(
                self.0.read_line(&mut line).unwrap() > 0,
                "the guest ended before printing {prefix:?}"
            );
            if line.starts_with(prefix) {
                return line.trim_end().to_string();
            }
        }
        panic!("no line starting with {prefix:?}");
    }
}

/// The `name=value` fields of one of the relink guest's lines.
fn field<'a>(line: &'a str, name: &str) -> &'a str {
    line.split(' ')
        .find_map(|f| f.strip_prefix(name).and_then(|f| f.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {name} in {line:?}"))
}

/// Version 2 pulls in libc code version 1 never had (with a constructor
/// of its own), takes the address of a function for the first time (the
/// table grows), and adds a constructor; version 3 adds an entry to a section the program walks from
/// `__start_` to `__stop_`, which cannot stay side by side with the kept
/// ones: refused, and patchgen says so in the same words; version 4 adds a
/// constructor that traps at the update: rolled back.
#[test]
fn the_relink_chain_updates_live_refuses_a_section_that_would_come_apart_and_rolls_back_a_failed_constructor(
) {
    let control = Control::new("relink-live");
    let mut running = KillOnDrop::spawn(
        host_command()
            .args(["--control", &control.path()])
            .args(how_to_run("relink").0)
            .arg(guest("relink"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    );
    let mut lines = Lines(BufReader::new(running.0.stdout.take().unwrap()));
    let first = lines.next_starting("v1 ");
    assert_eq!(
        (
            field(&first, "items"),
            field(&first, "weak"),
            field(&first, "constructed")
        ),
        ("11", "3", "1"),
        "{first}"
    );
    wait_for_path(Path::new(&control.path()));

    let out = control.update(&guest("relink-v2"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last_v1: i64 = {
        let mut last = first.clone();
        loop {
            let line = lines.next_starting("v");
            if line.starts_with("v2 ") {
                let counter: i64 = field(&line, "counter").parse().unwrap();
                let before: i64 = field(&last, "counter").parse().unwrap();
                assert_eq!(
                    counter,
                    before + 1,
                    "the counter carries on: {last} then {line}"
                );
                let tls: i64 = field(&line, "tls").parse().unwrap();
                assert_eq!(
                    tls,
                    field(&last, "tls").parse::<i64>().unwrap() + 1,
                    "so does the thread-local: {last} then {line}"
                );
                // The walked section is the same, the weak symbols are still
                // null, the function whose address v2 takes first is called
                // through its new slot. Of the constructors, v1's ran once,
                // when it started, and the ones v2 adds once, at the update:
                // its own, and wasi-libc's, which v1 did not link, so v2
                // finds the preopened directory.
                assert_eq!(field(&line, "items"), "11", "{line}");
                assert_eq!(field(&line, "weak"), "3", "{line}");
                assert_eq!(field(&line, "constructed"), "1,1", "{line}");
                assert_eq!(field(&line, "twice"), (2 * counter).to_string(), "{line}");
                assert_eq!(field(&line, "file"), "1", "{line}");
                break counter;
            }
            last = line;
        }
    };
    assert!(last_v1 > 0);

    let reason = expect_error(&control.update(&guest("relink-v3")), 1);
    let expected = "update refused: cannot relink: the program walks section `relink_items` from `__start_relink_items` to `__stop_relink_items`, but its objects would not stay side by side: some keep their running address and others go to fresh memory (keep the section's entries the same, or add new entries only in a new section)";
    assert_eq!(reason, expected);
    let verdict = patchgen("relink-v2", "relink-v3");
    assert_eq!(verdict.status, Some(1), "{}", verdict.text);
    assert_eq!(
        verdict.refusals,
        [expected.strip_prefix("update refused: ").unwrap()]
    );
    let line = lines.next_starting("v2 ");
    assert_eq!(field(&line, "items"), "11", "v2 runs on: {line}");

    // A constructor the new version adds traps when it runs at the update:
    // rolled back, and v2 runs on with its state as it was.
    let reason = expect_error(&control.update(&guest("relink-v4")), 1);
    assert!(
        reason.starts_with("update refused: applying it failed and it was rolled back: constructor `construct_v4` failed: "),
        "{reason}"
    );
    assert!(reason.ends_with("; the old version runs on"), "{reason}");
    let before = lines.next_starting("v2 ");
    let after = lines.next_starting("v2 ");
    assert_eq!(
        field(&after, "counter").parse::<i64>().unwrap(),
        field(&before, "counter").parse::<i64>().unwrap() + 1,
        "{before} then {after}"
    );
    assert_eq!(field(&after, "constructed"), "1,1", "{after}");
}
