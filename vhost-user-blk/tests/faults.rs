//! Fault injection on the standalone daemon: torii-vhost-user-blk SIGKILLed a hundred times
//! while a disk client writes, and restarted at once. No write the client saw acknowledged is
//! lost (each block is checked by its pattern through a new connection), and nothing is left:
//! no process, no socket, no file descriptor of the image.

mod common;

use std::time::Duration;

use common::{Backend, OrFail};
use torii_perf::fault::{self, verify, Ledger, Writer};
use torii_perf::proc_util;

const REPETITIONS: usize = 100;
const IMAGE_MIB: u64 = 64;

#[test]
fn killed_a_hundred_times_under_writes_no_acknowledged_write_is_lost() {
    torii_perf::prereq::require_root().or_fail("prerequisite");
    let dir = proc_util::unique_tmp_dir("torii-blk-fault").or_fail("tmp dir");
    let img = common::image(dir.path(), "disk.img", IMAGE_MIB);
    let mut b = Backend::start(dir.path(), &img, &[]);
    let ledger = Ledger::new(IMAGE_MIB << 20 >> 12);
    for i in 0..REPETITIONS {
        let writer = Writer::start(&b.socket, ledger.clone());
        let before = ledger.acked_count();
        let busy = proc_util::wait_until(Duration::from_secs(10), Duration::from_millis(2), || {
            ledger.acked_count() > before + 8
        });
        assert!(busy, "round {i}: no write got through; {}", b.log_text());
        // The writer is mid-stream when the backend dies; it notices and stops.
        b.kill_then(|| writer.finish().unwrap_or_else(|e| panic!("round {i}: {e}")));
    }
    let acked = ledger.acked();
    verify(&b.socket, &acked);
    eprintln!(
        "{REPETITIONS} SIGKILLs: {} acknowledged writes verified",
        acked.len()
    );
    let sock = b.socket.clone();
    b.stop();
    let img_name = img.to_string_lossy().into_owned();
    assert_eq!(
        fault::processes_with(&["torii-vhost-user-blk", &img_name]),
        0,
        "a backend outlived its SIGKILL"
    );
    assert!(!sock.exists());
    assert_eq!(fault::sockets_in(dir.path()), Vec::<String>::new());
    // Nobody holds the image open any more (fd links name the real path).
    let img = img.canonicalize().or_fail("image path");
    let holders = std::fs::read_dir("/proc")
        .or_fail("/proc")
        .flatten()
        .filter(|p| {
            std::fs::read_dir(p.path().join("fd")).is_ok_and(|fds| {
                fds.flatten()
                    .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t == img))
            })
        })
        .count();
    assert_eq!(holders, 0, "the image is still open somewhere");
}
