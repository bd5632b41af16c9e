//! `torii-bench`: Torii vs DPDK's own vhost backend (`dpdk-testpmd` with
//! `net_vhost`), both driven by the same frontend (`dpdk-testpmd` with
//! `net_virtio_user`), interleaved and repeated.
//!
//! * **guest-TX** (the backend dequeues): frontend `txonly` → Torii
//!   vhost-user port cross-connected to a `sink` port, or testpmd `net_vhost`
//!   in `rxonly` mode.
//! * **guest-RX** (the backend enqueues): Torii `source` port cross-connected
//!   to a vhost-user port, or testpmd `net_vhost` in `txonly` mode → frontend
//!   `rxonly`.
//! * **loopback** (VM to VM through the backend, which dequeues from guest A
//!   and enqueues into guest B): Torii with two vhost-user ports
//!   cross-connected, or testpmd with two `net_vhost` ports in `io`
//!   forwarding (paired topology). The frontend is one testpmd, one
//!   forwarding lcore, `io` forwarding over three ports chained
//!   (`--port-topology=chained`, port *i* transmits what port *i*−1
//!   received): `net_null0` (its receive makes frames of the size asked) →
//!   virtio-user A (guest A transmits into the backend) ⇒ backend ⇒
//!   virtio-user B (guest B receives) → `net_null0` (its transmit frees
//!   them). B transmits only what A received, and the backend sends nothing
//!   to A, so nothing flows B → A and the null port's frames only enter A.
//!
//! Both backends are measured at the same point: the frontend's periodic
//! statistics (`Tx-pps` of the txonly frontend = packets the backend drained
//! from the ring; `Rx-pps` of the rxonly frontend = packets the backend put
//! into it; loopback: `Rx-pps` of port B ([`LOOPBACK_SINK_PORT`]) = packets
//! the backend moved from A to B). The first `warmup` samples of a run are
//! dropped and the median of the rest is the run's rate.
//!
//! Frame sizes: testpmd's `--txpkts=N` makes N-byte frames *without* FCS (its
//! `TX-bytes` counts N per packet, e.g. 9440 packets = 604160 bytes for
//! N = 64), so Torii's source uses `frame_size = N` and both backends move
//! exactly the same bytes. Gbps = pps × N × 8 / 1e9, the same convention as
//! testpmd's `Tx-bps`/`Rx-bps` (no FCS, preamble or inter-frame gap).

use std::fs::File;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use serde::Serialize;

use crate::proc_util::{self, ChildGuard};
use crate::testpmd::{FinalStats, FwdMode, StatsSample, Testpmd, TestpmdBuilder};

/// CPU of the backend's busy-polling thread.
pub const BACKEND_CPU: u32 = 1;
/// CPU of the frontend's forwarding lcore.
pub const FRONTEND_CPU: u32 = 0;
/// Hugepage memory of each testpmd (MiB).
pub const TESTPMD_MEM_MIB: u32 = 512;
/// Free 2 MiB hugepages needed: two testpmds of [`TESTPMD_MEM_MIB`] (every
/// path, loopback included, runs one frontend testpmd, whatever its ports,
/// and at most one backend testpmd; Torii takes none: it maps the frontend's).
pub const HUGEPAGES_NEEDED: u64 = 2 * TESTPMD_MEM_MIB as u64 / 2;
/// Smallest and largest packet size accepted (a frame must fit one mbuf,
/// since the frontend runs with `mrg_rxbuf=0`).
pub const SIZE_RANGE: std::ops::RangeInclusive<u16> = 60..=1518;
/// The measured port of the loopback frontend (ports: null 0, virtio-user A
/// 1, virtio-user B 2).
pub const LOOPBACK_SINK_PORT: u16 = 2;

const START_TIMEOUT: Duration = Duration::from_secs(20);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
const LOG_TAIL_LINES: usize = 25;

/// Which data path is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum)]
pub enum Direction {
    /// Guest transmits, the backend dequeues.
    GuestTx,
    /// Guest receives, the backend enqueues.
    GuestRx,
    /// Guest A transmits, the backend forwards to guest B (VM to VM).
    Loopback,
}

impl Direction {
    /// `guest-tx` / `guest-rx` / `loopback`.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::GuestTx => "guest-tx",
            Direction::GuestRx => "guest-rx",
            Direction::Loopback => "loopback",
        }
    }

    /// Forwarding mode of the frontend (the "guest").
    pub fn frontend_mode(self) -> FwdMode {
        match self {
            Direction::GuestTx => FwdMode::TxOnly,
            Direction::GuestRx => FwdMode::RxOnly,
            Direction::Loopback => FwdMode::Io,
        }
    }

    /// Forwarding mode of the testpmd backend.
    pub fn dpdk_backend_mode(self) -> FwdMode {
        match self {
            Direction::GuestTx => FwdMode::RxOnly,
            Direction::GuestRx => FwdMode::TxOnly,
            Direction::Loopback => FwdMode::Io,
        }
    }

    /// Vhost-user ports of the backend (= virtio-user ports of the frontend).
    pub fn vhost_ports(self) -> usize {
        match self {
            Direction::GuestTx | Direction::GuestRx => 1,
            Direction::Loopback => 2,
        }
    }

    /// The frontend port whose rate measures this path.
    pub fn measured_port(self) -> u16 {
        match self {
            Direction::GuestTx | Direction::GuestRx => 0,
            Direction::Loopback => LOOPBACK_SINK_PORT,
        }
    }

    /// The frontend's per-second rate that measures this path.
    pub fn rate(self, s: &StatsSample) -> u64 {
        match self {
            Direction::GuestTx => s.tx_pps,
            Direction::GuestRx | Direction::Loopback => s.rx_pps,
        }
    }
}

impl Serialize for Direction {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// The vhost-user backend under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Backend {
    /// `torii-dataplane`.
    Torii,
    /// `dpdk-testpmd` with `net_vhost`.
    Dpdk,
}

impl Backend {
    /// `torii` / `dpdk`.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Torii => "torii",
            Backend::Dpdk => "dpdk",
        }
    }
}

impl Serialize for Backend {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Settings shared by all runs.
#[derive(Debug, Clone, Serialize)]
pub struct BenchOptions {
    /// Pairs (one run per backend each) per (path, size).
    pub pairs: u32,
    /// Per-second samples collected per run (≈ run length in seconds).
    pub secs: u32,
    /// Leading samples discarded as warm-up.
    pub warmup: u32,
    /// Packet sizes (frame bytes without FCS).
    pub sizes: Vec<u16>,
    /// Paths measured.
    pub paths: Vec<Direction>,
    /// `torii-dataplane` binary.
    pub dataplane: PathBuf,
    /// `dpdk-testpmd` binary (None: from PATH).
    pub testpmd: Option<PathBuf>,
}

/// One measured run.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    /// Backend.
    pub backend: Backend,
    /// Path.
    pub path: Direction,
    /// Packet size (frame bytes without FCS).
    pub size: u16,
    /// Pair index (0-based).
    pub pair: u32,
    /// Whether this backend ran first in its pair.
    pub first_in_pair: bool,
    /// Whether the run produced a rate.
    pub ok: bool,
    /// Why it failed.
    pub error: Option<String>,
    /// Median of the post-warm-up samples, Mpps.
    pub mpps: Option<f64>,
    /// `mpps × size × 8 / 1000`.
    pub gbps: Option<f64>,
    /// Every per-second sample of the frontend, packets/s (warm-up included).
    pub series_pps: Vec<u64>,
    /// Leading entries of `series_pps` that were discarded.
    pub warmup_samples: usize,
    /// The frontend's exit statistics.
    pub frontend_final: Option<FinalJson>,
    /// Torii's last statistics report (`stats_file`), if Torii ran.
    pub torii_report: Option<serde_json::Value>,
    /// Frontend testpmd arguments.
    pub frontend_args: Vec<String>,
    /// Backend testpmd arguments, or Torii's configuration file.
    pub backend_setup: String,
    /// Unix time the run started.
    pub started_unix: u64,
    /// Wall time of the whole run (setup and teardown included), seconds.
    pub wall_secs: f64,
    /// Problems that did not fail the run.
    pub warnings: Vec<String>,
    /// Log tails of the processes, kept for failed runs only.
    pub logs: Vec<(String, String)>,
}

/// [`FinalStats`] as JSON.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct FinalJson {
    /// Packets received.
    pub rx_packets: u64,
    /// Packets dropped on receive.
    pub rx_dropped: u64,
    /// Packets transmitted.
    pub tx_packets: u64,
    /// Packets the engine failed to transmit (ring full).
    pub tx_dropped: u64,
}

impl From<FinalStats> for FinalJson {
    fn from(f: FinalStats) -> Self {
        FinalJson {
            rx_packets: f.rx_packets,
            rx_dropped: f.rx_dropped,
            tx_packets: f.tx_packets,
            tx_dropped: f.tx_dropped,
        }
    }
}

/// Median (mean of the middle two for an even count); `None` when empty.
pub fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Per-second rates of the frontend's measured port for `dir` (port 0, or
/// port B of the loopback frontend).
pub fn frontend_series(samples: &[StatsSample], dir: Direction) -> Vec<u64> {
    let port = dir.measured_port();
    samples
        .iter()
        .filter(|s| s.port == port)
        .map(|s| dir.rate(s))
        .collect()
}

/// The run's rate in Mpps: the median of `series` without its first
/// `warmup` entries. Errors when nothing is left or no packet moved.
pub fn run_rate(series: &[u64], warmup: usize) -> Result<f64, String> {
    let used: Vec<f64> = series.iter().skip(warmup).map(|&p| p as f64).collect();
    if used.is_empty() {
        return Err(format!(
            "no samples after warm-up ({} samples, {warmup} warm-up)",
            series.len()
        ));
    }
    if used.iter().all(|&p| p == 0.0) {
        return Err("no packets moved after warm-up (all samples 0)".into());
    }
    Ok(median(&used).unwrap_or(0.0) / 1e6)
}

/// Gbps of `mpps` at `size`-byte frames.
pub fn gbps(mpps: f64, size: u16) -> f64 {
    mpps * f64::from(size) * 8.0 / 1e3
}

/// The vhost-user sockets of a run in `tmp`: `vhu.sock` for guest-tx and
/// guest-rx; `vhu0.sock` (guest A) and `vhu1.sock` (guest B) for loopback.
pub fn sockets(dir: Direction, tmp: &Path) -> Vec<PathBuf> {
    match dir {
        Direction::GuestTx | Direction::GuestRx => vec![tmp.join("vhu.sock")],
        Direction::Loopback => vec![tmp.join("vhu0.sock"), tmp.join("vhu1.sock")],
    }
}

/// Torii's configuration for one run: one PMD in poll mode on
/// [`BACKEND_CPU`]; the vhost-user port `vhu0` on `sockets[0]`
/// cross-connected to a `sink` (guest-tx), a `source` of `size`-byte frames
/// (guest-rx), or the vhost-user port `vhu1` on `sockets[1]` (loopback).
pub fn torii_config(dir: Direction, size: u16, sockets: &[PathBuf], stats_file: &Path) -> String {
    let vhost_port = |name: &str, socket: &Path| {
        format!(
            "[[port]]\nname = \"{name}\"\ntype = \"vhost-user\"\nsocket = {:?}\nmode = \"server\"\n",
            socket.display().to_string()
        )
    };
    let (other, other_name) = match dir {
        Direction::GuestTx => (
            "[[port]]\nname = \"sink0\"\ntype = \"sink\"\n".to_string(),
            "sink0",
        ),
        Direction::GuestRx => (
            format!("[[port]]\nname = \"src0\"\ntype = \"source\"\nframe_size = {size}\n"),
            "src0",
        ),
        Direction::Loopback => (vhost_port("vhu1", &sockets[1]), "vhu1"),
    };
    format!(
        "[dataplane]\npmd_cpus = [{BACKEND_CPU}]\npmd_mode = \"poll\"\nstats_file = {:?}\ncontrol_socket = {:?}\n\n\
         {}\n{other}\n[[xconnect]]\nports = [\"vhu0\", \"{other_name}\"]\n",
        stats_file.display().to_string(),
        stats_file
            .with_file_name("control.sock")
            .display()
            .to_string(),
        vhost_port("vhu0", &sockets[0]),
    )
}

/// The testpmd backend of one run: a `net_vhost` port listening on each of
/// `sockets`, in [`Direction::dpdk_backend_mode`] (loopback: `io` between
/// the two ports, paired topology, so port 0's receive goes out of port 1),
/// its forwarding lcore on [`BACKEND_CPU`].
pub fn dpdk_backend(
    opts: &BenchOptions,
    dir: Direction,
    size: u16,
    sockets: &[PathBuf],
) -> TestpmdBuilder {
    let mut b = testpmd_builder(opts);
    for s in sockets {
        b = b.vhost(s, 1);
    }
    if dir == Direction::Loopback {
        b = b.extra_app_arg("--port-topology=paired");
    }
    b.forward_mode(dir.dpdk_backend_mode())
        .pkt_size(size)
        // Main lcore on the frontend's CPU: the forwarding lcore is the
        // other one, BACKEND_CPU.
        .lcores("0,1", FRONTEND_CPU)
}

/// The frontend ("guest") of one run, its forwarding lcore on
/// [`FRONTEND_CPU`]: a virtio-user port on `sockets[0]` in
/// [`Direction::frontend_mode`]; loopback: `net_null0` (port 0), virtio-user
/// A on `sockets[0]` (port 1) and virtio-user B on `sockets[1]` (port
/// [`LOOPBACK_SINK_PORT`]), `io` forwarding, chained topology (null → A,
/// A → B, B → null; A receives nothing, so B transmits nothing).
pub fn frontend(
    opts: &BenchOptions,
    dir: Direction,
    size: u16,
    sockets: &[PathBuf],
) -> TestpmdBuilder {
    let mut b = testpmd_builder(opts);
    if dir == Direction::Loopback {
        b = b
            .vdev(format!("net_null0,size={size}"), 1)
            .extra_app_arg("--port-topology=chained");
    }
    for s in sockets {
        b = b.virtio_user(s, 1, false);
    }
    b.forward_mode(dir.frontend_mode())
        .pkt_size(size)
        // Main lcore on the backend's CPU: forwarding runs on FRONTEND_CPU.
        .lcores("0,1", BACKEND_CPU)
}

// ---------------------------------------------------------------------------
// Interruption

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_sig: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Makes SIGINT/SIGTERM/SIGHUP set a flag (see [`interrupted`]) so the
/// bench can stop its children and write partial results. The handler is
/// one-shot: a second signal terminates at once (children still die
/// through `PR_SET_PDEATHSIG`).
pub fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: sigaction is plain data; zeroed is a valid empty value.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        sa.sa_flags = libc::SA_RESETHAND;
        // SAFETY: `sa` is initialised; the handler only stores to an atomic,
        // which is async-signal-safe.
        unsafe {
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// Whether a termination signal arrived.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

// ---------------------------------------------------------------------------
// Processes

/// A running `torii-dataplane`; SIGKILLed on drop.
struct Torii {
    child: ChildGuard,
    log: PathBuf,
}

impl Torii {
    fn spawn(binary: &Path, config: &Path, log: PathBuf) -> anyhow::Result<Torii> {
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone().context("duplicating log handle")?;
        let mut cmd = Command::new(binary);
        cmd.arg("run")
            .arg("-c")
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
        })
    }

    fn tail(&self) -> String {
        proc_util::file_tail(&self.log, LOG_TAIL_LINES)
    }

    /// SIGINT (so the stats file is written a last time), then SIGKILL.
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

enum BackendProc {
    Torii(Torii),
    Dpdk(Testpmd),
}

impl BackendProc {
    fn is_running(&mut self) -> bool {
        match self {
            BackendProc::Torii(t) => t.child.is_running(),
            BackendProc::Dpdk(t) => t.is_running(),
        }
    }

    fn tail(&self) -> (String, String) {
        match self {
            BackendProc::Torii(t) => ("torii-dataplane".into(), t.tail()),
            BackendProc::Dpdk(t) => ("backend testpmd".into(), t.log_tail(LOG_TAIL_LINES)),
        }
    }

    fn stop(&mut self) -> anyhow::Result<()> {
        match self {
            BackendProc::Torii(t) => t.stop(),
            BackendProc::Dpdk(t) => t.stop(STOP_TIMEOUT).map(|_| ()).map_err(Into::into),
        }
    }
}

fn testpmd_builder(opts: &BenchOptions) -> TestpmdBuilder {
    let b = TestpmdBuilder::new().mem_mib(TESTPMD_MEM_MIB);
    match &opts.testpmd {
        Some(p) => b.binary(p),
        None => b,
    }
}

/// First line of an error chain (the rest, e.g. log tails, goes to `logs`).
fn short_error(e: &anyhow::Error) -> String {
    let s = format!("{e:#}");
    s.lines().next().unwrap_or_default().to_string()
}

/// Free 2 MiB hugepages now.
pub fn free_hugepages() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    crate::prereq::parse_hugepages_2m(&text)
        .ok()
        .map(|(_, f)| f)
}

/// Runs one backend for one (path, size). Never panics on peer failures: a
/// failure is recorded in the result. All children are stopped (or killed)
/// before this returns.
pub fn run_one(
    opts: &BenchOptions,
    backend: Backend,
    dir: Direction,
    size: u16,
    pair: u32,
    first_in_pair: bool,
    hugepages_baseline: Option<u64>,
) -> RunResult {
    let t0 = Instant::now();
    let mut r = RunResult {
        backend,
        path: dir,
        size,
        pair,
        first_in_pair,
        ok: false,
        error: None,
        mpps: None,
        gbps: None,
        series_pps: Vec::new(),
        warmup_samples: opts.warmup as usize,
        frontend_final: None,
        torii_report: None,
        frontend_args: Vec::new(),
        backend_setup: String::new(),
        started_unix: unix_now(),
        wall_secs: 0.0,
        warnings: Vec::new(),
        logs: Vec::new(),
    };
    let outcome = measure(opts, &mut r);
    if let Err(e) = outcome {
        r.error = Some(short_error(&e));
        let full = format!("{e:#}");
        if full.lines().count() > 1 {
            r.logs.push(("error".into(), full));
        }
    } else if let Err(e) = run_rate(&r.series_pps, r.warmup_samples) {
        r.error = Some(e);
    }
    if r.error.is_none() {
        let mpps = run_rate(&r.series_pps, r.warmup_samples).unwrap_or(0.0);
        r.ok = true;
        r.mpps = Some(mpps);
        r.gbps = Some(gbps(mpps, size));
    }
    if let Some(base) = hugepages_baseline {
        // The testpmds are reaped; their hugepages go back to the kernel
        // shortly after.
        let ok = proc_util::wait_until(Duration::from_secs(5), Duration::from_millis(100), || {
            free_hugepages().is_some_and(|f| f >= base)
        });
        if !ok {
            r.warnings.push(format!(
                "free hugepages {} < {base} at start of bench (held by someone else?)",
                free_hugepages().unwrap_or(0)
            ));
        }
    }
    r.wall_secs = t0.elapsed().as_secs_f64();
    r
}

fn measure(opts: &BenchOptions, r: &mut RunResult) -> anyhow::Result<()> {
    let (backend, dir, size) = (r.backend, r.path, r.size);
    let tmp = proc_util::unique_tmp_dir("torii-bench").context("creating temporary directory")?;
    let socks = sockets(dir, tmp.path());

    // Backend: listens on the sockets.
    let mut back = match backend {
        Backend::Torii => {
            let cfg_path = tmp.join("torii.toml");
            let stats = tmp.join("stats.json");
            let cfg = torii_config(dir, size, &socks, &stats);
            r.backend_setup = cfg.clone();
            std::fs::write(&cfg_path, &cfg)
                .with_context(|| format!("writing {}", cfg_path.display()))?;
            BackendProc::Torii(Torii::spawn(
                &opts.dataplane,
                &cfg_path,
                tmp.join("torii.log"),
            )?)
        }
        Backend::Dpdk => {
            let b = dpdk_backend(opts, dir, size, &socks);
            r.backend_setup = b.args().join(" ");
            BackendProc::Dpdk(b.spawn().context("starting backend testpmd")?)
        }
    };
    let res = measure_with_backend(opts, r, &mut back, &socks);
    if res.is_err() {
        r.logs.push(back.tail());
    }
    let stop = back.stop();
    if let BackendProc::Torii(_) = back {
        r.torii_report = std::fs::read_to_string(tmp.join("stats.json"))
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok());
    }
    drop(back);
    res?;
    if let Err(e) = stop {
        r.warnings
            .push(format!("stopping backend: {}", short_error(&e)));
    }
    Ok(())
}

fn measure_with_backend(
    opts: &BenchOptions,
    r: &mut RunResult,
    back: &mut BackendProc,
    socks: &[PathBuf],
) -> anyhow::Result<()> {
    let (dir, size) = (r.path, r.size);
    let all_exist = || socks.iter().all(|s| s.exists());
    proc_util::wait_until(START_TIMEOUT, Duration::from_millis(20), || {
        all_exist() || !back.is_running()
    });
    if let Some(missing) = socks.iter().find(|s| !s.exists()) {
        let why = if back.is_running() {
            format!("not within {START_TIMEOUT:?}")
        } else {
            "the backend exited".into()
        };
        bail!("backend socket {} did not appear: {why}", missing.display());
    }
    if let BackendProc::Dpdk(t) = back {
        t.wait_for_log("start packet forwarding", START_TIMEOUT)
            .context("backend testpmd start")?;
    }

    let fb = frontend(opts, dir, size, socks);
    r.frontend_args = fb.args();
    let mut front = fb.spawn().context("starting frontend testpmd")?;
    let res = (|| -> anyhow::Result<()> {
        front
            .wait_for_log("start packet forwarding", START_TIMEOUT)
            .context("frontend testpmd start")?;
        let want = opts.secs as usize;
        let deadline = Instant::now() + Duration::from_secs(u64::from(opts.secs) + 10);
        loop {
            std::thread::sleep(Duration::from_millis(200));
            let n = frontend_series(&front.samples(), dir).len();
            if n >= want {
                break;
            }
            if interrupted() {
                bail!("interrupted");
            }
            if !front.is_running() {
                bail!("frontend testpmd exited during the run");
            }
            if !back.is_running() {
                bail!("backend exited during the run");
            }
            if Instant::now() >= deadline {
                r.warnings
                    .push(format!("only {n} of {want} samples before the deadline"));
                break;
            }
        }
        Ok(())
    })();
    r.series_pps = frontend_series(&front.samples(), dir);
    r.series_pps.truncate(opts.secs as usize);
    match front.stop(STOP_TIMEOUT) {
        Ok(f) => r.frontend_final = Some(f.into()),
        Err(e) => r.warnings.push(format!(
            "stopping frontend: {}",
            e.to_string().lines().next().unwrap_or("")
        )),
    }
    if res.is_err() {
        r.logs
            .push(("frontend testpmd".into(), front.log_tail(LOG_TAIL_LINES)));
    }
    drop(front);
    res
}

// ---------------------------------------------------------------------------
// Summary and metadata

/// One backend's runs of one (path, size).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct BackendSummary {
    /// Median Mpps of the successful runs.
    pub median_mpps: Option<f64>,
    /// Gbps at the median.
    pub median_gbps: Option<f64>,
    /// Smallest run rate, Mpps.
    pub min_mpps: Option<f64>,
    /// Largest run rate, Mpps.
    pub max_mpps: Option<f64>,
    /// Successful runs.
    pub ok_runs: usize,
    /// All runs.
    pub runs: usize,
}

impl BackendSummary {
    fn of(runs: &[RunResult], b: Backend, dir: Direction, size: u16) -> Self {
        let all: Vec<&RunResult> = runs
            .iter()
            .filter(|r| r.backend == b && r.path == dir && r.size == size)
            .collect();
        let rates: Vec<f64> = all.iter().filter_map(|r| r.mpps).collect();
        let median_mpps = median(&rates);
        BackendSummary {
            median_mpps,
            median_gbps: median_mpps.map(|m| gbps(m, size)),
            min_mpps: rates.iter().copied().reduce(f64::min),
            max_mpps: rates.iter().copied().reduce(f64::max),
            ok_runs: rates.len(),
            runs: all.len(),
        }
    }
}

/// One (path, size) line of the summary.
#[derive(Debug, Clone, Serialize)]
pub struct SummaryRow {
    /// Path.
    pub path: Direction,
    /// Packet size.
    pub size: u16,
    /// Torii's runs.
    pub torii: BackendSummary,
    /// DPDK's runs.
    pub dpdk: BackendSummary,
    /// Median Mpps of Torii / median Mpps of DPDK.
    pub ratio: Option<f64>,
}

/// Summary rows in the order (path, size) of `opts`.
pub fn summarize(opts: &BenchOptions, runs: &[RunResult]) -> Vec<SummaryRow> {
    let mut rows = Vec::new();
    for &dir in &opts.paths {
        for &size in &opts.sizes {
            let torii = BackendSummary::of(runs, Backend::Torii, dir, size);
            let dpdk = BackendSummary::of(runs, Backend::Dpdk, dir, size);
            if torii.runs + dpdk.runs == 0 {
                continue;
            }
            let ratio = torii
                .median_mpps
                .zip(dpdk.median_mpps)
                .and_then(|(t, d)| (d > 0.0).then_some(t / d));
            rows.push(SummaryRow {
                path: dir,
                size,
                torii,
                dpdk,
                ratio,
            });
        }
    }
    rows
}

fn fmt_opt(v: Option<f64>, prec: usize) -> String {
    v.map_or_else(|| "-".into(), |x| format!("{x:.prec$}"))
}

fn fmt_backend(b: &BackendSummary) -> String {
    let range = match (b.min_mpps, b.max_mpps) {
        (Some(lo), Some(hi)) => format!("{lo:.2}-{hi:.2}"),
        _ => "-".into(),
    };
    format!(
        "{:>6} {:>5} {:>6} {:>11}",
        fmt_opt(b.median_mpps, 2),
        format!("{}/{}", b.ok_runs, b.runs),
        fmt_opt(b.median_gbps, 2),
        range
    )
}

/// The summary as a text table: per backend the median Mpps, ok/total
/// runs, Gbps at the median and the min-max of the run rates.
pub fn summary_table(rows: &[SummaryRow]) -> String {
    let head = format!(
        "{:>6} {:>5} {:>6} {:>11}",
        "Mpps", "runs", "Gbps", "min-max"
    );
    let mut s = format!(
        "{:<8} {:>4} | {:^31} | {:^31} | {:>6}\n{:<8} {:>4} | {head} | {head} | {:>6}\n",
        "", "", "torii", "dpdk", "ratio", "path", "size", "t/d"
    );
    s.push_str(&"-".repeat(s.lines().last().map_or(0, str::len)));
    s.push('\n');
    for r in rows {
        s.push_str(&format!(
            "{:<8} {:>4} | {} | {} | {:>6}\n",
            r.path.as_str(),
            r.size,
            fmt_backend(&r.torii),
            fmt_backend(&r.dpdk),
            fmt_opt(r.ratio, 3),
        ));
    }
    s
}

/// One line describing a run.
pub fn run_line(r: &RunResult) -> String {
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
        "{:<5} {:<8} {:>5}B pair {}",
        r.backend.as_str(),
        r.path.as_str(),
        r.size,
        r.pair + 1
    );
    // Torii's own cost per packet, from its PMD's cycle counters (independent of the offered
    // load, unlike the rate).
    let cost = r
        .torii_report
        .as_ref()
        .and_then(|t| t["pmds"][0]["cycles_per_packet"].as_f64())
        .map_or(String::new(), |c| format!("  {c:.0} cyc/pkt"));
    match (r.mpps, &r.error) {
        (Some(m), _) => format!(
            "{head}  {m:7.3} Mpps {:7.3} Gbps  [{}]{cost}",
            gbps(m, r.size),
            series.join(" ")
        ),
        (None, e) => format!(
            "{head}  FAILED: {}  [{}]",
            e.as_deref().unwrap_or("unknown"),
            series.join(" ")
        ),
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `YYYY-MM-DDTHH:MM:SSZ` of a Unix time (proleptic Gregorian, UTC).
pub fn format_utc(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let rem = unix % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Host description for the results file.
#[derive(Debug, Clone, Serialize)]
pub struct HostInfo {
    /// `uname -r`.
    pub kernel: String,
    /// `model name` of /proc/cpuinfo.
    pub cpu_model: String,
    /// Online CPUs.
    pub cpus: usize,
    /// Host name.
    pub hostname: String,
}

/// Collects [`HostInfo`].
pub fn host_info() -> HostInfo {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    let cpu_model = read("/proc/cpuinfo")
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    HostInfo {
        kernel: read("/proc/sys/kernel/osrelease"),
        cpu_model,
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        hostname: read("/proc/sys/kernel/hostname"),
    }
}

/// `git rev-parse --short HEAD` in `dir`, and whether the tree has changes.
pub fn git_info(dir: &Path) -> (Option<String>, Option<bool>) {
    let run = |args: &[&str]| -> io::Result<String> {
        let out = Command::new("git").arg("-C").arg(dir).args(args).output()?;
        if !out.status.success() {
            return Err(io::Error::other("git failed"));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let commit = run(&["rev-parse", "--short", "HEAD"]).ok();
    let dirty = run(&["status", "--porcelain", "--untracked-files=no"])
        .ok()
        .map(|s| !s.is_empty());
    (commit, dirty)
}

/// The workspace this crate was built in (or the current directory).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    match manifest.parent() {
        Some(p) if p.join("Cargo.toml").exists() => p.to_path_buf(),
        _ => std::env::current_dir().unwrap_or_else(|_| PathBuf::from(".")),
    }
}

/// The release `torii-dataplane` next to the workspace or this binary.
pub fn find_dataplane(root: &Path) -> anyhow::Result<PathBuf> {
    let mut candidates = vec![root.join("target/release/torii-dataplane")];
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        candidates.push(dir.join("torii-dataplane"));
    }
    if let Ok(cwd) = std::env::current_dir() {
        candidates.push(cwd.join("target/release/torii-dataplane"));
    }
    candidates
        .iter()
        .find(|p| crate::prereq::find_binary(&p.display().to_string()).is_some())
        .cloned()
        .with_context(|| {
            format!(
                "torii-dataplane not found (looked at {}); build it with: \
                 cargo build --release -p torii-dataplane (perf/run-bench does), \
                 or pass --dataplane PATH",
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

/// Writes `value`, with paths inside the workspace `root` made relative to it: results are
/// committed, and where a checkout lives says nothing about the measurement.
pub fn write_json(path: &Path, root: &Path, value: &serde_json::Value) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_string_pretty(value)?.replace(&format!("{}/", root.display()), "");
    std::fs::write(&tmp, text + "\n").with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }

    #[test]
    fn rates_skip_warmup() {
        let s = [0, 1_000_000, 5_000_000, 4_000_000, 6_000_000];
        assert_eq!(run_rate(&s, 2), Ok(5.0));
        assert!(run_rate(&s, 5).is_err());
        assert!(run_rate(&[5, 0, 0], 1).unwrap_err().contains("no packets"));
        assert!((gbps(1.0, 64) - 0.512).abs() < 1e-9);
    }

    #[test]
    fn series_uses_the_right_counter() {
        let s = StatsSample {
            tx_pps: 7,
            rx_pps: 9,
            ..Default::default()
        };
        let other_port = StatsSample { port: 1, ..s };
        assert_eq!(frontend_series(&[s, other_port], Direction::GuestTx), [7]);
        assert_eq!(frontend_series(&[s], Direction::GuestRx), [9]);
        // Loopback: Rx-pps of port B only (not the null port, not A).
        let b = StatsSample {
            port: LOOPBACK_SINK_PORT,
            rx_pps: 5,
            ..s
        };
        assert_eq!(
            frontend_series(&[s, other_port, b, s, b], Direction::Loopback),
            [5, 5]
        );
    }

    fn opts() -> BenchOptions {
        BenchOptions {
            pairs: 1,
            secs: 3,
            warmup: 1,
            sizes: vec![64],
            paths: vec![Direction::Loopback],
            dataplane: PathBuf::new(),
            testpmd: None,
        }
    }

    #[test]
    fn socket_paths() {
        let t = Path::new("/t");
        assert_eq!(sockets(Direction::GuestTx, t), [t.join("vhu.sock")]);
        assert_eq!(
            sockets(Direction::Loopback, t),
            [t.join("vhu0.sock"), t.join("vhu1.sock")]
        );
        for d in [Direction::GuestTx, Direction::GuestRx, Direction::Loopback] {
            assert_eq!(sockets(d, t).len(), d.vhost_ports());
        }
    }

    #[test]
    fn loopback_frontend_chains_null_a_b() {
        let socks = sockets(Direction::Loopback, Path::new("/t"));
        let a = frontend(&opts(), Direction::Loopback, 512, &socks)
            .args()
            .join(" ");
        let null = a.find("--vdev net_null0,size=512 ").unwrap();
        let va = a
            .find("--vdev net_virtio_user0,path=/t/vhu0.sock,queues=1,mrg_rxbuf=0,in_order=1 ")
            .unwrap();
        let vb = a
            .find("--vdev net_virtio_user1,path=/t/vhu1.sock,queues=1,mrg_rxbuf=0,in_order=1 ")
            .unwrap();
        assert!(null < va && va < vb, "{a}");
        assert!(a.contains("-l 0,1 --main-lcore 1"), "{a}");
        assert!(
            a.contains("--forward-mode=io --txpkts=512")
                && a.contains("--rxq=1 --txq=1 --port-topology=chained"),
            "{a}"
        );
        // The single-port paths are unchanged.
        let socks = sockets(Direction::GuestTx, Path::new("/t"));
        let t = frontend(&opts(), Direction::GuestTx, 64, &socks)
            .args()
            .join(" ");
        assert!(
            !t.contains("net_null") && !t.contains("port-topology"),
            "{t}"
        );
        assert!(
            t.contains("--vdev net_virtio_user0,path=/t/vhu.sock,"),
            "{t}"
        );
        assert!(t.contains("--forward-mode=txonly --txpkts=64"), "{t}");
    }

    #[test]
    fn loopback_dpdk_backend_forwards_between_two_vhost_ports() {
        let socks = sockets(Direction::Loopback, Path::new("/t"));
        let a = dpdk_backend(&opts(), Direction::Loopback, 1518, &socks)
            .args()
            .join(" ");
        assert!(
            a.contains(
                "--vdev net_vhost0,iface=/t/vhu0.sock,queues=1 \
                 --vdev net_vhost1,iface=/t/vhu1.sock,queues=1 --"
            ),
            "{a}"
        );
        assert!(a.contains("-l 0,1 --main-lcore 0"), "{a}");
        assert!(
            a.contains("--forward-mode=io") && a.contains("--port-topology=paired"),
            "{a}"
        );
        let socks = sockets(Direction::GuestRx, Path::new("/t"));
        let r = dpdk_backend(&opts(), Direction::GuestRx, 64, &socks)
            .args()
            .join(" ");
        assert!(
            r.contains("--vdev net_vhost0,iface=/t/vhu.sock,queues=1 --"),
            "{r}"
        );
        assert!(r.contains("--forward-mode=txonly") && !r.contains("port-topology"));
    }

    #[test]
    fn torii_configs() {
        let one = [PathBuf::from("/t/vhu.sock")];
        let tx = torii_config(Direction::GuestTx, 64, &one, Path::new("/t/s.json"));
        assert!(tx.contains("pmd_cpus = [1]") && tx.contains("pmd_mode = \"poll\""));
        assert!(tx.contains("type = \"sink\"") && tx.contains("ports = [\"vhu0\", \"sink0\"]"));
        assert!(tx.contains("socket = \"/t/vhu.sock\"") && tx.contains("mode = \"server\""));
        let rx = torii_config(Direction::GuestRx, 1518, &one, Path::new("/t/s.json"));
        assert!(rx.contains("type = \"source\"\nframe_size = 1518"));
        let lo = torii_config(
            Direction::Loopback,
            64,
            &sockets(Direction::Loopback, Path::new("/t")),
            Path::new("/t/s.json"),
        );
        assert!(lo.contains("pmd_cpus = [1]\npmd_mode = \"poll\""), "{lo}");
        assert!(
            lo.contains(
                "name = \"vhu0\"\ntype = \"vhost-user\"\nsocket = \"/t/vhu0.sock\"\nmode = \"server\""
            ),
            "{lo}"
        );
        assert!(
            lo.contains(
                "name = \"vhu1\"\ntype = \"vhost-user\"\nsocket = \"/t/vhu1.sock\"\nmode = \"server\""
            ),
            "{lo}"
        );
        assert!(lo.contains("ports = [\"vhu0\", \"vhu1\"]"), "{lo}");
        assert!(!lo.contains("sink") && !lo.contains("source"), "{lo}");
        assert_eq!(lo.matches("[[port]]").count(), 2, "{lo}");
    }

    fn fake_run(backend: Backend, mpps: Option<f64>) -> RunResult {
        RunResult {
            backend,
            path: Direction::GuestTx,
            size: 64,
            pair: 0,
            first_in_pair: true,
            ok: mpps.is_some(),
            error: None,
            mpps,
            gbps: None,
            series_pps: Vec::new(),
            warmup_samples: 0,
            frontend_final: None,
            torii_report: None,
            frontend_args: Vec::new(),
            backend_setup: String::new(),
            started_unix: 0,
            wall_secs: 0.0,
            warnings: Vec::new(),
            logs: Vec::new(),
        }
    }

    #[test]
    fn summary_uses_medians_of_ok_runs() {
        let opts = BenchOptions {
            pairs: 2,
            secs: 3,
            warmup: 1,
            sizes: vec![64, 1518],
            paths: vec![Direction::GuestTx],
            dataplane: PathBuf::new(),
            testpmd: None,
        };
        let runs = [
            fake_run(Backend::Torii, Some(2.0)),
            fake_run(Backend::Torii, Some(4.0)),
            fake_run(Backend::Torii, None),
            fake_run(Backend::Dpdk, Some(8.0)),
        ];
        let rows = summarize(&opts, &runs);
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!((r.torii.ok_runs, r.torii.runs), (2, 3));
        assert_eq!(r.torii.median_mpps, Some(3.0));
        assert_eq!((r.torii.min_mpps, r.torii.max_mpps), (Some(2.0), Some(4.0)));
        assert_eq!(r.ratio, Some(0.375));
        let table = summary_table(&rows);
        assert!(
            table.contains("guest-tx") && table.contains("0.375"),
            "{table}"
        );
    }

    #[test]
    fn utc_dates() {
        assert_eq!(format_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_utc(1_764_302_461), "2025-11-28T04:01:01Z");
    }
}
