//! Files, args and env through preopened directories, and the sandbox seen
//! from inside a guest: `..`, absolute paths and symlinks cannot leave it.

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
