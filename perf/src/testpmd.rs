//! `dpdk-testpmd` peers: a vhost-user backend (`net_vhost`) or a
//! virtio-user frontend (`net_virtio_user`), run non-interactively with
//! periodic statistics, stopped with SIGINT and their statistics parsed from
//! the log.
//!
//! ```no_run
//! use std::time::Duration;
//! use torii_perf::testpmd::{FwdMode, TestpmdBuilder};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut rx = TestpmdBuilder::new()
//!     .vhost("/tmp/vhu.sock", 1)
//!     .forward_mode(FwdMode::RxOnly)
//!     .lcores("0,1", 0)
//!     .spawn()?;
//! rx.wait_for_log("start packet forwarding", Duration::from_secs(20))?;
//! let stats = rx.stop(Duration::from_secs(10))?;
//! println!("received {}", stats.rx_packets);
//! # Ok(()) }
//! ```

use std::fs::File;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::prereq::{self, PrereqError};
use crate::proc_util::{self, ChildGuard, TmpDir};

/// Log lines quoted in error messages.
const ERROR_TAIL_LINES: usize = 40;

/// Errors of testpmd handling; they quote the end of testpmd's log.
#[derive(Debug, thiserror::Error)]
pub enum TestpmdError {
    /// dpdk-testpmd is not installed.
    #[error(transparent)]
    Prereq(#[from] PrereqError),
    /// An I/O operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// testpmd could not be started.
    #[error("failed to start {binary}: {source}")]
    Spawn {
        /// Binary.
        binary: String,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// Something did not happen in time.
    #[error(
        "timed out after {timeout:?} waiting for {what} (testpmd log {}); log tail:\n{log_tail}",
        log.display()
    )]
    Timeout {
        /// What was waited for.
        what: String,
        /// The timeout.
        timeout: Duration,
        /// Log file.
        log: PathBuf,
        /// End of the log.
        log_tail: String,
    },
    /// testpmd exited while waiting for something.
    #[error(
        "testpmd exited ({status}) while waiting for {what} (log {}); log tail:\n{log_tail}",
        log.display()
    )]
    Exited {
        /// What was waited for.
        what: String,
        /// Exit status.
        status: String,
        /// Log file.
        log: PathBuf,
        /// End of the log.
        log_tail: String,
    },
    /// The final statistics block was not found after testpmd exited.
    #[error(
        "testpmd exited ({status}) without printing its final forward statistics (log {}); \
         log tail:\n{log_tail}",
        log.display()
    )]
    NoFinalStats {
        /// Exit status.
        status: String,
        /// Log file.
        log: PathBuf,
        /// End of the log.
        log_tail: String,
    },
}

/// testpmd forwarding mode (`--forward-mode=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FwdMode {
    /// Generate packets.
    TxOnly,
    /// Receive and free packets.
    RxOnly,
    /// Forward unchanged.
    #[default]
    Io,
    /// Swap MAC addresses and forward.
    MacSwap,
    /// Answer ARP requests and ICMP echo requests (any IPv4 address), drop the rest.
    IcmpEcho,
}

impl FwdMode {
    /// testpmd's name of the mode.
    pub fn as_str(self) -> &'static str {
        match self {
            FwdMode::TxOnly => "txonly",
            FwdMode::RxOnly => "rxonly",
            FwdMode::Io => "io",
            FwdMode::MacSwap => "macswap",
            FwdMode::IcmpEcho => "icmpecho",
        }
    }
}

/// Builder for a [`Testpmd`] process.
#[derive(Debug, Clone)]
pub struct TestpmdBuilder {
    binary: Option<PathBuf>,
    mem_mib: u32,
    file_prefix: String,
    lcores: String,
    main_lcore: u32,
    vdevs: Vec<String>,
    n_virtio: u32,
    n_vhost: u32,
    n_memif: u32,
    max_vdev_queues: u16,
    queues: Option<u16>,
    fwd: FwdMode,
    pkt_size: u16,
    burst: u16,
    total_num_mbufs: u32,
    stats_period: u32,
    nb_cores: u32,
    tx_first: bool,
    extra_eal: Vec<String>,
    extra_app: Vec<String>,
    die_with_parent: bool,
}

impl Default for TestpmdBuilder {
    fn default() -> Self {
        Self::new()
    }
}

/// A new `torii-<pid>-<n>` file prefix, unique within this machine while
/// this process lives.
pub fn unique_file_prefix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    format!(
        "torii-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Directory DPDK creates for `file_prefix` (`/var/run/dpdk/<prefix>` for
/// root); it is left behind even with `--in-memory`.
pub fn runtime_dir(file_prefix: &str) -> PathBuf {
    // SAFETY: getuid(2) cannot fail and has no preconditions.
    let base = if unsafe { libc::getuid() } == 0 {
        PathBuf::from("/var/run")
    } else {
        std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/tmp"))
    };
    base.join("dpdk").join(file_prefix)
}

impl TestpmdBuilder {
    /// Defaults: 512 MiB, lcores `0,1` with main lcore 0, 1 forwarding core,
    /// io mode, 64-byte packets, burst 32, 32768 mbufs, stats every second,
    /// a unique file prefix.
    pub fn new() -> Self {
        Self {
            binary: None,
            mem_mib: 512,
            file_prefix: unique_file_prefix(),
            lcores: "0,1".into(),
            main_lcore: 0,
            vdevs: Vec::new(),
            n_virtio: 0,
            n_vhost: 0,
            n_memif: 0,
            max_vdev_queues: 1,
            queues: None,
            fwd: FwdMode::Io,
            pkt_size: 64,
            burst: 32,
            total_num_mbufs: 32768,
            stats_period: 1,
            nb_cores: 1,
            tx_first: false,
            extra_eal: Vec::new(),
            extra_app: Vec::new(),
            die_with_parent: true,
        }
    }

    /// testpmd binary instead of `dpdk-testpmd` from `PATH`.
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.binary = Some(path.into());
        self
    }

    /// Hugepage memory in MiB (`-m`, default 512).
    pub fn mem_mib(mut self, mib: u32) -> Self {
        self.mem_mib = mib;
        self
    }

    /// Overrides the generated `--file-prefix`.
    pub fn file_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.file_prefix = prefix.into();
        self
    }

    /// The EAL core list (`-l`) and main lcore (`--main-lcore`).
    pub fn lcores(mut self, list: &str, main: u32) -> Self {
        self.lcores = list.into();
        self.main_lcore = main;
        self
    }

    fn add_vdev(&mut self, vdev: String, queues: u16) {
        self.vdevs.push(vdev);
        self.max_vdev_queues = self.max_vdev_queues.max(queues);
    }

    /// Adds a virtio-user port (`net_virtio_userN`) on the vhost-user socket
    /// `path`; with `server` testpmd listens on it (`server=1`).
    pub fn virtio_user(mut self, path: impl AsRef<Path>, queues: u16, server: bool) -> Self {
        let mut v = format!(
            "net_virtio_user{},path={},queues={queues},mrg_rxbuf=0,in_order=1",
            self.n_virtio,
            path.as_ref().display()
        );
        if server {
            v.push_str(",server=1");
        }
        self.n_virtio += 1;
        self.add_vdev(v, queues);
        self
    }

    /// Adds a vhost-user backend port (`net_vhostN`) listening on `path`.
    pub fn vhost(mut self, path: impl AsRef<Path>, queues: u16) -> Self {
        let v = format!(
            "net_vhost{},iface={},queues={queues}",
            self.n_vhost,
            path.as_ref().display()
        );
        self.n_vhost += 1;
        self.add_vdev(v, queues);
        self
    }

    /// Adds a memif port (`net_memifN`) on the file-system socket `path` (not the abstract
    /// namespace, as VPP and Torii's examples use); `server`: testpmd listens.
    pub fn memif(mut self, path: impl AsRef<Path>, server: bool) -> Self {
        let v = format!(
            "net_memif{},role={},socket={},socket-abstract=no",
            self.n_memif,
            if server { "server" } else { "client" },
            path.as_ref().display()
        );
        self.n_memif += 1;
        self.add_vdev(v, 1);
        self
    }

    /// Adds a raw `--vdev` argument; `queues` feeds the `--rxq/--txq` default.
    pub fn vdev(mut self, vdev: impl Into<String>, queues: u16) -> Self {
        self.add_vdev(vdev.into(), queues);
        self
    }

    /// `--rxq`/`--txq` (default: the largest queue count of the vdevs).
    pub fn queues(mut self, q: u16) -> Self {
        self.queues = Some(q);
        self
    }

    /// Forwarding mode (default io).
    pub fn forward_mode(mut self, mode: FwdMode) -> Self {
        self.fwd = mode;
        self
    }

    /// Generated packet size (`--txpkts`, default 64).
    pub fn pkt_size(mut self, size: u16) -> Self {
        self.pkt_size = size;
        self
    }

    /// Burst size (`--burst`, default 32).
    pub fn burst(mut self, burst: u16) -> Self {
        self.burst = burst;
        self
    }

    /// Number of mbufs (`--total-num-mbufs`, default 32768).
    pub fn total_num_mbufs(mut self, n: u32) -> Self {
        self.total_num_mbufs = n;
        self
    }

    /// Forwarding cores (`--nb-cores`, default 1).
    pub fn nb_cores(mut self, n: u32) -> Self {
        self.nb_cores = n;
        self
    }

    /// Statistics period in seconds (`--stats-period`, default 1; 0
    /// disables periodic statistics).
    pub fn stats_period(mut self, secs: u32) -> Self {
        self.stats_period = secs;
        self
    }

    /// Sends a burst before forwarding starts (`--tx-first`).
    pub fn tx_first(mut self, on: bool) -> Self {
        self.tx_first = on;
        self
    }

    /// Appends an EAL argument (before `--`).
    pub fn extra_eal_arg(mut self, arg: impl Into<String>) -> Self {
        self.extra_eal.push(arg.into());
        self
    }

    /// Appends an application argument (after `--`).
    pub fn extra_app_arg(mut self, arg: impl Into<String>) -> Self {
        self.extra_app.push(arg.into());
        self
    }

    /// Whether testpmd gets SIGKILL when the spawning thread exits (default
    /// true, see [`proc_util::die_with_parent`]).
    pub fn die_with_parent(mut self, on: bool) -> Self {
        self.die_with_parent = on;
        self
    }

    /// The `--file-prefix` that will be used.
    pub fn get_file_prefix(&self) -> &str {
        &self.file_prefix
    }

    /// Command-line arguments (without the binary).
    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = ["--no-pci", "--in-memory", "--single-file-segments", "-m"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.push(self.mem_mib.to_string());
        a.push(format!("--file-prefix={}", self.file_prefix));
        a.extend(["-l".to_string(), self.lcores.clone()]);
        a.extend(["--main-lcore".to_string(), self.main_lcore.to_string()]);
        a.push("--log-level=lib.eal:notice".into());
        for v in &self.vdevs {
            a.extend(["--vdev".to_string(), v.clone()]);
        }
        a.extend(self.extra_eal.iter().cloned());
        let q = self.queues.unwrap_or(self.max_vdev_queues);
        a.push("--".into());
        a.extend(["--stats-period".to_string(), self.stats_period.to_string()]);
        a.push(format!("--nb-cores={}", self.nb_cores));
        a.push(format!("--forward-mode={}", self.fwd.as_str()));
        a.push(format!("--txpkts={}", self.pkt_size));
        a.push(format!("--burst={}", self.burst));
        a.push(format!("--total-num-mbufs={}", self.total_num_mbufs));
        a.push(format!("--rxq={q}"));
        a.push(format!("--txq={q}"));
        if self.tx_first {
            a.push("--tx-first".into());
        }
        a.extend(self.extra_app.iter().cloned());
        a
    }

    /// Starts testpmd in its own process group with stdin from /dev/null
    /// and stdout+stderr appended to a log file in a temporary directory.
    pub fn spawn(self) -> Result<Testpmd, TestpmdError> {
        let binary = match &self.binary {
            Some(b) => b.clone(),
            None => prereq::require_binary("dpdk-testpmd", prereq::TESTPMD_HINT)?,
        };
        let io_err = |context: String| move |source| TestpmdError::Io { context, source };
        let tmp = proc_util::unique_tmp_dir("torii-testpmd")
            .map_err(io_err("creating testpmd temporary directory".into()))?;
        let log_path = tmp.join(format!("{}.log", self.file_prefix));
        let log =
            File::create(&log_path).map_err(io_err(format!("creating {}", log_path.display())))?;
        let log2 = log
            .try_clone()
            .map_err(io_err("duplicating log file handle".into()))?;
        let args = self.args();
        let mut cmd = Command::new(&binary);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0);
        if self.die_with_parent {
            proc_util::die_with_parent(&mut cmd);
        }
        tracing::info!(binary = %binary.display(), args = ?args, log = %log_path.display(), "spawning testpmd");
        let child = cmd.spawn().map_err(|source| TestpmdError::Spawn {
            binary: binary.display().to_string(),
            source,
        })?;
        Ok(Testpmd {
            child: ChildGuard::new_group(child, format!("testpmd {}", self.file_prefix)),
            runtime_dir: runtime_dir(&self.file_prefix),
            file_prefix: self.file_prefix,
            log_path,
            _tmp: tmp,
        })
    }
}

/// One port's section of a periodic `Port statistics` block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatsSample {
    /// Index of the `Port statistics` block in the log (0-based).
    pub block: usize,
    /// Port id.
    pub port: u16,
    /// Cumulative received packets.
    pub rx_packets: u64,
    /// Cumulative missed packets.
    pub rx_missed: u64,
    /// Cumulative received bytes.
    pub rx_bytes: u64,
    /// Cumulative receive errors.
    pub rx_errors: u64,
    /// Cumulative receive mbuf allocation failures.
    pub rx_nombuf: u64,
    /// Cumulative transmitted packets.
    pub tx_packets: u64,
    /// Cumulative transmit errors.
    pub tx_errors: u64,
    /// Cumulative transmitted bytes.
    pub tx_bytes: u64,
    /// Receive rate since the previous block, packets/s.
    pub rx_pps: u64,
    /// Receive rate since the previous block, bits/s.
    pub rx_bps: u64,
    /// Transmit rate since the previous block, packets/s.
    pub tx_pps: u64,
    /// Transmit rate since the previous block, bits/s.
    pub tx_bps: u64,
}

/// Totals from testpmd's exit summary ("Accumulated forward statistics for
/// all ports", or the sum of the per-port "Forward statistics" sections).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FinalStats {
    /// Packets received by the forwarding engine.
    pub rx_packets: u64,
    /// Packets dropped on receive.
    pub rx_dropped: u64,
    /// `rx_packets + rx_dropped`.
    pub rx_total: u64,
    /// Packets transmitted.
    pub tx_packets: u64,
    /// Packets the forwarding engine failed to transmit (e.g. ring full).
    pub tx_dropped: u64,
    /// `tx_packets + tx_dropped`.
    pub tx_total: u64,
}

/// `key: value` pairs of a statistics line (`RX-packets: 12   RX-missed: 0`).
fn kv_pairs(line: &str) -> Vec<(&str, u64)> {
    let toks: Vec<&str> = line.split_whitespace().collect();
    let mut out = Vec::new();
    for w in toks.windows(2) {
        if let Some(key) = w[0].strip_suffix(':') {
            if let Ok(v) = w[1].parse::<u64>() {
                out.push((key, v));
            }
        }
    }
    out
}

fn is_rule(line: &str, c: char) -> bool {
    let t = line.trim();
    t.len() >= 8 && t.chars().all(|x| x == c)
}

fn port_after(line: &str, label: &str) -> Option<u16> {
    let rest = &line[line.find(label)? + label.len()..];
    let digits: String = rest
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

/// Parses every complete periodic statistics section from a testpmd log.
///
/// Each `Port statistics ====` block (preceded by an ANSI clear-screen
/// sequence) holds one `NIC statistics for port N` section per port ending
/// with a `####` rule; unrelated lines (e.g. `VHOST_CONFIG:` messages from
/// other threads) may interleave and are ignored. A section cut off at the
/// end of the log is not returned.
pub fn parse_samples(log: &str) -> Vec<StatsSample> {
    let mut out = Vec::new();
    let mut block: Option<usize> = None;
    let mut blocks_seen = 0usize;
    let mut cur: Option<StatsSample> = None;
    for line in log.lines() {
        if line.contains("Port statistics ====") {
            block = Some(blocks_seen);
            blocks_seen += 1;
            cur = None;
            continue;
        }
        let Some(b) = block else { continue };
        if line.contains("NIC statistics for port") {
            cur = port_after(line, "for port").map(|port| StatsSample {
                block: b,
                port,
                ..Default::default()
            });
            continue;
        }
        let Some(s) = cur.as_mut() else { continue };
        if is_rule(line, '#') {
            out.push(*s);
            cur = None;
            continue;
        }
        for (k, v) in kv_pairs(line) {
            match k {
                "RX-packets" => s.rx_packets = v,
                "RX-missed" => s.rx_missed = v,
                "RX-bytes" => s.rx_bytes = v,
                "RX-errors" => s.rx_errors = v,
                "RX-nombuf" => s.rx_nombuf = v,
                "TX-packets" => s.tx_packets = v,
                "TX-errors" => s.tx_errors = v,
                "TX-bytes" => s.tx_bytes = v,
                "Rx-pps" => s.rx_pps = v,
                "Rx-bps" => s.rx_bps = v,
                "Tx-pps" => s.tx_pps = v,
                "Tx-bps" => s.tx_bps = v,
                _ => {}
            }
        }
    }
    out
}

fn apply_fwd(s: &mut FinalStats, line: &str) {
    for (k, v) in kv_pairs(line) {
        match k {
            "RX-packets" => s.rx_packets = v,
            "RX-dropped" => s.rx_dropped = v,
            "RX-total" => s.rx_total = v,
            "TX-packets" => s.tx_packets = v,
            "TX-dropped" => s.tx_dropped = v,
            "TX-total" => s.tx_total = v,
            _ => {}
        }
    }
}

/// Parses the exit summary of a testpmd log: the last "Accumulated forward
/// statistics for all ports" block, or else the sum of the last run's
/// per-port "Forward statistics for port N" sections. `None` if absent.
pub fn parse_final_stats(log: &str) -> Option<FinalStats> {
    let lines: Vec<&str> = log.lines().collect();
    if let Some(start) = lines
        .iter()
        .rposition(|l| l.contains("Accumulated forward statistics"))
    {
        let mut s = FinalStats::default();
        let mut closed = false;
        for l in &lines[start + 1..] {
            if is_rule(l, '+') {
                closed = true;
                break;
            }
            apply_fwd(&mut s, l);
        }
        return closed.then_some(s);
    }
    // Per-port sections of the last stop (separated from earlier ones by the
    // "Telling cores to stop" line).
    let from = lines
        .iter()
        .rposition(|l| l.contains("Telling cores to stop"))
        .unwrap_or(0);
    let mut total: Option<FinalStats> = None;
    let mut cur: Option<FinalStats> = None;
    for l in &lines[from..] {
        if l.contains("Forward statistics for port") {
            cur = Some(FinalStats::default());
        } else if let Some(c) = cur.as_mut() {
            if is_rule(l, '-') {
                let t = total.get_or_insert_with(FinalStats::default);
                t.rx_packets += c.rx_packets;
                t.rx_dropped += c.rx_dropped;
                t.rx_total += c.rx_total;
                t.tx_packets += c.tx_packets;
                t.tx_dropped += c.tx_dropped;
                t.tx_total += c.tx_total;
                cur = None;
            } else {
                apply_fwd(c, l);
            }
        }
    }
    total
}

/// A running dpdk-testpmd. Dropping it SIGKILLs its process group and
/// removes its DPDK runtime directory.
#[derive(Debug)]
pub struct Testpmd {
    child: ChildGuard,
    file_prefix: String,
    runtime_dir: PathBuf,
    log_path: PathBuf,
    _tmp: TmpDir,
}

impl Testpmd {
    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Whether testpmd is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.is_running()
    }

    /// The `--file-prefix` in use.
    pub fn file_prefix(&self) -> &str {
        &self.file_prefix
    }

    /// Path of the stdout+stderr log.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Current log contents (lossy UTF-8).
    pub fn log_text(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The last `n` log lines.
    pub fn log_tail(&self, n: usize) -> String {
        proc_util::file_tail(&self.log_path, n)
    }

    fn status_string(&mut self) -> String {
        match self.child.try_wait() {
            Ok(Some(st)) => st.to_string(),
            Ok(None) => "still running".into(),
            Err(e) => format!("status unknown: {e}"),
        }
    }

    /// Waits until the log contains `needle`. Fails early if testpmd exits.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<(), TestpmdError> {
        let deadline = Instant::now() + timeout;
        let what = format!("{needle:?} in the testpmd log");
        loop {
            let exited = !self.child.is_running();
            if self.log_text().contains(needle) {
                return Ok(());
            }
            if exited {
                return Err(TestpmdError::Exited {
                    what,
                    status: self.status_string(),
                    log: self.log_path.clone(),
                    log_tail: self.log_tail(ERROR_TAIL_LINES),
                });
            }
            if Instant::now() >= deadline {
                return Err(TestpmdError::Timeout {
                    what,
                    timeout,
                    log: self.log_path.clone(),
                    log_tail: self.log_tail(ERROR_TAIL_LINES),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Periodic statistics printed so far (see [`parse_samples`]).
    pub fn samples(&self) -> Vec<StatsSample> {
        parse_samples(&self.log_text())
    }

    fn remove_runtime_dir(&self) {
        match std::fs::remove_dir_all(&self.runtime_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(dir = %self.runtime_dir.display(), error = %e,
                "failed to remove DPDK runtime directory"),
        }
    }

    /// Stops testpmd with SIGINT (a clean exit that prints the final
    /// statistics) and parses them. If it has not exited after `timeout` it
    /// is SIGKILLed and a timeout error returned.
    pub fn stop(&mut self, timeout: Duration) -> Result<FinalStats, TestpmdError> {
        let io_err = |source| TestpmdError::Io {
            context: "stopping testpmd".into(),
            source,
        };
        if self.child.is_running() {
            self.child.signal(libc::SIGINT).map_err(io_err)?;
        }
        let st = self.child.wait_timeout(timeout).map_err(io_err)?;
        if st.is_none() {
            let log_tail = self.log_tail(ERROR_TAIL_LINES);
            let _ = self.child.kill();
            self.remove_runtime_dir();
            return Err(TestpmdError::Timeout {
                what: "testpmd to exit after SIGINT".into(),
                timeout,
                log: self.log_path.clone(),
                log_tail,
            });
        }
        self.remove_runtime_dir();
        parse_final_stats(&self.log_text()).ok_or_else(|| TestpmdError::NoFinalStats {
            status: self.status_string(),
            log: self.log_path.clone(),
            log_tail: self.log_tail(ERROR_TAIL_LINES),
        })
    }
}

impl Drop for Testpmd {
    fn drop(&mut self) {
        if let Err(e) = self.child.kill() {
            tracing::warn!(error = %e, "failed to kill testpmd");
        }
        self.remove_runtime_dir();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RXONLY: &str = include_str!("../tests/fixtures/testpmd_vhost_rxonly.log");
    const TXONLY: &str = include_str!("../tests/fixtures/testpmd_virtio_user_txonly.log");

    #[test]
    fn samples_from_real_logs() {
        let rx = parse_samples(RXONLY);
        assert_eq!(rx.len(), 3);
        assert_eq!(rx[0].block, 0);
        assert_eq!(rx[0].rx_packets, 0);
        let last = rx[2];
        assert_eq!((last.block, last.port), (2, 0));
        assert_eq!(last.rx_pps, 5_400_611);
        assert_eq!(last.rx_bps, 2_765_113_312);
        assert_eq!(last.tx_pps, 0);
        assert!(last.rx_packets > 0 && last.rx_bytes == last.rx_packets * 64);

        let tx = parse_samples(TXONLY);
        assert_eq!(tx.len(), 2);
        assert_eq!(tx[0].tx_packets, 9440);
        assert_eq!(tx[0].tx_bytes, 604_160);
        assert_eq!(tx[1].tx_packets, 10_781_984);
        assert_eq!(tx[1].tx_pps, 5_385_679);
        assert_eq!(tx[1].tx_bps, 2_757_468_088);
        assert_eq!(tx[1].rx_packets, 0);
    }

    #[test]
    fn final_stats_from_real_logs() {
        let rx = parse_final_stats(RXONLY).unwrap();
        assert_eq!(
            rx,
            FinalStats {
                rx_packets: 16_178_272,
                rx_dropped: 0,
                rx_total: 16_178_272,
                tx_packets: 0,
                tx_dropped: 0,
                tx_total: 0,
            }
        );
        let tx = parse_final_stats(TXONLY).unwrap();
        assert_eq!(tx.tx_packets, 16_178_272);
        assert_eq!(tx.tx_dropped, 1_162_720);
        assert_eq!(tx.tx_total, 17_340_992);
        assert_eq!(tx.rx_packets, 0);
    }

    #[test]
    fn final_stats_fallback_and_truncation() {
        // Without the accumulated block the per-port sections are summed.
        let cut: String = TXONLY
            .lines()
            .take_while(|l| !l.contains("Accumulated"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(parse_final_stats(&cut).unwrap().tx_packets, 16_178_272);
        // A log cut before any summary yields nothing, and a half-written
        // periodic block is not returned.
        let early: String = TXONLY
            .lines()
            .take_while(|l| !l.contains("Telling cores"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(parse_final_stats(&early), None);
        let half =
            "Port statistics ====\n  ####### NIC statistics for port 0  #######\n  RX-packets: 5\n";
        assert!(parse_samples(half).is_empty());
    }

    #[test]
    fn args_match_lab_command() {
        let b = TestpmdBuilder::new()
            .file_prefix("b")
            .lcores("0,1", 1)
            .virtio_user("/tmp/vhu0.sock", 1, false)
            .forward_mode(FwdMode::TxOnly);
        let a = b.args().join(" ");
        assert!(a.starts_with(
            "--no-pci --in-memory --single-file-segments -m 512 --file-prefix=b -l 0,1 --main-lcore 1"
        ));
        assert!(a.contains(
            "--vdev net_virtio_user0,path=/tmp/vhu0.sock,queues=1,mrg_rxbuf=0,in_order=1 --"
        ));
        assert!(a.contains(
            "-- --stats-period 1 --nb-cores=1 --forward-mode=txonly --txpkts=64 --burst=32 \
             --total-num-mbufs=32768 --rxq=1 --txq=1"
        ));
        let a = TestpmdBuilder::new()
            .vhost("/s0", 2)
            .virtio_user("/s1", 1, true)
            .tx_first(true)
            .args()
            .join(" ");
        assert!(a.contains("--vdev net_vhost0,iface=/s0,queues=2"));
        assert!(a.contains("net_virtio_user0,path=/s1,queues=1,mrg_rxbuf=0,in_order=1,server=1"));
        assert!(a.contains("--rxq=2 --txq=2 --tx-first"));
    }
}
