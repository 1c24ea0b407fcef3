//! Exit statuses that mean one thing, for `upstare-host update` and
//! `upstare-patchgen` alike: 0 done (or safe), 1 refused (`error: update
//! refused: ...`; the old version runs on), 2 a module that cannot be used
//! at all (missing, not wasm, not built with relocations), 3 an internal
//! error, which names itself as a bug and leaves the program running.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use upstare_tests::{
    expect_error, guest, host_command, patchgen_bin, sha256_file, wait_for_path, Control,
    KillOnDrop, TempDir,
};

/// `upstare-patchgen OLD NEW`, with `env` set.
fn patchgen(old: &Path, new: &Path, env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(patchgen_bin());
    command.arg(old).arg(new);
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().expect("upstare-patchgen runs")
}

/// Modules that cannot be used at all, each with the message both commands
/// give (the host's after `error: `).
fn unusable(dir: &Path) -> Vec<(std::path::PathBuf, String)> {
    let not_wasm = dir.join("not.wasm");
    std::fs::write(&not_wasm, "hello").unwrap();
    let bare = dir.join("bare.wasm");
    std::fs::write(
        &bare,
        wat::parse_str(r#"(module (memory (export "memory") 1) (func (export "_start")))"#)
            .unwrap(),
    )
    .unwrap();
    let missing = dir.join("missing.wasm");
    vec![
        (missing.clone(), format!("cannot read {}", missing.display())),
        (not_wasm.clone(), format!("{} is not a WebAssembly module (it does not start with the `\\0asm` magic number)", not_wasm.display())),
        (bare.clone(), "the module has no `linking` section: build it with bin/upstare-cc, which links with -Wl,--emit-relocs".into()),
    ]
}

#[test]
fn patchgen_exits_0_when_safe_1_when_refused_2_for_an_unusable_module_3_for_a_bug() {
    let dir = TempDir::new("patchgen-statuses");
    let (v1, v2, v3) = (guest("relink"), guest("relink-v2"), guest("relink-v3"));
    let safe = patchgen(&v1, &v2, &[]);
    assert_eq!(safe.status.code(), Some(0), "{safe:?}");
    assert!(String::from_utf8_lossy(&safe.stdout).ends_with("verdict: safe\n"));

    let refused = patchgen(&v2, &v3, &[]);
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    let text = String::from_utf8_lossy(&refused.stdout);
    assert!(
        text.contains("refused: cannot relink: the program walks section `relink_items`"),
        "{text}"
    );
    assert!(text.ends_with("verdict: refused\n"), "{text}");

    for (path, message) in unusable(dir.0.as_path()) {
        for out in [patchgen(&v1, &path, &[]), patchgen(&path, &v1, &[])] {
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{}: {err}", path.display());
            assert!(
                err.starts_with("error: ") && err.contains(&message),
                "{}: expected {message:?} in {err}",
                path.display()
            );
            assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
        }
    }

    let bug = patchgen(&v1, &v2, &[("UPSTARE_TEST_PANIC_IN_PLAN", "1")]);
    let err = String::from_utf8_lossy(&bug.stderr);
    assert_eq!(bug.status.code(), Some(3), "{err}");
    assert!(
        err.trim_end()
            .ends_with("error: internal error (a bug in upstare-patchgen, please report it)"),
        "{err}"
    );
}

/// The relink guest under a host with a control socket, and its stdout.
fn start_relink(
    control: &Control,
    env: &[(&str, &str)],
) -> (KillOnDrop, BufReader<std::process::ChildStdout>) {
    let mut command = host_command();
    command
        .args([
            "--control",
            &control.path(),
            guest("relink").to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    for (k, v) in env {
        command.env(k, v);
    }
    let mut running = KillOnDrop::spawn(&mut command);
    let stdout = BufReader::new(running.0.stdout.take().unwrap());
    wait_for_path(Path::new(&control.path()));
    (running, stdout)
}

/// The guest prints on: a line of the given version arrives.
fn prints_on(stdout: &mut BufReader<std::process::ChildStdout>, version: &str) {
    for _ in 0..1000 {
        let mut line = String::new();
        assert!(stdout.read_line(&mut line).unwrap() > 0, "the guest ended");
        if line.starts_with(version) {
            return;
        }
    }
    panic!("no line of {version}");
}

#[test]
fn update_exits_1_for_a_refusal_2_for_an_unusable_module_and_the_program_runs_on() {
    let control = Control::new("update-statuses");
    let (mut running, mut stdout) = start_relink(&control, &[]);
    for (path, message) in unusable(control.dir()) {
        let reason = expect_error(&control.update(&path), 2);
        assert!(
            reason.contains(&message),
            "{}: expected {message:?} in {reason}",
            path.display()
        );
    }
    // A refusal found while relinking is a refusal like any other.
    let reason = expect_error(&control.update(&guest("relink-v3")), 1);
    assert!(
        reason.starts_with("update refused: cannot relink: "),
        "{reason}"
    );
    assert_eq!(control.running_version(), sha256_file(&guest("relink")));
    prints_on(&mut stdout, "v1 ");
    assert!(running.0.try_wait().unwrap().is_none());
}

/// An internal failure while preparing the update (forced, in debug
/// builds, by an environment variable the host reads for this test only)
/// is reported as a bug with status 3, not a crash: the program runs on,
/// still the old version.
#[test]
fn an_internal_error_exits_3_names_itself_a_bug_and_the_program_runs_on() {
    let control = Control::new("update-bug");
    let (mut running, mut stdout) =
        start_relink(&control, &[("UPSTARE_TEST_PANIC_IN_PREPARE", "1")]);
    let reason = expect_error(&control.update(&guest("relink-v2")), 3);
    assert_eq!(
        reason,
        "internal error (a bug in UpStare, please report it): preparing the update panicked: UPSTARE_TEST_PANIC_IN_PREPARE is set; the old version runs on"
    );
    assert_eq!(control.running_version(), sha256_file(&guest("relink")));
    prints_on(&mut stdout, "v1 ");
    assert!(
        running.0.try_wait().unwrap().is_none(),
        "the host is still running"
    );
}

/// Both commands' `--help` say what their statuses mean, in the same terms.
#[test]
fn both_helps_list_the_exit_statuses() {
    let host = upstare_tests::run_host(&["update", "--help"]);
    let patchgen = Command::new(patchgen_bin()).arg("--help").output().unwrap();
    for (name, out, statuses) in [
        (
            "update",
            &host,
            [
                "0 updated",
                "1 refused (`error: update refused: REASON`)",
                "2 bad input",
                "3 an internal error",
            ],
        ),
        (
            "patchgen",
            &patchgen,
            [
                "0 safe",
                "1 refused",
                "2 a module that cannot be used at all",
                "3 an internal error",
            ],
        ),
    ] {
        let text = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        assert!(out.status.success(), "{name}");
        for s in statuses {
            assert!(text.contains(s), "{name} --help lacks {s:?}: {text}");
        }
    }
}
