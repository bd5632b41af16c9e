//! Least privilege for Torii's daemons: a seccomp-BPF allowlist per thread class, built with
//! seccompiler's Rust API (no policy file is read at run time) and installed by each thread
//! for itself once its setup is done.
//!
//! Filters stack: a thread inherits the filters of the thread that started it and adds its
//! own, and the kernel allows a system call only if every filter of the stack does. The
//! daemon's main thread installs [`ThreadClass::Control`] for the whole process before it
//! starts any other thread, so every thread runs under that filter too, and each thread then
//! narrows it with its own class. Each class's list therefore holds its own needs plus those
//! of the classes its threads start (`Control` the union of all of them, `VhostUser` the
//! kick watchers'); [`allowlist`] builds them that way, and a test checks it.
//!
//! [`Mode::Enforce`] answers any other system call with `SECCOMP_RET_TRAP`: the `SIGSYS`
//! handler writes the thread's name, its class and the call's number and name to stderr
//! (with `write(2)` only) and kills the process with `SIGSYS`. [`Mode::Log`] lets everything
//! through but has the kernel log what enforce would refuse (`SECCOMP_RET_LOG`, in the kernel
//! log as audit type 1326), which is how a list is grown. [`Mode::Off`] installs nothing.
//!
//! x86_64 and aarch64 (where the legacy calls such as `open` or `poll` do not exist).

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// What the filters do with a system call outside a thread's list.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Trap (`SIGSYS`): the handler names the thread and the call on stderr, then the process
    /// is killed.
    #[default]
    Enforce,
    /// Allow, and have the kernel log the call (`SECCOMP_RET_LOG`): for building lists.
    Log,
    /// No filter at all.
    Off,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Log => "log",
            Mode::Off => "off",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "enforce" => Ok(Mode::Enforce),
            "log" => Ok(Mode::Log),
            "off" => Ok(Mode::Off),
            _ => Err(format!("unknown seccomp mode {s:?} (enforce, log or off)")),
        }
    }
}

/// The kinds of thread of Torii's daemons, each with its own allowlist.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ThreadClass {
    /// The daemon's main thread: configuration, the control API (tokio), signals, the stats
    /// file; it makes ports, disks and threads at run time. Also every thread that installs
    /// nothing of its own (tokio's blocking threads, DPDK's threads): they run under the
    /// filter the main thread installed for the whole process.
    Control,
    /// A device's endpoint thread (`vhu-<name>`): accepts or connects, receives vhost-user
    /// messages with their fds, maps guest memory and the inflight region, makes eventfds and
    /// starts the connection's watcher threads.
    VhostUser,
    /// The watchers of a connection (`kick-<name>`, `vhu-<name>-stop`): wait in epoll or poll,
    /// read kicks, wake the data path, shut the socket down on a stop request.
    Watcher,
    /// A PMD thread (`pmd<N>`): busy-polls rings and ports, sleeps in epoll when adaptive.
    Pmd,
    /// A vhost-user-blk queue worker (`blk-<name>-<n>`): io_uring, or inline I/O on tmpfs.
    IoWorker,
    /// The Prometheus endpoint's thread of `torii-vhost-user-blk` (`metrics`).
    Metrics,
    /// Timer threads that only tick shared state (`mac-ager`).
    Housekeeping,
}

impl ThreadClass {
    pub const ALL: [ThreadClass; 7] = [
        ThreadClass::Control,
        ThreadClass::VhostUser,
        ThreadClass::Watcher,
        ThreadClass::Pmd,
        ThreadClass::IoWorker,
        ThreadClass::Metrics,
        ThreadClass::Housekeeping,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ThreadClass::Control => "control",
            ThreadClass::VhostUser => "vhost-user",
            ThreadClass::Watcher => "watcher",
            ThreadClass::Pmd => "pmd",
            ThreadClass::IoWorker => "io-worker",
            ThreadClass::Metrics => "metrics",
            ThreadClass::Housekeeping => "housekeeping",
        }
    }

    /// Which threads are of this class.
    pub fn threads(self) -> &'static str {
        match self {
            ThreadClass::Control => {
                "main thread; tokio's blocking threads and DPDK's own threads inherit its filter"
            }
            ThreadClass::VhostUser => "vhu-<device>",
            ThreadClass::Watcher => "kick-<device>, vhu-<device>-stop",
            ThreadClass::Pmd => "pmd<N>",
            ThreadClass::IoWorker => "blk-<disk>-<n>",
            ThreadClass::Metrics => "metrics",
            ThreadClass::Housekeeping => "mac-ager",
        }
    }

    /// The classes of the threads a thread of this class starts (whose needs its list must
    /// therefore include: they run under its filter too).
    pub fn starts(self) -> &'static [ThreadClass] {
        match self {
            ThreadClass::Control => &[
                ThreadClass::VhostUser,
                ThreadClass::Watcher,
                ThreadClass::Pmd,
                ThreadClass::IoWorker,
                ThreadClass::Metrics,
                ThreadClass::Housekeeping,
            ],
            ThreadClass::VhostUser => &[ThreadClass::Watcher],
            _ => &[],
        }
    }

    /// Whether the daemon `o` describes has threads of this class.
    pub fn used(self, o: Options) -> bool {
        match self {
            ThreadClass::Pmd | ThreadClass::Housekeeping => o.net,
            _ => true,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for ThreadClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which daemon the lists are for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Options {
    /// The packet data plane (`torii-dataplane`): PMDs, taps, the MAC ager. Without it, the
    /// block daemon (`torii-vhost-user-blk`).
    pub net: bool,
    /// DPDK ports (`torii-dataplane` built with feature `dpdk`): device probing, removal and
    /// the drivers' control paths on the control thread, the drivers' fast paths on PMDs.
    pub dpdk: bool,
}

impl Options {
    /// `torii-vhost-user-blk`.
    pub const fn blk() -> Options {
        Options {
            net: false,
            dpdk: false,
        }
    }

    /// `torii-dataplane`, with or without DPDK ports.
    pub const fn dataplane(dpdk: bool) -> Options {
        Options { net: true, dpdk }
    }
}

/// A test on one argument of a system call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// The argument is this value.
    Eq(u64),
    /// None of these bits is set.
    Clear(u64),
}

/// A condition on argument `arg`; `what` names the value for people.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArgRule {
    pub arg: u8,
    pub check: Check,
    /// Compare all 64 bits (pointers), not just the low 32 (ints, flags, ioctl requests).
    pub qword: bool,
    pub what: &'static str,
}

impl ArgRule {
    fn condition(&self) -> SeccompCondition {
        let len = if self.qword {
            SeccompCmpArgLen::Qword
        } else {
            SeccompCmpArgLen::Dword
        };
        let (op, value) = match self.check {
            Check::Eq(v) => (SeccompCmpOp::Eq, v),
            Check::Clear(mask) => (SeccompCmpOp::MaskedEq(mask), 0),
        };
        SeccompCondition::new(self.arg, len, op, value).expect("argument index below 6")
    }
}

/// One allowed system call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allowed {
    pub nr: i64,
    pub name: &'static str,
    /// `None`: any arguments; otherwise allowed when any one of these holds.
    pub only: Option<Vec<ArgRule>>,
}

/// The system calls one class may make, and those it is refused gracefully.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Allowlist {
    allowed: BTreeMap<i64, Allowed>,
    /// Calls that fail with EACCES in enforce mode instead of killing the process: calls a
    /// library may make where failure is an answer it handles.
    refused: BTreeMap<i64, &'static str>,
}

/// A system call's number and name.
type Sys = (i64, &'static str);

macro_rules! sys {
    ($n:ident) => {
        // "SYS_read" -> "read"
        (libc::$n as i64, &stringify!($n)[4..])
    };
}

/// An argument that must equal `v`.
const fn eq(arg: u8, v: u64, what: &'static str) -> ArgRule {
    ArgRule {
        arg,
        check: Check::Eq(v),
        qword: false,
        what,
    }
}

impl Allowlist {
    /// Allows `s` with any arguments.
    fn any(&mut self, s: Sys) -> &mut Self {
        self.allowed.insert(
            s.0,
            Allowed {
                nr: s.0,
                name: s.1,
                only: None,
            },
        );
        self
    }

    fn all(&mut self, ss: &[Sys]) -> &mut Self {
        for &s in ss {
            self.any(s);
        }
        self
    }

    /// Allows `s` when one of `rules` holds (added to those already allowed for it).
    fn only(&mut self, s: Sys, rules: &[ArgRule]) -> &mut Self {
        let e = self.allowed.entry(s.0).or_insert(Allowed {
            nr: s.0,
            name: s.1,
            only: Some(Vec::new()),
        });
        if let Some(v) = &mut e.only {
            for r in rules {
                if !v.contains(r) {
                    v.push(*r);
                }
            }
        }
        self
    }

    /// Refuses `s` with EACCES (enforce mode) rather than killing the process.
    fn refuse(&mut self, s: Sys) -> &mut Self {
        self.refused.insert(s.0, s.1);
        self
    }

    /// The calls refused with EACCES, by number.
    pub fn refused(&self) -> impl Iterator<Item = (i64, &'static str)> + '_ {
        self.refused.iter().map(|(n, s)| (*n, *s))
    }

    /// Adds everything `other` allows (not what it refuses).
    fn extend(&mut self, other: &Allowlist) -> &mut Self {
        for a in other.allowed.values() {
            match &a.only {
                None => self.any((a.nr, a.name)),
                Some(rules) => self.only((a.nr, a.name), rules),
            };
        }
        self
    }

    pub fn len(&self) -> usize {
        self.allowed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.allowed.is_empty()
    }

    /// The allowed calls by number.
    pub fn iter(&self) -> impl Iterator<Item = &Allowed> {
        self.allowed.values()
    }

    pub fn get(&self, nr: i64) -> Option<&Allowed> {
        self.allowed.get(&nr)
    }

    /// Whether a thread under `self`'s filter can run `other`'s filter as intended: `self`
    /// allows everything `other` allows (with at most `other`'s argument rules), and lets
    /// through or refuses alike what `other` refuses.
    pub fn covers(&self, other: &Allowlist) -> bool {
        let refused = other.refused.keys().all(|nr| {
            self.refused.contains_key(nr)
                || matches!(self.allowed.get(nr), Some(a) if a.only.is_none())
        });
        refused
            && other
                .allowed
                .values()
                .all(|a| match (self.allowed.get(&a.nr), &a.only) {
                    (None, _) => false,
                    (Some(Allowed { only: None, .. }), _) => true,
                    (Some(Allowed { only: Some(_), .. }), None) => false,
                    (
                        Some(Allowed {
                            only: Some(mine), ..
                        }),
                        Some(theirs),
                    ) => theirs.iter().all(|r| mine.contains(r)),
                })
    }

    fn rules(&self) -> BTreeMap<i64, Vec<SeccompRule>> {
        self.allowed
            .values()
            .map(|a| {
                let rules = match &a.only {
                    None => Vec::new(),
                    Some(v) => v
                        .iter()
                        .map(|r| SeccompRule::new(vec![r.condition()]).expect("one condition"))
                        .collect(),
                };
                (a.nr, rules)
            })
            .collect()
    }
}

// ioctl requests (asm-generic numbering, as on x86_64 and aarch64).
const FIONBIO: u64 = 0x5421;
const FIOCLEX: u64 = 0x5451;
const FIONCLEX: u64 = 0x5450;
const TCGETS: u64 = 0x5401;
const TIOCGWINSZ: u64 = 0x5413;
const TUNSETIFF: u64 = 0x4004_54ca;
const TUNSETOFFLOAD: u64 = 0x4004_54d0;
const TUNSETVNETHDRSZ: u64 = 0x4004_54d8;
const SIOCGIFFLAGS: u64 = 0x8913;
const SIOCSIFFLAGS: u64 = 0x8914;
const BLKSSZGET: u64 = 0x1268;
const BLKGETSIZE64: u64 = 0x8008_1272;

// io_uring_register opcodes.
const IORING_REGISTER_BUFFERS: u64 = 0;
const IORING_UNREGISTER_BUFFERS: u64 = 1;

/// mmap and mprotect: never an executable mapping (argument 2 is `prot`).
const NO_EXEC: ArgRule = ArgRule {
    arg: 2,
    check: Check::Clear(libc::PROT_EXEC as u64),
    qword: false,
    what: "prot without PROT_EXEC",
};

/// sendto without a destination (a connected socket: send(2)); argument 4 is the address.
const NO_ADDRESS: ArgRule = ArgRule {
    arg: 4,
    check: Check::Eq(0),
    qword: true,
    what: "no destination address",
};

/// What every thread of every class does: allocate and free memory (never executable), log to
/// stderr, take and return from signals, sleep and yield, wake and wait on futexes, end.
fn base() -> Allowlist {
    let mut l = Allowlist::default();
    l.all(&[
        // Logging (tracing writes each line with write(2)) and eventfd notifications.
        sys!(SYS_write),
        // Dropping files and fds (a port's, a connection's, an io_uring's).
        sys!(SYS_close),
        // The allocator: brk for the main arena, mmap/munmap/mremap for large blocks and
        // thread arenas, madvise when it trims them (and glibc on a thread's stack at exit).
        sys!(SYS_brk),
        sys!(SYS_munmap),
        sys!(SYS_mremap),
        sys!(SYS_madvise),
        // Locks, condition variables, channels, joins.
        sys!(SYS_futex),
        sys!(SYS_sched_yield),
        sys!(SYS_clock_gettime),
        sys!(SYS_clock_nanosleep),
        sys!(SYS_nanosleep),
        // std's HashMap keys (once per thread).
        sys!(SYS_getrandom),
        // glibc's malloc counts CPUs with it when it makes another arena (from any thread
        // that allocates, e.g. after a failed allocation).
        sys!(SYS_sched_getaffinity),
        // Signals (tokio's handler can run on any thread) and thread exit (glibc blocks all
        // signals, std removes its alternate signal stack).
        sys!(SYS_rt_sigreturn),
        sys!(SYS_rt_sigprocmask),
        sys!(SYS_sigaltstack),
        sys!(SYS_restart_syscall),
        sys!(SYS_exit),
        sys!(SYS_exit_group),
    ]);
    l.only(sys!(SYS_mmap), &[NO_EXEC])
        .only(sys!(SYS_mprotect), &[NO_EXEC])
        // The SIGSYS handler reads the thread's name.
        .only(
            sys!(SYS_prctl),
            &[eq(0, libc::PR_GET_NAME as u64, "PR_GET_NAME")],
        )
        // Debug builds check that an fd is open before closing it (std's OwnedFd).
        .only(sys!(SYS_fcntl), &[eq(1, libc::F_GETFD as u64, "F_GETFD")])
        // tokio's signal handler runs on whichever thread the signal hits and writes to its
        // socket with send(2).
        .only(sys!(SYS_sendto), &[NO_ADDRESS]);
    l
}

/// Starting a thread: the new thread runs its first calls (robust futex list, rseq, its name,
/// std's guard page and signal stack) under the filter of the thread that starts it, and
/// then installs its own filter (which can only take privileges away).
fn thread_start() -> Allowlist {
    let mut l = Allowlist::default();
    l.all(&[
        sys!(SYS_clone),
        sys!(SYS_clone3),
        sys!(SYS_set_robust_list),
        sys!(SYS_rseq),
        // glibc's pthread_getattr_np (std's stack guard) reads the thread's affinity.
        sys!(SYS_sched_getaffinity),
        sys!(SYS_gettid),
    ])
    .only(
        sys!(SYS_prctl),
        &[
            eq(0, libc::PR_SET_NAME as u64, "PR_SET_NAME"),
            eq(0, libc::PR_SET_NO_NEW_PRIVS as u64, "PR_SET_NO_NEW_PRIVS"),
        ],
    )
    .only(
        sys!(SYS_seccomp),
        &[eq(
            0,
            libc::SECCOMP_SET_MODE_FILTER as u64,
            "SECCOMP_SET_MODE_FILTER",
        )],
    );
    l
}

/// epoll_wait(2) as glibc makes it: the call itself on x86_64, epoll_pwait where only that
/// exists.
#[cfg(target_arch = "x86_64")]
fn epoll_wait() -> Sys {
    sys!(SYS_epoll_wait)
}
#[cfg(not(target_arch = "x86_64"))]
fn epoll_wait() -> Sys {
    sys!(SYS_epoll_pwait)
}

/// poll(2) likewise (ppoll elsewhere).
#[cfg(target_arch = "x86_64")]
fn poll() -> Sys {
    sys!(SYS_poll)
}
#[cfg(not(target_arch = "x86_64"))]
fn poll() -> Sys {
    sys!(SYS_ppoll)
}

fn watcher() -> Allowlist {
    let mut l = base();
    l.all(&[
        // The kick watcher waits in epoll, the stop watcher in poll.
        epoll_wait(),
        poll(),
        // Kick reads: preadv2(RWF_NOWAIT), read(2) where the kernel lacks it.
        sys!(SYS_read),
        sys!(SYS_preadv2),
        // A watcher forgets a kick fd that turned out dead.
        sys!(SYS_epoll_ctl),
        // The stop watcher shuts the connection's socket down.
        sys!(SYS_shutdown),
    ]);
    l
}

fn vhost_user(_o: Options) -> Allowlist {
    let mut l = base();
    l.extend(&thread_start()).extend(&watcher());
    l.all(&[
        // The socket: accept (server) or connect (client), messages with SCM_RIGHTS fds.
        sys!(SYS_accept4),
        sys!(SYS_connect),
        sys!(SYS_recvmsg),
        sys!(SYS_sendmsg),
        sys!(SYS_recvfrom),
        // The connection's stream is cloned for the stop watcher (F_DUPFD_CLOEXEC).
        sys!(SYS_fcntl),
        // Does the client-mode socket exist yet; the sizes of guest memory files.
        sys!(SYS_newfstatat),
        sys!(SYS_fstat),
        sys!(SYS_statx),
        sys!(SYS_lseek),
        // The listening socket is removed when the endpoint stops.
        sys!(SYS_unlinkat),
        // GET_INFLIGHT_FD: the inflight region is a memfd of the right size.
        sys!(SYS_memfd_create),
        sys!(SYS_ftruncate),
        // A connection's kick watcher and stop event.
        sys!(SYS_eventfd2),
        sys!(SYS_epoll_create1),
    ])
    .only(sys!(SYS_socket), &[eq(0, libc::AF_UNIX as u64, "AF_UNIX")]);
    #[cfg(target_arch = "x86_64")]
    l.all(&[sys!(SYS_unlink)]);
    l
}

fn pmd(o: Options) -> Allowlist {
    let mut l = base();
    l.all(&[
        // Its wake eventfd; epoll for adaptive sleep (made at start, ports' fds added and
        // removed as ports come and go).
        sys!(SYS_read),
        sys!(SYS_epoll_create1),
        sys!(SYS_epoll_ctl),
        epoll_wait(),
        // Tap ports: one io_uring_enter per burst (submissions, and waits when a port goes).
        sys!(SYS_io_uring_enter),
    ])
    // Tap ports follow the offloads the guest accepts.
    .only(sys!(SYS_ioctl), &[eq(1, TUNSETOFFLOAD, "TUNSETOFFLOAD")])
    // A port added at run time gets a copy of the PMD's wake eventfd.
    .only(
        sys!(SYS_fcntl),
        &[eq(1, libc::F_DUPFD_CLOEXEC as u64, "F_DUPFD_CLOEXEC")],
    );
    if o.dpdk {
        // Drivers' fast paths: af_packet and af_xdp kick the kernel with a send on their own
        // socket (no address, in the base list), af_xdp wakes its fill ring with a receive,
        // net_tap reads and writes its tap with readv/writev. rte_thread_register (the first
        // poll of a DPDK port) reads the thread's affinity and id and finds its NUMA node by
        // probing /sys/devices/system/node/node*/cpuN with access(2).
        l.all(&[
            sys!(SYS_recvfrom),
            sys!(SYS_readv),
            sys!(SYS_writev),
            sys!(SYS_sched_getaffinity),
            sys!(SYS_gettid),
        ]);
        #[cfg(target_arch = "x86_64")]
        l.all(&[sys!(SYS_access)]);
        #[cfg(not(target_arch = "x86_64"))]
        l.all(&[sys!(SYS_faccessat)]);
    }
    l
}

fn io_worker() -> Allowlist {
    let mut l = base();
    l.all(&[
        // The ring: submissions, waits (with a timeout) and reaping.
        sys!(SYS_io_uring_enter),
        // Inline I/O on memory file systems.
        sys!(SYS_preadv2),
        sys!(SYS_pwritev2),
        sys!(SYS_fallocate),
        sys!(SYS_fdatasync),
        // Its kick/completion eventfd, and sleeping on it.
        sys!(SYS_read),
        poll(),
    ])
    // Guest memory is registered as fixed buffers whenever the memory table changes.
    .only(
        sys!(SYS_io_uring_register),
        &[
            eq(1, IORING_REGISTER_BUFFERS, "IORING_REGISTER_BUFFERS"),
            eq(1, IORING_UNREGISTER_BUFFERS, "IORING_UNREGISTER_BUFFERS"),
        ],
    );
    l
}

fn metrics() -> Allowlist {
    let mut l = base();
    l.all(&[
        sys!(SYS_accept4),
        sys!(SYS_read),
        sys!(SYS_recvfrom),
        sys!(SYS_writev),
        // The read timeout (SO_RCVTIMEO) and the write-side shutdown.
        sys!(SYS_setsockopt),
        sys!(SYS_shutdown),
    ]);
    l
}

fn housekeeping() -> Allowlist {
    base()
}

fn control(o: Options) -> Allowlist {
    let mut l = base();
    l.extend(&thread_start());
    for c in ThreadClass::Control.starts() {
        if c.used(o) {
            l.extend(&allowlist(*c, o));
        }
    }
    l.all(&[
        // Files: the configuration, the stats file (written and renamed), socket directories
        // checked (canonicalize, metadata), disks opened, tap devices opened.
        sys!(SYS_read),
        sys!(SYS_readv),
        sys!(SYS_writev),
        sys!(SYS_pread64),
        sys!(SYS_pwrite64),
        sys!(SYS_openat),
        sys!(SYS_newfstatat),
        sys!(SYS_fstat),
        sys!(SYS_statx),
        sys!(SYS_fstatfs),
        sys!(SYS_statfs),
        sys!(SYS_lseek),
        sys!(SYS_fcntl),
        sys!(SYS_dup),
        sys!(SYS_dup3),
        sys!(SYS_pipe2),
        sys!(SYS_getdents64),
        sys!(SYS_readlinkat),
        sys!(SYS_getcwd),
        sys!(SYS_faccessat),
        sys!(SYS_faccessat2),
        sys!(SYS_unlinkat),
        sys!(SYS_renameat),
        sys!(SYS_renameat2),
        sys!(SYS_mkdirat),
        sys!(SYS_fchmod),
        sys!(SYS_fchmodat),
        sys!(SYS_ftruncate),
        sys!(SYS_fallocate),
        sys!(SYS_fsync),
        sys!(SYS_fdatasync),
        sys!(SYS_flock),
        // Sockets: the control API, metrics, vhost-user sockets made at run time.
        sys!(SYS_socketpair),
        sys!(SYS_bind),
        sys!(SYS_listen),
        sys!(SYS_accept4),
        sys!(SYS_connect),
        sys!(SYS_getsockname),
        sys!(SYS_getpeername),
        sys!(SYS_setsockopt),
        sys!(SYS_getsockopt),
        sys!(SYS_shutdown),
        sys!(SYS_recvfrom),
        sys!(SYS_recvmsg),
        sys!(SYS_sendto),
        sys!(SYS_sendmsg),
        // tokio's event loop, eventfds for PMDs, workers and devices.
        sys!(SYS_epoll_create1),
        sys!(SYS_epoll_ctl),
        sys!(SYS_epoll_pwait),
        sys!(SYS_epoll_pwait2),
        sys!(SYS_ppoll),
        sys!(SYS_eventfd2),
        // io_urings of taps and disks.
        sys!(SYS_io_uring_setup),
        sys!(SYS_io_uring_enter),
        sys!(SYS_io_uring_register),
        sys!(SYS_memfd_create),
        // Signals: tokio's handlers, the blk daemon's sigwait.
        sys!(SYS_rt_sigaction),
        sys!(SYS_rt_sigtimedwait),
        // available_parallelism, PMD pinning.
        sys!(SYS_sched_getaffinity),
        sys!(SYS_sched_setaffinity),
        sys!(SYS_getpid),
        sys!(SYS_gettid),
        sys!(SYS_getuid),
        sys!(SYS_geteuid),
        sys!(SYS_getgid),
        sys!(SYS_getegid),
    ]);
    let af = [
        eq(0, libc::AF_UNIX as u64, "AF_UNIX"),
        // The metrics listener (and a tap's link is set up through an AF_INET datagram
        // socket).
        eq(0, libc::AF_INET as u64, "AF_INET"),
        eq(0, libc::AF_INET6 as u64, "AF_INET6"),
    ];
    l.only(sys!(SYS_socket), &af);
    #[cfg(target_arch = "x86_64")]
    l.all(&[
        sys!(SYS_open),
        sys!(SYS_stat),
        sys!(SYS_lstat),
        sys!(SYS_readlink),
        sys!(SYS_access),
        sys!(SYS_unlink),
        sys!(SYS_rename),
        sys!(SYS_mkdir),
        sys!(SYS_chmod),
        sys!(SYS_poll),
        sys!(SYS_epoll_wait),
        sys!(SYS_pipe),
        sys!(SYS_dup2),
    ]);
    if o.dpdk {
        // Devices probed, configured, started, stopped and removed at run time: drivers do
        // their own ioctls (net_tap's TUN and SIOC* requests, af_xdp's ethtool queries),
        // netlink (net_tap's flow rules), AF_PACKET and AF_XDP sockets, BPF programs (af_xdp),
        // NUMA-aware memory for mempools, and timers for link status polling.
        l.any(sys!(SYS_ioctl))
            .only(
                sys!(SYS_socket),
                &[
                    eq(0, libc::AF_NETLINK as u64, "AF_NETLINK"),
                    eq(0, libc::AF_PACKET as u64, "AF_PACKET"),
                    eq(0, libc::AF_XDP as u64, "AF_XDP"),
                ],
            )
            .all(&[
                sys!(SYS_bpf),
                sys!(SYS_get_mempolicy),
                sys!(SYS_set_mempolicy),
                sys!(SYS_mbind),
                sys!(SYS_timerfd_create),
                sys!(SYS_timerfd_settime),
                sys!(SYS_uname),
            ]);
        // DPDK's own threads (the interrupt thread, memif's control channel).
        #[cfg(target_arch = "x86_64")]
        l.all(&[sys!(SYS_accept), sys!(SYS_epoll_create)]);
    } else {
        // Non-blocking and close-on-exec switches, terminal queries, block device sizes.
        l.only(
            sys!(SYS_ioctl),
            &[
                eq(1, FIONBIO, "FIONBIO"),
                eq(1, FIOCLEX, "FIOCLEX"),
                eq(1, FIONCLEX, "FIONCLEX"),
                eq(1, TCGETS, "TCGETS"),
                eq(1, TIOCGWINSZ, "TIOCGWINSZ"),
                eq(1, BLKSSZGET, "BLKSSZGET"),
                eq(1, BLKGETSIZE64, "BLKGETSIZE64"),
            ],
        );
        if o.net {
            // Taps: made, given the vnet header and offloads, brought up.
            l.only(
                sys!(SYS_ioctl),
                &[
                    eq(1, TUNSETIFF, "TUNSETIFF"),
                    eq(1, TUNSETOFFLOAD, "TUNSETOFFLOAD"),
                    eq(1, TUNSETVNETHDRSZ, "TUNSETVNETHDRSZ"),
                    eq(1, SIOCGIFFLAGS, "SIOCGIFFLAGS"),
                    eq(1, SIOCSIFFLAGS, "SIOCSIFFLAGS"),
                ],
            );
        }
    }
    l
}

/// The system calls threads of `class` may make (including what the threads it starts need).
pub fn allowlist(class: ThreadClass, o: Options) -> Allowlist {
    let mut l = match class {
        ThreadClass::Control => control(o),
        ThreadClass::VhostUser => vhost_user(o),
        ThreadClass::Watcher => watcher(),
        ThreadClass::Pmd => pmd(o),
        ThreadClass::IoWorker => io_worker(),
        ThreadClass::Metrics => metrics(),
        ThreadClass::Housekeeping => housekeeping(),
    };
    if class != ThreadClass::Control {
        // glibc's malloc reads /proc/sys/vm/overcommit_memory (once per process) the first
        // time it shrinks a thread's heap, which may happen on any thread; refused, it keeps
        // the heap's pages mapped and releases them with madvise instead. No other file is
        // opened outside the control thread.
        l.refuse(sys!(SYS_openat));
        #[cfg(target_arch = "x86_64")]
        l.refuse(sys!(SYS_open));
    }
    l
}

/// Why a filter could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("seccomp filter for {class}: {source}")]
    Build {
        class: ThreadClass,
        source: seccompiler::Error,
    },
    #[error("seccomp filter for {class}: cannot install: {source}")]
    Install {
        class: ThreadClass,
        source: io::Error,
    },
    #[error("seccomp: thread {tid} already has a filter of its own; it must be installed before any other thread installs one")]
    ThreadSync { tid: i64 },
    #[error("seccomp: this architecture is not supported")]
    Arch,
    #[error("seccomp: already set up in mode {0}")]
    AlreadyInitialised(Mode),
    #[error("seccomp: cannot install the SIGSYS handler: {0}")]
    Handler(io::Error),
}

fn target_arch() -> Result<TargetArch, Error> {
    std::env::consts::ARCH.try_into().map_err(|_| Error::Arch)
}

/// The BPF program of `class` in `mode` (`None` for [`Mode::Off`]).
pub fn program(class: ThreadClass, mode: Mode, o: Options) -> Result<Option<BpfProgram>, Error> {
    let mismatch = match mode {
        Mode::Off => return Ok(None),
        Mode::Enforce => SeccompAction::Trap,
        Mode::Log => SeccompAction::Log,
    };
    let build = |source| Error::Build { class, source };
    let filter = SeccompFilter::new(
        allowlist(class, o).rules(),
        mismatch,
        SeccompAction::Allow,
        target_arch()?,
    )
    .map_err(|e| build(e.into()))?;
    let prog: BpfProgram = filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| build(e.into()))?;
    if mode == Mode::Log {
        // Nothing is refused: what enforce refuses is logged.
        return Ok(Some(prog));
    }
    Ok(Some(with_refusals(&allowlist(class, o), prog)))
}

// Classic BPF as seccomp uses it (linux/filter.h, linux/seccomp.h).
const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JEQ_K: u16 = 0x15;
const BPF_RET_K: u16 = 0x06;
const BPF_JA: u16 = 0x05;
const SECCOMP_DATA_NR: u32 = 0;
const SECCOMP_DATA_ARCH: u32 = 4;
const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xc000_003e;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xc000_00b7;
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const AUDIT_ARCH: u32 = 0;

fn insn(code: u16, jt: u8, jf: u8, k: u32) -> seccompiler::sock_filter {
    seccompiler::sock_filter { code, jt, jf, k }
}

/// `prog` behind a prefix that answers `l`'s refused calls with EACCES: seccompiler's
/// filters have one action for every listed call, this one a second.
fn with_refusals(l: &Allowlist, prog: BpfProgram) -> BpfProgram {
    let refused: Vec<i64> = l.refused.keys().copied().collect();
    if refused.is_empty() {
        return prog;
    }
    // 0: load arch; 1: another architecture → seccompiler's program (which refuses it);
    // 2: load nr; 3..3+n: one comparison per refused call, a match jumping to the RET at
    // 3+n+1; 3+n: none matched → over the RET; 3+n+1: RET EACCES; then the program.
    let n = refused.len();
    assert!(n < 64);
    let mut p = Vec::with_capacity(prog.len() + n + 5);
    p.push(insn(BPF_LD_W_ABS, 0, 0, SECCOMP_DATA_ARCH));
    p.push(insn(BPF_JEQ_K, 0, (n + 3) as u8, AUDIT_ARCH));
    p.push(insn(BPF_LD_W_ABS, 0, 0, SECCOMP_DATA_NR));
    for (i, nr) in refused.iter().enumerate() {
        p.push(insn(BPF_JEQ_K, (n - i) as u8, 0, *nr as u32));
    }
    p.push(insn(BPF_JA, 0, 0, 1));
    p.push(insn(
        BPF_RET_K,
        0,
        0,
        SECCOMP_RET_ERRNO | libc::EACCES as u32,
    ));
    p.extend(prog);
    p
}

/// What the daemon chose, with every class's program compiled once.
struct State {
    mode: Mode,
    programs: Vec<Option<BpfProgram>>,
}

static STATE: OnceLock<State> = OnceLock::new();
/// Names of the calls any class allows plus a few notable others, for the SIGSYS message
/// (set before the handler is installed, read-only after).
static NAMES: OnceLock<Vec<Sys>> = OnceLock::new();
/// Set once a filter is in place in this process.
static INSTALLED: AtomicBool = AtomicBool::new(false);
const NO_CLASS: u8 = u8::MAX;

thread_local! {
    /// The class whose filter this thread installed (for the SIGSYS message).
    static CLASS: Cell<u8> = const { Cell::new(NO_CLASS) };
}

/// Calls no list allows that a SIGSYS message should still name.
fn notable() -> Vec<Sys> {
    let mut v = vec![
        sys!(SYS_execve),
        sys!(SYS_execveat),
        sys!(SYS_ptrace),
        sys!(SYS_process_vm_readv),
        sys!(SYS_process_vm_writev),
        sys!(SYS_mount),
        sys!(SYS_umount2),
        sys!(SYS_kill),
        sys!(SYS_tgkill),
        sys!(SYS_setuid),
        sys!(SYS_setgid),
        sys!(SYS_unshare),
        sys!(SYS_setns),
        sys!(SYS_pidfd_open),
        sys!(SYS_wait4),
        sys!(SYS_uname),
        sys!(SYS_sysinfo),
        sys!(SYS_timerfd_create),
        sys!(SYS_membarrier),
        sys!(SYS_mlock),
        sys!(SYS_munlock),
        sys!(SYS_mlockall),
        sys!(SYS_close_range),
        sys!(SYS_getcpu),
        sys!(SYS_getppid),
        sys!(SYS_setsid),
        sys!(SYS_socket),
    ];
    #[cfg(target_arch = "x86_64")]
    v.extend([sys!(SYS_fork), sys!(SYS_vfork)]);
    v
}

/// Sets the process's mode and options (once): compiles every class's program and, for
/// [`Mode::Enforce`], installs the SIGSYS handler. Threads then install theirs with
/// [`enter`]; until this is called [`enter`] does nothing (in-process tests).
pub fn init(mode: Mode, o: Options) -> Result<(), Error> {
    if let Some(s) = STATE.get() {
        return if s.mode == mode {
            Ok(())
        } else {
            Err(Error::AlreadyInitialised(s.mode))
        };
    }
    let programs = ThreadClass::ALL
        .iter()
        .map(|c| program(*c, mode, o))
        .collect::<Result<Vec<_>, _>>()?;
    if mode == Mode::Enforce {
        install_handler()?;
    }
    // The handler that survives truncated guest memory goes in now, as the thread that maps
    // guest memory later may not be allowed rt_sigaction (crate::guard).
    if let Err(e) = crate::guard::install() {
        tracing::warn!("{e}: a frontend that truncates guest memory will end the daemon");
    }
    // Read before the sandboxes, which may not allow it later (for error hints only).
    let _ = crate::daemon::capabilities();
    let state = State { mode, programs };
    let _ = STATE.set(state);
    match STATE.get() {
        Some(s) if s.mode != mode => Err(Error::AlreadyInitialised(s.mode)),
        _ => Ok(()),
    }
}

/// The mode [`init`] set ([`Mode::Off`] before).
pub fn mode() -> Mode {
    STATE.get().map_or(Mode::Off, |s| s.mode)
}

/// Whether a filter is in place in this process (some thread installed one).
pub fn installed() -> bool {
    INSTALLED.load(Ordering::Acquire)
}

/// Installs `class`'s filter on the calling thread in the mode [`init`] set; nothing before
/// [`init`] or in [`Mode::Off`]. A thread that cannot install its filter must not go on
/// without it: the error is logged and the process aborted.
pub fn enter(class: ThreadClass) {
    let Some(s) = STATE.get() else { return };
    let Some(prog) = &s.programs[class.index()] else {
        return;
    };
    if let Err(e) = install(prog, class, false) {
        tracing::error!("{e}; stopping");
        eprintln!("torii: {e}");
        // Not abort(): its tgkill is in no list, and the process would die of SIGSYS with a
        // message that hides this one.
        // SAFETY: _exit ends the process at once; nothing is left to run.
        unsafe { libc::_exit(70) };
    }
}

/// Installs `class`'s filter on every thread of the process (TSYNC): for the main thread,
/// so that threads libraries started before it (DPDK's) run under it too. No thread may
/// have a filter of its own yet.
pub fn enter_process(class: ThreadClass) -> Result<(), Error> {
    let Some(s) = STATE.get() else { return Ok(()) };
    let Some(prog) = &s.programs[class.index()] else {
        return Ok(());
    };
    install(prog, class, true)
}

/// Builds and installs `class`'s filter in `mode` on the calling thread alone (the SIGSYS
/// handler too, for [`Mode::Enforce`]), whatever [`init`] set.
pub fn apply(class: ThreadClass, mode: Mode, o: Options) -> Result<(), Error> {
    let Some(prog) = program(class, mode, o)? else {
        return Ok(());
    };
    if mode == Mode::Enforce {
        install_handler()?;
    }
    install(&prog, class, false)
}

/// Installs `prog` (compiled for `class`) on this thread, or every thread with `all`. Makes
/// only system calls and allocates nothing: usable in a forked child of a threaded process.
pub fn install(
    prog: &[seccompiler::sock_filter],
    class: ThreadClass,
    all: bool,
) -> Result<(), Error> {
    CLASS.with(|c| c.set(class.index() as u8));
    let r = if all {
        seccompiler::apply_filter_all_threads(prog)
    } else {
        seccompiler::apply_filter(prog)
    };
    match r {
        Ok(()) => {
            INSTALLED.store(true, Ordering::Release);
            Ok(())
        }
        Err(seccompiler::Error::ThreadSync(tid)) => Err(Error::ThreadSync { tid }),
        Err(seccompiler::Error::Seccomp(e)) | Err(seccompiler::Error::Prctl(e)) => {
            CLASS.with(|c| c.set(NO_CLASS));
            Err(Error::Install { class, source: e })
        }
        Err(e) => Err(Error::Install {
            class,
            source: io::Error::other(e.to_string()),
        }),
    }
}

/// Installs the SIGSYS handler (process-wide; idempotent).
pub fn install_handler() -> Result<(), Error> {
    NAMES.get_or_init(|| {
        let mut names: Vec<Sys> = allowlist(ThreadClass::Control, Options::dataplane(true))
            .iter()
            .map(|a| (a.nr, a.name))
            .collect();
        names.extend(notable());
        names
    });
    // SAFETY: `sa` is plain data, fully initialised before use; the handler is an
    // `extern "C"` function with the SA_SIGINFO signature that only makes async-signal-safe
    // calls.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) != 0 {
            return Err(Error::Handler(io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// A system call number no kernel has and no list allows: made from the SIGSYS handler
/// (where SIGSYS is blocked), it has the kernel deliver SIGSYS with its default action,
/// which kills the process.
const SELF_KILL_NR: libc::c_long = 0xffff;

/// A fixed buffer for the SIGSYS message (no allocation in a signal handler).
struct Msg {
    buf: [u8; 256],
    len: usize,
}

impl Msg {
    fn push(&mut self, s: &[u8]) {
        for &b in s {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
    }

    fn number(&mut self, mut n: i64) {
        if n < 0 {
            self.push(b"-");
            n = -n;
        }
        let mut d = [0u8; 20];
        let mut i = d.len();
        loop {
            i -= 1;
            d[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push(&d[i..]);
    }
}

/// The message the SIGSYS handler writes (built without allocating).
fn sigsys_message(comm: &[u8], class: u8, nr: i64, names: &[Sys]) -> Msg {
    let mut m = Msg {
        buf: [0; 256],
        len: 0,
    };
    m.push(b"torii: seccomp: thread \"");
    m.push(comm);
    m.push(b"\" (class ");
    match ThreadClass::ALL.get(class as usize) {
        Some(c) => m.push(c.name().as_bytes()),
        None => m.push(b"inherited"),
    }
    m.push(b") made system call ");
    m.number(nr);
    if let Some((_, name)) = names.iter().find(|(n, _)| *n == nr) {
        m.push(b" (");
        m.push(name.as_bytes());
        m.push(b")");
    }
    m.push(b", which its seccomp filter forbids: killing the process\n");
    m
}

/// `si_code` of a SIGSYS a seccomp filter raised.
const SYS_SECCOMP: i32 = 1;

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // siginfo's _sigsys: the call's address at offset 16, its number (int) at 24, on every
    // 64-bit Linux.
    // SAFETY: the kernel passes a valid siginfo_t (128 bytes) to an SA_SIGINFO handler;
    // si_code is the int at offset 8.
    let code = unsafe { std::ptr::read_unaligned((info as *const u8).add(8).cast::<i32>()) };
    if code != SYS_SECCOMP {
        // Sent by someone (kill -SYS), not a filter: SIGSYS's own meaning, said truthfully.
        const MSG: &[u8] = b"torii: SIGSYS sent by another process: killing the process\n";
        // SAFETY: writes MSG to stderr, then the same self-kill as below.
        unsafe {
            libc::write(2, MSG.as_ptr().cast(), MSG.len());
            libc::syscall(SELF_KILL_NR);
            libc::syscall(libc::SYS_exit_group, 128 + libc::SIGSYS);
        }
    }
    // SAFETY: as above; for a seccomp trap the call's number is the int at offset 24.
    let nr = unsafe { std::ptr::read_unaligned((info as *const u8).add(24).cast::<i32>()) };
    let mut comm = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes, NUL included, into `comm`.
    let got = unsafe { libc::prctl(libc::PR_GET_NAME, comm.as_mut_ptr()) } == 0;
    let comm_len = if got {
        comm.iter().position(|&b| b == 0).unwrap_or(comm.len())
    } else {
        0
    };
    let class = CLASS.try_with(|c| c.get()).unwrap_or(NO_CLASS);
    let names: &[Sys] = NAMES.get().map_or(&[], |v| v.as_slice());
    let m = sigsys_message(&comm[..comm_len], class, i64::from(nr), names);
    // SAFETY: writes `m.len` initialised bytes of `m.buf` to stderr; then a call that the
    // filter refuses with SIGSYS blocked (the kernel kills the process), and exit_group if
    // somehow not.
    unsafe {
        libc::write(2, m.buf.as_ptr().cast(), m.len);
        libc::syscall(SELF_KILL_NR);
        libc::syscall(libc::SYS_exit_group, 128 + libc::SIGSYS);
    }
}

/// The allowlists as text, one class after another: its threads, its count, and each call
/// (with its argument rules), then the calls it refuses with EACCES. For `seccomp` /
/// `--print-seccomp`, and the docs.
pub fn describe(o: Options) -> String {
    let mut s = String::new();
    for c in ThreadClass::ALL.into_iter().filter(|c| c.used(o)) {
        let l = allowlist(c, o);
        s.push_str(&format!(
            "{} ({}): {} system calls\n",
            c.name(),
            c.threads(),
            l.len()
        ));
        let mut names: Vec<&Allowed> = l.iter().collect();
        names.sort_by_key(|a| a.name);
        for a in names {
            match &a.only {
                None => s.push_str(&format!("  {}\n", a.name)),
                Some(rules) => {
                    let what: Vec<String> = rules
                        .iter()
                        .map(|r| format!("arg{}: {}", r.arg, r.what))
                        .collect();
                    s.push_str(&format!("  {} [{}]\n", a.name, what.join(" | ")));
                }
            }
        }
        for (_, name) in l.refused() {
            s.push_str(&format!("  {name} [refused: EACCES, not counted]\n"));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/security.md's table of allowed calls per class and daemon says what the lists
    /// are: a list that grows or shrinks fails here until the table follows.
    #[test]
    fn the_documented_counts_are_the_lists() {
        let doc = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../docs/security.md"
        ))
        .expect("docs/security.md");
        let rows: Vec<Vec<&str>> = doc
            .lines()
            .skip_while(|l| !l.starts_with("| class | threads | torii-dataplane |"))
            .skip(2)
            .take_while(|l| l.starts_with('|'))
            .map(|l| l.trim_matches('|').split('|').map(str::trim).collect())
            .collect();
        assert_eq!(rows.len(), ThreadClass::ALL.len(), "{rows:?}");
        let columns = [
            Options::dataplane(false),
            Options::dataplane(true),
            Options::blk(),
        ];
        for row in &rows {
            let class = ThreadClass::ALL
                .into_iter()
                .find(|c| c.name() == row[0])
                .unwrap_or_else(|| panic!("no class {:?}", row[0]));
            for (o, cell) in columns.iter().zip(&row[2..]) {
                let real = if class.used(*o) {
                    allowlist(class, *o).len().to_string()
                } else {
                    "—".into()
                };
                assert_eq!(
                    *cell, real,
                    "{class} with {o:?}: docs/security.md says {cell}"
                );
            }
        }
    }

    const BOTH: [Options; 3] = [
        Options::blk(),
        Options::dataplane(false),
        Options::dataplane(true),
    ];

    #[test]
    fn each_list_covers_the_threads_it_starts() {
        for o in BOTH {
            for c in ThreadClass::ALL.into_iter().filter(|c| c.used(o)) {
                let mine = allowlist(c, o);
                for s in c.starts().iter().filter(|c| c.used(o)) {
                    assert!(
                        mine.covers(&allowlist(*s, o)),
                        "{c} does not cover {s} ({o:?})"
                    );
                }
                // Every thread runs under the control filter as well.
                assert!(allowlist(ThreadClass::Control, o).covers(&mine), "{c}");
                assert!(mine.covers(&base()), "{c} lacks the base calls");
            }
        }
    }

    #[test]
    fn no_list_allows_what_a_sandbox_is_for() {
        let mut forbidden = vec![
            sys!(SYS_execve),
            sys!(SYS_execveat),
            sys!(SYS_ptrace),
            sys!(SYS_process_vm_readv),
            sys!(SYS_process_vm_writev),
            sys!(SYS_kexec_load),
            sys!(SYS_init_module),
            sys!(SYS_finit_module),
            sys!(SYS_delete_module),
            sys!(SYS_mount),
            sys!(SYS_umount2),
            sys!(SYS_pivot_root),
            sys!(SYS_chroot),
            sys!(SYS_setns),
            sys!(SYS_unshare),
            sys!(SYS_setuid),
            sys!(SYS_setgid),
            sys!(SYS_reboot),
            sys!(SYS_personality),
            sys!(SYS_kill),
            sys!(SYS_tgkill),
            (SELF_KILL_NR, "(self-kill)"),
        ];
        #[cfg(target_arch = "x86_64")]
        forbidden.extend([sys!(SYS_fork), sys!(SYS_vfork)]);
        for o in BOTH {
            for c in ThreadClass::ALL {
                let l = allowlist(c, o);
                for (nr, name) in &forbidden {
                    assert!(l.get(*nr).is_none(), "{c} allows {name}");
                }
                if c != ThreadClass::Control {
                    assert!(l.get(libc::SYS_bpf).is_none(), "{c} allows bpf");
                }
                // Executable mappings never.
                for call in [libc::SYS_mmap, libc::SYS_mprotect] {
                    assert_eq!(l.get(call).unwrap().only, Some(vec![NO_EXEC]), "{c}");
                }
            }
        }
        // The PMD's list is the short one it is meant to be.
        assert!(allowlist(ThreadClass::Pmd, Options::dataplane(false)).len() <= 32);
        assert!(allowlist(ThreadClass::Pmd, Options::dataplane(false))
            .get(libc::SYS_socket)
            .is_none());
    }

    #[test]
    fn every_program_compiles_in_every_mode() {
        for o in BOTH {
            for c in ThreadClass::ALL {
                assert!(program(c, Mode::Off, o).unwrap().is_none());
                for m in [Mode::Enforce, Mode::Log] {
                    let p = program(c, m, o).unwrap().unwrap();
                    assert!(!p.is_empty() && p.len() < 4096, "{c}: {}", p.len());
                }
            }
        }
    }

    #[test]
    fn modes_parse_and_print() {
        for m in [Mode::Enforce, Mode::Log, Mode::Off] {
            assert_eq!(m.as_str().parse::<Mode>(), Ok(m));
        }
        assert!("permissive".parse::<Mode>().is_err());
        assert_eq!(Mode::default(), Mode::Enforce);
    }

    #[test]
    fn the_listing_names_every_class_and_its_calls() {
        let o = Options::dataplane(false);
        let text = describe(o);
        for c in ThreadClass::ALL {
            let n = allowlist(c, o).len();
            assert!(
                text.contains(&format!("{} ({}): {n} system calls", c.name(), c.threads())),
                "{text}"
            );
        }
        assert!(text.contains("  socket [arg0: AF_UNIX | arg0: AF_INET | arg0: AF_INET6]"));
        assert!(text.contains("  ioctl [arg1: TUNSETOFFLOAD]"), "{text}");
        assert!(
            text.contains("  openat [refused: EACCES, not counted]"),
            "{text}"
        );
        // The block daemon has no PMD and no tap.
        let blk = describe(Options::blk());
        assert!(
            !blk.contains("pmd (") && !blk.contains("TUNSETIFF"),
            "{blk}"
        );
        assert!(blk.contains("io-worker ("), "{blk}");
    }

    #[test]
    fn the_sigsys_message_names_thread_class_and_call() {
        let names = [sys!(SYS_socket)];
        let m = sigsys_message(b"pmd0", ThreadClass::Pmd as u8, libc::SYS_socket, &names);
        assert_eq!(
            std::str::from_utf8(&m.buf[..m.len]).unwrap(),
            format!(
                "torii: seccomp: thread \"pmd0\" (class pmd) made system call {} (socket), which its seccomp filter forbids: killing the process\n",
                libc::SYS_socket
            )
        );
        let m = sigsys_message(b"x", NO_CLASS, -1, &[]);
        assert!(std::str::from_utf8(&m.buf[..m.len])
            .unwrap()
            .contains("(class inherited) made system call -1,"));
    }

    /// How a forked child ended, and what it wrote to stderr.
    struct Outcome {
        signal: Option<i32>,
        code: Option<i32>,
        stderr: String,
    }

    /// Forks a child that installs `class`'s filter in `mode` (compiled here, before the
    /// fork: the child of a threaded process may only make system calls), then runs `body`
    /// and exits with its result.
    fn in_child(class: ThreadClass, mode: Mode, body: fn() -> i32) -> Outcome {
        let prog = program(class, mode, Options::dataplane(false))
            .unwrap()
            .unwrap();
        install_handler().unwrap();
        let mut p = [0i32; 2];
        // SAFETY: `p` has room for the two fds.
        assert_eq!(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: the child only makes system calls (install allocates nothing) and ends with
        // _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
        if pid == 0 {
            // SAFETY: plain fd operations on fds this process owns.
            unsafe {
                libc::dup2(p[1], 2);
                if install(&prog, class, false).is_err() {
                    libc::_exit(100);
                }
                libc::_exit(body());
            }
        }
        // SAFETY: closing our copy of the write end, so the read below ends with the child.
        unsafe { libc::close(p[1]) };
        let mut status = 0;
        // SAFETY: waits for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        let mut out = Vec::new();
        // SAFETY: `p[0]` is the pipe's read end we own; from_raw_fd takes it over.
        let mut r = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(p[0]) };
        std::io::Read::read_to_end(&mut r, &mut out).unwrap();
        Outcome {
            signal: libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status)),
            code: libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
            stderr: String::from_utf8_lossy(&out).into_owned(),
        }
    }

    fn say(s: &str) {
        // SAFETY: writes `s` to stderr.
        unsafe { libc::write(2, s.as_ptr().cast(), s.len()) };
    }

    /// Asserts that the child got as far as `reached` and was then killed by SIGSYS for
    /// system call `nr`.
    fn assert_killed_for(o: &Outcome, reached: &str, nr: i64, class: &str) {
        assert!(
            o.stderr.contains(reached),
            "allowed calls failed: {:?}",
            o.stderr
        );
        assert_eq!(
            o.signal,
            Some(libc::SIGSYS),
            "code {:?}: {:?}",
            o.code,
            o.stderr
        );
        assert!(
            o.stderr
                .contains(&format!("(class {class}) made system call {nr} (")),
            "{:?}",
            o.stderr
        );
    }

    fn inet_socket() -> i32 {
        // SAFETY: no pointer arguments.
        unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) }
    }

    /// An eventfd made before the fork, for the child's allowed calls.
    static EVENTFD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

    #[test]
    fn a_pmd_may_use_eventfds_but_not_open_a_socket() {
        // SAFETY: no pointer arguments.
        let e = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        assert!(e >= 0);
        EVENTFD.store(e, Ordering::Relaxed);
        let o = in_child(ThreadClass::Pmd, Mode::Enforce, || {
            let e = EVENTFD.load(Ordering::Relaxed);
            let one = 1u64;
            let mut v = 0u64;
            // SAFETY: 8-byte reads and writes of an eventfd into and from 8-byte values.
            unsafe {
                if libc::write(e, (&one as *const u64).cast(), 8) != 8
                    || libc::read(e, (&mut v as *mut u64).cast(), 8) != 8
                    || libc::sched_yield() != 0
                {
                    return 1;
                }
            }
            say("allowed calls ok\n");
            inet_socket();
            0
        });
        // SAFETY: our eventfd, closed once.
        unsafe { libc::close(e) };
        assert_killed_for(&o, "allowed calls ok", libc::SYS_socket, "pmd");
        assert!(
            o.stderr
                .contains("(socket), which its seccomp filter forbids"),
            "{:?}",
            o.stderr
        );

        // Any call outside the list, not only socket().
        let o = in_child(ThreadClass::Pmd, Mode::Enforce, || {
            say("allowed calls ok\n");
            // SAFETY: no arguments; refused by the filter.
            unsafe { libc::syscall(libc::SYS_getppid) };
            0
        });
        assert_killed_for(&o, "allowed calls ok", libc::SYS_getppid, "pmd");
    }

    #[test]
    fn a_pmd_may_not_map_executable_memory() {
        let o = in_child(ThreadClass::Pmd, Mode::Enforce, || {
            let map = |prot| {
                // SAFETY: an anonymous private mapping, no address hint.
                unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        4096,
                        prot,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    )
                }
            };
            if map(libc::PROT_READ | libc::PROT_WRITE) == libc::MAP_FAILED {
                return 1;
            }
            say("allowed calls ok\n");
            map(libc::PROT_READ | libc::PROT_EXEC);
            0
        });
        assert_killed_for(&o, "allowed calls ok", libc::SYS_mmap, "pmd");
    }

    #[test]
    fn a_vhost_user_thread_may_open_unix_sockets_only() {
        let o = in_child(ThreadClass::VhostUser, Mode::Enforce, || {
            // SAFETY: no pointer arguments.
            if unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) } < 0 {
                return 1;
            }
            say("allowed calls ok\n");
            inet_socket();
            0
        });
        assert_killed_for(&o, "allowed calls ok", libc::SYS_socket, "vhost-user");
    }

    #[test]
    fn the_control_thread_may_not_exec_or_ptrace() {
        let o = in_child(ThreadClass::Control, Mode::Enforce, || {
            if inet_socket() < 0 {
                return 1;
            }
            say("allowed calls ok\n");
            let path = c"/bin/true";
            let argv = [path.as_ptr(), std::ptr::null()];
            let envp = [std::ptr::null::<libc::c_char>()];
            // SAFETY: NULL-terminated argv and envp of valid C strings.
            unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
            0
        });
        assert_killed_for(&o, "allowed calls ok", libc::SYS_execve, "control");

        let o = in_child(ThreadClass::Control, Mode::Enforce, || {
            say("allowed calls ok\n");
            // SAFETY: PTRACE_TRACEME takes no pointers.
            unsafe { libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) };
            0
        });
        assert_killed_for(&o, "allowed calls ok", libc::SYS_ptrace, "control");
    }

    #[test]
    fn an_io_worker_may_register_buffers_but_not_make_a_ring() {
        let o = in_child(ThreadClass::IoWorker, Mode::Enforce, || {
            // A bad fd: the filter lets the call through and the kernel refuses it.
            // SAFETY: no memory is passed (NULL, 0).
            let r = unsafe {
                libc::syscall(
                    libc::SYS_io_uring_register,
                    -1,
                    IORING_UNREGISTER_BUFFERS,
                    std::ptr::null::<u8>(),
                    0,
                )
            };
            if r != -1 {
                return 1;
            }
            say("allowed calls ok\n");
            let mut params = [0u8; 120];
            // SAFETY: io_uring_params is 120 bytes; the call is refused by the filter.
            unsafe { libc::syscall(libc::SYS_io_uring_setup, 8, params.as_mut_ptr()) };
            0
        });
        assert_killed_for(
            &o,
            "allowed calls ok",
            libc::SYS_io_uring_setup,
            "io-worker",
        );
    }

    #[test]
    fn a_pmd_is_refused_files_without_dying() {
        let o = in_child(ThreadClass::Pmd, Mode::Enforce, || {
            // SAFETY: a NUL-terminated path; no other pointers.
            let fd =
                unsafe { libc::open(c"/proc/sys/vm/overcommit_memory".as_ptr(), libc::O_RDONLY) };
            if fd != -1 || io::Error::last_os_error().raw_os_error() != Some(libc::EACCES) {
                return 1;
            }
            say("refused ok\n");
            inet_socket();
            0
        });
        assert_killed_for(&o, "refused ok", libc::SYS_socket, "pmd");
        // The control thread opens files.
        let o = in_child(ThreadClass::Control, Mode::Enforce, || {
            // SAFETY: a NUL-terminated path; no other pointers.
            let fd =
                unsafe { libc::open(c"/proc/sys/vm/overcommit_memory".as_ptr(), libc::O_RDONLY) };
            if fd < 0 {
                return 1;
            }
            7
        });
        assert_eq!((o.signal, o.code), (None, Some(7)), "{:?}", o.stderr);
    }

    #[test]
    fn log_mode_blocks_nothing() {
        let o = in_child(ThreadClass::Pmd, Mode::Log, || {
            if inet_socket() < 0 {
                return 1;
            }
            42
        });
        assert_eq!((o.signal, o.code), (None, Some(42)), "{:?}", o.stderr);
    }
}
