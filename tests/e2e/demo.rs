//! `scripts/live-update`, the README's demonstration, run as a user runs it
//! (with the binaries and guests this suite built): it succeeds when every
//! reply is right, and fails with the wrong reply named when one is not.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use upstare_tests::{guest, host_bin, instrument_cache, TempDir};

fn live_update(guests: &Path) -> Output {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/live-update");
    Command::new(script)
        .arg("127.0.0.1:0")
        .env("UPSTARE_HOST", host_bin())
        .env("UPSTARE_GUESTS", guests)
        .env("UPSTARE_CACHE_DIR", instrument_cache())
        .output()
        .expect("scripts/live-update runs")
}

#[test]
fn the_live_update_demonstration_passes_its_own_checks() {
    let guests = guest("kv-server").parent().unwrap().to_path_buf();
    let out = live_update(&guests);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}{stderr}");
    assert_eq!(stdout.matches("\nupdated to ").count(), 2, "{stdout}");
    assert!(stdout.contains("server> VALUE hello world"), "{stdout}");
    assert!(stdout.contains("; 0 failed\n"), "{stdout}");
}

/// A "v2" that is v1 again: the update goes through, but STATS is still
/// unknown, and the script must say so and fail.
#[test]
fn the_live_update_demonstration_fails_on_a_wrong_reply() {
    let dir = TempDir::new("live-update-wrong");
    for (name, from) in [("kv-server", "kv-server"), ("kv-server-v2", "kv-server"), ("kv-server-v3", "kv-server-v3")] {
        std::fs::copy(guest(from), dir.0.join(format!("{name}.wasm"))).unwrap();
    }
    let out = live_update(&dir.0);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with("live-update: 'STATS' got 'ERROR unknown command', expected 'STATS requests="),
        "{stderr}"
    );
}
