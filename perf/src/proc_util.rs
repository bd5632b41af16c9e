//! Process and filesystem helpers shared by the harness: a child guard that
//! never leaks processes, unique temporary directories and polling helpers.

use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// Errors of the polling helpers.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    /// A condition did not become true in time.
    #[error("timed out after {timeout:?} waiting for {what}")]
    Timeout {
        /// What was waited for.
        what: String,
        /// How long was waited.
        timeout: Duration,
    },
}

/// Polls `f` every `poll` until it returns `true` or `timeout` elapses.
///
/// `f` is always called at least once, and once more right at the deadline,
/// so a condition that became true during the last sleep is not missed.
/// Returns whether the condition became true.
pub fn wait_until(timeout: Duration, poll: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        thread::sleep(poll.min(deadline - now));
    }
}

/// Waits until `path` exists (e.g. a vhost-user socket created by a server).
pub fn wait_for_path(path: impl AsRef<Path>, timeout: Duration) -> Result<(), ProcError> {
    let path = path.as_ref();
    if wait_until(timeout, Duration::from_millis(20), || path.exists()) {
        Ok(())
    } else {
        Err(ProcError::Timeout {
            what: format!("path {} to appear", path.display()),
            timeout,
        })
    }
}

/// Arranges for the child spawned from `cmd` to receive SIGKILL when the
/// spawning *thread* exits (Linux `PR_SET_PDEATHSIG`).
///
/// This keeps busy-polling peers (testpmd) and guests from outliving a test
/// binary that was killed before its destructors could run. Note the
/// "parent" is the thread that spawned the child: do not spawn from a
/// short-lived helper thread when this is set.
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec; it only calls
    // prctl(2) and getppid(2), which are async-signal-safe system calls, does
    // not allocate and touches no state shared with the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl: then we were
            // re-parented and would never get the signal.
            if libc::getppid() == 1 {
                return Err(io::Error::other("parent exited before exec"));
            }
            Ok(())
        });
    }
}

/// Owns a child process and kills (SIGKILL) and reaps it on drop.
///
/// When created with [`ChildGuard::new_group`] the child is expected to lead
/// its own process group (`Command::process_group(0)`) and signals are sent
/// to the whole group.
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
    name: String,
    group: bool,
    status: Option<ExitStatus>,
}

impl ChildGuard {
    /// Guards `child`; `name` is used in log messages.
    pub fn new(child: Child, name: impl Into<String>) -> Self {
        Self {
            child,
            name: name.into(),
            group: false,
            status: None,
        }
    }

    /// Guards `child` that leads its own process group; signals go to the
    /// whole group.
    pub fn new_group(child: Child, name: impl Into<String>) -> Self {
        let mut g = Self::new(child, name);
        g.group = true;
        g
    }

    /// Process id of the child.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Name given at construction.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The wrapped child, e.g. to take its stdin.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Sends `sig` to the child (or its process group). A no-op once the
    /// child has been reaped, so a recycled pid is never signalled.
    pub fn signal(&self, sig: libc::c_int) -> io::Result<()> {
        if self.status.is_some() {
            return Ok(());
        }
        let pid = libc::pid_t::try_from(self.child.id()).map_err(io::Error::other)?;
        let target = if self.group { -pid } else { pid };
        // SAFETY: kill(2) has no memory-safety preconditions; the pid belongs
        // to our own unreaped child (or its group), so it cannot be recycled.
        let rc = unsafe { libc::kill(target, sig) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ESRCH) {
            Ok(())
        } else {
            Err(err)
        }
    }

    /// Non-blocking check for exit; caches the status once reaped.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        if let Some(st) = self.status {
            return Ok(Some(st));
        }
        let st = self.child.try_wait()?;
        if st.is_some() {
            self.status = st;
        }
        Ok(st)
    }

    /// Whether the child has not exited yet.
    pub fn is_running(&mut self) -> bool {
        matches!(self.try_wait(), Ok(None))
    }

    /// Exit status if the child has already been reaped.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.status
    }

    /// Waits up to `timeout` for the child to exit; `Ok(None)` on timeout.
    pub fn wait_timeout(&mut self, timeout: Duration) -> io::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_wait()? {
                return Ok(Some(st));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            thread::sleep(Duration::from_millis(20).min(deadline - now));
        }
    }

    /// SIGKILLs the child (group) and reaps it.
    pub fn kill(&mut self) -> io::Result<ExitStatus> {
        if let Some(st) = self.status {
            return Ok(st);
        }
        self.signal(libc::SIGKILL)?;
        let st = self.child.wait()?;
        self.status = Some(st);
        Ok(st)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.status.is_none() {
            tracing::debug!(name = %self.name, pid = self.child.id(), "killing child on drop");
        }
        if let Err(e) = self.kill() {
            tracing::warn!(name = %self.name, error = %e, "failed to kill/reap child");
        }
    }
}

/// A uniquely named temporary directory, removed (recursively) on drop
/// unless the environment variable `TORII_KEEP_TMP=1` is set.
#[derive(Debug)]
pub struct TmpDir {
    path: PathBuf,
    keep: bool,
}

impl TmpDir {
    /// Path of the directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `self.path().join(p)`.
    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.path.join(p)
    }

    /// Keeps the directory after drop and returns its path.
    pub fn into_path(mut self) -> PathBuf {
        self.keep = true;
        self.path.clone()
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        if self.keep {
            tracing::info!(path = %self.path.display(), "keeping temporary directory");
            return;
        }
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(path = %self.path.display(), error = %e, "failed to remove temporary directory");
            }
        }
    }
}

/// Whether `TORII_KEEP_TMP=1` asks to keep temporary files.
pub fn keep_tmp() -> bool {
    std::env::var_os("TORII_KEEP_TMP").is_some_and(|v| v == "1")
}

/// An ext4 image of 32 MiB holding `files` (name, content), made with `mkfs.ext4 -d` and
/// served by its own `blk_binary` (torii-vhost-user-blk, event mode) on `<dir>/<name>.sock`:
/// the backend, its socket and the image. Panics on failure (a test helper).
pub fn serve_ext4_image(
    blk_binary: &Path,
    dir: &Path,
    name: &str,
    files: &[(&str, &str)],
) -> (ChildGuard, PathBuf, PathBuf) {
    let content = dir.join(format!("{name}.d"));
    std::fs::create_dir_all(&content).unwrap();
    for (f, text) in files {
        std::fs::write(content.join(f), text).unwrap();
    }
    let img = dir.join(format!("{name}.img"));
    let mk = Command::new("mkfs.ext4")
        .args(["-q", "-d"])
        .arg(&content)
        .arg(&img)
        .arg("32M")
        .stdout(Stdio::null())
        .status()
        .expect("mkfs.ext4 (e2fsprogs: scripts/setup)");
    assert!(mk.success(), "mkfs.ext4 -d {}", content.display());
    let socket = dir.join(format!("{name}.sock"));
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    let mut cmd = Command::new(blk_binary);
    cmd.arg("--socket")
        .arg(&socket)
        .arg("--file")
        .arg(&img)
        .args(["--poll-mode", "event"])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    die_with_parent(&mut cmd);
    let child = ChildGuard::new(
        cmd.spawn().expect("starting torii-vhost-user-blk"),
        "torii-vhost-user-blk",
    );
    wait_for_path(&socket, Duration::from_secs(20)).expect("backend socket");
    (child, socket, img)
}

/// Creates a fresh directory `<temp_dir>/<prefix>-<pid>-<n>`.
///
/// Names are kept short because vhost-user socket paths placed inside must
/// fit in `sun_path` (108 bytes).
pub fn unique_tmp_dir(prefix: &str) -> io::Result<TmpDir> {
    unique_dir_in(&std::env::temp_dir(), prefix)
}

/// Creates a fresh directory `<base>/<prefix>-<pid>-<n>` (e.g. on tmpfs, `/dev/shm`).
pub fn unique_dir_in(base: &Path, prefix: &str) -> io::Result<TmpDir> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let pid = std::process::id();
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = base.join(format!("{prefix}-{pid}-{n}"));
        match std::fs::create_dir(&path) {
            Ok(()) => {
                return Ok(TmpDir {
                    path,
                    keep: keep_tmp(),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Last `n` lines of a text file (lossy UTF-8), joined with `\n`; an empty
/// string if the file cannot be read.
pub fn file_tail(path: impl AsRef<Path>, n: usize) -> String {
    match std::fs::read(path.as_ref()) {
        Ok(bytes) => tail_lines(&String::from_utf8_lossy(&bytes), n),
        Err(_) => String::new(),
    }
}

/// Last `n` lines of `text`, joined with `\n`.
pub fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Runs `cmd` with `sh -c` on the host and returns its stdout; panics with its output if it
/// fails (a test helper: setup steps that must work).
pub fn sh(cmd: &str) -> String {
    let out = Command::new("sh")
        .args(["-c", cmd])
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A field of `/proc/<pid>/status` (`key` with its colon, e.g. `"Uid:"`), trimmed; empty if
/// the process or the field is not there.
pub fn status_field(pid: u32, key: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| v.trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tmp_dir_is_unique_and_removed() {
        let a = unique_tmp_dir("torii-ut").unwrap();
        let b = unique_tmp_dir("torii-ut").unwrap();
        assert_ne!(a.path(), b.path());
        std::fs::write(a.join("f"), b"x").unwrap();
        let pa = a.path().to_path_buf();
        drop(a);
        assert!(keep_tmp() || !pa.exists());
    }

    #[test]
    fn wait_helpers() {
        let mut n = 0;
        assert!(wait_until(
            Duration::from_secs(1),
            Duration::from_millis(1),
            || {
                n += 1;
                n == 3
            }
        ));
        assert!(!wait_until(
            Duration::from_millis(30),
            Duration::from_millis(5),
            || false
        ));
        let err = wait_for_path("/nonexistent/torii", Duration::from_millis(30)).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/torii"));
    }

    #[test]
    fn child_guard_kills_on_drop() {
        let child = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id() as libc::pid_t;
        let mut g = ChildGuard::new(child, "sleep");
        assert!(g.is_running());
        drop(g);
        // SAFETY: signal 0 only checks for existence; the pid was reaped.
        let alive = unsafe { libc::kill(pid, 0) } == 0;
        assert!(!alive);
        let child = Command::new("true").spawn().unwrap();
        g = ChildGuard::new(child, "true");
        assert!(g
            .wait_timeout(Duration::from_secs(5))
            .unwrap()
            .unwrap()
            .success());
    }

    #[test]
    fn tails() {
        assert_eq!(tail_lines("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail_lines("a", 5), "a");
    }
}
