//! The launcher: one trait over the hypervisors, and the VMM process they share.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::spec::{Disk, HypervisorKind, Sandbox};

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("{0}")]
    Launch(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Api(String),
}

pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> VmmError {
    let context = context.into();
    move |source| VmmError::Io { context, source }
}

/// A hypervisor that can start a sandbox's VM.
pub trait Hypervisor {
    fn kind(&self) -> HypervisorKind;
    /// Starts the VM of `sb`, with its sockets and logs in `dir`; returns once the VMM runs it
    /// (the guest may still be booting).
    fn launch(&self, sb: &Sandbox, dir: &Path) -> Result<Box<dyn Vm>, VmmError>;
}

/// A running VM.
pub trait Vm: Send {
    fn pid(&self) -> u32;
    /// A byte stream to the guest agent, waiting up to `timeout` for one (on virtio-serial the
    /// guest may not have opened its end yet: QEMU holds what is sent until it does; over a
    /// hybrid vsock the connection is retried until the agent listens).
    fn agent_stream(&mut self, timeout: Duration) -> Result<UnixStream, VmmError>;
    /// Asks the VMM to stop the VM at once (the guest has been asked to power off already, or
    /// could not be); waits up to `timeout` and kills the VMM after that.
    fn stop(&mut self, timeout: Duration) -> Result<(), VmmError>;
    /// Waits up to `timeout` for the VMM to exit by itself (the guest powered off).
    fn wait_exit(&mut self, timeout: Duration) -> bool;
    /// The end of the guest's console output (bounded), for error messages.
    fn console_tail(&mut self) -> String;
    /// Hot-plugs vhost-user-blk disk `disk` into its guest PCI slot. Its backend must listen
    /// already: a VMM may wait for it without end (QEMU's main loop does).
    fn add_disk(&mut self, disk: &Disk) -> Result<(), VmmError>;
    /// Hot-unplugs `disk` (hot-plugged or given at launch): returns once the guest has let go
    /// of it and the VMM has removed it. A disk that is gone already is success.
    fn remove_disk(&mut self, disk: &Disk) -> Result<(), VmmError>;
}

/// The hypervisor of `kind`.
pub fn hypervisor(kind: HypervisorKind) -> Box<dyn Hypervisor> {
    match kind {
        HypervisorKind::Qemu => Box::new(crate::qemu::Qemu),
        HypervisorKind::CloudHypervisor => Box::new(crate::cloud_hypervisor::CloudHypervisor),
        HypervisorKind::Firecracker => Box::new(crate::firecracker::Firecracker),
    }
}

/// Finds `name` in PATH.
pub fn find_binary(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The VMM process: killed (and reaped) when dropped, so an error path leaks no VMM.
pub struct VmmProcess {
    child: Option<Child>,
    pub log: PathBuf,
}

impl VmmProcess {
    /// Starts `cmd` with its output in `log`, in `netns` when given, in a session of its own
    /// (a terminal's Ctrl-C is the runtime's to handle, not the VMM's). It is killed when the
    /// thread that spawned it ends (PR_SET_PDEATHSIG: the runtime's main thread, for toriictl),
    /// or when this guard is dropped.
    pub fn spawn(mut cmd: Command, log: &Path, netns: Option<&Path>) -> Result<Self, VmmError> {
        let out = File::create(log).map_err(io_err(format!("{}", log.display())))?;
        let err = out.try_clone().map_err(io_err("log"))?;
        let ns = match netns {
            Some(p) => Some(File::open(p).map_err(io_err(format!("netns {}", p.display())))?),
            None => None,
        };
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        let ns_fd = ns.as_ref().map(|f| f.as_raw_fd());
        // SAFETY: getpid(2) has no preconditions.
        let me = unsafe { libc::getpid() };
        // SAFETY: the closure runs in the child between fork and exec and only makes
        // async-signal-safe calls (setsid, prctl, getppid, setns) on values captured by copy;
        // `ns` (the fd's owner) lives until after spawn returns.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setsid() < 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The parent died before the death signal was asked for: nobody will stop us.
                if libc::getppid() != me {
                    return Err(io::Error::other("the runtime went away"));
                }
                if let Some(fd) = ns_fd {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        let e = io::Error::last_os_error();
                        return Err(io::Error::new(
                            e.kind(),
                            format!("entering the pod's network namespace: {e}"),
                        ));
                    }
                }
                Ok(())
            });
        }
        let prog = cmd.get_program().to_string_lossy().into_owned();
        let child = cmd.spawn().map_err(io_err(match netns {
            Some(ns) => format!("starting {prog} in {}", ns.display()),
            None => format!("starting {prog}"),
        }))?;
        drop(ns);
        Ok(VmmProcess {
            child: Some(child),
            log: log.to_path_buf(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// Whether it has exited (reaped).
    pub fn exited(&mut self) -> bool {
        match &mut self.child {
            Some(c) => !matches!(c.try_wait(), Ok(None)),
            None => true,
        }
    }

    /// Waits up to `timeout` for it to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        loop {
            if self.exited() {
                return true;
            }
            if Instant::now() >= end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The last lines of its log, for error messages.
    pub fn log_tail(&self) -> String {
        file_tail(&self.log, 15)
    }

    /// Waits for `socket` to appear while the VMM runs.
    pub fn wait_socket(&mut self, socket: &Path, timeout: Duration) -> Result<(), VmmError> {
        let end = Instant::now() + timeout;
        while !socket.exists() {
            if self.exited() {
                return Err(VmmError::Launch(format!(
                    "the VMM exited while starting:\n{}",
                    self.log_tail()
                )));
            }
            if Instant::now() >= end {
                return Err(VmmError::Launch(format!(
                    "{} did not appear within {timeout:?}",
                    socket.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for VmmProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Pins thread `tid` to host CPU `cpu`.
pub fn pin_thread(tid: i32, cpu: usize) -> io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET writes inside it (cpu is checked
    // against its size first).
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if cpu >= 8 * std::mem::size_of::<libc::cpu_set_t>() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "CPU number too large",
        ));
    }
    // SAFETY: as above.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: sched_setaffinity reads `size_of::<cpu_set_t>()` bytes of `set`.
    let r = unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The last `lines` lines of a file, read from its last 64 KiB (the file may be large, and the
/// guest writes what it likes into consoles: decoded lossily).
pub fn file_tail(path: &Path, lines: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let mut buf = Vec::new();
    if let Ok(mut f) = File::open(path) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 << 10)));
        let _ = f.take(64 << 10).read_to_end(&mut buf);
    }
    tail_lines(&String::from_utf8_lossy(&buf), lines)
}

/// The last `n` lines of `text`.
pub fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Connects to `path`, retrying while the VMM has bound it but does not listen yet.
pub fn connect_unix(path: &Path, timeout: Duration) -> io::Result<UnixStream> {
    let end = Instant::now() + timeout;
    loop {
        match UnixStream::connect(path) {
            Err(e)
                if matches!(e.raw_os_error(), Some(libc::ECONNREFUSED | libc::ENOENT))
                    && Instant::now() < end =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            r => return r,
        }
    }
}
