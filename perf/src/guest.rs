//! QEMU test guests driven over their serial console.
//!
//! The guest image (`scripts/setup`, see `scripts/guest/init`) prints
//! `TORII-GUEST-READY uptime=...` and then runs a busybox shell on the serial
//! console with echo off and an empty prompt. [`Guest`] synchronises with
//! that shell and runs commands in it, recovering each command's exit code
//! from a unique marker line.
//!
//! ```no_run
//! use std::time::Duration;
//! use torii_perf::guest::GuestBuilder;
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut g = GuestBuilder::new().spawn()?;
//! g.wait_ready(Duration::from_secs(60))?;
//! let out = g.run_ok("uname -r", Duration::from_secs(10))?;
//! println!("guest kernel {}", out.trim());
//! g.poweroff(Duration::from_secs(10))?;
//! # Ok(()) }
//! ```

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::prereq::{self, GuestImage, PrereqError};
use crate::proc_util::{self, ChildGuard, TmpDir};

/// Line printed by the guest's /init once modules are loaded.
pub const READY_MARKER: &str = "TORII-GUEST-READY";
/// Default kernel command line (serial console, quiet kernel).
pub const DEFAULT_APPEND: &str = "console=ttyS0 panic=-1 loglevel=1";
/// Number of serial lines quoted in error messages.
pub const ERROR_TAIL_LINES: usize = 30;
/// Serial lines kept in memory for [`Guest::serial_log_tail`].
const TAIL_CAPACITY: usize = 1000;
/// Interval between `echo __SYNC_<n>__` probes while synchronising.
const SYNC_INTERVAL: Duration = Duration::from_millis(300);

/// Errors of guest handling. Timeouts and unexpected exits quote the last
/// serial-console lines (and QEMU's stderr) so failures are diagnosable.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// A prerequisite (QEMU, guest image) is missing.
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
    /// QEMU could not be started.
    #[error("failed to start QEMU ({binary}): {source}")]
    Spawn {
        /// QEMU binary.
        binary: String,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// Something did not happen in time.
    #[error(
        "timed out after {timeout:?} waiting for {what}; last serial console lines:\n{serial_tail}"
    )]
    Timeout {
        /// What was waited for.
        what: String,
        /// The timeout.
        timeout: Duration,
        /// Last serial lines.
        serial_tail: String,
    },
    /// QEMU exited while the harness was waiting for something.
    #[error(
        "QEMU exited ({status}) while waiting for {what}; last serial console lines:\n\
         {serial_tail}\nQEMU stderr:\n{stderr_tail}"
    )]
    Exited {
        /// What was waited for.
        what: String,
        /// Exit status description.
        status: String,
        /// Last serial lines.
        serial_tail: String,
        /// Last lines of QEMU's stderr.
        stderr_tail: String,
    },
    /// A command run by [`Guest::run_ok`] exited non-zero.
    #[error("guest command `{cmd}` exited with status {rc}; output:\n{output}")]
    CommandFailed {
        /// The command.
        cmd: String,
        /// Its exit code.
        rc: i32,
        /// Its combined stdout/stderr.
        output: String,
    },
}

/// How QEMU's vhost-user chardev connects to the backend socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChardevMode {
    /// QEMU connects to a socket the backend listens on. With
    /// `reconnect_ms`, QEMU retries (and reconnects after a backend
    /// restart) every that many milliseconds.
    Client {
        /// `reconnect-ms=` value, if any.
        reconnect_ms: Option<u32>,
    },
    /// QEMU listens (`server=on,wait=off`); the backend connects.
    Server,
}

/// Accelerator selection.
///
/// TCG is the default: on the lab machines `/dev/kvm` exists but KVM is
/// unusable (QEMU aborts with `failed to set MSR 0x10a`), so KVM is never
/// picked automatically. Set `TORII_ACCEL=kvm` (or call
/// [`GuestBuilder::accel`]) on hosts where KVM works.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Accel {
    /// TCG emulation (`-accel tcg -cpu max`).
    #[default]
    Tcg,
    /// KVM (`-accel kvm -cpu host`).
    Kvm,
}

impl Accel {
    /// `Kvm` if the environment has `TORII_ACCEL=kvm`, else `Tcg`.
    pub fn from_env() -> Self {
        match std::env::var("TORII_ACCEL") {
            Ok(v) if v.eq_ignore_ascii_case("kvm") => Accel::Kvm,
            _ => Accel::Tcg,
        }
    }
}

#[derive(Debug, Clone)]
struct NetDev {
    sock: PathBuf,
    mac: String,
    queues: u16,
    mode: ChardevMode,
    /// Extra virtio-net-pci properties, e.g. `guest_tso4=off`.
    props: Vec<String>,
}

#[derive(Debug, Clone)]
struct BlkDev {
    sock: PathBuf,
    queues: u16,
    reconnect_ms: Option<u32>,
}

/// Builder for a [`Guest`].
#[derive(Debug, Clone)]
pub struct GuestBuilder {
    qemu: Option<PathBuf>,
    image: Option<GuestImage>,
    accel: Accel,
    memory_mib: u32,
    smp: u32,
    append_extra: Vec<String>,
    nets: Vec<NetDev>,
    blks: Vec<BlkDev>,
    host_root: bool,
    shared_memory: bool,
    serial_log: Option<PathBuf>,
    extra_args: Vec<String>,
    early_args: Vec<String>,
    die_with_parent: bool,
    reboot: bool,
    taps: Vec<TapDev>,
    netns: Option<PathBuf>,
}

/// A virtio-net device on a tap that exists already (QEMU's `-netdev tap`, no scripts).
#[derive(Debug, Clone)]
struct TapDev {
    ifname: String,
    mac: String,
    queues: u16,
}

impl Default for GuestBuilder {
    fn default() -> Self {
        Self::new()
    }
}

/// Escapes a value for a QEMU `-opt key=value,...` list (commas double).
fn qemu_opt_escape(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

impl GuestBuilder {
    /// Defaults: TCG, 256 MiB, 1 vCPU, no devices, image from
    /// [`prereq::guest_image`], QEMU from `PATH`.
    pub fn new() -> Self {
        Self {
            qemu: None,
            image: None,
            accel: Accel::from_env(),
            memory_mib: 256,
            smp: 1,
            append_extra: Vec::new(),
            nets: Vec::new(),
            blks: Vec::new(),
            host_root: false,
            shared_memory: false,
            serial_log: None,
            extra_args: Vec::new(),
            early_args: Vec::new(),
            die_with_parent: true,
            reboot: false,
            taps: Vec::new(),
            netns: None,
        }
    }

    /// QEMU binary to use instead of `qemu-system-x86_64` from `PATH`.
    pub fn qemu_binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.qemu = Some(path.into());
        self
    }

    /// Kernel/initramfs to boot instead of [`prereq::guest_image`].
    pub fn image(mut self, image: GuestImage) -> Self {
        self.image = Some(image);
        self
    }

    /// Accelerator (default [`Accel::from_env`], i.e. TCG unless
    /// `TORII_ACCEL=kvm`).
    pub fn accel(mut self, accel: Accel) -> Self {
        self.accel = accel;
        self
    }

    /// Guest RAM in MiB (default 256).
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    /// Number of vCPUs (default 1).
    pub fn smp(mut self, cpus: u32) -> Self {
        self.smp = cpus;
        self
    }

    /// Appends words to the kernel command line (after [`DEFAULT_APPEND`]).
    pub fn append(mut self, extra: impl Into<String>) -> Self {
        self.append_extra.push(extra.into());
        self
    }

    /// Adds a virtio-net-pci device backed by vhost-user on `sock`.
    /// `queues` > 1 enables multiqueue (`mq=on,vectors=2*queues+2`).
    pub fn net_vhost_user(
        mut self,
        sock: impl Into<PathBuf>,
        mac: impl Into<String>,
        queues: u16,
        mode: ChardevMode,
    ) -> Self {
        self.nets.push(NetDev {
            sock: sock.into(),
            mac: mac.into(),
            queues: queues.max(1),
            mode,
            props: Vec::new(),
        });
        self
    }

    /// Adds a virtio-net-pci device on the existing tap `ifname` (in QEMU's network namespace:
    /// see [`GuestBuilder::netns`]); `queues` > 1 opens it multiqueue.
    pub fn net_tap(
        mut self,
        ifname: impl Into<String>,
        mac: impl Into<String>,
        queues: u16,
    ) -> Self {
        self.taps.push(TapDev {
            ifname: ifname.into(),
            mac: mac.into(),
            queues: queues.max(1),
        });
        self
    }

    /// Runs QEMU in the network namespace at `path` (`/run/netns/NAME`), as a pod's VM runs.
    pub fn netns(mut self, path: impl Into<PathBuf>) -> Self {
        self.netns = Some(path.into());
        self
    }

    /// Adds `prop` (`name=value`) to the last virtio-net device added, e.g. `guest_tso4=off`
    /// to keep a feature from being offered to the guest.
    pub fn net_device_prop(mut self, prop: impl Into<String>) -> Self {
        if let Some(n) = self.nets.last_mut() {
            n.props.push(prop.into());
        }
        self
    }

    /// Adds a vhost-user-blk-pci device connecting (as client) to `sock`.
    pub fn blk_vhost_user(mut self, sock: impl Into<PathBuf>, queues: u16) -> Self {
        self.blks.push(BlkDev {
            sock: sock.into(),
            queues: queues.max(1),
            reconnect_ms: None,
        });
        self
    }

    /// The last vhost-user-blk device added reconnects to its backend `ms` after losing it
    /// (QEMU `reconnect-ms`), resubmitting what was in flight (INFLIGHT_SHMFD).
    pub fn blk_reconnect_ms(mut self, ms: u32) -> Self {
        if let Some(b) = self.blks.last_mut() {
            b.reconnect_ms = Some(ms);
        }
        self
    }

    /// Lets a guest reboot (`reboot -f`) restart the guest in the same QEMU instead of ending
    /// it (QEMU's `-no-reboot` is the default).
    pub fn allow_reboot(mut self, on: bool) -> Self {
        self.reboot = on;
        self
    }

    /// Shares the host's `/` read-only (9p, tag `hostroot`); the guest
    /// mounts it at `/host`.
    pub fn host_root_share(mut self, on: bool) -> Self {
        self.host_root = on;
        self
    }

    /// Forces a shared memfd memory backend even without vhost-user devices
    /// (it is always used when such devices are present).
    pub fn shared_memory(mut self, on: bool) -> Self {
        self.shared_memory = on;
        self
    }

    /// Appends serial output to this file (default: a file in a temporary
    /// directory removed with the guest unless `TORII_KEEP_TMP=1`). QEMU's
    /// stderr then goes to `<path>.stderr`.
    pub fn serial_log(mut self, path: impl Into<PathBuf>) -> Self {
        self.serial_log = Some(path.into());
        self
    }

    /// Appends a raw QEMU argument.
    pub fn extra_qemu_arg(mut self, arg: impl Into<String>) -> Self {
        self.extra_args.push(arg.into());
        self
    }

    /// A raw QEMU argument placed before any device: the machine type, a vIOMMU (which QEMU
    /// wants created before the PCI devices it translates for).
    pub fn early_qemu_arg(mut self, arg: impl Into<String>) -> Self {
        self.early_args.push(arg.into());
        self
    }

    /// Whether QEMU gets SIGKILL when the spawning thread exits (default
    /// true, see [`proc_util::die_with_parent`]).
    pub fn die_with_parent(mut self, on: bool) -> Self {
        self.die_with_parent = on;
        self
    }

    /// The QEMU arguments (without the binary) that [`spawn`](Self::spawn)
    /// would use.
    pub fn qemu_args(&self) -> Result<Vec<String>, GuestError> {
        let image = match &self.image {
            Some(i) => i.clone(),
            None => prereq::guest_image()?,
        };
        let use_kvm = self.accel == Accel::Kvm;
        let mut a: Vec<String> = Vec::new();
        let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
        if use_kvm {
            push(&["-accel", "kvm", "-cpu", "host"]);
        } else {
            push(&["-accel", "tcg", "-cpu", "max"]);
        }
        a.extend(self.early_args.iter().cloned());
        let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
        let mem = format!("{}M", self.memory_mib);
        let smp = self.smp.to_string();
        push(&["-smp", &smp, "-m", &mem]);
        push(&[
            "-display",
            "none",
            "-monitor",
            "none",
            "-serial",
            "stdio",
            "-nodefaults",
            "-no-user-config",
        ]);
        if !self.reboot {
            push(&["-no-reboot"]);
        }
        let kernel = image.kernel.display().to_string();
        let initrd = image.initrd.display().to_string();
        push(&["-kernel", &kernel, "-initrd", &initrd]);
        let mut append = DEFAULT_APPEND.to_string();
        for e in &self.append_extra {
            append.push(' ');
            append.push_str(e);
        }
        push(&["-append", &append]);
        if self.shared_memory || !self.nets.is_empty() || !self.blks.is_empty() {
            let obj = format!("memory-backend-memfd,id=mem,size={mem},share=on");
            push(&["-object", &obj, "-numa", "node,memdev=mem"]);
        }
        for (i, n) in self.nets.iter().enumerate() {
            let mut chr = format!("socket,id=c{i},path={}", qemu_opt_escape(&n.sock));
            match n.mode {
                ChardevMode::Client { reconnect_ms: None } => {}
                ChardevMode::Client {
                    reconnect_ms: Some(ms),
                } => chr.push_str(&format!(",reconnect-ms={ms}")),
                ChardevMode::Server => chr.push_str(",server=on,wait=off"),
            }
            let netdev = format!("vhost-user,id=n{i},chardev=c{i},queues={}", n.queues);
            let mut dev = format!("virtio-net-pci,netdev=n{i},mac={}", n.mac);
            if n.queues > 1 {
                dev.push_str(&format!(",mq=on,vectors={}", 2 * u32::from(n.queues) + 2));
            }
            for p in &n.props {
                dev.push(',');
                dev.push_str(p);
            }
            push(&["-chardev", &chr, "-netdev", &netdev, "-device", &dev]);
        }
        for (i, t) in self.taps.iter().enumerate() {
            let netdev = format!(
                "tap,id=t{i},ifname={},script=no,downscript=no,queues={}",
                t.ifname, t.queues
            );
            let mut dev = format!("virtio-net-pci,netdev=t{i},mac={}", t.mac);
            if t.queues > 1 {
                dev.push_str(&format!(",mq=on,vectors={}", 2 * u32::from(t.queues) + 2));
            }
            push(&["-netdev", &netdev, "-device", &dev]);
        }
        for (i, b) in self.blks.iter().enumerate() {
            let mut chr = format!("socket,id=b{i},path={}", qemu_opt_escape(&b.sock));
            if let Some(ms) = b.reconnect_ms {
                chr.push_str(&format!(",reconnect-ms={ms}"));
            }
            let dev = format!("vhost-user-blk-pci,chardev=b{i},num-queues={}", b.queues);
            push(&["-chardev", &chr, "-device", &dev]);
        }
        if self.host_root {
            push(&[
                "-virtfs",
                "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
            ]);
        }
        a.extend(self.extra_args.iter().cloned());
        Ok(a)
    }

    /// Starts QEMU. Call [`Guest::wait_ready`] before running commands.
    pub fn spawn(self) -> Result<Guest, GuestError> {
        let qemu = match &self.qemu {
            Some(q) => q.clone(),
            None => prereq::require_binary("qemu-system-x86_64", prereq::QEMU_HINT)?,
        };
        let args = self.qemu_args()?;
        let io_err = |context: String| move |source| GuestError::Io { context, source };
        let (tmp, serial_log, stderr_log) = match &self.serial_log {
            Some(p) => {
                let mut s = p.clone().into_os_string();
                s.push(".stderr");
                (None, p.clone(), PathBuf::from(s))
            }
            None => {
                let t = proc_util::unique_tmp_dir("torii-guest")
                    .map_err(io_err("creating guest temporary directory".into()))?;
                let (s, e) = (t.join("serial.log"), t.join("qemu-stderr.log"));
                (Some(t), s, e)
            }
        };
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&serial_log)
            .map_err(io_err(format!(
                "opening serial log {}",
                serial_log.display()
            )))?;
        let stderr = File::create(&stderr_log)
            .map_err(io_err(format!("creating {}", stderr_log.display())))?;

        let mut cmd = Command::new(&qemu);
        cmd.args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr);
        if self.die_with_parent {
            proc_util::die_with_parent(&mut cmd);
        }
        // Kept open until QEMU has started.
        let _netns = match &self.netns {
            Some(p) => {
                let f = File::open(p).map_err(io_err(format!("opening netns {}", p.display())))?;
                let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
                // SAFETY: the closure runs in the child between fork and exec and only calls
                // setns, which is async-signal-safe, on an fd the parent keeps open until the
                // spawn returns.
                unsafe {
                    std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                        if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                            return Err(io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
                Some(f)
            }
            None => None,
        };
        tracing::info!(qemu = %qemu.display(), args = ?args, "spawning guest");
        let child = cmd.spawn().map_err(|source| GuestError::Spawn {
            binary: qemu.display().to_string(),
            source,
        })?;
        let mut child = ChildGuard::new(child, "qemu");
        let stdin = child.child_mut().stdin.take().expect("stdin is piped");
        let stdout = child.child_mut().stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        let tail = Arc::new(Mutex::new(VecDeque::with_capacity(TAIL_CAPACITY)));
        let tail2 = Arc::clone(&tail);
        let reader = thread::Builder::new()
            .name(format!("serial-{}", child.pid()))
            .spawn(move || serial_reader(stdout, tx, tail2, log))
            .map_err(io_err("spawning serial reader thread".into()))?;
        Ok(Guest {
            child,
            stdin: Some(stdin),
            lines: rx,
            tail,
            reader: Some(reader),
            serial_log,
            stderr_log,
            seq: 0,
            _tmp: tmp,
        })
    }
}

/// Reads QEMU's stdout (the serial console) line by line: strips `\r`,
/// appends to the log file and the in-memory tail, and forwards the line.
fn serial_reader(
    stdout: ChildStdout,
    tx: Sender<String>,
    tail: Arc<Mutex<VecDeque<String>>>,
    mut log: File,
) {
    let mut r = BufReader::new(stdout);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match r.read_until(b'\n', &mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!(error = %e, "serial read failed");
                break;
            }
        }
        let line: String = String::from_utf8_lossy(&buf)
            .chars()
            .filter(|&c| c != '\r' && c != '\n')
            .collect();
        let _ = writeln!(log, "{line}");
        {
            let mut t = tail.lock().unwrap_or_else(|e| e.into_inner());
            if t.len() == TAIL_CAPACITY {
                t.pop_front();
            }
            t.push_back(line.clone());
        }
        // The receiver may be gone (guest dropped); keep logging regardless.
        let _ = tx.send(line);
    }
    let _ = log.flush();
}

/// Whether `line` is a kernel log line (`[    6.391170] ...`).
pub fn is_kernel_log_line(line: &str) -> bool {
    let Some(rest) = line.strip_prefix('[') else {
        return false;
    };
    let Some(end) = rest.find(']') else {
        return false;
    };
    let ts = rest[..end].trim_start();
    let mut parts = ts.splitn(2, '.');
    let secs = parts.next().unwrap_or("");
    let frac = parts.next().unwrap_or("");
    !secs.is_empty()
        && !frac.is_empty()
        && secs.bytes().all(|b| b.is_ascii_digit())
        && frac.bytes().all(|b| b.is_ascii_digit())
}

/// Whether `line` is an ash job-status notice (`[1]+  Done   sleep 1`),
/// which the interactive console shell prints before reading a command.
pub fn is_job_notice_line(line: &str) -> bool {
    let Some(rest) = line.strip_prefix('[') else {
        return false;
    };
    let Some(end) = rest.find(']') else {
        return false;
    };
    if end == 0 || !rest[..end].bytes().all(|b| b.is_ascii_digit()) {
        return false;
    }
    let status = rest[end + 1..]
        .trim_start()
        .trim_start_matches(['+', '-'])
        .trim_start();
    [
        "Done",
        "Running",
        "Stopped",
        "Terminated",
        "Killed",
        "Exit ",
        "Hangup",
        "Interrupt",
    ]
    .iter()
    .any(|w| status.starts_with(w))
}

/// Lines of console noise that never belong to a command's output.
fn is_noise_line(line: &str) -> bool {
    is_kernel_log_line(line) || is_job_notice_line(line)
}

/// If `line` contains `marker` followed by a decimal number up to the end of
/// the line, returns the text before the marker and the number.
fn parse_marker_line<'a>(line: &'a str, marker: &str) -> Option<(&'a str, i64)> {
    let idx = line.rfind(marker)?;
    let digits = line[idx + marker.len()..].trim_end();
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((&line[..idx], digits.parse().ok()?))
}

/// Parses a line consisting only of `__SYNC_<n>__`.
fn parse_sync_line(line: &str) -> Option<u64> {
    line.trim()
        .strip_prefix("__SYNC_")?
        .strip_suffix("__")?
        .parse()
        .ok()
}

/// Result of [`Guest::run`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CmdOutput {
    /// Exit status of the command (`$?`).
    pub rc: i32,
    /// Combined stdout and stderr, one `\n`-terminated line per output
    /// line, with `\r`, kernel log lines and shell job notices removed.
    pub stdout: String,
}

/// A running QEMU guest. Dropping it SIGKILLs and reaps QEMU.
#[derive(Debug)]
pub struct Guest {
    child: ChildGuard,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    tail: Arc<Mutex<VecDeque<String>>>,
    reader: Option<JoinHandle<()>>,
    serial_log: PathBuf,
    stderr_log: PathBuf,
    seq: u64,
    _tmp: Option<TmpDir>,
}

impl Guest {
    /// QEMU's pid.
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Whether QEMU is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.is_running()
    }

    /// Path of the serial console log.
    pub fn serial_log_path(&self) -> &Path {
        &self.serial_log
    }

    /// Path of the file capturing QEMU's stderr.
    pub fn stderr_log_path(&self) -> &Path {
        &self.stderr_log
    }

    /// The last `n` serial console lines, joined with `\n`.
    pub fn serial_log_tail(&self, n: usize) -> String {
        let t = self.tail.lock().unwrap_or_else(|e| e.into_inner());
        let skip = t.len().saturating_sub(n);
        t.iter().skip(skip).cloned().collect::<Vec<_>>().join("\n")
    }

    /// The last `n` lines of QEMU's stderr.
    pub fn stderr_tail(&self, n: usize) -> String {
        proc_util::file_tail(&self.stderr_log, n)
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn timeout_err(&self, what: &str, timeout: Duration) -> GuestError {
        GuestError::Timeout {
            what: what.to_string(),
            timeout,
            serial_tail: self.serial_log_tail(ERROR_TAIL_LINES),
        }
    }

    fn exited_err(&mut self, what: &str) -> GuestError {
        let status = match self.child.wait_timeout(Duration::from_secs(2)) {
            Ok(Some(st)) => st.to_string(),
            Ok(None) => "serial console closed, process still running".to_string(),
            Err(e) => format!("status unknown: {e}"),
        };
        GuestError::Exited {
            what: what.to_string(),
            status,
            serial_tail: self.serial_log_tail(ERROR_TAIL_LINES),
            stderr_tail: self.stderr_tail(ERROR_TAIL_LINES),
        }
    }

    /// Receives the next serial line before `deadline`.
    fn recv_line(
        &mut self,
        deadline: Instant,
        what: &str,
        timeout: Duration,
    ) -> Result<String, GuestError> {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.lines.recv_timeout(left) {
            Ok(l) => Ok(l),
            Err(RecvTimeoutError::Timeout) => Err(self.timeout_err(what, timeout)),
            Err(RecvTimeoutError::Disconnected) => Err(self.exited_err(what)),
        }
    }

    /// Writes `line` plus a newline to the serial console.
    pub fn send_line(&mut self, line: &str) -> Result<(), GuestError> {
        let res = match self.stdin.as_mut() {
            Some(s) => s
                .write_all(format!("{line}\n").as_bytes())
                .and_then(|()| s.flush()),
            None => Err(io::Error::from(io::ErrorKind::BrokenPipe)),
        };
        match res {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                Err(self.exited_err(&format!("sending `{line}` to the serial console")))
            }
            Err(source) => Err(GuestError::Io {
                context: "writing to the guest serial console".into(),
                source,
            }),
        }
    }

    /// Discards serial lines received so far (they remain in the log).
    pub fn drain(&mut self) {
        while self.lines.try_recv().is_ok() {}
    }

    /// Waits for `TORII-GUEST-READY`, then synchronises with the console
    /// shell: sends `echo __SYNC_<n>__` every 300 ms until one comes back on
    /// a line of its own, then waits for the output of the last probe sent,
    /// so no stale probe output can be mistaken for command output later.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<(), GuestError> {
        let start = Instant::now();
        let deadline = start + timeout;
        loop {
            let line =
                self.recv_line(deadline, "TORII-GUEST-READY on the serial console", timeout)?;
            if line.contains(READY_MARKER) {
                tracing::debug!(after = ?start.elapsed(), "{line}");
                break;
            }
        }
        let what = "the guest shell to answer `echo __SYNC_<n>__`";
        let mut sent: Vec<u64> = Vec::new();
        let mut next_send = Instant::now();
        let mut seen = false;
        loop {
            let now = Instant::now();
            if !seen && now >= next_send {
                let n = self.next_seq();
                self.send_line(&format!("echo __SYNC_{n}__"))?;
                sent.push(n);
                next_send = now + SYNC_INTERVAL;
            }
            let wake = if seen {
                deadline
            } else {
                next_send.min(deadline)
            };
            let left = wake.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(k) = parse_sync_line(&line) {
                        if !sent.contains(&k) {
                            continue;
                        }
                        seen = true;
                        // Every probe sent after the shell was up is answered
                        // in order; the last one ends the synchronisation.
                        if Some(&k) == sent.last() {
                            break;
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    if Instant::now() >= deadline {
                        return Err(self.timeout_err(what, timeout));
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return Err(self.exited_err(what)),
            }
        }
        // Continuation lines would otherwise be prefixed by PS2 ("> ").
        self.run_ok(
            "PS2=''",
            timeout
                .saturating_sub(start.elapsed())
                .max(Duration::from_secs(5)),
        )?;
        tracing::debug!(after = ?start.elapsed(), probes = sent.len(), "guest shell synchronised");
        Ok(())
    }

    /// Runs `cmd` in the guest shell as `{ cmd ; } 2>&1` and returns its exit
    /// status and combined output. Pending serial lines are discarded first.
    ///
    /// After a timeout the command may still be running in the guest and its
    /// late output would be attributed to the next command.
    pub fn run(&mut self, cmd: &str, timeout: Duration) -> Result<CmdOutput, GuestError> {
        let deadline = Instant::now() + timeout;
        self.drain();
        let seq = self.next_seq();
        let marker = format!("__TORII_RC_{seq}_");
        self.send_line(&format!("{{ {cmd} ; }} 2>&1; echo \"{marker}$?\""))?;
        let what = format!("guest command `{cmd}` to finish");
        let mut out = String::new();
        loop {
            let line = self.recv_line(deadline, &what, timeout)?;
            if let Some((before, rc)) = parse_marker_line(&line, &marker) {
                // Output without a trailing newline shares the marker's line.
                if !before.is_empty() && !is_noise_line(before) {
                    out.push_str(before);
                    out.push('\n');
                }
                let rc = i32::try_from(rc).unwrap_or(i32::MAX);
                return Ok(CmdOutput { rc, stdout: out });
            }
            if !is_noise_line(&line) {
                out.push_str(&line);
                out.push('\n');
            }
        }
    }

    /// Like [`run`](Self::run) but fails unless the exit status is 0;
    /// returns the output.
    pub fn run_ok(&mut self, cmd: &str, timeout: Duration) -> Result<String, GuestError> {
        let out = self.run(cmd, timeout)?;
        if out.rc == 0 {
            Ok(out.stdout)
        } else {
            Err(GuestError::CommandFailed {
                cmd: cmd.to_string(),
                rc: out.rc,
                output: out.stdout,
            })
        }
    }

    /// Starts `cmd` in the background in the guest without waiting, as
    /// `( cmd & )`. Redirect its output (e.g. `> /tmp/x.log 2>&1`) or it
    /// interleaves with later command output.
    ///
    /// The extra subshell matters: the console shell is busybox ash reading
    /// with echo off, and a SIGCHLD arriving while it waits for input (a
    /// plain `cmd &` job finishing) makes it see EOF and exit, which powers
    /// the guest off. With `( cmd & )` the command is re-parented to init and
    /// the shell only reaps the subshell, in the foreground. For the same
    /// reason never leave a bare `&` job behind in [`run`](Self::run).
    pub fn spawn_bg(&mut self, cmd: &str) -> Result<(), GuestError> {
        self.send_line(&format!("( {cmd} & )"))
    }

    /// Sends `poweroff -f` and waits for QEMU to exit. On timeout QEMU is
    /// killed and a timeout error returned.
    pub fn poweroff(&mut self, timeout: Duration) -> Result<ExitStatus, GuestError> {
        if let Some(st) = self.child.exit_status() {
            return Ok(st);
        }
        // QEMU may have exited already; the wait below tells.
        let _ = self.send_line("poweroff -f");
        let res = self.child.wait_timeout(timeout);
        match res {
            Ok(Some(st)) => Ok(st),
            Ok(None) => {
                let err = self.timeout_err("QEMU to exit after `poweroff -f`", timeout);
                let _ = self.child.kill();
                Err(err)
            }
            Err(source) => Err(GuestError::Io {
                context: "waiting for QEMU to exit".into(),
                source,
            }),
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.stdin.take();
        if let Err(e) = self.child.kill() {
            tracing::warn!(error = %e, "failed to kill QEMU");
        }
        if let Some(h) = self.reader.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_lines() {
        assert!(is_kernel_log_line("[    6.391170] reboot: Power down"));
        assert!(is_kernel_log_line("[12345.000001] x"));
        assert!(!is_kernel_log_line("[1]+  Done  sleep 1"));
        assert!(!is_kernel_log_line("hello"));
        assert!(!is_kernel_log_line("[ ok ]"));
        assert!(is_job_notice_line(
            "[1]+  Done                       sleep 1"
        ));
        assert!(is_job_notice_line("[12] - Exit 1   false"));
        assert!(!is_job_notice_line("[1] hello"));
        assert!(!is_job_notice_line("[    6.391170] reboot: Power down"));
    }

    #[test]
    fn markers() {
        let m = "__TORII_RC_7_";
        assert_eq!(parse_marker_line("__TORII_RC_7_0", m), Some(("", 0)));
        assert_eq!(
            parse_marker_line("abc__TORII_RC_7_127 ", m),
            Some(("abc", 127))
        );
        assert_eq!(parse_marker_line("echo \"__TORII_RC_7_$?\"", m), None);
        assert_eq!(parse_marker_line("__TORII_RC_17_0", m), None);
        assert_eq!(parse_sync_line("__SYNC_3__"), Some(3));
        assert_eq!(parse_sync_line("echo __SYNC_3__"), None);
    }

    #[test]
    fn args() {
        let img = GuestImage {
            kernel: "/k".into(),
            initrd: "/i".into(),
        };
        let a = GuestBuilder::new()
            .image(img)
            .accel(Accel::Tcg)
            .net_vhost_user("/tmp/a,b.sock", "52:54:00:00:00:01", 2, ChardevMode::Server)
            .net_vhost_user(
                "/tmp/c.sock",
                "52:54:00:00:00:02",
                1,
                ChardevMode::Client {
                    reconnect_ms: Some(1000),
                },
            )
            .net_device_prop("guest_tso4=off")
            .blk_vhost_user("/tmp/blk.sock", 2)
            .host_root_share(true)
            .qemu_args()
            .unwrap()
            .join(" ");
        assert!(a.contains("-accel tcg -cpu max"));
        assert!(a.contains("memory-backend-memfd,id=mem,size=256M,share=on"));
        assert!(a.contains("socket,id=c0,path=/tmp/a,,b.sock,server=on,wait=off"));
        assert!(a.contains("virtio-net-pci,netdev=n0,mac=52:54:00:00:00:01,mq=on,vectors=6"));
        assert!(a.contains("socket,id=c1,path=/tmp/c.sock,reconnect-ms=1000"));
        assert!(a.contains("virtio-net-pci,netdev=n1,mac=52:54:00:00:00:02,guest_tso4=off "));
        assert!(a.contains("vhost-user-blk-pci,chardev=b0,num-queues=2"));
        assert!(a.contains("mount_tag=hostroot"));
    }
}
