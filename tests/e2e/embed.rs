//! `host/examples/embed.rs`, the README's embedding example, run as built by
//! `cargo test`: it pauses a running guest from another thread, sees its
//! stack, resumes it, and the guest prints what a run that was never paused
//! prints.

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
    let plain = run_host(&["--no-instrument", args[0], args[1], args[2]]);
    let plain = String::from_utf8_lossy(&plain.stdout);
    let guest_lines: Vec<&str> = stdout
        .lines()
        .filter(|l| !l.starts_with("paused ") && !l.starts_with("guest ") && *l != "leaving it paused")
        .collect();
    // On a busy machine the guest may still run at the example's second
    // look (5.5 s in), which then leaves it paused: what it printed so far
    // must still be what an unpaused run prints.
    if stdout.ends_with("guest exited with status 0\n") {
        assert_eq!(guest_lines.join("\n") + "\n", plain, "the guest's own output");
    } else {
        assert!(stdout.ends_with("leaving it paused\n"), "{stdout}");
        let printed: Vec<&str> = plain.lines().take(guest_lines.len()).collect();
        assert_eq!(guest_lines, printed, "the guest's output so far");
    }
}
