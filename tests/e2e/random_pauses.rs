//! Real pauses, as an update or a checkpoint makes them, at moments no
//! guest loop can keep in step with: the guest, instrumented as
//! `upstare-host` runs it (not the stress variant), is paused hundreds of
//! times and resumed each time, and must print exactly what its
//! uninstrumented module prints. Bodies with nested blocks have two copies
//! (one a rewind enters, one for normal calls); these pauses land in both,
//! and every resume continues in the first. Lua's interpreter, which
//! nobody here wrote, recurses through hundreds of functions, of which only
//! a feedback set checks its entry; the pauses land at those too.

use std::path::{Path, PathBuf};
use std::time::Duration;

use upstare_host::{new_engine, Exit, Guest, GuestConfig, GuestModule, LoadOptions, Stdio};
use upstare_tests::random_pauses::{pause_at_random, RandomPauses};
use upstare_tests::{guest, instrumented, TempDir};

/// At least this many pauses must land before the guest ends, or the test
/// proves nothing. (Alone on this machine each guest meets hundreds; tests
/// running beside it on two cores take most of them away.)
const MIN_PAUSES: usize = 20;

/// A guest that neither pauses nor ends within this long after a request
/// has broken the pause bound (or its rewind): the test fails rather than
/// hang.
const PAUSE_DEADLINE: Duration = Duration::from_secs(30);

fn config(args: &[&str], stdout: &Path) -> GuestConfig {
    let mut config = GuestConfig::new(args.iter().map(|s| s.to_string()).collect());
    config.stdout = Stdio::Fd(std::fs::File::create(stdout).unwrap().into());
    config
}

/// Runs the guest `name` at `wasm` with `args` as is, then instrumented
/// under random pauses, and compares what the two print.
fn same_under_random_pauses(name: &str, wasm: PathBuf, args: &[&str]) {
    let dir = TempDir::new(&format!("random-pauses-{name}"));
    let engine = new_engine().unwrap();
    let as_is = LoadOptions { instrument: false, ..LoadOptions::default() };
    let plain = GuestModule::load_with(&engine, &wasm, &as_is).unwrap();
    let expected_out = dir.0.join("plain.txt");
    let exit = Guest::new(&engine, &plain, config(args, &expected_out)).unwrap().run();
    assert!(matches!(exit, Exit::Status(0)), "{name} as is: {exit:?}");

    let module = GuestModule::load_with(&engine, &wasm, &instrumented()).unwrap();
    let out = dir.0.join("paused.txt");
    let g = Guest::new(&engine, &module, config(args, &out)).unwrap();
    let RandomPauses { exit, times, unwind_only } = pause_at_random(g, 100..500, PAUSE_DEADLINE);
    let pauses = times.len();
    assert!(matches!(exit, Exit::Status(0)), "{name} under pauses: {exit:?}");
    assert!(pauses >= MIN_PAUSES, "{name} ended after {pauses} pauses; give it more work");
    // Loaded without the code that rewinds, it took it on at its first resume.
    assert_eq!(unwind_only, [true, false], "{name}: the variant it ran at its start and at its end");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), std::fs::read_to_string(&expected_out).unwrap(), "{name} after {pauses} pauses");
}

#[test]
fn the_switch_interpreter_paused_at_random_moments_prints_what_it_prints_as_is() {
    same_under_random_pauses("switchvm", guest("switchvm"), &["switchvm", "10000"]);
}

#[test]
fn compute_paused_at_random_moments_prints_what_it_prints_as_is() {
    same_under_random_pauses("compute", guest("compute"), &["compute", "2000", "200"]);
}

/// bzip2 and LZ4, from the C sources their crates bundle: sorting and
/// hashing loops nobody here wrote.
#[test]
fn bzip2_and_lz4_paused_at_random_moments_print_what_they_print_as_is() {
    same_under_random_pauses("compress", upstare_tests::releases::compress_workload(), &["compress", "16", "128"]);
}

#[test]
fn lua_paused_at_random_moments_prints_what_it_prints_as_is() {
    same_under_random_pauses("lua", upstare_tests::releases::lua_workload(), &["lua", "15"]);
}
