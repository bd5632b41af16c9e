//! The byte streams the agent is served on.
//!
//! - A virtio-serial port, found by its name in sysfs (the guest has devtmpfs, no udev, so no
//!   `/dev/virtio-ports/NAME` links), opened once for the agent's life: the port allows one
//!   opener at a time, and a reopen would fail while anything still held it. Each host
//!   connection is served in turn on it; while no host is connected, reads end at once (EOF)
//!   and `poll(2)` says hang-up, so the agent looks again every 100 ms.
//! - A Unix socket, one connection at a time.
//! - Any `Read` and `Write` (stdio).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::protocol::FrameError;
use crate::server::{serve, Agent};

/// How often a port with no host connected is looked at again.
const IDLE: Duration = Duration::from_millis(100);

/// The device node of virtio-serial port `name`: the `vportNpM` whose
/// `<sys>/class/virtio-ports/vportNpM/name` holds it, as `<dev>/vportNpM`.
pub fn find_port(name: &str, sys: &Path, dev: &Path) -> Option<PathBuf> {
    let dir = sys.join("class/virtio-ports");
    let mut ports: Vec<_> = std::fs::read_dir(&dir)
        .ok()?
        .filter_map(|e| Some(e.ok()?.file_name()))
        .collect();
    ports.sort();
    ports
        .into_iter()
        .find(|p| {
            std::fs::read_to_string(dir.join(p).join("name"))
                .is_ok_and(|n| n.trim_end_matches('\n') == name)
        })
        .map(|p| dev.join(p))
}

/// Opens port `name` (a path if it holds a `/`, else found with [`find_port`]), trying again
/// for up to `patience`: the port may show up (or get its name) after the agent starts.
pub fn open_port(name: &str, sys: &Path, dev: &Path, patience: Duration) -> io::Result<Port> {
    let deadline = Instant::now() + patience;
    loop {
        let path = if name.contains('/') {
            Some(PathBuf::from(name))
        } else {
            find_port(name, sys, dev)
        };
        let r = match path {
            Some(p) => Port::open(&p)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", p.display()))),
            None => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no virtio-serial port named {name:?}"),
            )),
        };
        match r {
            Err(_) if Instant::now() < deadline => std::thread::sleep(IDLE),
            r => return r,
        }
    }
}

/// poll(2) on one fd, with no timeout (EINTR retried); what happened.
fn poll1(fd: &impl AsRawFd, events: i16) -> io::Result<i16> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    };
    loop {
        // SAFETY: poll(2) on one pollfd that lives across the call.
        if unsafe { libc::poll(&mut p, 1, -1) } >= 0 {
            return Ok(p.revents);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// How a connection on a port is ended early (after a failed write, or its end).
struct Stop {
    stopped: AtomicBool,
    /// Readable once `stopped`: what a read or write waiting in poll(2) wakes up on.
    wake: UnixStream,
    waker: UnixStream,
}

impl Stop {
    fn new() -> io::Result<Stop> {
        let (wake, waker) = UnixStream::pair()?;
        Ok(Stop {
            stopped: AtomicBool::new(false),
            wake,
            waker,
        })
    }

    fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        let _ = self.waker.shutdown(std::net::Shutdown::Both);
    }

    fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }
}

/// One side of a connection on a port (non-blocking, waiting in poll(2)).
struct PortIo {
    file: Arc<File>,
    stop: Arc<Stop>,
}

impl PortIo {
    /// Waits for `events` on the port; `None` once the connection is stopped.
    fn wait(&self, events: i16) -> io::Result<Option<i16>> {
        let mut fds = [
            libc::pollfd {
                fd: self.file.as_raw_fd(),
                events,
                revents: 0,
            },
            libc::pollfd {
                fd: self.stop.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        loop {
            if self.stop.is_stopped() {
                return Ok(None);
            }
            // SAFETY: poll(2) on an array of two pollfds that lives across the call.
            if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } >= 0 {
                return Ok((fds[1].revents == 0).then_some(fds[0].revents));
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "the connection was closed")
}

impl Read for PortIo {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.stop.is_stopped() {
                return Ok(0);
            }
            match (&*self.file).read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if self.wait(libc::POLLIN)?.is_none() {
                        return Ok(0);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // 0: no host (any more).
                r => return r,
            }
        }
    }
}

impl Write for PortIo {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            if self.stop.is_stopped() {
                return Err(closed());
            }
            match (&*self.file).write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Writes wait while no host is connected: hang-up ends them instead.
                    let ev = self.wait(libc::POLLOUT)?.ok_or_else(closed)?;
                    if ev & libc::POLLOUT == 0 && ev & (libc::POLLHUP | libc::POLLERR) != 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::BrokenPipe,
                            "the host went away",
                        ));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => return r,
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A virtio-serial port (or, for tests, two FIFOs that behave like one), open for the
/// agent's life.
pub struct Port {
    read: Arc<File>,
    write: Arc<File>,
}

fn set_nonblocking(f: &File) -> io::Result<()> {
    // SAFETY: fcntl(2) F_GETFL/F_SETFL on an open fd take no pointers.
    let r = unsafe {
        let fl = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
        if fl < 0 {
            fl
        } else {
            libc::fcntl(f.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK)
        }
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Port {
    pub fn open(path: &Path) -> io::Result<Port> {
        let f = Arc::new(
            OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(path)?,
        );
        Ok(Port {
            read: f.clone(),
            write: f,
        })
    }

    /// A port read from `read` and written to `write` (made non-blocking).
    pub fn from_files(read: File, write: File) -> io::Result<Port> {
        set_nonblocking(&read)?;
        set_nonblocking(&write)?;
        Ok(Port {
            read: Arc::new(read),
            write: Arc::new(write),
        })
    }

    fn io(&self, file: &Arc<File>, stop: &Arc<Stop>) -> PortIo {
        PortIo {
            file: file.clone(),
            stop: stop.clone(),
        }
    }

    /// Waits until a host is connected and has sent something. What an earlier host left
    /// unread is dropped.
    fn wait_host(&self) -> io::Result<()> {
        loop {
            let ev = poll1(&*self.read, libc::POLLIN)?;
            if ev & libc::POLLNVAL != 0 {
                return Err(io::Error::from_raw_os_error(libc::EBADF));
            }
            if ev & libc::POLLHUP == 0 {
                if ev & libc::POLLIN != 0 {
                    return Ok(());
                }
                if ev & libc::POLLERR != 0 {
                    return Err(io::Error::other("the port is in error"));
                }
            }
            // No host: drop what is left (an error here is the port's: unplugged), look again
            // shortly.
            let mut buf = [0u8; 4096];
            loop {
                match (&*self.read).read(&mut buf) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            std::thread::sleep(IDLE);
        }
    }

    /// Serves host connections one after another; returns only if the port fails.
    pub fn serve(&self, agent: &Arc<Agent>, log: &dyn Fn(&str)) -> io::Error {
        loop {
            if let Err(e) = self.wait_host() {
                return e;
            }
            let stop = match Stop::new() {
                Ok(s) => Arc::new(s),
                Err(e) => return e,
            };
            let (r, w) = (self.io(&self.read, &stop), self.io(&self.write, &stop));
            let ended = serve(agent.clone(), r, w, move || stop.stop());
            if let Err(e) = ended {
                // The agent cannot close a port's stream: what this host sends is read and
                // dropped until it goes away.
                log(&format!(
                    "{e}; dropping what the host sends until it disconnects"
                ));
                let stop = match Stop::new() {
                    Ok(s) => Arc::new(s),
                    Err(e) => return e,
                };
                if let Err(e) = io::copy(&mut self.io(&self.read, &stop), &mut io::sink()) {
                    return e;
                }
            }
        }
    }
}

/// Serves one connection on a Unix stream socket.
pub fn serve_unix(agent: Arc<Agent>, s: UnixStream) -> Result<(), FrameError> {
    let (r, w) = (s.try_clone()?, s.try_clone()?);
    serve(agent, r, w, move || {
        let _ = s.shutdown(std::net::Shutdown::Both);
    })
}

/// Serves the connections `l` accepts, one at a time; returns only if `l` fails.
pub fn serve_listener(agent: &Arc<Agent>, l: &UnixListener, log: &dyn Fn(&str)) -> io::Error {
    loop {
        match l.accept() {
            Ok((s, _)) => {
                if let Err(e) = serve_unix(agent.clone(), s) {
                    log(&format!("connection ended: {e}"));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EBADF | libc::EINVAL | libc::ENOTSOCK)
                ) =>
            {
                return e
            }
            Err(e) => {
                // Out of fds, a connection aborted: look again shortly.
                log(&format!("accept: {e}"));
                std::thread::sleep(IDLE);
            }
        }
    }
}

/// A listening vsock socket: the host reaches it through vhost-vsock, or through Cloud
/// Hypervisor's and Firecracker's hybrid vsock (`CONNECT <port>` on their Unix socket).
pub struct VsockListener(std::os::fd::OwnedFd);

impl VsockListener {
    /// Listens on `port` for any CID.
    pub fn bind(port: u32) -> io::Result<VsockListener> {
        use std::os::fd::FromRawFd;
        // SAFETY: socket(2) with constant arguments; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new socket that nothing else owns.
        let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_vm is plain old data: all zeroes is a valid value.
        let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_cid = libc::VMADDR_CID_ANY;
        addr.svm_port = port;
        let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
        // SAFETY: bind and listen on the socket we own, with an address of the given length.
        let r = unsafe {
            let r = libc::bind(
                fd,
                &addr as *const libc::sockaddr_vm as *const libc::sockaddr,
                len,
            );
            if r == 0 {
                libc::listen(fd, 4)
            } else {
                r
            }
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(VsockListener(owned))
    }

    /// The next connection, as a file (a stream socket's reads and writes).
    fn accept(&self) -> io::Result<File> {
        use std::os::fd::FromRawFd;
        // SAFETY: accept4 on the listening socket we own; no peer address is asked for.
        let fd = unsafe {
            libc::accept4(
                self.0.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new connection that nothing else owns.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    /// Serves the connections it accepts, one at a time; returns only if it fails.
    pub fn serve(&self, agent: &Arc<Agent>, log: &dyn Fn(&str)) -> io::Error {
        loop {
            let c = match self.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EBADF | libc::EINVAL)) => return e,
                Err(e) => {
                    log(&format!("accept: {e}"));
                    std::thread::sleep(IDLE);
                    continue;
                }
            };
            let r = c.try_clone().and_then(|r| Ok((r, c.try_clone()?)));
            let (r, w) = match r {
                Ok(rw) => rw,
                Err(e) => {
                    log(&format!("connection: {e}"));
                    continue;
                }
            };
            let res = serve(agent.clone(), r, w, move || {
                // SAFETY: shutdown(2) on the connection, which the closure owns (`c`), so
                // the descriptor is open.
                unsafe { libc::shutdown(c.as_raw_fd(), libc::SHUT_RDWR) };
            });
            if let Err(e) = res {
                log(&format!("connection ended: {e}"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_found_by_name_in_sysfs() {
        let root = std::env::temp_dir().join(format!("torii-agent-ports-{}", std::process::id()));
        let sys = root.join("sys");
        for (port, name) in [
            ("vport0p0", ""),
            ("vport1p1", "agent.0\n"),
            ("vport1p2", "log\n"),
        ] {
            let d = sys.join("class/virtio-ports").join(port);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("name"), name).unwrap();
        }
        let dev = Path::new("/dev");
        let found = (
            find_port("agent.0", &sys, dev),
            find_port("log", &sys, dev),
            find_port("agent", &sys, dev),
            find_port("agent.0", &root.join("nosys"), dev),
        );
        // Not there: looked for until the patience runs out, then an error.
        let t = Instant::now();
        let missing = open_port("nope", &sys, dev, Duration::from_millis(300));
        let waited = t.elapsed();
        let _ = std::fs::remove_dir_all(&root);
        assert_eq!(found.0, Some(PathBuf::from("/dev/vport1p1")));
        assert_eq!(found.1, Some(PathBuf::from("/dev/vport1p2")));
        assert_eq!((found.2, found.3), (None, None));
        assert_eq!(missing.err().unwrap().kind(), io::ErrorKind::NotFound);
        assert!(waited >= Duration::from_millis(300), "{waited:?}");
    }
}
