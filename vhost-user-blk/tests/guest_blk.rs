//! A QEMU (TCG) guest with a vhost-user-blk-pci disk on Torii's backend: a real virtio-blk
//! driver (Linux) and a real vhost-user frontend (QEMU) against the real daemon.

mod common;

use std::time::Duration;

use common::{allocated_blocks, host_cmd, image, run, Backend, OrFail, T};
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
/// and the cache mode switched by the driver.
#[test]
fn ext4_survives_reboot_and_fstrim_discards() {
    let _heavy = torii_perf::heavy_test_lock();
    prereq::require_qemu().or_fail("QEMU");
    let dir = proc_util::unique_tmp_dir("torii-blk-guest").or_fail("tmp dir");
    let img = image(dir.path(), "disk.img", 256);
    let mut be = Backend::start(
        dir.path(),
        &img,
        &["--queues", "2", "--serial", "torii-disk-1"],
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
