//! Random C programs nobody here wrote (Debian's `csmith`), built with
//! `bin/upstare-cc`, print the same checksum as they are
//! (`--no-instrument`), instrumented, and unwound and rewound at every
//! first and every seventh update point (`--stress-pause 1` and `7`).
//!
//! A fixed handful of seeds runs by default, each built at `-O2` (the
//! documented level), `-Os` and `-O0`, since the programs users bring are
//! built every way; `UPSTARE_CSMITH_SEEDS=FIRST..LAST` runs that range
//! instead, by hand, at `-O2` or at the level `UPSTARE_CSMITH_OPT` names
//! (`-O0`, `-O3`, ...). At `-O0` a program crosses an update point every
//! few instructions, so `--stress-pause 1` can take thousands of times its
//! plain run (seed 50: 0.34 s as is, 136 s at `--stress-pause 7`). csmith's programs may run for a long
//! time, and a few trap (clang turns some undefined behaviour into
//! `unreachable`); the default seeds each finish in well under a second,
//! and a seed of a hand-picked range whose plain run passes the time limit
//! or traps is reported and passed over (it says nothing about the
//! instrumentation).

use std::process::Stdio;
use std::time::{Duration, Instant};

use upstare_tests::{csmith, host_command, KillOnDrop, TempDir};

/// Seeds whose programs run in well under a second here.
const DEFAULT_SEEDS: std::ops::RangeInclusive<u64> = 1..=8;

/// How long one plain run of a hand-picked seed may take.
const PLAIN_LIMIT: Duration = Duration::from_secs(10);

fn seeds() -> std::ops::RangeInclusive<u64> {
    let Some(spec) = std::env::var_os("UPSTARE_CSMITH_SEEDS") else {
        return DEFAULT_SEEDS;
    };
    let spec = spec.to_string_lossy().into_owned();
    let parse = |s: &str| {
        s.trim()
            .parse::<u64>()
            .unwrap_or_else(|_| panic!("UPSTARE_CSMITH_SEEDS={spec}: expected FIRST..LAST"))
    };
    match spec.split_once("..") {
        Some((a, b)) => parse(a)..=parse(b),
        None => parse(&spec)..=parse(&spec),
    }
}

/// The optimisation flags the programs are built with.
fn opt_levels(hand_picked: bool) -> Vec<String> {
    match std::env::var("UPSTARE_CSMITH_OPT") {
        Ok(opt) => {
            assert!(opt.starts_with("-O"), "UPSTARE_CSMITH_OPT={opt}: expected an -O flag such as -O0 or -Os");
            vec![opt]
        }
        Err(_) if hand_picked => vec!["-O2".into()],
        Err(_) => ["-O2", "-Os", "-O0"].map(String::from).to_vec(),
    }
}

/// How a run of `upstare-host` ended.
enum Ran {
    /// It exited with success, printing this.
    Printed(String),
    /// It failed, saying this on stderr.
    Failed(String),
    /// It ran out of time and was killed.
    OutOfTime,
}

/// Runs `upstare-host ARGS`, killed after `limit`.
fn run_limited(args: &[&str], limit: Duration) -> Ran {
    let mut cmd = host_command();
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = KillOnDrop::spawn(&mut cmd);
    let start = Instant::now();
    loop {
        if let Some(status) = child.0.try_wait().expect("wait for upstare-host") {
            let mut out = String::new();
            let mut err = String::new();
            use std::io::Read;
            child
                .0
                .stdout
                .take()
                .expect("stdout")
                .read_to_string(&mut out)
                .expect("read stdout");
            child
                .0
                .stderr
                .take()
                .expect("stderr")
                .read_to_string(&mut err)
                .expect("read stderr");
            return match status.success() {
                true => Ran::Printed(out),
                false => Ran::Failed(format!("upstare-host {args:?} failed ({status}): {err}")),
            };
        }
        if start.elapsed() > limit {
            return Ran::OutOfTime;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn random_csmith_programs_print_the_same_checksum_instrumented_and_under_stress() {
    let dir = TempDir::new("csmith");
    let hand_picked = std::env::var_os("UPSTARE_CSMITH_SEEDS").is_some();
    let levels = opt_levels(hand_picked);
    let mut checked = 0;
    for seed in seeds() {
        let src = csmith::generate(seed as u32, &dir.0, &[]);
        for opt in &levels {
            let wasm = csmith::build(&src, opt);
            if check(seed, opt, wasm.to_str().expect("utf-8 path"), hand_picked) {
                checked += 1;
            }
        }
    }
    assert!(checked > 0, "no seed was checked");
}

/// Runs the program built from `seed` at `opt` as is, instrumented and
/// under stress, and asserts the outputs agree. Returns whether it was
/// checked: a hand-picked seed that fails or runs too long as is is
/// reported and passed over.
fn check(seed: u64, opt: &str, wasm: &str, hand_picked: bool) -> bool {
    let limit = if hand_picked {
        PLAIN_LIMIT
    } else {
        Duration::from_secs(60)
    };
    let plain = match run_limited(&["run", "--no-instrument", wasm], limit) {
        Ran::Printed(out) => out,
        Ran::Failed(why) => {
            assert!(hand_picked, "seed {seed} {opt} as is: {why}");
            eprintln!("seed {seed} {opt}: fails as is, passed over: {}", why.lines().next().unwrap_or_default());
            return false;
        }
        Ran::OutOfTime => {
            assert!(hand_picked, "seed {seed} {opt} ran longer than {limit:?} as is");
            eprintln!("seed {seed} {opt}: runs longer than {limit:?} as is, passed over");
            return false;
        }
    };
    assert!(
        plain.contains("checksum = "),
        "seed {seed} {opt} printed no checksum: {plain:?}"
    );
    // Instrumented and stressed runs may be much slower, never wrong.
    let slow = Duration::from_secs(600);
    for mode in [
        &[][..],
        &["--stress-pause", "1"][..],
        &["--stress-pause", "7"][..],
    ] {
        let args: Vec<&str> = ["run"]
            .iter()
            .copied()
            .chain(mode.iter().copied())
            .chain([wasm])
            .collect();
        let out = match run_limited(&args, slow) {
            Ran::Printed(out) => out,
            Ran::Failed(why) => panic!("seed {seed} {opt} {mode:?}: {why}"),
            Ran::OutOfTime => panic!("seed {seed} {opt} {mode:?}: no end in {slow:?}"),
        };
        assert_eq!(
            out, plain,
            "seed {seed} {opt} {mode:?}: output differs from the run as is"
        );
    }
    true
}
