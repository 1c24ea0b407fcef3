//! Programs of several processes (upstare.h's fork, waitpid, kill): the
//! `forker` test guest's cases through the host binary, and the prefork
//! example server under load: updated with every worker, with a worker
//! that ends and one that forks until the process limit stops it.

use std::collections::BTreeSet;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use upstare_host::wasi::persist::FdKind;
use upstare_tests::{guest, host_command, Control, Server};

/// `upstare-host FLAGS forker CASE` with stdin open and silent: its
/// status, stdout and stderr.
fn forker(flags: &[&str], case: &str) -> (Option<i32>, String, String) {
    forker_logged(flags, case, "")
}

/// [`forker`] with the host's diagnostics filtered by `log` (`UPSTARE_LOG`).
fn forker_logged(flags: &[&str], case: &str, log: &str) -> (Option<i32>, String, String) {
    let mut child: std::process::Child = host_command()
        .env("UPSTARE_LOG", log)
        .args(flags)
        .arg(guest("forker"))
        .arg(case)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("upstare-host starts");
    // Kept open: children that read stdin wait, and are killed or ended.
    let stdin = child.stdin.take();
    let out = child.wait_with_output().expect("upstare-host ends");
    drop(stdin);
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Three children each change their copy of a counter and exit with what
/// they added; the parent's copy is untouched, it reaps each with its
/// status, and then has no child left.
#[test]
fn forked_children_have_their_own_memory_and_are_waited_for() {
    let (code, out, err) = forker(&[], "basic");
    assert_eq!(code, Some(0), "{out}{err}");
    let mut lines: Vec<&str> = out.lines().collect();
    let parent = lines.pop();
    lines.sort_unstable();
    assert_eq!(
        lines,
        [
            "child 0 exited with 1",
            "child 0: pid 2, parent 1, counter 101",
            "child 1 exited with 2",
            "child 1: pid 3, parent 1, counter 102",
            "child 2 exited with 3",
            "child 2: pid 4, parent 1, counter 103",
        ]
    );
    assert_eq!(parent, Some("parent: pid 1, counter 100"));
}

/// Processes that write pages of an 8 MiB block after forking, and fork
/// again, each see exactly their own history (forker's `pages` case)
/// whether forks share memory copy-on-write or copy it. And the default
/// does share it: of the five forks, the first copies nothing, and those
/// made by processes that wrote pages since their own fork copy those
/// pages (2.7 MiB, 4 MiB and twice the whole 8 MiB block, a little stack
/// and heap), not the whole memory. The whole block goes to anonymous
/// huge pages in the child, which count as its own when it forks in turn.
#[test]
fn forked_processes_see_only_their_own_writes_whether_memory_is_shared_or_copied() {
    let log = "upstare_host::program_memory=debug";
    let want = [
        "c1 after g: every page as written",
        "c1 at its fork: every page as written",
        "c2 at its fork: every page as written",
        "g after gg: every page as written",
        "g at its fork: every page as written",
        "gg after ggg: every page as written",
        "gg at its fork: every page as written",
        "ggg at its fork: every page as written",
        "parent after all: every page as written",
    ];
    for how in ["cow", "copy"] {
        let (code, out, err) = forker_logged(&["--fork-memory", how], "pages", log);
        let mut lines: Vec<&str> = out.lines().collect();
        lines.sort_unstable();
        assert_eq!((code, lines.as_slice()), (Some(0), want.as_slice()), "--fork-memory {how}: {err}");
        let counts = |marker: &str| -> Vec<u64> {
            err.lines()
                .filter_map(|l| l.split_once(marker))
                .map(|(before, _)| before.rsplit(' ').find_map(|w| w.parse().ok()).unwrap_or_else(|| panic!("{before}")))
                .collect()
        };
        if how == "copy" {
            let copies = counts(" bytes of memory copied");
            assert!(copies.len() == 5 && copies.iter().all(|&n| n >= 8 << 20), "whole copies: {err}");
            continue;
        }
        let mut copied = counts(" bytes of the parent's own pages copied");
        copied.sort_unstable();
        let (block, block_half, block_third) = (2048 * 4096, 1024 * 4096, 683 * 4096);
        let slack = 1 << 20;
        assert_eq!(copied.len(), 5, "five copy-on-write forks: {err}");
        assert_eq!(copied[0], 0, "the first fork copies nothing: {err}");
        assert!((block_third..block_third + slack).contains(&copied[1]), "the parent's second fork: {err}");
        assert!((block_half..block_half + slack).contains(&copied[2]), "c1's fork: {err}");
        assert!(copied[3..].iter().all(|n| (block..block + slack).contains(n)), "the forks of g and gg: {err}");
    }
}

#[test]
fn a_killed_child_is_reported_killed_and_is_gone() {
    let (code, out, err) = forker(&[], "kill");
    assert_eq!((code, out.as_str()), (Some(0), "child killed by signal 15\n"), "{err}");
}

/// A process whose parent ended passes to the host: it sees parent 0, and
/// the host reaps it when it ends (the grandparent has nothing to wait for).
#[test]
fn orphans_pass_to_the_host_which_reaps_them() {
    let (code, out, err) = forker(&[], "orphan");
    assert_eq!((code, out.as_str()), (Some(0), "grandchild 3: parent now 0\nparent: no child left\n"), "{err}");
}

/// A fork bomb stops at `--max-processes` with EAGAIN and one line from
/// the host; the program goes on and ends normally.
#[test]
fn forks_past_the_process_limit_fail_with_eagain() {
    let (code, out, err) = forker(&["--max-processes", "8"], "bomb");
    assert_eq!((code, out.as_str()), (Some(0), "fork failed after 7 children: EAGAIN\n"), "{err}");
    assert!(err.contains("upstare-host: fork refused: the program already has 8 processes (--max-processes)"), "{err}");
}

/// A fork needs an unwind: run as it is, the module's fork fails with
/// ENOSYS (and the guest says so), nothing else happens.
#[test]
fn without_instrumentation_fork_fails_with_enosys() {
    let (code, _, err) = forker(&["--no-instrument"], "basic");
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("fork: Function not implemented"), "{err}");
}

#[test]
fn a_bad_process_limit_is_refused() {
    let out = host_command().args(["--max-processes", "0", "x.wasm"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected a number of processes from 1 to"));
}

#[test]
fn a_bad_fork_memory_is_refused() {
    let out = host_command().args(["--fork-memory", "share", "x.wasm"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected `cow` or `copy`"));
}

/// Which worker (index, pid) a PING on `client`'s connection reaches.
fn ping_on(client: &mut upstare_tests::Client) -> (u32, u32) {
    let (index, pid, _) = pong(client);
    (index, pid)
}

/// A PING on `client`'s connection: the worker's index, its pid and the
/// version that answered.
fn pong(client: &mut upstare_tests::Client) -> (u32, u32, u32) {
    let reply = client.request("PING");
    let words: Vec<&str> = reply.split(' ').collect();
    match words[..] {
        ["PONG", version, "WORKER", index, "PID", pid] => {
            (index.parse().unwrap(), pid.parse().unwrap(), version.trim_start_matches('v').parse().unwrap())
        }
        _ => panic!("{reply}"),
    }
}

/// [`ping_on`] a new connection.
fn ping(port: u16) -> (u32, u32) {
    ping_on(&mut upstare_tests::Client::connect(port))
}

/// The prefork server with 4 workers sharing its listener, under 16
/// clients that connect over and over: every request is answered, by all
/// four workers; a worker that exits is replaced by the master and the
/// server serves on; `status` lists the processes.
#[test]
fn the_prefork_server_serves_on_every_worker_and_replaces_one_that_ends() {
    let control = Control::new("prefork");
    let (mut server, first) = Server::start(&guest("prefork-server"), &["--control", &control.path()], &["4"]);
    assert!(first.starts_with("prefork v1: 4 workers"), "{first}");
    let port = server.port;
    let clients: Vec<_> = (0..16)
        .map(|_| {
            std::thread::spawn(move || {
                let mut seen = BTreeSet::new();
                for _ in 0..20 {
                    let mut c = upstare_tests::Client::connect(port);
                    let reply = c.request("ADD 1");
                    assert!(reply.starts_with("TOTAL "), "{reply}");
                    let pong = c.request("PING");
                    seen.insert(pong.split(' ').nth(5).unwrap().to_string());
                }
                seen
            })
        })
        .collect();
    let mut pids = BTreeSet::new();
    for c in clients {
        pids.extend(c.join().expect("no request failed"));
    }
    assert_eq!(pids.len(), 4, "all four workers served: {pids:?}");

    let status = control.status();
    assert!(status.contains("processes: 5"), "{status}");
    assert!((2..=5).all(|p| status.contains(&format!("process {p}: parent 1, running"))), "{status}");

    // A worker ends; the master forks another in its place.
    let mut c = upstare_tests::Client::connect(port);
    let (index, pid) = ping_on(&mut c);
    assert!(c.try_request("EXIT").is_err(), "the worker closed the connection as it ended");
    assert_eq!(server.next_line(), format!("worker {index} (pid {pid}) exited with 3"));
    let restarted = server.next_line();
    assert!(restarted.starts_with(&format!("worker {index} restarted as pid ")), "{restarted}");
    let mut seen = BTreeSet::new();
    for _ in 0..200 {
        seen.insert(ping(port));
        if seen.len() == 4 {
            break;
        }
    }
    assert_eq!(seen.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [0, 1, 2, 3], "four workers serve again: {seen:?}");
    assert!(!seen.iter().any(|(_, p)| *p == pid), "the old worker is gone: {seen:?}");
    server.kill();
}

/// The prefork server with 8 workers, updated from v1 to v2 while 16
/// clients connect, add and ping over and over: no request fails and no
/// connection drops, all nine processes move at once (no reply after the
/// update returned comes from v1, and 8 connections held at once reach 8
/// workers on v2), and the master runs its new loop: a worker that ends is
/// restarted with v2's count of restarts, a global v2 adds.
#[test]
fn the_prefork_server_updates_every_process_at_once_under_load() {
    let control = Control::new("prefork-update");
    let (mut server, first) = Server::start(&guest("prefork-server"), &["--control", &control.path()], &["8"]);
    assert!(first.starts_with("prefork v1: 8 workers"), "{first}");
    let port = server.port;
    // The version the clients must see from now on.
    let floor = Arc::new(AtomicU32::new(1));
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..16)
        .map(|_| {
            let (floor, stop) = (floor.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut connections = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let mut c = upstare_tests::Client::connect(port);
                    connections += 1;
                    for _ in 0..3 {
                        let at_least = floor.load(Ordering::SeqCst);
                        assert!(c.request("ADD 1").starts_with("TOTAL "), "an addition failed");
                        let (_, _, version) = pong(&mut c);
                        assert!(version >= at_least, "a reply from v{version} after the update to v{at_least} returned");
                    }
                }
                connections
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let out = control.update(&guest("prefork-server-v2"));
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "update: {}{report}", String::from_utf8_lossy(&out.stderr));
    assert!(report.contains("processes: 9 moved to the new version together"), "{report}");
    floor.store(2, Ordering::SeqCst);
    // Eight connections held at once are served by eight workers.
    let mut held: Vec<_> = (0..8).map(|_| upstare_tests::Client::connect(port)).collect();
    let seen: BTreeSet<(u32, u32)> = held.iter_mut().map(|c| pong(c)).map(|(index, _, version)| (index, version)).collect();
    assert_eq!(seen, (0..8).map(|i| (i, 2)).collect(), "every worker runs v2");
    drop(held);
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::SeqCst);
    let connections: u64 = clients.into_iter().map(|c| c.join().expect("no client failed")).sum();
    assert!(connections > 16, "the clients reconnected through the update ({connections} connections)");

    // The master's new loop restarts a worker that ends, and counts it.
    let mut c = upstare_tests::Client::connect(port);
    let (index, pid) = ping_on(&mut c);
    assert!(c.try_request("EXIT").is_err(), "the worker closed the connection as it ended");
    assert_eq!(server.next_line(), format!("worker {index} (pid {pid}) exited with 3"));
    let restarted = server.next_line();
    assert!(restarted.starts_with(&format!("worker {index} restarted as pid ")) && restarted.ends_with(" (restart 1)"), "{restarted}");
    let status = control.status();
    assert!(status.contains("processes: 9"), "{status}");
    assert!(status.contains("updates: 1"), "{status}");
    server.kill();
}

/// An update whose new constructor scribbles over a worker's state and
/// traps in every process but the master rolls back in all of them: the
/// master, which moved first, and the workers, each with its memory as it
/// was; connections held through it keep their worker and its total. The
/// next update goes through, on every process.
#[test]
fn a_constructor_that_traps_in_the_workers_rolls_the_update_back_in_every_process() {
    let control = Control::new("prefork-trap");
    let (mut server, _) = Server::start(&guest("prefork-server"), &["--control", &control.path()], &["4"]);
    // One connection held on each worker, each with a total of its own.
    let mut held: Vec<_> = (0..4).map(|_| upstare_tests::Client::connect(server.port)).collect();
    let mut totals = Vec::new();
    for (i, c) in held.iter_mut().enumerate() {
        totals.push(c.request(&format!("ADD {}", 10 * (i + 1))));
    }
    let workers: BTreeSet<u32> = held.iter_mut().map(|c| ping_on(c).0).collect();
    assert_eq!(workers.len(), 4, "each connection has a worker of its own");

    let out = control.update(&guest("prefork-server-trap"));
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("rolled back") && said.contains("constructor `broken` failed"), "{said}");
    assert!(said.contains(": process "), "the process is named: {said}");
    for (c, total) in held.iter_mut().zip(&totals) {
        assert_eq!(&c.request("ADD 0"), total, "the worker's total is as it was");
        assert_eq!(pong(c).2, 1, "the worker runs v1");
    }
    assert!(control.status().contains("updates: 0"));

    let out = control.update(&guest("prefork-server-v2"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("processes: 5 moved to the new version together"));
    for (c, total) in held.iter_mut().zip(&totals) {
        assert_eq!(&c.request("ADD 0"), total);
        assert_eq!(pong(c).2, 2, "the worker runs v2");
    }
    drop(held);
    server.kill();
}

/// Workers killed with SIGKILL (by another worker) over and over while the
/// program is updated and rolled back: every update either moves every
/// process or is refused with a reason, a worker killed while paused ends
/// when the program resumes, and the master restarts each killed worker,
/// in the version then running.
#[test]
fn workers_killed_during_updates_end_and_are_restarted_in_the_running_version() {
    let control = Control::new("prefork-kill");
    let (mut server, _) = Server::start(&guest("prefork-server"), &["--control", &control.path()], &["4"]);
    let port = server.port;
    let stop = Arc::new(AtomicBool::new(false));
    let killer = {
        let stop = stop.clone();
        std::thread::spawn(move || -> Result<u32, String> {
            let mut kills = 0;
            // Paced and bounded: the master's two lines per restart go to
            // a pipe this test reads only at the end, and a full pipe
            // would block the master in `fd_write`.
            while !stop.load(Ordering::SeqCst) && kills < 300 {
                std::thread::sleep(Duration::from_millis(5));
                // The victim is busy with `victim`, so the kill comes from
                // another worker.
                let mut victim = upstare_tests::Client::connect(port);
                let pong = victim.try_request("PING")?;
                let pid = pong.rsplit(' ').next().unwrap_or_default().to_string();
                let mut c = upstare_tests::Client::connect(port);
                assert_eq!(c.try_request(&format!("KILL {pid}"))?, "KILLED 0");
                kills += 1;
                assert!(victim.try_request("PING").is_err(), "a killed worker answers no more");
            }
            Ok(kills)
        })
    };
    let mut moved = 0;
    for round in 0..6 {
        std::thread::sleep(Duration::from_millis(50));
        let out = if round % 2 == 0 { control.update(&guest("prefork-server-v2")) } else { control.rollback() };
        let (said, report) = (String::from_utf8_lossy(&out.stderr), String::from_utf8_lossy(&out.stdout));
        if out.status.success() {
            assert!(report.contains(" moved to the new version together"), "{report}");
            moved += 1;
        } else {
            assert!(said.contains("refused") && !said.contains("internal error"), "{said}");
        }
    }
    stop.store(true, Ordering::SeqCst);
    let kills = killer.join().expect("every kill worked").unwrap_or_else(|e| {
        let status = control.status();
        server.kill();
        panic!("{e}\n{status}\n{}\n{}", server.stderr(), server.remaining_output())
    });
    assert!(kills > 0 && moved > 0, "{kills} kills, {moved} updates");
    // Four workers serve, all in the version running now.
    let version = if control.status().contains("prefork-server-v2") { 2 } else { 1 };
    let mut held: Vec<_> = (0..4).map(|_| upstare_tests::Client::connect(port)).collect();
    let seen: BTreeSet<(u32, u32)> = held.iter_mut().map(|c| pong(c)).map(|(index, _, v)| (index, v)).collect();
    assert_eq!(seen, (0..4).map(|i| (i, version)).collect());
    drop(held);
    server.kill();
    let out = server.remaining_output();
    assert!(out.contains("killed by signal 9"), "{out}");
}

/// A checkpoint of the prefork server holds the master and its four
/// workers, each with its own memory, pid and parent, and the listener
/// they share: restored in another host, the same workers (same pids, each
/// with its own total) accept on the one listener, and the master restarts
/// a worker that ends, as it knows it by pid.
#[test]
fn a_checkpointed_prefork_server_restores_with_every_process() {
    let control = Control::new("prefork-checkpoint");
    let (mut server, _) = Server::start(&guest("prefork-server"), &["--control", &control.path()], &["4"]);
    // Connections held on every worker, each with a total of its own.
    let mut held: Vec<_> = (0..4).map(|_| server.client()).collect();
    let mut before = std::collections::BTreeMap::new();
    for (i, c) in held.iter_mut().enumerate() {
        let total = c.request(&format!("ADD {}", 10 * (i + 1)));
        before.insert(ping_on(c), total);
    }
    let snapshot = control.checkpoint("prefork");
    assert_eq!(snapshot.processes.iter().map(|p| (p.pid, p.parent, p.ended)).collect::<Vec<_>>(), (2..=5).map(|p| (p, 1, None)).collect::<Vec<_>>());
    drop(held);
    server.kill();

    // A process whose listener is shared with one the snapshot does not
    // hold is refused in one line, before anything runs.
    let mut broken = snapshot.clone();
    for fd in broken.processes[0].fds.iter_mut().filter(|f| matches!(f.kind, FdKind::Shared { .. })) {
        fd.kind = FdKind::Shared { pid: 99, fd: fd.fd };
    }
    let broken_path = control.dir().join("broken.snap");
    std::fs::write(&broken_path, broken.encode()).unwrap();
    let out = upstare_tests::run_host(&["restore", "--tcplisten", "127.0.0.1:0", broken_path.to_str().unwrap()]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && said.contains("process 2: cannot restore fd 3: it shares fd 3 of process 99, which the snapshot does not hold"), "{said}");
    assert_eq!(said.lines().filter(|l| l.starts_with("error:")).count(), 1, "{said}");
    assert!(!said.contains("panicked"), "{said}");

    let path = control.dir().join("prefork.snap");
    let restored_control = Control::new("prefork-restored");
    let mut restored = Server::spawn(host_command().args([
        "restore",
        "--control",
        &restored_control.path(),
        "--tcplisten",
        "127.0.0.1:0",
        path.to_str().unwrap(),
    ]));
    // The connections held at the checkpoint are gone; four new ones reach
    // the four workers, as they were.
    let mut held: Vec<_> = (0..4).map(|_| restored.client()).collect();
    let mut after = std::collections::BTreeMap::new();
    for c in &mut held {
        let total = c.request("ADD 0");
        after.insert(ping_on(c), total);
    }
    assert_eq!(after, before, "every worker, by index and pid, with its total");
    drop(held);
    let status = restored_control.status();
    assert!(status.contains("processes: 5") && status.contains("process 5: parent 1, "), "{status}");

    let mut c = restored.client();
    let (index, pid) = ping_on(&mut c);
    assert!(c.try_request("EXIT").is_err());
    assert_eq!(restored.next_line(), format!("worker {index} (pid {pid}) exited with 3"));
    assert!(restored.next_line().starts_with(&format!("worker {index} restarted as pid 6")));
    restored.kill();
}

/// A worker that forks without end is stopped at `--max-processes`: its
/// forks fail, the host says so once per refusal, and the server serves on.
#[test]
fn a_fork_bomb_in_a_worker_stops_at_the_limit_while_the_server_serves() {
    let (mut server, _) = Server::start(&guest("prefork-server"), &["--max-processes", "12"], &["2"]);
    let mut c = server.client();
    // The master and two workers leave room for nine more.
    assert_eq!(c.request("SPAWN 100"), "SPAWNED 9");
    for _ in 0..10 {
        let (index, _) = ping(server.port);
        assert!(index < 2);
    }
    std::thread::sleep(Duration::from_millis(100));
    assert!(server.stderr().contains("upstare-host: fork refused: the program already has 12 processes (--max-processes)"), "{}", server.stderr());
    server.kill();
}
