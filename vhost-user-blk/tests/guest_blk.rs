//! A QEMU (TCG) guest with a vhost-user-blk-pci disk on Torii's backend: a real virtio-blk
//! driver (Linux) and a real vhost-user frontend (QEMU) against the real daemon.

mod common;

use std::time::Duration;

use common::{allocated_blocks, host_cmd, image, run, Backend, FreezableFs, OrFail, T};
use torii_perf::guest::{Guest, GuestBuilder};
use torii_perf::{prereq, proc_util};

fn guest(sock: &std::path::Path, queues: u16, smp: u32) -> GuestBuilder {
    GuestBuilder::new()
        .memory_mib(512)
        .smp(smp)
        .host_root_share(true)
        .blk_vhost_user(sock, queues)
}

fn boot(b: GuestBuilder) -> Guest {
    let mut g = b.spawn().or_fail("starting QEMU");
    g.wait_ready(Duration::from_secs(120)).or_fail("guest boot");
    g
}

/// mkfs.ext4, files written and read back after a guest reboot (the device is reset and the
/// connection re-negotiated), fstrim deallocating on the host, two queues in use, the serial,
/// the block topology, and the cache mode switched by the driver.
#[test]
fn ext4_survives_reboot_and_fstrim_discards() {
    let _heavy = torii_perf::heavy_test_lock();
    prereq::require_qemu().or_fail("QEMU");
    let dir = proc_util::unique_tmp_dir("torii-blk-guest").or_fail("tmp dir");
    let img = image(dir.path(), "disk.img", 256);
    let mut be = Backend::start(
        dir.path(),
        &img,
        &[
            "--queues",
            "2",
            "--serial",
            "torii-disk-1",
            "--physical-block-size",
            "4096",
        ],
    );
    let mut g = boot(guest(&be.socket, 2, 2).allow_reboot(true));

    // Both queues are used by the guest's blk-mq (one per vCPU).
    let hw_queues = run(&mut g, "ls /sys/block/vda/mq | wc -l");
    assert_eq!(hw_queues.trim(), "2", "blk-mq queues");
    assert_eq!(
        run(&mut g, "cat /sys/block/vda/serial").trim(),
        "torii-disk-1"
    );
    assert_eq!(
        run(&mut g, "cat /sys/block/vda/size").trim(),
        (256u64 << 11).to_string()
    );
    assert_eq!(run(&mut g, "cat /sys/block/vda/ro").trim(), "0");
    // Topology: 512-byte logical blocks, 4 KiB physical blocks.
    assert_eq!(
        run(
            &mut g,
            "cat /sys/block/vda/queue/logical_block_size /sys/block/vda/queue/physical_block_size"
        )
        .split_whitespace()
        .collect::<Vec<_>>(),
        ["512", "4096"]
    );
    // The driver switches the cache mode through the config space (CONFIG_WCE).
    assert_eq!(
        run(&mut g, "cat /sys/block/vda/cache_type").trim(),
        "write back"
    );
    run(&mut g, "echo 'write through' > /sys/block/vda/cache_type");
    assert_eq!(
        run(&mut g, "cat /sys/block/vda/cache_type").trim(),
        "write through"
    );
    run(&mut g, "echo 'write back' > /sys/block/vda/cache_type");

    run(
        &mut g,
        &host_cmd("/host/usr/sbin/mke2fs -q -F -t ext4 -E nodiscard /dev/vda"),
    );
    run(&mut g, "mkdir -p /mnt && mount -t ext4 /dev/vda /mnt");
    run(
        &mut g,
        "dd if=/dev/urandom of=/mnt/a bs=1M count=16 2>/dev/null && \
         dd if=/dev/urandom of=/mnt/b bs=4k count=999 2>/dev/null && \
         mkdir /mnt/d && for i in $(seq 1 50); do echo file $i > /mnt/d/f$i; done && sync",
    );
    let sums = run(&mut g, "(cd /mnt && sha256sum a b d/* | sha256sum)");
    // A big file written, synced and deleted: fstrim must give its blocks back to the host.
    run(
        &mut g,
        "dd if=/dev/urandom of=/mnt/big bs=1M count=48 2>/dev/null && sync",
    );
    let before = allocated_blocks(&img);
    run(&mut g, "rm /mnt/big && sync");
    let trimmed = run(&mut g, "fstrim -v /mnt");
    let after = allocated_blocks(&img);
    assert!(
        before.saturating_sub(after) >= 40 << 11,
        "fstrim ({}) freed only {} sectors on the host ({before} -> {after})",
        trimmed.trim(),
        before.saturating_sub(after)
    );
    run(&mut g, "umount /mnt");

    // Reboot: the guest resets the device; the backend serves the re-initialized rings.
    g.send_line("reboot -f").or_fail("reboot");
    g.wait_ready(Duration::from_secs(120))
        .or_fail("guest boot after reboot");
    run(&mut g, "mkdir -p /mnt && mount -t ext4 /dev/vda /mnt");
    let again = run(&mut g, "(cd /mnt && sha256sum a b d/* | sha256sum)");
    assert_eq!(sums, again, "files differ after the reboot");
    run(&mut g, "umount /mnt");
    g.poweroff(T).or_fail("poweroff");

    assert!(
        be.log_text().contains("frontend connected"),
        "log:\n{}",
        be.log_text()
    );
    assert!(
        !be.log_text().contains("virtqueue broken"),
        "log:\n{}",
        be.log_text()
    );
    be.stop();
}

/// A read-only export: the guest sees a read-only disk, and writes forced through the block
/// layer are refused by the backend (IOERR), leaving the image unchanged.
#[test]
fn read_only_export_rejects_writes() {
    let _heavy = torii_perf::heavy_test_lock();
    prereq::require_qemu().or_fail("QEMU");
    let dir = proc_util::unique_tmp_dir("torii-blk-ro").or_fail("tmp dir");
    let img = image(dir.path(), "ro.img", 16);
    std::fs::write(&img, vec![0x5a; 16 << 20]).or_fail("filling image");
    let mut be = Backend::start(dir.path(), &img, &["--read-only"]);
    let mut g = boot(guest(&be.socket, 1, 1));
    assert_eq!(run(&mut g, "cat /sys/block/vda/ro").trim(), "1");
    // Reads work.
    let first = run(
        &mut g,
        "dd if=/dev/vda bs=4k count=1 iflag=direct 2>/dev/null | od -An -tx1 | head -1",
    );
    assert!(first.contains("5a 5a 5a"), "read {first}");
    // Make the block layer let writes through, so that they reach the device.
    run(&mut g, "blockdev --setrw /dev/vda");
    let w = g
        .run("dd if=/dev/zero of=/dev/vda bs=4k count=1 oflag=direct", T)
        .or_fail("dd");
    assert_ne!(w.rc, 0, "a write to a read-only export succeeded: {w:?}");
    let d = g
        .run("blkdiscard -o 0 -l 4096 /dev/vda", T)
        .or_fail("blkdiscard");
    assert_ne!(d.rc, 0, "a discard on a read-only export succeeded: {d:?}");
    g.poweroff(T).or_fail("poweroff");
    be.stop();
    let data = std::fs::read(&img).or_fail("reading image");
    assert!(data.iter().all(|&b| b == 0x5a), "the image changed");
}

/// Crash-safe reconnect: the backend is killed (SIGKILL) and restarted while four guest
/// writers keep O_DIRECT writes in flight; QEMU reconnects and re-sends the inflight region,
/// the new backend resubmits what its predecessor left unfinished, the writers carry on, and
/// every write the guest saw acknowledged is in the image file. Two kills land wherever the
/// writers are; for the last one the file system under the image is frozen first, so writes
/// the backend has taken are certainly in flight when it dies.
#[test]
fn killed_backend_restarts_and_no_acknowledged_write_is_lost() {
    let _heavy = torii_perf::heavy_test_lock();
    prereq::require_qemu().or_fail("QEMU");
    prereq::require_root().or_fail("root (loop device, mount, fsfreeze)");
    let dir = proc_util::unique_tmp_dir("torii-blk-kill").or_fail("tmp dir");
    const REGION_MIB: u64 = 4;
    const REGIONS: u64 = 48;
    let fs = FreezableFs::new(dir.path(), REGION_MIB * REGIONS + 64);
    let img = image(&fs.mnt, "disk.img", REGION_MIB * REGIONS);
    // Write-through: each write is durable on completion (RWF_DSYNC).
    let mut be = Backend::start(dir.path(), &img, &["--writethrough"]);
    let mut g = boot(guest(&be.socket, 1, 1).blk_reconnect_ms(200));
    let stop = dir.join("stop");
    let src_sum = run(
        &mut g,
        &format!(
            "dd if=/dev/urandom of=/tmp/src bs=1M count={REGION_MIB} 2>/dev/null && sha256sum < /tmp/src"
        ),
    );
    // Writer w fills regions w, w+4, w+8, ... (round and round) with /tmp/src, logging each
    // one dd reported done (acknowledged), until the host creates `stop` (seen through the
    // 9p share).
    for w in 0..4 {
        g.spawn_bg(&format!(
            "r={w}; while [ ! -e /host{stop} ]; do \
               dd if=/tmp/src of=/dev/vda bs=1M seek=$((r*{REGION_MIB})) oflag=direct conv=notrunc 2>/dev/null \
                 && echo $r >> /tmp/acked.{w}; r=$(((r+4)%{REGIONS})); done; touch /tmp/done.{w}",
            stop = stop.display()
        ))
        .or_fail("writer");
    }
    let connected = |be: &Backend, n: usize| {
        proc_util::wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
            be.log_text().matches("frontend connected").count() >= n
        })
    };
    for kill in 0..2 {
        std::thread::sleep(Duration::from_millis(1500));
        be.kill_then(|| {});
        assert!(
            connected(&be, kill + 2),
            "QEMU did not reconnect; log:\n{}",
            be.log_text()
        );
    }
    std::thread::sleep(Duration::from_millis(1500));
    fs.freeze();
    // The writers' requests pile up in the backend, blocked in the frozen file system.
    std::thread::sleep(Duration::from_millis(1000));
    be.kill_then(|| fs.thaw());
    assert!(
        connected(&be, 4),
        "QEMU did not reconnect; log:\n{}",
        be.log_text()
    );
    let resubmitted =
        proc_util::wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
            be.log_text().contains(RESUBMITTED)
        });
    assert!(
        resubmitted,
        "the restarted backend resubmitted nothing; log:\n{}",
        be.log_text()
    );
    std::thread::sleep(Duration::from_millis(1500));
    std::fs::write(&stop, b"").or_fail("stop flag");
    run(
        &mut g,
        "i=0; until [ -e /tmp/done.0 ] && [ -e /tmp/done.1 ] && [ -e /tmp/done.2 ] && [ -e /tmp/done.3 ]; do \
           i=$((i+1)); [ $i -ge 600 ] && exit 1; sleep 0.1; done",
    );
    let mut acked: Vec<u64> = run(&mut g, "cat /tmp/acked.*")
        .split_whitespace()
        .map(|s| s.parse().or_fail("acked region"))
        .collect();
    acked.sort_unstable();
    acked.dedup();
    assert!(acked.len() >= 8, "only {} regions written", acked.len());
    // The guest reads every acknowledged region back (through the restarted backend)...
    let bad = run(
        &mut g,
        &format!(
            "for r in $(cat /tmp/acked.* | sort -u); do \
               s=$(dd if=/dev/vda bs=1M skip=$((r*{REGION_MIB})) count={REGION_MIB} iflag=direct 2>/dev/null | sha256sum); \
               [ \"$s\" = \"$(sha256sum < /tmp/src)\" ] || echo bad $r; done"
        ),
    );
    assert_eq!(bad.trim(), "", "regions read back wrong in the guest");
    g.poweroff(T).or_fail("poweroff");
    be.stop();
    // ...and the image file on the host holds them: the guest's source data, not zeros.
    let data = std::fs::read(&img).or_fail("reading image");
    let region = (REGION_MIB << 20) as usize;
    let want = &data[acked[0] as usize * region..][..region];
    for &r in &acked {
        let got = &data[r as usize * region..][..region];
        assert!(got == want, "region {r} differs in the image");
    }
    assert_eq!(
        src_sum.split_whitespace().next(),
        Some(sha256_hex(want).as_str())
    );
}

/// What a restarted backend logs when it resubmits requests from the inflight region.
const RESUBMITTED: &str = "resubmitting requests left in flight";

/// SHA-256 of `data` as lowercase hex (sha256sum's output), by the host's sha256sum.
fn sha256_hex(data: &[u8]) -> String {
    use std::io::Write;
    let mut c = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .or_fail("sha256sum");
    let mut stdin = c.stdin.take().expect("piped stdin");
    stdin.write_all(data).or_fail("sha256sum input");
    drop(stdin);
    let out = c.wait_with_output().or_fail("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}
