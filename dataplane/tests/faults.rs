//! Fault injection: torii-dataplane killed with SIGKILL under load, a hundred times, restarted
//! at once as a supervisor would; and frontends that die without a goodbye, a hundred times,
//! against a daemon that stays up. What must hold: the frontends (DPDK virtio-user, waiting in
//! server mode) are reconnected and net traffic flows again within a second of the restart;
//! no write a disk client saw acknowledged is lost (every block is checked by its pattern);
//! and nothing is left behind — no process, no socket, no hugepage, and no file descriptor,
//! thread or memory growth in a daemon that outlives its frontends.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Daemon, OrFail};
use torii_perf::blk_client::BlkClient;
use torii_perf::fault::{
    self, client_config, completion, pattern, sockets_in, steady, verify, Ledger, Writer, BLOCK,
    S_OK, T_OUT,
};
use torii_perf::testpmd::{FwdMode, Testpmd, TestpmdBuilder};
use torii_perf::{prereq, proc_util};

const REPETITIONS: usize = 100;
/// How soon traffic must flow again after the restarted daemon is started.
const BACK_WITHIN: Duration = Duration::from_secs(1);
const IMAGE_BLOCKS: u64 = 16384; // 64 MiB of 4 KiB blocks

fn prerequisites() {
    prereq::require_root().or_fail("prerequisite");
    prereq::require_testpmd().or_fail("prerequisite");
    prereq::require_hugepages(512).or_fail("prerequisite");
}

/// A virtio-user testpmd listening on `sock` (server=1): it waits for Torii, and for Torii
/// again after Torii dies.
fn waiting_frontend(sock: &Path, mode: FwdMode, main_lcore: u32) -> Testpmd {
    let t = TestpmdBuilder::new()
        .virtio_user(sock, 1, true)
        .forward_mode(mode)
        .pkt_size(64)
        .mem_mib(256)
        .total_num_mbufs(8192)
        .lcores("0,1", main_lcore)
        .spawn()
        .or_fail("starting testpmd");
    proc_util::wait_for_path(sock, Duration::from_secs(20)).or_fail("testpmd socket");
    t
}

/// A port counter read live through the control API (not the once-a-second stats file).
fn live_counter(socket: &Path, port: &str, field: &str) -> Option<u64> {
    let r =
        torii_dataplane::ctl::request(socket, "GET", &format!("/v1/ports/{port}"), None).ok()?;
    if r.status != 200 {
        return None;
    }
    serde_json::from_str::<serde_json::Value>(&r.body).ok()?[field].as_u64()
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Torii's processes started with `config`.
fn daemons_of(config: &Path) -> usize {
    fault::processes_with(&["torii-dataplane", &config.to_string_lossy()])
}

/// SIGKILL under load, a hundred times: net traffic between two waiting testpmds flows again
/// within a second of each restart, every acknowledged disk write survives, and nothing is
/// left behind.
#[test]
fn killed_dataplane_is_back_within_a_second_and_loses_no_acknowledged_write() {
    let _lock = torii_perf::heavy_test_lock();
    prerequisites();
    let dir = proc_util::unique_tmp_dir("torii-fault").or_fail("tmp dir");
    let hp_before = fault::hugepages_free();
    let (a_sock, b_sock, d_sock) = (dir.join("a.sock"), dir.join("b.sock"), dir.join("d.sock"));
    let img = dir.join("d.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(IMAGE_BLOCKS * u64::from(BLOCK)))
        .or_fail("image");
    let mut tx = waiting_frontend(&a_sock, FwdMode::TxOnly, 0);
    let mut rx = waiting_frontend(&b_sock, FwdMode::RxOnly, 1);
    let mut dp = Daemon::start(
        dir.path(),
        "",
        &format!(
            "[[port]]\nname = \"a\"\ntype = \"vhost-user\"\nsocket = \"{}\"\nmode = \"client\"\n\
             [[port]]\nname = \"b\"\ntype = \"vhost-user\"\nsocket = \"{}\"\nmode = \"client\"\n\
             [[xconnect]]\nports = [\"a\", \"b\"]\n\
             [[disk]]\nname = \"d\"\nsocket = \"{}\"\nfile = \"{}\"\n",
            a_sock.display(),
            b_sock.display(),
            d_sock.display(),
            img.display()
        ),
    );
    let ctl = dp.control_socket();
    dp.wait_port("b", Duration::from_secs(30), "traffic a -> b", |p| {
        p["tx_packets"].as_u64().unwrap_or(0) > 10_000
    });

    let ledger = Ledger::new(IMAGE_BLOCKS);
    let mut back = Vec::with_capacity(REPETITIONS);
    for i in 0..REPETITIONS {
        // A disk client writing when the daemon dies.
        let writer = Writer::start(&d_sock, ledger.clone());
        let before = ledger.acked_count();
        let busy = proc_util::wait_until(Duration::from_secs(10), Duration::from_millis(2), || {
            ledger.acked_count() > before + 8
        });
        assert!(busy, "round {i}: the disk client got no write through");
        dp.kill9();
        writer.finish().unwrap_or_else(|e| panic!("round {i}: {e}"));

        let t0 = Instant::now();
        dp.spawn_nowait();
        // A new daemon's counters start at zero.
        let flowing =
            proc_util::wait_until(Duration::from_secs(10), Duration::from_millis(5), || {
                live_counter(&ctl, "b", "tx_packets").is_some_and(|n| n > 0)
            });
        let took = t0.elapsed();
        assert!(
            flowing,
            "round {i}: no traffic through b after the restart; log:\n{}",
            proc_util::tail_lines(&dp.log_text(), 40)
        );
        back.push(took);
    }
    // The daemon started a hundred and one times; every one but the last is gone.
    assert_eq!(daemons_of(&dir.join("dataplane.toml")), 1);
    let acked = ledger.acked();
    verify(&d_sock, &acked);
    let worst = *back.iter().max().unwrap();
    let med = median(&mut back.clone());
    eprintln!(
        "{REPETITIONS} SIGKILLs: traffic back after {med:?} (median), {worst:?} (worst); {} acknowledged writes verified",
        acked.len()
    );
    assert!(
        back.iter().all(|&t| t < BACK_WITHIN),
        "traffic took longer than {BACK_WITHIN:?} to come back: {back:?}"
    );

    dp.stop();
    tx.stop(Duration::from_secs(20)).or_fail("stopping sender");
    rx.stop(Duration::from_secs(20))
        .or_fail("stopping receiver");
    assert_eq!(daemons_of(&dir.join("dataplane.toml")), 0);
    assert_eq!(sockets_in(dir.path()), Vec::<String>::new(), "sockets left");
    let hp_after =
        proc_util::wait_until(Duration::from_secs(5), Duration::from_millis(100), || {
            fault::hugepages_free() >= hp_before
        });
    assert!(
        hp_after,
        "hugepages free: {hp_before} before, {} after",
        fault::hugepages_free()
    );
}

/// A hundred disk frontends that connect, write and vanish without a goodbye (their socket and
/// memory simply go, as when a VMM is killed), and a few DPDK frontends killed the same way:
/// the daemon keeps serving, and its file descriptors, threads and memory do not grow.
#[test]
fn a_hundred_dead_frontends_leak_nothing_in_the_daemon() {
    let _lock = torii_perf::heavy_test_lock();
    prerequisites();
    let dir = proc_util::unique_tmp_dir("torii-fault-fe").or_fail("tmp dir");
    let (v_sock, d_sock) = (dir.join("v.sock"), dir.join("d.sock"));
    let img = dir.join("d.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(IMAGE_BLOCKS * u64::from(BLOCK)))
        .or_fail("image");
    let mut dp = Daemon::start(
        dir.path(),
        "",
        &common::vhost_to_sink_and_disk(&v_sock, &d_sock, &img),
    );
    let pid = dp.pid();
    let disk = |dp: &Daemon| {
        let r = torii_dataplane::ctl::request(&dp.control_socket(), "GET", "/v1/disks/d", None)
            .or_fail("disk");
        serde_json::from_str::<serde_json::Value>(&r.body).or_fail("disk JSON")
    };
    let crash_one = |n: u64| {
        let mut c = BlkClient::connect(&d_sock, &client_config()).or_fail("connect");
        let mut q = c.take_queues().pop().expect("queue");
        pattern(n, &mut q.data(0)[..BLOCK as usize]);
        q.queue(0, T_OUT, n * 8, BLOCK);
        q.publish();
        let st = completion(&mut q, Duration::from_secs(5)).expect("write answered");
        assert_eq!(st, S_OK);
        // Another request in flight, then the frontend is gone: socket, rings and memory.
        q.queue(0, T_OUT, (n + 1) * 8, BLOCK);
        q.publish();
        drop(q);
        drop(c);
    };
    // Warm up (the first connections size the daemon's pools and logs), then measure.
    for n in 0..10 {
        crash_one(n);
    }
    // Every connection made so far was served and is over.
    let settled = |dp: &Daemon, want: u64| {
        proc_util::wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
            let d = disk(dp);
            d["connections"].as_u64() >= Some(want) && d["connected"] == false
        })
    };
    assert!(settled(&dp, 10), "disk d: {}", disk(&dp));
    let before = steady(pid);
    for n in 10..10 + REPETITIONS as u64 {
        crash_one(n * 2);
    }
    assert!(
        settled(&dp, 10 + REPETITIONS as u64),
        "disk d: {}",
        disk(&dp)
    );
    // A frontend of the net port, killed the same way, three times.
    for round in 0..3 {
        let tx = common::sender(&v_sock);
        let seen = dp.counter("v", "rx_packets");
        dp.wait_port("v", Duration::from_secs(30), "traffic on v", |p| {
            p["rx_packets"].as_u64().unwrap_or(0) > seen + 10_000
        });
        drop(tx); // SIGKILL
        dp.wait_port("v", Duration::from_secs(20), "v disconnected", |p| {
            p["connected"] == false
        });
        assert_eq!(dp.counter("v", "connections"), round + 1);
    }
    let after = steady(pid);
    eprintln!("daemon before: {before:?}; after: {after:?}");
    assert_eq!(after.fds, before.fds, "file descriptors leaked");
    assert_eq!(after.threads, before.threads, "threads leaked");
    // Memory: the net port's first connection may size its buffers once; beyond that, a
    // hundred connections must not show.
    assert!(
        after.rss_kib < before.rss_kib + 16 * 1024,
        "resident memory grew from {} KiB to {} KiB",
        before.rss_kib,
        after.rss_kib
    );
    // Still serving.
    verify(&d_sock, &[0]);
    dp.stop();
    assert_eq!(sockets_in(dir.path()), Vec::<String>::new(), "sockets left");
}

/// Real frontends: two QEMU guests on the switch, pinging each other ten times a second, and
/// torii-dataplane SIGKILLed and restarted at once. QEMU reconnects (its chardev retries every
/// 100 ms), re-negotiates, and the guests' virtio-net carries on: their traffic goes through
/// the new daemon within a second of its start, at most the two pings the dying daemon may
/// have held are lost, none waits longer than two seconds, and no queue is broken.
#[test]
fn guests_ping_through_a_killed_dataplane() {
    use torii_perf::guest::{ChardevMode, GuestBuilder};
    let _lock = torii_perf::heavy_test_lock();
    prereq::require_root().or_fail("prerequisite");
    prereq::require_qemu().or_fail("prerequisite");
    prereq::guest_image().or_fail("prerequisite");
    let dir = proc_util::unique_tmp_dir("torii-fault-vm").or_fail("tmp dir");
    let (sa, sb) = (dir.join("a.sock"), dir.join("b.sock"));
    let mut dp = Daemon::start(
        dir.path(),
        "",
        &format!(
            "[[port]]\nname = \"a\"\ntype = \"vhost-user\"\nsocket = \"{}\"\n\
             [[port]]\nname = \"b\"\ntype = \"vhost-user\"\nsocket = \"{}\"\n",
            sa.display(),
            sb.display()
        ),
    );
    let guest = |sock: &Path, mac: &str, ip: &str| {
        let b = GuestBuilder::new().memory_mib(384).net_vhost_user(
            sock,
            mac,
            1,
            ChardevMode::Client {
                reconnect_ms: Some(100),
            },
        );
        common::start_guest(b, ip)
    };
    let mut a = guest(&sa, "52:54:00:fa:00:01", "10.252.0.1/24");
    let _b = guest(&sb, "52:54:00:fa:00:02", "10.252.0.2/24");
    common::ping_from(&mut a, "10.252.0.2");

    const PINGS: u32 = 100;
    const INTERVAL: f64 = 0.1;
    a.spawn_bg(&format!(
        "ping -c {PINGS} -i {INTERVAL} -W 1 10.252.0.2 > /tmp/ping.log 2>&1"
    ))
    .or_fail("starting ping");
    std::thread::sleep(Duration::from_secs(3));
    dp.kill9();
    let t0 = Instant::now();
    dp.spawn_nowait();
    // Traffic flows again when guest A's pings come through the new daemon to guest B.
    let ctl = dp.control_socket();
    let flowing = proc_util::wait_until(Duration::from_secs(10), Duration::from_millis(5), || {
        live_counter(&ctl, "b", "tx_packets").is_some_and(|n| n > 0)
    });
    let back = t0.elapsed();
    assert!(flowing, "no traffic after the restart: {}", dp.log_text());
    // The pings end (each is answered or given up on after a second).
    let done = a
        .run(
            "i=0; until grep -q 'packets transmitted' /tmp/ping.log; do i=$((i+1)); [ $i -ge 300 ] && break; sleep 0.1; done; cat /tmp/ping.log",
            Duration::from_secs(60),
        )
        .or_fail("reading the ping log");
    let seqs: Vec<u32> = done
        .stdout
        .lines()
        .filter_map(|l| l.split("seq=").nth(1))
        .filter_map(|r| r.split_whitespace().next()?.parse().ok())
        .collect();
    assert!(
        done.stdout.contains("packets transmitted"),
        "{}",
        done.stdout
    );
    // At most the pings the dying daemon had taken from a ring and not yet delivered are lost;
    // those waiting in the rings survive it.
    let mut answered = seqs.clone();
    answered.sort_unstable();
    answered.dedup();
    assert!(
        answered.len() + 2 >= PINGS as usize,
        "{} of {PINGS} pings answered:\n{}",
        answered.len(),
        done.stdout
    );
    // The longest run of pings that got no answer.
    let mut gap = 0;
    let mut last = None;
    for &s in &seqs {
        if let Some(l) = last {
            gap = gap.max(s.saturating_sub(l + 1));
        }
        last = Some(s);
    }
    // Pings sent while the daemon was down wait in the guest's TX ring (it lives in guest
    // memory and the new daemon takes it over where QEMU says it stopped) and are answered late;
    // so the outage is the longer of the longest run of lost pings and the slowest answer.
    let slowest = done
        .stdout
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|r| r.split_whitespace().next()?.parse::<f64>().ok())
        .fold(0.0f64, f64::max)
        / 1000.0;
    let outage = (f64::from(gap) * INTERVAL).max(slowest);
    eprintln!(
        "traffic back {back:?} after the restart; pings answered: {} of {PINGS}; longest run lost {:.1} s, slowest answer {slowest:.3} s",
        seqs.len(),
        f64::from(gap) * INTERVAL
    );
    assert!(
        back < BACK_WITHIN,
        "traffic took {back:?} to come back after the restart"
    );
    // Seen from the guest, a ping sent while the daemon was down waits about a second (the
    // restart, both QEMUs reconnecting, and the pings' own timing); none is lost.
    assert!(
        outage <= 2.0,
        "traffic stopped for {outage:.1} s:\n{}",
        done.stdout
    );
    // Both ports reconnected on the new daemon, and nothing broke.
    for p in ["a", "b"] {
        dp.wait_port(p, Duration::from_secs(10), "reconnected", |v| {
            v["connected"] == true
                && v["connections"] == 1
                && v["broken_queues"] == serde_json::json!([])
        });
    }
    dp.stop();
}
