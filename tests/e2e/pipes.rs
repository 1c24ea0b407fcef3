//! Named pipes and devices: a program waiting for the other end of a FIFO,
//! or for data on one, waits where the host can interrupt it, so a
//! checkpoint or an update pauses it at once; and the program sees the
//! blocking or non-blocking behaviour it asked for, and devices as the host
//! has them.

use std::io::{BufRead, BufReader, Lines, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use upstare_tests::{expect_report, guest, host_command, wait_for_path, Control, KillOnDrop};

/// A FIFO at `data/pipe` below `control`'s directory; returns the data
/// directory and the FIFO.
fn fifo_in(control: &Control) -> (PathBuf, PathBuf) {
    let data = control.dir().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let fifo = data.join("pipe");
    let made = Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo (coreutils) is installed");
    assert!(made.success());
    (data, fifo)
}

/// Runs the `fifo` guest with `args` under a host serving `control`, with
/// `data` preopened as `/data` and a pause limit of 200 ms.
fn start(
    control: &Control,
    data: &Path,
    args: &[&str],
) -> (KillOnDrop, Lines<BufReader<ChildStdout>>) {
    let spec = format!("{}::/data", data.display());
    let mut host = KillOnDrop::spawn(
        host_command()
            .args([
                "--control",
                &control.path(),
                "--pause-limit",
                "200",
                "--dir",
                &spec,
                guest("fifo").to_str().unwrap(),
            ])
            .args(args)
            .stdout(Stdio::piped()),
    );
    let lines = BufReader::new(host.0.stdout.take().unwrap()).lines();
    wait_for_path(Path::new(&control.path()));
    // Time to reach the wait the test is about.
    std::thread::sleep(Duration::from_millis(300));
    (host, lines)
}

fn next_line(lines: &mut Lines<BufReader<ChildStdout>>) -> String {
    lines.next().expect("the guest prints a line").unwrap()
}

/// The paused program's update to the same module: it must pause for it.
/// Restores the checkpoint `name` of `control`, its output piped.
fn restore(control: &Control, name: &str) -> KillOnDrop {
    let snap = control.dir().join(format!("{name}.snap"));
    KillOnDrop::spawn(host_command().args(["restore", snap.to_str().unwrap()]).stdout(Stdio::piped()))
}

/// Everything `child` prints until it closes its output.
fn all_output(child: &mut KillOnDrop) -> String {
    let mut out = String::new();
    child.0.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    out
}

fn update_in_place(control: &Control) {
    let report = expect_report(&control.update(&guest("fifo")));
    assert_eq!(report.count("functions", "changed"), 0);
}

/// A reader waiting for the FIFO's first writer, then for more data from
/// it, pauses each time within the limit, for a checkpoint and an update;
/// the writer's data then reaches it and it ends as it would have without
/// the pauses. The first snapshot, restored, opens the FIFO again and waits
/// for a writer of its own.
#[test]
fn a_reader_waiting_for_a_writer_or_for_data_pauses_at_once() {
    let control = Control::new("fifo-reader");
    let (data, fifo) = fifo_in(&control);
    let (mut host, mut lines) = start(&control, &data, &["/data/pipe"]);

    control.checkpoint("waiting");
    update_in_place(&control);
    assert!(host.0.try_wait().unwrap().is_none(), "the program waits on");

    let mut writer = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    writer.write_all(b"hello").unwrap();
    assert_eq!(next_line(&mut lines), "read: hello");

    // Now it waits for more data, the writer still there.
    std::thread::sleep(Duration::from_millis(100));
    control.checkpoint("reading");
    writer.write_all(b"world").unwrap();
    drop(writer);
    assert_eq!(next_line(&mut lines), "read: world");
    assert_eq!(next_line(&mut lines), "end");
    assert!(host.0.wait().unwrap().success());

    let mut restored = restore(&control, "waiting");
    // Opening for writing waits until the restored program reads the FIFO.
    std::fs::write(&fifo, "again").unwrap();
    let out = all_output(&mut restored);
    assert_eq!(out, "read: again\nend\n");
    assert!(restored.0.wait().unwrap().success());
}

/// A writer waiting for the FIFO's first reader, in `write` or in `poll`,
/// pauses within the limit, for a checkpoint and an update; when a reader
/// comes, it gets the data and the program ends. The snapshot, restored,
/// waits for a reader of its own.
#[test]
fn a_writer_waiting_for_a_reader_pauses_at_once() {
    for mode in ["-w", "-p"] {
        let control = Control::new("fifo-writer");
        let (data, fifo) = fifo_in(&control);
        let (mut host, mut lines) = start(&control, &data, &[mode, "/data/pipe", "hello"]);

        control.checkpoint("waiting");
        update_in_place(&control);
        assert!(
            host.0.try_wait().unwrap().is_none(),
            "{mode}: the program waits on"
        );

        assert_eq!(std::fs::read_to_string(&fifo).unwrap(), "hello", "{mode}");
        assert_eq!(next_line(&mut lines), "wrote 5", "{mode}");
        assert!(host.0.wait().unwrap().success(), "{mode}");

        let mut restored = restore(&control, "waiting");
        assert_eq!(
            std::fs::read_to_string(&fifo).unwrap(),
            "hello",
            "{mode}: restored"
        );
        let out = all_output(&mut restored);
        assert_eq!(out, "wrote 5\n", "{mode}: restored");
        assert!(restored.0.wait().unwrap().success(), "{mode}: restored");
    }
}

/// Opened with O_NONBLOCK, a FIFO behaves as POSIX says for non-blocking
/// descriptors: no reader is ENXIO for a writer, no writer yet is end of
/// stream for a reader, no data is EAGAIN.
#[test]
fn a_fifo_opened_non_blocking_never_waits() {
    let control = Control::new("fifo-nonblocking");
    let (data, _fifo) = fifo_in(&control);
    let spec = format!("{}::/data", data.display());
    let mut host = KillOnDrop::spawn(
        host_command()
            .args([
                "--dir",
                &spec,
                guest("fifo").to_str().unwrap(),
                "-n",
                "/data/pipe",
            ])
            .stdout(Stdio::piped()),
    );
    // A call that waited would wait for good: nobody else opens the FIFO.
    let deadline = Instant::now() + Duration::from_secs(20);
    while host.0.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the program waits where POSIX does not"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(host.0.wait().unwrap().success());
    let mut out = String::new();
    host.0
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert_eq!(
        out,
        "open for writing, no reader: No such device or address\n\
         read, no writer yet: 0\n\
         open for writing, with a reader: 0\n\
         read, no data: Resource temporarily unavailable\n\
         write: 1\n\
         read: 1\n\
         read, writer gone: 0\n\
         set blocking: 0\n\
         read in blocking mode, no writer: 0\n"
    );
}

/// A device opened by path is used as the host uses it, without blocking
/// in the kernel: `/dev/null` takes writes, reads as empty, seeks, and is
/// no terminal.
#[test]
fn a_device_opened_by_path_behaves_as_on_the_host() {
    let out = upstare_tests::run_host(&[
        "--dir",
        "/dev::/dev",
        guest("fifo").to_str().unwrap(),
        "-d",
        "/dev/null",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "isatty: 0\nwrite: 3\nread: 0\nseek: 0\n"
    );
}
