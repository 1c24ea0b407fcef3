//! Real releases of programs nobody here wrote, updated live: a key-value
//! server embedding SQLite, built against consecutive SQLite releases, and
//! one keeping its values compressed with zstd, built against consecutive
//! zstd releases (`upstare_tests::releases`). The server's own code is the
//! same in every build, and no build carries a line of update code: each
//! step updates a running release to the next while clients keep writing
//! and reading, and every row must be kept. A step that cannot be applied
//! must be refused by `update` with the words `upstare-patchgen` prints (or,
//! where only the running heap can tell, by `update` alone), and the old
//! release must serve on: the releases that change a type of the library's
//! objects in a way no automatic mapping carries (a union over SQLite's
//! `struct Index`, `struct sqlite3` and `struct Parse`; a member of zstd's
//! compression context, for a server that keeps one on the heap), named in
//! the refusal. `docs/RELEASES.md` records each step's plan and report; run
//! with `--nocapture` to print them.

use std::path::PathBuf;

use upstare_tests::releases::Program;
use upstare_tests::{expect_error, expect_report, sha256_file, Control, Load, Server, Verdict};

use crate::update::seed;

/// What a step must do.
enum Step {
    /// Applied, under load.
    Applied,
    /// Refused by the plan (`upstare-patchgen` says the same), with a
    /// reason containing this.
    Refused(&'static str),
    /// Planned as safe, then refused by `update` when it traced the
    /// running program's heap, with a reason containing this.
    RefusedOnTheHeap(&'static str),
}

/// A release running under load.
struct Running {
    release: usize,
    server: Server,
    control: Control,
    load: Load,
    seeded: Vec<(String, String)>,
}

impl Running {
    fn start(program: Program, releases: &[&str], guests: &[PathBuf], release: usize) -> Self {
        let name = format!("{}-{}", program.name(), releases[release]);
        let control = Control::new(&format!("release-{name}"));
        let (server, first) = Server::start(&guests[release], &["--control", &control.path()], &[]);
        assert!(first.contains(releases[release]) && first.contains("listening on fd 3"), "{name} starts: {first}");
        let seeded = seed(server.port, "row", 200);
        let load = Load::start(server.port, 4, 30);
        load.wait_for_requests(200);
        Running { release, server, control, load, seeded }
    }

    /// The release the server says it runs.
    fn version(&self) -> String {
        let reply = self.load.command(0, "VERSION").expect("the server answers VERSION");
        reply.strip_prefix("VERSION ").unwrap_or_else(|| panic!("bad VERSION reply {reply:?}")).to_string()
    }

    /// The number of SETs a server that counts them (zstd-kv's `stats`
    /// global, through `STATS`) has served; `None` for one that does not.
    fn sets(&self) -> Option<u64> {
        let reply = self.load.command(0, "STATS").ok()?;
        reply.strip_prefix("STATS sets=")?.split(' ').next()?.parse().ok()
    }

    /// Stops the load and checks that every row written is there, and
    /// that there are no others.
    fn stop_and_check(self) {
        let outcome = self.load.stop_and_check(self.server.port, &self.seeded);
        let count = self.server.client().request("COUNT");
        assert_eq!(count, format!("COUNT {}", self.seeded.len() + outcome.stored.len()), "every row is kept, once");
    }
}

/// Runs the chain of `program`'s releases, each step as `steps` says.
fn chain(program: Program, steps: &[Step]) {
    let releases = program.releases();
    let guests: Vec<PathBuf> = releases.iter().map(|r| program.guest(r)).collect();
    chain_of(program, releases, &guests, steps);
}

/// Runs `guests`, builds of `program` at `releases`, as a chain: starts the
/// first under load, updates it to each next one as `steps` says, and
/// after a refusal starts the next step's old release afresh.
fn chain_of(program: Program, releases: &[&str], guests: &[PathBuf], steps: &[Step]) {
    assert_eq!(steps.len() + 1, releases.len(), "one expectation per step");
    let mut running = Running::start(program, releases, guests, 0);
    for (step, expected) in steps.iter().enumerate() {
        if running.release != step {
            running.stop_and_check();
            running = Running::start(program, releases, guests, step);
        }
        let (old, new) = (releases[step], releases[step + 1]);
        let what = format!("{} {old} -> {new}", program.name());
        let sets = running.sets();
        let verdict = Verdict::of(&guests[step], &guests[step + 1]);
        let out = running.control.update(&guests[step + 1]);
        println!(
            "== {what}\n-- upstare-patchgen\n{}-- upstare-host update\n{}{}",
            verdict.text,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        match expected {
            Step::Applied => {
                assert_eq!(verdict.status, Some(0), "{what}: {}", verdict.text);
                let report = expect_report(&out);
                assert_eq!(report.sha256, sha256_file(&guests[step + 1]), "{what}: the report names the new release");
                assert_eq!(running.control.running_version(), report.sha256, "{what}: status shows the new release");
                assert_eq!(running.version(), new, "{what}: the new release's code answers");
                running.release = step + 1;
            }
            Step::Refused(why) | Step::RefusedOnTheHeap(why) => {
                let reason = expect_error(&out, 1);
                if matches!(expected, Step::Refused(_)) {
                    assert_eq!(verdict.status, Some(1), "{what}: {}", verdict.text);
                    assert_eq!(reason, format!("update refused: {}", verdict.refusals.join("; ")), "{what}: one verdict");
                } else {
                    assert_eq!(verdict.status, Some(0), "{what}: {}", verdict.text);
                }
                assert!(reason.contains(why), "{what}: {reason}");
                assert_eq!(
                    running.control.running_version(),
                    sha256_file(&guests[step]),
                    "{what}: the old release runs on"
                );
                assert_eq!(running.version(), old, "{what}: the old release answers");
            }
        }
        running.load.wait_for_requests(200);
        if let Some(before) = sets {
            let after = running.sets().expect("STATS answers after the step");
            assert!(after > before, "{what}: the count of SETs is carried: {before} before, {after} after");
        }
    }
    running.stop_and_check();
}

#[test]
fn sqlite_releases_update_live_keeping_every_row() {
    chain(
        Program::Sqlite,
        &[
            Step::Applied,
            // Two members dropped from the union of a VDBE opcode's
            // operand (and two limits added: every connection's `struct
            // sqlite3` changes layout); a union cannot be converted.
            Step::Refused("union p4union changed layout (union p4union lost members pI64, pReal)"),
            // A bug-fix release that adds a member to the parser's state,
            // reached from that union too.
            Step::Refused("union p4union changed layout (struct Parse, reached as p4union.pCtx->pVdbe->pParse, gained member szOpAlloc)"),
        ],
    );
}

/// An earlier patch release, 3.49.1 -> 3.49.2, adds one bit-field to
/// `struct Index` (an index of a table; the server's table has one, on the
/// heap): refused, naming it.
#[test]
fn a_sqlite_patch_release_that_adds_a_bit_field_to_an_index_is_refused() {
    let releases = ["3.49.1", "3.49.2"];
    let guests: Vec<PathBuf> = releases.iter().map(|r| Program::Sqlite.guest(r)).collect();
    chain_of(
        Program::Sqlite,
        &releases,
        &guests,
        &[Step::Refused("union p4union changed layout (struct Index, reached as p4union.pTab->pIndex, gained member bIdxRowid)")],
    );
}

#[test]
fn zstd_releases_update_live_keeping_every_value() {
    chain(Program::Zstd, &[Step::Applied, Step::Applied, Step::Applied]);
}

/// A server that keeps one zstd compression context between requests
/// holds an object of zstd's private `struct ZSTD_CCtx_s` on the heap,
/// through a pointer whose type `zstd.h` only declares. Release 1.5.5
/// changes that struct: the update is refused, naming it, and 1.5.4 serves
/// on (before the planner looked up declared-only structs, it said safe).
#[test]
fn a_zstd_context_kept_between_requests_is_refused_at_a_release_that_changes_its_type() {
    let releases = ["1.5.4", "1.5.5"];
    let guests: Vec<PathBuf> = releases.iter().map(|r| Program::Zstd.guest_with(r, &["KEEP_CONTEXT"])).collect();
    chain_of(
        Program::Zstd,
        &releases,
        &guests,
        &[Step::RefusedOnTheHeap(
            "the heap cannot be converted: *cctx.blockState.matchState.tagTable: unsigned short* became unsigned char*",
        )],
    );
}
