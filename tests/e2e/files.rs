//! Files, args and env through preopened directories, and the sandbox seen
//! from inside a guest: `..`, absolute paths and symlinks cannot leave it,
//! for opens as for renames, links and symlinks, across two preopens too.

use upstare_tests::{guest, run_host, TempDir};

#[test]
fn files_guest_uses_files_args_and_env() {
    let dir = TempDir::new("files");
    let spec = format!("{}::/data", dir.0.display());
    let files = guest("files");
    let out = run_host(&["--dir", &spec, "--env", "GREETING=hello there", files.to_str().unwrap(), "/data", "two words"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("argv[2] two words"), "{stdout}");
    assert!(stdout.contains("env GREETING=hello there"), "{stdout}");
    assert!(stdout.contains("read sub/moved.txt: 25 bytes \"hello, world\\nsecond line\\n\""), "{stdout}");
    assert!(stdout.contains("list .: hello.txt notes.txt"), "{stdout}");
    assert!(stdout.contains("done: 0 failures"), "{stdout}");
    // What the guest wrote is really on the host, under the preopen only.
    let result = std::fs::read_to_string(dir.0.join("result.txt")).unwrap();
    assert!(!result.is_empty());
    assert!(stdout.contains("escape ../outside.txt: refused (ENOTCAPABLE)"), "{stdout}");
    assert!(stdout.contains("escape /etc/passwd: refused (ENOTCAPABLE)"), "{stdout}");
}

#[test]
fn sandbox_escapes_are_refused() {
    let root = TempDir::new("sandbox");
    let data = root.0.join("data");
    std::fs::create_dir_all(data.join("sub")).unwrap();
    std::fs::write(root.0.join("secret.txt"), "SECRET\n").unwrap();
    std::fs::write(data.join("inside.txt"), "inside\n").unwrap();
    std::os::unix::fs::symlink(root.0.join("secret.txt"), data.join("abs-link")).unwrap();
    std::os::unix::fs::symlink("../secret.txt", data.join("rel-link")).unwrap();
    std::os::unix::fs::symlink("inside.txt", data.join("ok-link")).unwrap();
    std::os::unix::fs::symlink("..", data.join("sub/up")).unwrap();

    let spec = format!("{}::/data", data.display());
    let escape = guest("escape");
    let paths = [
        "/data/inside.txt",
        "/data/ok-link",
        "/data/../secret.txt",
        "/data/sub/../../secret.txt",
        "/data/abs-link",
        "/data/rel-link",
        "/data/sub/up/../secret.txt",
        "/etc/passwd",
        "secret.txt",
    ];
    let mut args = vec!["--dir", spec.as_str(), escape.to_str().unwrap()];
    args.extend(paths);
    let out = run_host(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("/data/inside.txt: ok inside"), "{stdout}");
    assert!(stdout.contains("/data/ok-link: ok inside"), "{stdout}");
    // ENOTCAPABLE, as the README promises: the host refuses the first five
    // (wasi-libc hands it the path relative to /data), wasi-libc itself the
    // last two (no preopen holds them).
    for p in &paths[2..] {
        assert!(stdout.contains(&format!("{p}: refused Capabilities insufficient\n")), "{p} was not refused with ENOTCAPABLE:\n{stdout}");
    }
    assert!(!stdout.contains("SECRET"), "{stdout}");
}

/// A tree with two preopenable directories, `a` and `b`, and a file beside
/// them that no guest may reach.
fn two_preopens(tag: &str) -> TempDir {
    let root = TempDir::new(tag);
    let (a, b) = (root.0.join("a"), root.0.join("b"));
    std::fs::create_dir_all(a.join("dir")).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    std::fs::write(root.0.join("outside.txt"), "OUTSIDE\n").unwrap();
    std::fs::write(a.join("x.txt"), "x\n").unwrap();
    std::fs::write(a.join("y.txt"), "y\n").unwrap();
    std::fs::write(a.join("dir/inner.txt"), "inner\n").unwrap();
    std::fs::write(b.join("z.txt"), "z\n").unwrap();
    std::os::unix::fs::symlink("..", a.join("up")).unwrap();
    std::os::unix::fs::symlink("../outside.txt", a.join("out-link")).unwrap();
    std::os::unix::fs::symlink(root.0.join("outside.txt"), a.join("out-abs")).unwrap();
    root
}

/// Runs the `fsops` guest with `a` as `/a` and `b` as `/b`; each op's line.
fn fsops(root: &TempDir, ops: &[&str]) -> Vec<String> {
    let spec_a = format!("{}::/a", root.0.join("a").display());
    let spec_b = format!("{}::/b", root.0.join("b").display());
    let guest_path = guest("fsops");
    let mut args = vec!["--dir", &spec_a, "--dir", &spec_b, guest_path.to_str().unwrap()];
    args.extend(ops);
    let out = run_host(&args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<String> = stdout.lines().map(str::to_string).collect();
    assert_eq!(lines.len(), ops.len(), "one line per op:\n{stdout}");
    for (op, line) in ops.iter().zip(&lines) {
        assert!(line.starts_with(&format!("{op}: ")), "out of order: `{line}` for `{op}`");
    }
    lines
}

/// The entries directly in `root`: what is outside both preopens.
fn outside_entries(root: &TempDir) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(&root.0).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

#[test]
fn renames_and_links_across_two_preopens_stay_inside_the_sandbox() {
    let root = two_preopens("across");
    let (a, b) = (root.0.join("a"), root.0.join("b"));
    let ops = [
        "rename:/a/x.txt:/b/x.txt",
        "read:/b/x.txt",
        "link:/b/z.txt:/a/z-hard.txt",
        "rename:/a/dir:/b/dir",
        "read:/b/dir/inner.txt",
        "rename:/b/x.txt:/a/back.txt",
        // A path is resolved in its own preopen: `..` out of /b is refused
        // even when it would land in /a.
        "rename:/a/y.txt:/b/../a/y2.txt",
        "link:/a/y.txt:/b/../a/y3.txt",
        // A symlink in /b naming /a's file through `..` is stored, but
        // following it leaves /b.
        "symlink:../a/y.txt:/b/to-a",
        "read:/b/to-a",
    ];
    let lines = fsops(&root, &ops);
    let expect = [
        "ok",
        "ok x",
        "ok",
        "ok",
        "ok inner",
        "ok",
        "refused ENOTCAPABLE",
        "refused ENOTCAPABLE",
        "ok",
        "refused ENOTCAPABLE",
    ];
    for ((op, line), want) in ops.iter().zip(&lines).zip(expect) {
        assert_eq!(line, &format!("{op}: {want}"));
    }
    // The host's files moved as the guest was told, and only so.
    assert_eq!(std::fs::read_to_string(a.join("back.txt")).unwrap(), "x\n");
    assert!(!a.join("x.txt").exists() && !b.join("x.txt").exists());
    assert_eq!(std::fs::read_to_string(b.join("dir/inner.txt")).unwrap(), "inner\n");
    assert!(!a.join("dir").exists());
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(a.join("z-hard.txt")).unwrap().ino(), std::fs::metadata(b.join("z.txt")).unwrap().ino());
    assert_eq!(std::fs::read_to_string(a.join("y.txt")).unwrap(), "y\n");
    assert!(!a.join("y2.txt").exists() && !a.join("y3.txt").exists());
    assert_eq!(outside_entries(&root), ["a", "b", "outside.txt"]);
}

#[test]
fn renames_links_and_symlinks_that_leave_the_preopens_are_refused() {
    let root = two_preopens("leave");
    let a = root.0.join("a");
    let ops = [
        // Out by `..`, in both directions.
        "rename:/a/x.txt:/a/../stolen.txt",
        "rename:/a/../outside.txt:/a/got.txt",
        "link:/a/x.txt:/a/../hard.txt",
        "link:/a/../outside.txt:/a/hard-in.txt",
        "symlink:x.txt:/a/../evil",
        "unlink:/a/../outside.txt",
        "mkdir:/a/../newdir",
        // Out through a symlink to a directory above the preopen.
        "rename:/a/x.txt:/a/up/stolen.txt",
        "rename:/a/up/outside.txt:/a/got.txt",
        "link:/a/up/outside.txt:/a/hard-up.txt",
        "symlink:x.txt:/a/up/evil",
        "unlink:/a/up/outside.txt",
        "write:/a/up/outside.txt",
        // Symlinks that point out, then used.
        "read:/a/out-link",
        "read:/a/out-abs",
        "write:/a/out-link",
        "stat:/a/out-link",
        "linkfollow:/a/out-link:/a/followed",
        "symlink:../outside.txt:/a/made-out",
        "read:/a/made-out",
        "write:/a/made-out",
        "rename:/a/made-out:/a/made-out-2",
        "read:/a/made-out-2",
        // An absolute target is refused when the link is made.
        "symlink:/etc/passwd:/a/abs",
        // Absolute paths no preopen holds never reach the host.
        "rename:/a/x.txt:/tmp/stolen.txt",
        "link:/a/x.txt:/tmp/hard.txt",
        "symlink:x.txt:/tmp/evil",
    ];
    let lines = fsops(&root, &ops);
    // Making or moving a link changes nothing outside; a hard link that
    // follows a symlink is refused whatever the symlink names (EINVAL, as
    // wasmtime does).
    let not_enotcapable = [
        ("symlink:../outside.txt:/a/made-out", "ok"),
        ("rename:/a/made-out:/a/made-out-2", "ok"),
        ("linkfollow:/a/out-link:/a/followed", "refused EINVAL"),
    ];
    for (op, line) in ops.iter().zip(&lines) {
        let want = not_enotcapable.iter().find(|(o, _)| o == op).map_or("refused ENOTCAPABLE", |(_, w)| w);
        assert_eq!(line, &format!("{op}: {want}"));
    }
    // The outside file is untouched, nothing appeared beside it, and the
    // files inside were not moved away.
    assert_eq!(std::fs::read_to_string(root.0.join("outside.txt")).unwrap(), "OUTSIDE\n");
    assert_eq!(outside_entries(&root), ["a", "b", "outside.txt"]);
    assert_eq!(std::fs::read_to_string(a.join("x.txt")).unwrap(), "x\n");
    for gone in ["got.txt", "hard-in.txt", "hard-up.txt", "followed", "abs"] {
        assert!(std::fs::symlink_metadata(a.join(gone)).is_err(), "{gone} was made");
    }
    assert_eq!(std::fs::read_link(a.join("made-out-2")).unwrap(), std::path::Path::new("../outside.txt"));
}

/// The `flags:` of the host's open file description for `path`, from
/// /proc: how the host really opened a file the guest asked for. Waits up
/// to 10 s for the host to open it (a restore reopens files as it starts).
fn host_open_flags(pid: u32, path: &std::path::Path) -> u32 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
            let entry = entry.unwrap();
            if std::fs::read_link(entry.path()).ok().as_deref() == Some(path) {
                let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", entry.file_name().to_string_lossy())).unwrap();
                let flags = info.lines().find_map(|l| l.strip_prefix("flags:")).expect("fdinfo has flags");
                return u32::from_str_radix(flags.trim(), 8).unwrap();
            }
        }
        assert!(std::time::Instant::now() < deadline, "the host has no fd open on {}", path.display());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

// Linux's values: O_SYNC includes O_DSYNC.
const O_DSYNC: u32 = 0o10000;
const O_SYNC: u32 = 0o4010000;

#[test]
fn o_sync_and_o_dsync_reach_the_host_file() {
    use std::io::BufRead;
    use std::process::Stdio;
    let dir = TempDir::new("sync");
    let spec = format!("{}::/d", dir.0.display());
    let mut command = upstare_tests::host_command();
    command.args(["--dir", &spec]).arg(guest("syncopen")).args(["sync:/d/s", "dsync:/d/ds", "plain:/d/p"]);
    let mut host = upstare_tests::KillOnDrop::spawn(command.stdin(Stdio::piped()).stdout(Stdio::piped()));
    let mut line = String::new();
    std::io::BufReader::new(host.0.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");
    let pid = host.0.id();
    assert_eq!(host_open_flags(pid, &dir.0.join("s")) & O_SYNC, O_SYNC);
    // At least data-synchronous (the host's file layer opens O_DSYNC as
    // O_SYNC, stronger than asked).
    assert_eq!(host_open_flags(pid, &dir.0.join("ds")) & O_DSYNC, O_DSYNC);
    assert_eq!(host_open_flags(pid, &dir.0.join("p")) & O_SYNC, 0);
    drop(host.0.stdin.take());
    assert!(host.0.wait().unwrap().success());
}

#[test]
fn a_restore_reopens_o_sync_files_with_o_sync() {
    use std::io::BufRead;
    use std::process::Stdio;
    let dir = TempDir::new("sync-restore");
    let data = dir.0.join("d");
    std::fs::create_dir_all(&data).unwrap();
    let control = upstare_tests::Control::new("sync-restore");
    let spec = format!("{}::/d", data.display());
    let mut command = upstare_tests::host_command();
    command.args(["--control", &control.path(), "--dir", &spec]).arg(guest("syncopen")).args(["sync:/d/s", "dsync:/d/ds", "plain:/d/p"]);
    let mut host = upstare_tests::KillOnDrop::spawn(command.stdin(Stdio::piped()).stdout(Stdio::piped()));
    let mut line = String::new();
    std::io::BufReader::new(host.0.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");
    // The guest now waits on stdin, where it can pause.
    let snap = dir.0.join("sync.snap");
    let out = run_host(&["checkpoint", "--control", &control.path(), snap.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    drop(host);

    let mut restored = upstare_tests::KillOnDrop::spawn(
        upstare_tests::host_command().args(["restore", snap.to_str().unwrap()]).stdin(Stdio::piped()).stdout(Stdio::null()),
    );
    let pid = restored.0.id();
    assert_eq!(host_open_flags(pid, &data.join("s")) & O_SYNC, O_SYNC);
    assert_eq!(host_open_flags(pid, &data.join("ds")) & O_DSYNC, O_DSYNC);
    assert_eq!(host_open_flags(pid, &data.join("p")) & O_SYNC, 0);
    drop(restored.0.stdin.take());
    assert!(restored.0.wait().unwrap().success());
}
