//! Terminal tests run under a pseudo-terminal: `ctr run -t` and `ctr task exec -t` need one,
//! and CI has none. Checked against the runc shim of each containerd version.

use std::time::Duration;

use hyperbox_integration::containerd::ContainerdVersion;
use hyperbox_integration::images::TestImage;
use hyperbox_integration::per_version;
use hyperbox_integration::pty::{run_in_pty, run_in_pty_when};
use hyperbox_integration::testbed::TestBed;

fn tty_through_ctr(v: ContainerdVersion) {
    let bed = TestBed::start(v).expect("test bed");
    let image = bed.image(TestImage::Busybox).expect("busybox");
    let c = &bed.containerd;

    let mut run = c.ctr();
    run.args(["run", "-t", "--rm", "--fifo-dir"])
        .arg(c.dir().join("fifo"))
        // A moment before the exit: containerd 1.7's runc shim once dropped the whole output
        // of a process that exited at once (CI, `5f53cd6`..`ebc5331`: "" with exit code 6).
        .args([
            &image,
            "tty1",
            "sh",
            "-c",
            "tty; stty size; sleep 0.2; exit 6",
        ]);
    let out = run_in_pty(run, b"", Duration::from_secs(60)).expect("ctr run -t");
    assert!(out.output.contains("/dev/pts/"), "{out:?}");
    assert_eq!(out.status.code(), Some(6), "{out:?}");

    // Input typed on the terminal reaches the container's shell.
    let mut run = c.ctr();
    run.args(["run", "-t", "--rm", "--fifo-dir"])
        .arg(c.dir().join("fifo"))
        .args([&image, "tty2", "sh"]);
    let out = run_in_pty_when(
        run,
        "# ",
        b"echo typed-$((6*7))\nexit 2\n",
        Duration::from_secs(60),
    )
    .expect("interactive ctr run -t");
    assert!(out.output.contains("typed-42"), "{out:?}");
    assert_eq!(out.status.code(), Some(2), "{out:?}");

    // exec with and without a terminal returns the exec'd process's exit code.
    c.ctr_run(&["run", "-d", "--null-io", &image, "host", "sleep", "1000"])
        .unwrap();
    let mut exec = c.ctr();
    exec.args(["tasks", "exec", "-t", "--exec-id", "e1", "host"])
        .args(["sh", "-c", "tty; exit 9"]);
    let out = run_in_pty(exec, b"", Duration::from_secs(60)).expect("exec -t");
    assert!(out.output.contains("/dev/pts/"), "{out:?}");
    assert_eq!(out.status.code(), Some(9), "{out:?}");

    let out = c
        .ctr()
        .args(["tasks", "exec", "--exec-id", "e2", "host", "sh", "-c"])
        .arg("tty; exit 11")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(11));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("not a tty"),
        "{out:?}"
    );
}
per_version!(tty, tty_through_ctr);
