//! qemu-storage-daemon as the vhost-user-blk peer: the same file exported by QEMU's own
//! backend, for tests that check Torii's answers against it and benchmarks that measure
//! against it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::prereq::{self, PrereqError};
use crate::proc_util::{wait_for_path, ChildGuard, ProcError};

/// How qemu-storage-daemon does its I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QsdAio {
    /// Its default: a thread pool doing preadv/pwritev.
    Threads,
    /// Linux io_uring (`aio=io_uring`), as Torii uses.
    IoUring,
}

/// Errors starting the peer.
#[derive(Debug, thiserror::Error)]
pub enum QsdError {
    #[error(transparent)]
    Prereq(#[from] PrereqError),
    #[error("cannot start qemu-storage-daemon: {0}")]
    Spawn(std::io::Error),
    #[error("qemu-storage-daemon did not listen on {socket}: {err}; log:\n{log}")]
    NoSocket {
        socket: PathBuf,
        err: ProcError,
        log: String,
    },
}

/// A running `qemu-storage-daemon --export type=vhost-user-blk`.
pub struct Qsd {
    child: ChildGuard,
    pub socket: PathBuf,
}

impl Qsd {
    /// Exports `image` (raw) on `socket` with `queues` queues.
    pub fn start(
        image: &Path,
        socket: &Path,
        queues: u16,
        aio: QsdAio,
        direct: bool,
        log: &Path,
    ) -> Result<Qsd, QsdError> {
        let bin = prereq::require_binary("qemu-storage-daemon", prereq::QSD_HINT)?;
        let _ = std::fs::remove_file(socket);
        let aio = match aio {
            QsdAio::Threads => "threads",
            QsdAio::IoUring => "io_uring",
        };
        let file = format!(
            "driver=file,node-name=file0,filename={},aio={aio},cache.direct={}",
            image.display().to_string().replace(',', ",,"),
            if direct { "on" } else { "off" }
        );
        let export = format!(
            "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},writable=on,num-queues={queues}",
            socket.display().to_string().replace(',', ",,")
        );
        let out = std::fs::File::create(log).map_err(QsdError::Spawn)?;
        let mut cmd = Command::new(bin);
        cmd.args(["--blockdev", &file])
            .args(["--blockdev", "driver=raw,node-name=disk0,file=file0"])
            .args(["--export", &export])
            .stdin(Stdio::null())
            .stdout(out.try_clone().map_err(QsdError::Spawn)?)
            .stderr(out);
        crate::proc_util::die_with_parent(&mut cmd);
        let child = cmd.spawn().map_err(QsdError::Spawn)?;
        let guard = ChildGuard::new(child, "qemu-storage-daemon");
        if let Err(err) = wait_for_path(socket, Duration::from_secs(10)) {
            return Err(QsdError::NoSocket {
                socket: socket.to_path_buf(),
                err,
                log: std::fs::read_to_string(log).unwrap_or_default(),
            });
        }
        Ok(Qsd {
            child: guard,
            socket: socket.to_path_buf(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }
}
