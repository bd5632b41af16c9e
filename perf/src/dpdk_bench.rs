//! `torii-dpdk-bench`: Torii forwarding between a vhost-user port and a DPDK memif port (a
//! cross-connect), against `dpdk-testpmd` doing the same io forwarding between a `net_vhost`
//! port and a `net_memif` port, in the same run, interleaved and repeated.
//!
//! The forwarder owns CPU 1 (Torii's PMD in poll mode; testpmd's forwarding lcore). Torii's
//! DPDK threads and the testpmd forwarder's main lcore sit on CPU 0, with the peers'
//! forwarding lcores (their main lcores, which only print statistics, sit on CPU 1, as
//! `torii-bench` places its frontend). Two directions:
//!
//! * **vhost-to-memif**: traffic enters the forwarder's vhost-user port (the peer is a
//!   virtio-user frontend) and leaves by its memif port (the peer is a memif client; the
//!   forwarder's memif is the server).
//! * **memif-to-vhost**: the other way.
//!
//! Two ways to drive it ([`Peers`]):
//!
//! * **combined** (the default): one peer testpmd, one forwarding lcore, io forwarding over
//!   three ports in a chain: `net_null0` (its receive makes frames, uninitialised content, of
//!   the size asked) → the generator port → (through the forwarder) the sink port →
//!   `net_null0` (its transmit frees them). Generator and sink take turns on the lcore burst by
//!   burst, so the forwarder sees a steady stream.
//! * **split**: a generator testpmd (`txonly`) and a sink testpmd (`rxonly`), two processes
//!   whose forwarding lcores share CPU 0. On a 2-CPU machine the scheduler runs them in turns
//!   of milliseconds, and while the sink is off the forwarder's output ring fills and the rest
//!   is dropped: the rate measures the rings and the time slice more than the forwarder.
//!
//! Start order: the forwarder, the sink, its link (Torii: the port is up in the stats file;
//! testpmd: one second), then the generator (combined: the peer, then both links). The rate
//! is the sink port's `Rx-pps` from the peer's periodic statistics (1 s period), counted from
//! the generator's start; the first `warmup` samples are dropped and the median of the rest
//! is the run's rate.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use serde::Serialize;

use crate::bench::{self, median, FinalJson};
use crate::proc_util::{self, ChildGuard};
use crate::testpmd::{FwdMode, StatsSample, Testpmd, TestpmdBuilder};

/// The forwarder's CPU (Torii's PMD, testpmd's forwarding lcore).
pub const FORWARDER_CPU: u32 = 1;
/// The peers' forwarding lcores (and DPDK's housekeeping threads).
pub const PEER_CPU: u32 = 0;
/// Hugepage memory of each testpmd (MiB).
pub const TESTPMD_MEM_MIB: u32 = 512;
/// Torii's `[dpdk] memory_mib`.
pub const TORII_DPDK_MIB: u32 = 256;
/// Free 2 MiB hugepages needed: three testpmds (the testpmd forwarder with split peers).
pub const HUGEPAGES_NEEDED: u64 = 3 * TESTPMD_MEM_MIB as u64 / 2;
/// Frame sizes accepted (one mbuf, one memif buffer).
pub const SIZE_RANGE: std::ops::RangeInclusive<u16> = 60..=1518;
/// The sink's port in the combined peer (ports: null, generator, sink).
pub const COMBINED_SINK_PORT: u16 = 2;

const START_TIMEOUT: Duration = Duration::from_secs(30);
const LINK_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
const LOG_TAIL_LINES: usize = 25;

/// Which way the packets go through the forwarder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum)]
pub enum Direction {
    /// virtio-user generator → vhost-user port → memif port → memif sink.
    VhostToMemif,
    /// memif generator → memif port → vhost-user port → virtio-user sink.
    MemifToVhost,
}

impl Direction {
    /// `vhost-to-memif` / `memif-to-vhost`.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::VhostToMemif => "vhost-to-memif",
            Direction::MemifToVhost => "memif-to-vhost",
        }
    }

    /// The name of Torii's port the sink is attached to.
    pub fn sink_port(self) -> &'static str {
        match self {
            Direction::VhostToMemif => "memif",
            Direction::MemifToVhost => "vm",
        }
    }

    /// The name of Torii's port the generator is attached to.
    pub fn generator_port(self) -> &'static str {
        match self {
            Direction::VhostToMemif => "vm",
            Direction::MemifToVhost => "memif",
        }
    }
}

impl Serialize for Direction {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// The forwarder under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Forwarder {
    /// `torii-dataplane`: a vhost-user port cross-connected to a `dpdk` memif port.
    Torii,
    /// `dpdk-testpmd`: io forwarding between `net_vhost` and `net_memif`.
    Testpmd,
    /// Another `torii-dataplane` build (`--baseline-dataplane`, e.g. the last commit's), run
    /// the same way: a before/after comparison in the same run.
    Baseline,
}

impl Forwarder {
    /// `torii` / `testpmd`.
    pub fn as_str(self) -> &'static str {
        match self {
            Forwarder::Torii => "torii",
            Forwarder::Testpmd => "testpmd",
            Forwarder::Baseline => "torii-baseline",
        }
    }
}

impl Serialize for Forwarder {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// How the generator and the sink run (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Peers {
    /// One testpmd, one lcore: null → generator port, sink port → null (io, chained).
    #[default]
    Combined,
    /// A txonly generator testpmd and an rxonly sink testpmd sharing CPU 0.
    Split,
}

impl Peers {
    /// `combined` / `split`.
    pub fn as_str(self) -> &'static str {
        match self {
            Peers::Combined => "combined",
            Peers::Split => "split",
        }
    }
}

impl Serialize for Peers {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Settings shared by all runs.
#[derive(Debug, Clone, Serialize)]
pub struct Options {
    /// Rounds; each runs both forwarders for every (direction, size).
    pub rounds: u32,
    /// Per-second samples collected per run.
    pub secs: u32,
    /// Leading samples discarded as warm-up.
    pub warmup: u32,
    /// Frame sizes (bytes without FCS).
    pub sizes: Vec<u16>,
    /// Directions measured.
    pub directions: Vec<Direction>,
    /// How the generator and the sink run.
    pub peers: Peers,
    /// `torii-dataplane` binary (built with the `dpdk` feature).
    pub dataplane: PathBuf,
    /// A second `torii-dataplane` binary measured as the `torii-baseline` forwarder.
    pub baseline: Option<PathBuf>,
    /// `dpdk-testpmd` binary (None: from PATH).
    pub testpmd: Option<PathBuf>,
}

/// A port's counters from a testpmd's last periodic statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PortCounters {
    pub port: u16,
    pub rx_packets: u64,
    pub rx_missed: u64,
    pub rx_nombuf: u64,
    pub tx_packets: u64,
    pub tx_errors: u64,
}

/// The ports of the last complete periodic statistics block.
pub fn last_ports(samples: &[StatsSample]) -> Vec<PortCounters> {
    let Some(last) = samples.iter().map(|s| s.block).max() else {
        return Vec::new();
    };
    samples
        .iter()
        .filter(|s| s.block == last)
        .map(|s| PortCounters {
            port: s.port,
            rx_packets: s.rx_packets,
            rx_missed: s.rx_missed,
            rx_nombuf: s.rx_nombuf,
            tx_packets: s.tx_packets,
            tx_errors: s.tx_errors,
        })
        .collect()
}

/// A peer testpmd of a run.
#[derive(Debug, Clone, Serialize)]
pub struct PeerRecord {
    /// `generator`, `sink` or `generator+sink`.
    pub role: &'static str,
    pub args: Vec<String>,
    /// Its exit statistics (all ports together).
    pub final_stats: Option<FinalJson>,
    /// Its ports' counters at its last periodic statistics.
    pub ports: Vec<PortCounters>,
}

/// One measured run.
#[derive(Debug, Clone, Serialize)]
pub struct DpdkRun {
    pub forwarder: Forwarder,
    pub direction: Direction,
    /// Frame size (bytes without FCS).
    pub size: u16,
    /// Round (0-based).
    pub round: u32,
    /// Whether this forwarder ran before the other one for this (direction, size, round).
    pub first_in_round: bool,
    /// Whether the run produced a rate.
    pub ok: bool,
    /// Why it failed (the first line; log tails are in `logs`).
    pub error: Option<String>,
    /// Median of the post-warm-up samples, Mpps.
    pub mpps: Option<f64>,
    /// The sink's receive rate every second from the generator's start, packets/s (warm-up
    /// included).
    pub series_pps: Vec<u64>,
    /// Leading entries of `series_pps` that were discarded.
    pub warmup_samples: usize,
    /// Torii's stats file at the end of the measurement, before the peers stop (port
    /// counters and drops, DPDK's view of the memif device, PMD cycles).
    pub torii_report: Option<serde_json::Value>,
    /// The testpmd forwarder's ports at the end of the measurement (port 0: vhost, 1: memif).
    pub forwarder_ports: Vec<PortCounters>,
    /// The testpmd forwarder's exit statistics (its drops; the memif port's own counters
    /// restart when its peer disconnects, so its packet counts there can be low).
    pub forwarder_final: Option<FinalJson>,
    /// Torii's configuration, or the testpmd forwarder's arguments.
    pub forwarder_setup: String,
    pub peers: Vec<PeerRecord>,
    /// Unix time the run started.
    pub started_unix: u64,
    /// Wall time of the whole run (setup and teardown included), seconds.
    pub wall_secs: f64,
    /// Problems that did not fail the run.
    pub warnings: Vec<String>,
    /// Log tails of the processes, for failed runs.
    pub logs: Vec<(String, String)>,
}

impl DpdkRun {
    fn new(forwarder: Forwarder, direction: Direction, size: u16, round: u32) -> Self {
        DpdkRun {
            forwarder,
            direction,
            size,
            round,
            first_in_round: false,
            ok: false,
            error: None,
            mpps: None,
            series_pps: Vec::new(),
            warmup_samples: 0,
            torii_report: None,
            forwarder_ports: Vec::new(),
            forwarder_final: None,
            forwarder_setup: String::new(),
            peers: Vec::new(),
            started_unix: bench::unix_now(),
            wall_secs: 0.0,
            warnings: Vec::new(),
            logs: Vec::new(),
        }
    }
}

/// Torii's configuration: the vhost-user port `vm` cross-connected to the memif server port
/// `memif`, one PMD in poll mode on [`FORWARDER_CPU`], DPDK's threads on [`PEER_CPU`].
pub fn torii_config(dir: &Path) -> String {
    format!(
        "[dataplane]\npmd_cpus = [{FORWARDER_CPU}]\npmd_mode = \"poll\"\nstats_file = \"{}\"\ncontrol_socket = \"{}\"\n\n\
         [dpdk]\nmemory_mib = {TORII_DPDK_MIB}\ncpus = [{PEER_CPU}]\n\n\
         [[port]]\nname = \"vm\"\ntype = \"vhost-user\"\nsocket = \"{}\"\n\n\
         [[port]]\nname = \"memif\"\ntype = \"dpdk\"\ndevice = \"net_memif0,role=server,socket={},socket-abstract=no\"\n\n\
         [[xconnect]]\nports = [\"vm\", \"memif\"]\n",
        dir.join("stats.json").display(),
        dir.join("control.sock").display(),
        dir.join("vhost.sock").display(),
        dir.join("memif.sock").display(),
    )
}

/// The per-second receive rates of `port`.
pub fn sink_series(samples: &[StatsSample], port: u16) -> Vec<u64> {
    samples
        .iter()
        .filter(|s| s.port == port)
        .map(|s| s.rx_pps)
        .collect()
}

// ---------------------------------------------------------------------------
// Processes

/// A running `torii-dataplane`; SIGKILLed on drop.
struct Torii {
    child: ChildGuard,
    log: PathBuf,
    stats: PathBuf,
}

impl Torii {
    fn spawn(binary: &Path, config: &Path, log: PathBuf, stats: PathBuf) -> anyhow::Result<Self> {
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone().context("duplicating log handle")?;
        let mut cmd = Command::new(binary);
        cmd.arg("run")
            .arg("--config")
            .arg(config)
            .env("TORII_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        proc_util::die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        Ok(Torii {
            child: ChildGuard::new_group(child, "torii-dataplane"),
            log,
            stats,
        })
    }

    fn tail(&self) -> String {
        proc_util::file_tail(&self.log, LOG_TAIL_LINES)
    }

    /// The stats file's report and when it was written.
    fn report(&self) -> Option<(serde_json::Value, SystemTime)> {
        let t = std::fs::metadata(&self.stats).ok()?.modified().ok()?;
        let v = serde_json::from_str(&std::fs::read_to_string(&self.stats).ok()?).ok()?;
        Some((v, t))
    }

    /// Waits until port `name` is up in the stats file: a DPDK port's link, a vhost-user
    /// port's frontend connected.
    fn wait_link(&mut self, name: &str) -> anyhow::Result<()> {
        let mut last = None;
        let done = proc_util::wait_until(LINK_TIMEOUT, Duration::from_millis(50), || {
            if !self.child.is_running() {
                return true;
            }
            let Some((r, _)) = self.report() else {
                return false;
            };
            let p = r["ports"]
                .as_array()
                .and_then(|ps| ps.iter().find(|p| p["name"] == name).cloned());
            let up = p.as_ref().is_some_and(|p| {
                if p["kind"] == "dpdk" {
                    p["dpdk"]["link_up"] == true
                } else {
                    p["connected"] == true
                }
            });
            last = p;
            up
        });
        if !self.child.is_running() {
            bail!("torii-dataplane exited while waiting for port {name} to come up");
        }
        if !done {
            bail!(
                "port {name} not up within {LINK_TIMEOUT:?}: {}",
                last.map_or("absent".into(), |p| p.to_string())
            );
        }
        Ok(())
    }

    /// SIGINT, then SIGKILL.
    fn stop(&mut self) -> anyhow::Result<()> {
        if self.child.is_running() {
            self.child.signal(libc::SIGINT)?;
        }
        if self.child.wait_timeout(STOP_TIMEOUT)?.is_none() {
            self.child.kill()?;
            bail!("torii-dataplane did not exit within {STOP_TIMEOUT:?} of SIGINT; killed");
        }
        Ok(())
    }
}

enum FwdProc {
    Torii(Torii),
    Testpmd(Testpmd),
}

impl FwdProc {
    fn is_running(&mut self) -> bool {
        match self {
            FwdProc::Torii(t) => t.child.is_running(),
            FwdProc::Testpmd(t) => t.is_running(),
        }
    }

    fn tail(&self) -> (String, String) {
        match self {
            FwdProc::Torii(t) => ("torii-dataplane".into(), t.tail()),
            FwdProc::Testpmd(t) => ("forwarder testpmd".into(), t.log_tail(LOG_TAIL_LINES)),
        }
    }

    /// Waits for the links of Torii's `ports`; testpmd's forwarder gets a second.
    fn wait_links(&mut self, ports: &[&str]) -> anyhow::Result<()> {
        match self {
            FwdProc::Torii(t) => ports.iter().try_for_each(|p| t.wait_link(p)),
            FwdProc::Testpmd(_) => {
                std::thread::sleep(Duration::from_secs(1));
                Ok(())
            }
        }
    }
}

fn testpmd_builder(opts: &Options) -> TestpmdBuilder {
    let b = TestpmdBuilder::new().mem_mib(TESTPMD_MEM_MIB);
    match &opts.testpmd {
        Some(p) => b.binary(p),
        None => b,
    }
}

/// Adds the peer's port on the forwarder's memif (client) or vhost-user (virtio-user) socket.
fn peer_port(b: TestpmdBuilder, on_memif: bool, dir: &Path) -> TestpmdBuilder {
    if on_memif {
        b.memif(dir.join("memif.sock"), false)
    } else {
        b.virtio_user(dir.join("vhost.sock"), 1, false)
    }
}

/// A split generator (`txonly`) or sink (`rxonly`), its forwarding lcore on [`PEER_CPU`].
pub fn split_peer(
    opts: &Options,
    on_memif: bool,
    mode: FwdMode,
    size: u16,
    dir: &Path,
) -> TestpmdBuilder {
    peer_port(testpmd_builder(opts), on_memif, dir)
        .forward_mode(mode)
        .pkt_size(size)
        .lcores("0,1", FORWARDER_CPU)
}

/// The combined peer: ports null (0), generator (1), sink ([`COMBINED_SINK_PORT`]) chained
/// with io forwarding, so null's frames go out of the generator port and what the sink port
/// receives is freed by null; its forwarding lcore on [`PEER_CPU`].
pub fn combined_peer(opts: &Options, d: Direction, size: u16, dir: &Path) -> TestpmdBuilder {
    let b = testpmd_builder(opts).vdev(format!("net_null0,size={size}"), 1);
    let gen_on_memif = d == Direction::MemifToVhost;
    let b = peer_port(b, gen_on_memif, dir);
    peer_port(b, !gen_on_memif, dir)
        .forward_mode(FwdMode::Io)
        .pkt_size(size)
        .extra_app_arg("--port-topology=chained")
        .lcores("0,1", FORWARDER_CPU)
}

/// First line of an error chain (the rest, e.g. log tails, goes to `logs`).
fn short_error(e: &anyhow::Error) -> String {
    format!("{e:#}")
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Runs one forwarder for one (direction, size). Never panics on peer failures: a failure is
/// recorded in the result. Every child is stopped (or killed) before this returns.
pub fn run_one(
    opts: &Options,
    forwarder: Forwarder,
    direction: Direction,
    size: u16,
    round: u32,
    first_in_round: bool,
    hugepages_baseline: Option<u64>,
) -> DpdkRun {
    let t0 = Instant::now();
    let mut r = DpdkRun::new(forwarder, direction, size, round);
    r.first_in_round = first_in_round;
    r.warmup_samples = opts.warmup as usize;
    match measure(opts, &mut r) {
        Err(e) => {
            r.error = Some(short_error(&e));
            let full = format!("{e:#}");
            if full.lines().count() > 1 {
                r.logs.push(("error".into(), full));
            }
        }
        Ok(()) => match bench::run_rate(&r.series_pps, r.warmup_samples) {
            Ok(m) => {
                r.ok = true;
                r.mpps = Some(m);
            }
            Err(e) => r.error = Some(e),
        },
    }
    if let Some(base) = hugepages_baseline {
        // The testpmds' and Torii's hugepages go back to the kernel shortly after they exit.
        let ok = proc_util::wait_until(Duration::from_secs(5), Duration::from_millis(100), || {
            bench::free_hugepages().is_some_and(|f| f >= base)
        });
        if !ok {
            r.warnings.push(format!(
                "free hugepages {} < {base} at start of bench (held by someone else?)",
                bench::free_hugepages().unwrap_or(0)
            ));
        }
    }
    r.wall_secs = t0.elapsed().as_secs_f64();
    r
}

fn measure(opts: &Options, r: &mut DpdkRun) -> anyhow::Result<()> {
    let tmp = proc_util::unique_tmp_dir("torii-dpdkb").context("creating temporary directory")?;
    let mut fwd = match r.forwarder {
        Forwarder::Torii | Forwarder::Baseline => {
            let cfg = torii_config(tmp.path());
            let path = tmp.join("torii.toml");
            std::fs::write(&path, &cfg).with_context(|| format!("writing {}", path.display()))?;
            r.forwarder_setup = cfg;
            let bin = match (r.forwarder, &opts.baseline) {
                (Forwarder::Baseline, Some(b)) => b,
                (Forwarder::Baseline, None) => anyhow::bail!("no --baseline-dataplane given"),
                _ => &opts.dataplane,
            };
            FwdProc::Torii(Torii::spawn(
                bin,
                &path,
                tmp.join("torii.log"),
                tmp.join("stats.json"),
            )?)
        }
        Forwarder::Testpmd => {
            let b = testpmd_builder(opts)
                .vhost(tmp.join("vhost.sock"), 1)
                .memif(tmp.join("memif.sock"), true)
                .forward_mode(FwdMode::Io)
                .pkt_size(r.size)
                // Main lcore on the peers' CPU: the forwarding lcore is FORWARDER_CPU.
                .lcores("0,1", PEER_CPU);
            r.forwarder_setup = b.args().join(" ");
            FwdProc::Testpmd(b.spawn().context("starting the forwarder testpmd")?)
        }
    };
    let res = with_forwarder(opts, r, &mut fwd, tmp.path());
    if res.is_err() {
        r.logs.push(fwd.tail());
    }
    let stop = match &mut fwd {
        FwdProc::Torii(t) => t.stop(),
        FwdProc::Testpmd(t) => match t.stop(STOP_TIMEOUT) {
            Ok(f) => {
                r.forwarder_final = Some(f.into());
                Ok(())
            }
            Err(e) => Err(e.into()),
        },
    };
    drop(fwd);
    res?;
    if let Err(e) = stop {
        r.warnings
            .push(format!("stopping the forwarder: {}", short_error(&e)));
    }
    Ok(())
}

fn with_forwarder(
    opts: &Options,
    r: &mut DpdkRun,
    fwd: &mut FwdProc,
    dir: &Path,
) -> anyhow::Result<()> {
    match fwd {
        FwdProc::Torii(t) => {
            let up = proc_util::wait_until(START_TIMEOUT, Duration::from_millis(50), || {
                t.report().is_some() || !t.child.is_running()
            });
            if !t.child.is_running() {
                bail!("torii-dataplane exited at start");
            }
            if !up {
                bail!("no stats file from torii-dataplane within {START_TIMEOUT:?}");
            }
        }
        FwdProc::Testpmd(t) => t
            .wait_for_log("start packet forwarding", START_TIMEOUT)
            .context("forwarder testpmd start")?,
    }
    match opts.peers {
        Peers::Combined => run_combined(opts, r, fwd, dir),
        Peers::Split => run_split(opts, r, fwd, dir),
    }
}

/// Stops a peer and records it (with its log tail if the run failed).
fn finish_peer(
    r: &mut DpdkRun,
    role: &'static str,
    args: Vec<String>,
    peer: &mut Testpmd,
    failed: bool,
) {
    let final_stats = match peer.stop(STOP_TIMEOUT) {
        Ok(f) => Some(f.into()),
        Err(e) => {
            r.warnings.push(format!(
                "stopping the {role} testpmd: {}",
                e.to_string().lines().next().unwrap_or("")
            ));
            None
        }
    };
    if failed {
        r.logs
            .push((format!("{role} testpmd"), peer.log_tail(LOG_TAIL_LINES)));
    }
    r.peers.push(PeerRecord {
        role,
        args,
        final_stats,
        ports: last_ports(&peer.samples()),
    });
}

fn run_combined(
    opts: &Options,
    r: &mut DpdkRun,
    fwd: &mut FwdProc,
    dir: &Path,
) -> anyhow::Result<()> {
    let b = combined_peer(opts, r.direction, r.size, dir);
    let args = b.args();
    let mut peer = b.spawn().context("starting the peer testpmd")?;
    let res = (|| -> anyhow::Result<()> {
        peer.wait_for_log("start packet forwarding", START_TIMEOUT)
            .context("peer testpmd start")?;
        fwd.wait_links(&[r.direction.sink_port(), r.direction.generator_port()])?;
        sample(opts, r, fwd, &mut peer, COMBINED_SINK_PORT, None)
    })();
    finish_peer(r, "generator+sink", args, &mut peer, res.is_err());
    res
}

fn run_split(opts: &Options, r: &mut DpdkRun, fwd: &mut FwdProc, dir: &Path) -> anyhow::Result<()> {
    let sink_on_memif = r.direction == Direction::VhostToMemif;
    let sb = split_peer(opts, sink_on_memif, FwdMode::RxOnly, r.size, dir);
    let sink_args = sb.args();
    let mut sink = sb.spawn().context("starting the sink testpmd")?;
    let res = (|| -> anyhow::Result<()> {
        sink.wait_for_log("start packet forwarding", START_TIMEOUT)
            .context("sink testpmd start")?;
        fwd.wait_links(&[r.direction.sink_port()])?;
        let gb = split_peer(opts, !sink_on_memif, FwdMode::TxOnly, r.size, dir);
        let gen_args = gb.args();
        let mut gen = gb.spawn().context("starting the generator testpmd")?;
        let res = (|| -> anyhow::Result<()> {
            gen.wait_for_log("start packet forwarding", START_TIMEOUT)
                .context("generator testpmd start")?;
            sample(opts, r, fwd, &mut sink, 0, Some(&mut gen))
        })();
        finish_peer(r, "generator", gen_args, &mut gen, res.is_err());
        res
    })();
    finish_peer(r, "sink", sink_args, &mut sink, res.is_err());
    res
}

/// Collects `opts.secs` samples of the rate `sink` receives on `port` from now on, then takes
/// the forwarder's counters (before the peers stop).
fn sample(
    opts: &Options,
    r: &mut DpdkRun,
    fwd: &mut FwdProc,
    sink: &mut Testpmd,
    port: u16,
    mut gen: Option<&mut Testpmd>,
) -> anyhow::Result<()> {
    let n0 = sink_series(&sink.samples(), port).len();
    let want = opts.secs as usize;
    let deadline = Instant::now() + Duration::from_secs(u64::from(opts.secs) + 15);
    let res = loop {
        std::thread::sleep(Duration::from_millis(200));
        let n = sink_series(&sink.samples(), port).len().saturating_sub(n0);
        if n >= want {
            break Ok(());
        }
        if bench::interrupted() {
            break Err(anyhow::anyhow!("interrupted"));
        }
        if gen.as_mut().is_some_and(|g| !g.is_running()) {
            break Err(anyhow::anyhow!(
                "the generator testpmd exited during the run"
            ));
        }
        if !sink.is_running() {
            break Err(anyhow::anyhow!("the sink testpmd exited during the run"));
        }
        if !fwd.is_running() {
            break Err(anyhow::anyhow!("the forwarder exited during the run"));
        }
        if Instant::now() >= deadline {
            r.warnings
                .push(format!("only {n} of {want} samples before the deadline"));
            break Ok(());
        }
    };
    r.series_pps = sink_series(&sink.samples(), port)
        .into_iter()
        .skip(n0)
        .take(want)
        .collect();
    match fwd {
        FwdProc::Torii(t) => r.torii_report = t.report().map(|(v, _)| v),
        FwdProc::Testpmd(t) => r.forwarder_ports = last_ports(&t.samples()),
    }
    res
}

// ---------------------------------------------------------------------------
// Summary

/// One forwarder's runs of one (direction, size).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ForwarderSummary {
    /// Median Mpps of the successful runs.
    pub median_mpps: Option<f64>,
    pub min_mpps: Option<f64>,
    pub max_mpps: Option<f64>,
    /// Successful runs.
    pub ok_runs: usize,
    /// All runs.
    pub runs: usize,
}

impl ForwarderSummary {
    fn of(runs: &[DpdkRun], f: Forwarder, d: Direction, size: u16) -> Self {
        let all: Vec<&DpdkRun> = runs
            .iter()
            .filter(|r| r.forwarder == f && r.direction == d && r.size == size)
            .collect();
        let rates: Vec<f64> = all.iter().filter_map(|r| r.mpps).collect();
        ForwarderSummary {
            median_mpps: median(&rates),
            min_mpps: rates.iter().copied().reduce(f64::min),
            max_mpps: rates.iter().copied().reduce(f64::max),
            ok_runs: rates.len(),
            runs: all.len(),
        }
    }
}

/// One (direction, size) row of the summary.
#[derive(Debug, Clone, Serialize)]
pub struct DpdkSummary {
    pub direction: Direction,
    pub size: u16,
    pub torii: ForwarderSummary,
    pub testpmd: ForwarderSummary,
    /// Torii's median / testpmd's median.
    pub ratio: Option<f64>,
    /// With `--baseline-dataplane`: the baseline build, and Torii's median / its median.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline: Option<ForwarderSummary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio_to_baseline: Option<f64>,
}

/// Summary rows in the order (direction, size) of `opts`.
pub fn summarize(opts: &Options, runs: &[DpdkRun]) -> Vec<DpdkSummary> {
    let mut rows = Vec::new();
    for &direction in &opts.directions {
        for &size in &opts.sizes {
            let torii = ForwarderSummary::of(runs, Forwarder::Torii, direction, size);
            let testpmd = ForwarderSummary::of(runs, Forwarder::Testpmd, direction, size);
            if torii.runs + testpmd.runs == 0 {
                continue;
            }
            let ratio_of = |a: &ForwarderSummary, b: &ForwarderSummary| {
                a.median_mpps
                    .zip(b.median_mpps)
                    .and_then(|(t, d)| (d > 0.0).then_some(t / d))
            };
            let ratio = ratio_of(&torii, &testpmd);
            let baseline = opts
                .baseline
                .is_some()
                .then(|| ForwarderSummary::of(runs, Forwarder::Baseline, direction, size));
            let ratio_to_baseline = baseline.as_ref().and_then(|b| ratio_of(&torii, b));
            rows.push(DpdkSummary {
                direction,
                size,
                torii,
                testpmd,
                ratio,
                baseline,
                ratio_to_baseline,
            });
        }
    }
    rows
}

fn fmt_opt(v: Option<f64>, prec: usize) -> String {
    v.map_or_else(|| "-".into(), |x| format!("{x:.prec$}"))
}

fn fmt_range(s: &ForwarderSummary) -> String {
    match (s.min_mpps, s.max_mpps) {
        (Some(lo), Some(hi)) => format!("{lo:.2}-{hi:.2}"),
        _ => "-".into(),
    }
}

/// The summary as a markdown table: per forwarder the median Mpps over the rounds, the
/// min-max of the run rates and the ok/total runs; then torii/testpmd.
pub fn summary_table(rows: &[DpdkSummary]) -> String {
    let mut s = String::from(
        "| direction | size | torii Mpps | torii min-max | runs | testpmd Mpps | testpmd min-max | runs | torii/testpmd |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        s += &format!(
            "| {} | {} | {} | {} | {}/{} | {} | {} | {}/{} | {} |\n",
            r.direction.as_str(),
            r.size,
            fmt_opt(r.torii.median_mpps, 2),
            fmt_range(&r.torii),
            r.torii.ok_runs,
            r.torii.runs,
            fmt_opt(r.testpmd.median_mpps, 2),
            fmt_range(&r.testpmd),
            r.testpmd.ok_runs,
            r.testpmd.runs,
            fmt_opt(r.ratio, 3),
        );
    }
    if rows.iter().any(|r| r.baseline.is_some()) {
        s += "\n| direction | size | torii-baseline Mpps | min-max | runs | torii/baseline |\n|---|---:|---:|---:|---:|---:|\n";
        for r in rows {
            if let Some(b) = &r.baseline {
                s += &format!(
                    "| {} | {} | {} | {} | {}/{} | {} |\n",
                    r.direction.as_str(),
                    r.size,
                    fmt_opt(b.median_mpps, 2),
                    fmt_range(b),
                    b.ok_runs,
                    b.runs,
                    fmt_opt(r.ratio_to_baseline, 3),
                );
            }
        }
    }
    s
}

/// Packets Torii dropped in a report: no room on a transmit queue, no buffer on receive, and
/// what a DPDK device missed.
pub fn torii_drops(report: &serde_json::Value) -> u64 {
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    report["ports"].as_array().map_or(0, |ps| {
        ps.iter()
            .map(|p| {
                n(&p["tx_dropped_no_room"])
                    + n(&p["rx_dropped_no_buffer"])
                    + n(&p["dpdk"]["rx_missed"])
            })
            .sum()
    })
}

/// One line describing a run.
pub fn run_line(r: &DpdkRun) -> String {
    let series: Vec<String> = r
        .series_pps
        .iter()
        .enumerate()
        .map(|(i, &p)| {
            let m = format!("{:.2}", p as f64 / 1e6);
            if i < r.warmup_samples {
                format!("({m})")
            } else {
                m
            }
        })
        .collect();
    let head = format!(
        "[round {}] {:<7} {:<14} {:>5}B",
        r.round + 1,
        r.forwarder.as_str(),
        r.direction.as_str(),
        r.size
    );
    let extra = match (&r.torii_report, &r.forwarder_final) {
        (Some(t), _) => format!(
            "  {:.0} cyc/pkt, {} dropped",
            t["pmds"][0]["cycles_per_packet"].as_f64().unwrap_or(0.0),
            torii_drops(t)
        ),
        (None, Some(f)) => format!("  {} dropped", f.rx_dropped + f.tx_dropped),
        _ => String::new(),
    };
    match (r.mpps, &r.error) {
        (Some(m), _) => format!("{head}  {m:7.3} Mpps  [{}]{extra}", series.join(" ")),
        (None, e) => format!(
            "{head}  FAILED: {}  [{}]",
            e.as_deref().unwrap_or("unknown"),
            series.join(" ")
        ),
    }
}

/// Where results go by default.
pub fn default_out(root: &Path) -> PathBuf {
    root.join("perf/results/dpdk-latest.json")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> Options {
        Options {
            rounds: 2,
            secs: 3,
            warmup: 1,
            sizes: vec![64, 1518],
            directions: vec![Direction::VhostToMemif, Direction::MemifToVhost],
            peers: Peers::Combined,
            dataplane: PathBuf::new(),
            baseline: None,
            testpmd: None,
        }
    }

    #[test]
    fn torii_config_cross_connects_vhost_user_and_memif() {
        let c = torii_config(Path::new("/t"));
        assert!(c.contains("pmd_cpus = [1]\npmd_mode = \"poll\""), "{c}");
        assert!(c.contains("[dpdk]\nmemory_mib = 256\ncpus = [0]"), "{c}");
        assert!(
            c.contains("type = \"vhost-user\"\nsocket = \"/t/vhost.sock\""),
            "{c}"
        );
        assert!(c.contains(
            "device = \"net_memif0,role=server,socket=/t/memif.sock,socket-abstract=no\""
        ));
        assert!(c.contains("ports = [\"vm\", \"memif\"]"), "{c}");
    }

    #[test]
    fn combined_peer_chains_null_generator_sink() {
        let a = combined_peer(&opts(), Direction::VhostToMemif, 512, Path::new("/t"))
            .args()
            .join(" ");
        let null = a.find("--vdev net_null0,size=512").unwrap();
        let virtio = a
            .find("--vdev net_virtio_user0,path=/t/vhost.sock")
            .unwrap();
        let memif = a
            .find("--vdev net_memif0,role=client,socket=/t/memif.sock")
            .unwrap();
        assert!(null < virtio && virtio < memif, "{a}");
        assert!(a.contains("--forward-mode=io") && a.contains("--port-topology=chained"));
        assert!(a.contains("-l 0,1 --main-lcore 1"), "{a}");
        let b = combined_peer(&opts(), Direction::MemifToVhost, 64, Path::new("/t"))
            .args()
            .join(" ");
        assert!(b.find("net_memif0").unwrap() < b.find("net_virtio_user0").unwrap());
    }

    #[test]
    fn series_and_last_ports() {
        let s = StatsSample {
            rx_pps: 9,
            tx_pps: 7,
            rx_packets: 5,
            ..Default::default()
        };
        let other = StatsSample { port: 2, ..s };
        let later = StatsSample {
            block: 1,
            rx_packets: 6,
            ..s
        };
        assert_eq!(sink_series(&[s, other, s], 0), [9, 9]);
        assert_eq!(sink_series(&[s, other], 2), [9]);
        let p = last_ports(&[s, other, later]);
        assert_eq!(p.len(), 1);
        assert_eq!((p[0].port, p[0].rx_packets), (0, 6));
        assert!(last_ports(&[]).is_empty());
    }

    fn fake(f: Forwarder, mpps: Option<f64>) -> DpdkRun {
        let mut r = DpdkRun::new(f, Direction::VhostToMemif, 64, 0);
        r.mpps = mpps;
        r.ok = mpps.is_some();
        r
    }

    #[test]
    fn summary_relates_torii_to_testpmd() {
        let runs = [
            fake(Forwarder::Torii, Some(2.0)),
            fake(Forwarder::Torii, Some(4.0)),
            fake(Forwarder::Torii, None),
            fake(Forwarder::Testpmd, Some(8.0)),
        ];
        let rows = summarize(&opts(), &runs);
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!((r.torii.ok_runs, r.torii.runs), (2, 3));
        assert_eq!(r.torii.median_mpps, Some(3.0));
        assert_eq!((r.torii.min_mpps, r.torii.max_mpps), (Some(2.0), Some(4.0)));
        assert_eq!(r.ratio, Some(0.375));
        let t = summary_table(&rows);
        assert!(
            t.contains("| vhost-to-memif | 64 | 3.00 | 2.00-4.00 | 2/3 | 8.00 |"),
            "{t}"
        );
        assert!(t.contains("| 0.375 |"), "{t}");
    }

    #[test]
    fn drops_add_up_over_ports() {
        let v = serde_json::json!({"ports": [
            {"tx_dropped_no_room": 3, "rx_dropped_no_buffer": 1},
            {"tx_dropped_no_room": 2, "dpdk": {"rx_missed": 4}},
        ]});
        assert_eq!(torii_drops(&v), 10);
    }
}
