//! `host/examples/embed.rs`, the README's embedding example, run as built by
//! `cargo test`: it pauses a running guest from another thread, sees its
//! stack, resumes it, and the guest finishes with the output of a run that
//! was never paused.

use std::process::Command;

use upstare_tests::{guest, host_bin, instrument_cache, run_host};

#[test]
fn the_embedding_example_pauses_and_resumes_a_guest_invisibly() {
    let example = host_bin().with_file_name("examples").join("embed");
    assert!(example.exists(), "{} is missing: `cargo test` builds the examples", example.display());
    let compute = guest("compute");
    let args = [compute.to_str().unwrap(), "5000", "2000"];
    let out = Command::new(&example).args(args).env("UPSTARE_CACHE_DIR", instrument_cache()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let depth: usize = stdout
        .lines()
        .find_map(|l| l.strip_prefix("guest paused with ")?.strip_suffix(" frames on its stack")?.parse().ok())
        .unwrap_or_else(|| panic!("no pause reported: {stdout}"));
    assert!(depth > 1, "paused inside main: {stdout}");
    assert!(stdout.ends_with("guest exited with status 0\n"), "{stdout}");
    let plain = run_host(&["--no-instrument", args[0], args[1], args[2]]);
    let guest_lines: Vec<&str> =
        stdout.lines().filter(|l| !l.starts_with("paused ") && !l.starts_with("guest ")).collect();
    assert_eq!(guest_lines.join("\n") + "\n", String::from_utf8_lossy(&plain.stdout), "the guest's own output");
}
