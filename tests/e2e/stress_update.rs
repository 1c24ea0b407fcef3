//! Updates at update points the host picks: `--stress-update N` updates a
//! program onto its own module at every Nth point with every function
//! treated as changed (each frame moves by what its values mean), and
//! `--update-at K:MODULE` updates it once, at its Kth point, to the same
//! source built at another optimisation level. Either way the program must
//! print what an uninterrupted run prints; the host's summary says how many
//! points moved, retreated or waited, and why.

use std::process::{Command, Output, Stdio};

use upstare_tests::{csmith, guest, host_command, Control, Server, TempDir};

/// The counts of a `--stress-update` or `--update-at` summary line.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    points: u64,
    moved: u64,
    retreated: u64,
    waited: u64,
    refused: u64,
}

impl Tally {
    fn applied(&self) -> u64 {
        self.moved + self.retreated
    }

    /// `P points: M moved, R retreated, W waited, F refused`, anywhere in
    /// `text`, after `option`.
    fn parse(text: &str, option: &str) -> Tally {
        let line = text
            .lines()
            .find(|l| l.contains(option) && l.contains(" points: "))
            .unwrap_or_else(|| panic!("no {option} summary in {text:?}"));
        let numbers = |text: &str| -> Vec<u64> {
            text.split(|c: char| !c.is_ascii_digit()).filter(|w| !w.is_empty()).map(|w| w.parse().unwrap()).collect()
        };
        let at = line.find(" points: ").unwrap();
        let (before, after) = (numbers(&line[..at]), numbers(&line[at..]));
        let (Some(&points), &[moved, retreated, waited, refused]) = (before.last(), after.as_slice()) else {
            panic!("cannot read the counts of {line:?}");
        };
        let tally = Tally { points, moved, retreated, waited, refused };
        assert_eq!(points, moved + retreated + waited + refused, "{line}");
        tally
    }
}

/// Runs the host with `args`, the guest's stdout going to a file (a write
/// to a file does not wait, unlike one to a pipe: an update's checked
/// rewind must not make it happen twice); returns the output with that
/// file's content as stdout.
fn run_to_file(args: &[&str]) -> Output {
    run_to_file_within(args, None).expect("no limit, so the run ends")
}

/// [`run_to_file`], or `None` if the program is still running after
/// `limit`, if any (it is killed then).
fn run_to_file_within(args: &[&str], limit: Option<std::time::Duration>) -> Option<Output> {
    let dir = TempDir::new("stress-update-out");
    let path = dir.0.join("stdout");
    let file = std::fs::File::create(&path).unwrap();
    let mut child = host_command().args(args).stdout(file).stderr(Stdio::piped()).spawn().expect("upstare-host runs");
    // Without a limit, waiting reads stderr as it comes, so a chatty
    // program never fills the pipe.
    if let Some(limit) = limit {
        let deadline = std::time::Instant::now() + limit;
        while child.try_wait().unwrap().is_none() {
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    let mut out = child.wait_with_output().unwrap();
    out.stdout = std::fs::read(&path).unwrap();
    Some(out)
}

/// How many update points a random program may reach to be one of the
/// tests'.
const MAX_POINTS: u64 = 20_000;

/// How long a random program may run as it is to be one of the tests'.
const PLAIN_RUN_LIMIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Asserts the run succeeded and printed `expected`; returns its summary.
fn same_output(out: &Output, expected: &[u8], option: &str, what: &str) -> Tally {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{what}: {stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(expected), "{what}: {stderr}");
    Tally::parse(&stderr, option)
}

const PERIODS: [&str; 2] = ["1", "13"];

#[test]
fn example_programs_updated_onto_themselves_at_every_nth_point_print_what_a_plain_run_prints() {
    let files_dir = TempDir::new("stress-update-files");
    let files_spec = format!("{}::/data", files_dir.0.display());
    let programs: Vec<(&str, Vec<&str>)> = vec![
        ("compute", vec!["1", "10"]),
        ("recurse", vec!["16"]),
        ("switchvm", vec!["1"]),
        ("files", vec!["--dir", &files_spec, "--env", "GREETING=hi"]),
    ];
    for (name, args) in &programs {
        let wasm = guest(name);
        let (options, guest_args): (Vec<&str>, Vec<&str>) = match *name {
            "files" => (args.clone(), vec!["/data", "x y"]),
            _ => (vec![], args.clone()),
        };
        let run = |extra: &[&str]| {
            // The files guest creates and renames files: each run starts
            // from an empty directory.
            for entry in std::fs::read_dir(&files_dir.0).unwrap() {
                let path = entry.unwrap().path();
                let _ = std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
            }
            run_to_file(&[extra, &options, &[wasm.to_str().unwrap()], &guest_args].concat())
        };
        let plain = run(&["--no-instrument"]);
        assert!(plain.status.success(), "{name}: {}", String::from_utf8_lossy(&plain.stderr));
        for n in PERIODS {
            let tally = same_output(&run(&["--stress-update", n]), &plain.stdout, "--stress-update", &format!("{name}, N={n}"));
            assert!(tally.points > 10, "{name}, N={n}: {tally:?}");
            // The code is the same, so the rules for changed code find
            // every value: a point that waits is a gap in them.
            assert_eq!(tally.applied(), tally.points, "{name}, N={n}: {tally:?}");
        }
    }
}

/// bzip2 and LZ4 from the C sources their crates bundle, updated onto
/// themselves every 97th and 997th point (their loops reach hundreds of
/// thousands of points on a few KiB): every frame moves by the rules for
/// changed code, and what they print is what they print as is.
#[test]
fn bzip2_and_lz4_updated_onto_themselves_at_every_nth_point_print_what_they_print_as_is() {
    let wasm = upstare_tests::releases::compress_workload();
    let wasm = wasm.to_str().unwrap();
    let plain = run_to_file(&["--no-instrument", wasm, "2", "8"]);
    assert!(plain.status.success(), "{}", String::from_utf8_lossy(&plain.stderr));
    for n in ["97", "997"] {
        let tally = same_output(&run_to_file(&["--stress-update", n, wasm, "2", "8"]), &plain.stdout, "--stress-update", &format!("N={n}"));
        assert!(tally.points > 100, "N={n}: {tally:?}");
        assert_eq!(tally.applied(), tally.points, "N={n}: {tally:?}");
    }
}

#[test]
fn servers_updated_onto_themselves_at_every_nth_point_serve_their_clients() {
    for n in PERIODS {
        let (mut kv, first) = Server::start(&guest("kv-server"), &["--stress-update", n], &[]);
        assert!(first.starts_with("kv: listening"), "N={n}: {first}");
        let (mut a, mut b) = (kv.client(), kv.client());
        for i in 0..30 {
            assert_eq!(a.request(&format!("SET key{i} value {i}")), "OK", "N={n}");
            assert_eq!(b.request(&format!("GET key{i}")), format!("VALUE value {i}"), "N={n}");
        }
        assert_eq!(b.request("COUNT"), "COUNT 30", "N={n}");
        assert_eq!(b.request("SHUTDOWN"), "BYE", "N={n}");
        assert_eq!(kv.wait(), Some(0), "N={n}: {}", kv.stderr());
        let tally = Tally::parse(&kv.stderr(), "--stress-update");
        assert!(tally.applied() >= 60 / n.parse::<u64>().unwrap(), "N={n}: {tally:?}");

        // The poll server never exits: `status` tells how its updates went.
        let control = Control::new("stress-update-poll");
        let (poll, first) = Server::start(&guest("poll-server"), &["--control", &control.path(), "--stress-update", n], &[]);
        assert!(first.contains("listening"), "N={n}: {first}");
        let mut c = poll.client();
        for i in 1..=20 {
            assert!(c.request("PING").starts_with("PONG"), "N={n}");
            assert_eq!(c.request("INCR"), format!("COUNT {i}"), "N={n}");
        }
        let tally = Tally::parse(&control.status(), "stress updates");
        assert!(tally.applied() >= 40 / n.parse::<u64>().unwrap(), "N={n}: {tally:?}");
        // Its own updates would go behind the stress mode's back.
        let refused = control.update(&guest("poll-server-v2"));
        assert_eq!(refused.status.code(), Some(1), "N={n}");
        assert_eq!(
            String::from_utf8_lossy(&refused.stderr).trim(),
            "error: update refused: the program runs with --stress-update or --update-at, which make updates of their own"
        );
        assert!(c.request("PING").starts_with("PONG v1"), "N={n}");
    }
}

/// How many random programs each test runs.
const PROGRAMS: usize = 30;

/// The first `count` random programs (seeds from 1 up) that a plain run
/// finishes quickly, and that reach at most [`MAX_POINTS`] update points:
/// a program csmith makes may run for minutes, or trap without
/// instrumentation too, and says nothing about updates then. Each with its
/// plain output.
fn random_programs(dir: &std::path::Path, count: usize) -> Vec<(u32, std::path::PathBuf, Vec<u8>)> {
    let mut programs = Vec::new();
    for seed in 1..=(count as u32 * 3) {
        if programs.len() == count {
            break;
        }
        let source = csmith::source(seed, dir);
        let wasm = csmith::build(&source, "-O2");
        let plain = run_to_file_within(&["--no-instrument", wasm.to_str().unwrap()], Some(PLAIN_RUN_LIMIT));
        let Some(plain) = plain.filter(|p| p.status.success() && String::from_utf8_lossy(&p.stdout).contains("checksum = ")) else {
            continue;
        };
        // A program that reaches very many update points makes as many
        // updates at N=1: leave it to runs by hand.
        let paused = run_to_file_within(&["--stress-pause", "1", wasm.to_str().unwrap()], Some(PLAIN_RUN_LIMIT));
        let unwinds = paused.and_then(|p| {
            let stderr = String::from_utf8_lossy(&p.stderr).to_string();
            let line = stderr.lines().find(|l| l.contains("unwound and rewound"))?.to_string();
            line.split_whitespace().rev().nth(1)?.parse::<u64>().ok()
        });
        if unwinds.is_some_and(|n| n <= MAX_POINTS) {
            programs.push((seed, source, plain.stdout));
        }
    }
    assert_eq!(programs.len(), count, "too few random programs finish a plain run");
    programs
}

#[test]
fn random_programs_updated_onto_themselves_at_every_nth_point_keep_their_checksum() {
    let dir = TempDir::new("stress-update-csmith");
    let mut total = Tally::default();
    for (seed, source, plain) in random_programs(&dir.0, PROGRAMS) {
        let wasm = source.with_extension("O2.wasm");
        let wasm = wasm.to_str().unwrap();
        for n in PERIODS {
            let tally = same_output(&run_to_file(&["--stress-update", n, wasm]), &plain, "--stress-update", &format!("seed {seed}, N={n}"));
            total.points += tally.points;
            total.moved += tally.moved;
            total.retreated += tally.retreated;
            total.waited += tally.waited;
            total.refused += tally.refused;
        }
    }
    println!("{PROGRAMS} csmith programs, --stress-update 1 and 13: {total:?}");
    assert!(total.applied() * 100 >= total.points * 95, "{total:?}");
}

/// Each program built at `-O2` is updated at several of its update points
/// to the same source built at `-O1` and at `-Os`: every function's code
/// differs, its meaning does not. Every update that applies must leave the
/// checksum of an uninterrupted run; one that does not says why. The same
/// `-O2` build under another name, whose functions are all unchanged, must
/// apply at every point: the path an applied update takes is exercised
/// whatever the share of the other builds.
#[test]
fn random_programs_updated_mid_run_to_another_optimisation_level_keep_their_checksum() {
    let dir = TempDir::new("update-at-csmith");
    // Per target build: (tried, applied, applied past the first point).
    let mut share: std::collections::BTreeMap<&str, (u64, u64, u64)> = Default::default();
    for (seed, source, plain) in random_programs(&dir.0, 6) {
        let o2 = source.with_extension("O2.wasm");
        // How many points a run reaches: the updates go at spread-out ones.
        let points = same_output(&run_to_file(&["--stress-update", "1", o2.to_str().unwrap()]), &plain, "--stress-update", &format!("seed {seed}")).points;
        let again = source.with_extension("O2-again.wasm");
        std::fs::copy(&o2, &again).unwrap();
        for opt in ["-O2 again", "-O1", "-Os"] {
            let other = match opt {
                "-O2 again" => again.clone(),
                _ => csmith::build(&source, opt),
            };
            for k in std::iter::once(1).chain((1..6).map(|i| points * i / 6)).filter(|&k| k >= 1) {
                let spec = format!("{k}:{}", other.display());
                let out = run_to_file(&["--update-at", &spec, o2.to_str().unwrap()]);
                let what = format!("seed {seed}, {opt} at point {k} of {points}");
                let tally = same_output(&out, &plain, "--update-at", &what);
                assert_eq!(tally.points, 1, "{what}");
                let counts = share.entry(opt).or_default();
                counts.0 += 1;
                if tally.applied() == 1 {
                    counts.1 += 1;
                    counts.2 += u64::from(k > 1);
                } else {
                    assert_ne!(opt, "-O2 again", "{what}: the same code must move: {}", String::from_utf8_lossy(&out.stderr));
                    // A refusal or a wait names the function, the point and
                    // the reason.
                    let stderr = String::from_utf8_lossy(&out.stderr);
                    assert!(stderr.contains("  1 x `"), "{what}: no reason given: {stderr}");
                }
            }
        }
    }
    for (opt, (tried, applied, past_start)) in &share {
        println!("csmith -O2 to {opt} mid-run: {applied} of {tried} updates applied ({past_start} past the first point)");
    }
}

/// `--update-at` checks its module before the program starts.
#[test]
fn update_at_a_module_that_is_not_there_is_bad_input() {
    let out = Command::new(upstare_tests::host_bin())
        .args(["run", "--update-at", "5:/nonexistent/next.wasm"])
        .arg(guest("compute"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("error: --update-at: cannot read /nonexistent/next.wasm"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}
