//! An optional Landlock file-system sandbox for Torii's daemons (docs/security.md#landlock).
//!
//! The daemon derives what it may touch from its configuration — the directories its sockets
//! are in, its disk images, the devices its ports open, what DPDK reads — plus the operator's
//! own list (`landlock_paths`), and restricts itself to that with Landlock
//! (`landlock_create_ruleset`, `landlock_add_rule`, `landlock_restrict_self`, through the
//! `landlock` crate). Everything else in the file system is then refused with `EACCES` by the
//! kernel, whatever the daemon's user and capabilities: no reading of other files, no writing,
//! no executing, no device node made.
//!
//! Rules are made on the paths as they are when the sandbox is applied (an `O_PATH` fd of each:
//! a rule follows the inode, not the name). Each rule allows a set of [`Rights`] on a file, or
//! beneath a directory.
//!
//! Landlock restricts the calling thread and the threads it starts afterwards. A kernel with
//! Landlock ABI 8 (`LANDLOCK_RESTRICT_SELF_TSYNC`) applies it to every thread of the process
//! at once, and [`restrict`] asks for that; on older kernels the threads that were already
//! running keep what they had, and [`restrict`] reports them by name.
//!
//! Best effort across kernels: the handled rights are those of the highest ABI the `landlock`
//! crate knows, and the kernel's own ABI decides which of them are enforced — [`Applied`]
//! says which ABI was reached and whether the sandbox is fully or partially enforced. A kernel
//! without Landlock at all is an error in [`Mode::Enforce`], never a silent run without it.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

use landlock::{
    Access, AccessFs, BitFlags, CompatLevel, Compatible, LandlockStatus, PathBeneath, PathFd,
    RestrictSelfAttr, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus, ABI,
};

/// Whether a daemon sandboxes itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// No sandbox (the default: ports and disks can be added at run time at any path).
    #[default]
    Off,
    /// Restrict the daemon to the rules its configuration produces; refuse to start on a
    /// kernel without Landlock.
    Enforce,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Off => "off",
            Mode::Enforce => "enforce",
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
            "off" => Ok(Mode::Off),
            "enforce" => Ok(Mode::Enforce),
            _ => Err(format!("unknown landlock mode {s:?} (off or enforce)")),
        }
    }
}

/// A set of Landlock file-system access rights (`LANDLOCK_ACCESS_FS_*`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Rights(u32);

impl Rights {
    pub const NONE: Rights = Rights(0);
    /// Run a file (`execve`). Never allowed by Torii's rules.
    pub const EXECUTE: Rights = Rights(1 << 0);
    pub const READ_FILE: Rights = Rights(1 << 1);
    pub const WRITE_FILE: Rights = Rights(1 << 2);
    /// List a directory (and open it, e.g. to `flock` it).
    pub const READ_DIR: Rights = Rights(1 << 3);
    pub const REMOVE_DIR: Rights = Rights(1 << 4);
    /// Unlink a file or socket, or rename one away (or over another).
    pub const REMOVE_FILE: Rights = Rights(1 << 5);
    pub const MAKE_CHAR: Rights = Rights(1 << 6);
    pub const MAKE_DIR: Rights = Rights(1 << 7);
    /// Create a regular file (also the target of a rename).
    pub const MAKE_REG: Rights = Rights(1 << 8);
    /// Create a Unix socket (`bind`).
    pub const MAKE_SOCK: Rights = Rights(1 << 9);
    pub const MAKE_FIFO: Rights = Rights(1 << 10);
    pub const MAKE_BLOCK: Rights = Rights(1 << 11);
    pub const MAKE_SYM: Rights = Rights(1 << 12);
    /// Link or rename across directories (ABI 2).
    pub const REFER: Rights = Rights(1 << 13);
    /// Truncate a file (`O_TRUNC`, `ftruncate`; ABI 3).
    pub const TRUNCATE: Rights = Rights(1 << 14);
    /// `ioctl` on a character or block device (ABI 5).
    pub const IOCTL_DEV: Rights = Rights(1 << 15);
    /// Connect to a pathname Unix socket (ABI 9).
    pub const RESOLVE_UNIX: Rights = Rights(1 << 16);

    /// Every right this build knows.
    pub const ALL: Rights = Rights((1 << 17) - 1);

    /// The rights that make sense on a file that is not a directory.
    pub const FILE: Rights = Rights(
        Self::EXECUTE.0
            | Self::READ_FILE.0
            | Self::WRITE_FILE.0
            | Self::TRUNCATE.0
            | Self::IOCTL_DEV.0
            | Self::RESOLVE_UNIX.0,
    );

    /// A directory where the daemon binds, removes and connects to Unix sockets.
    pub const SOCKET_DIR: Rights =
        Rights(Self::MAKE_SOCK.0 | Self::REMOVE_FILE.0 | Self::RESOLVE_UNIX.0);
    /// Read files and list directories.
    pub const READ: Rights = Rights(Self::READ_FILE.0 | Self::READ_DIR.0);
    /// A device the daemon opens and drives with ioctls (`/dev/net/tun`, `/dev/vfio`).
    pub const DEVICE: Rights = Rights(Self::READ_FILE.0 | Self::WRITE_FILE.0 | Self::IOCTL_DEV.0);
    /// A directory where the daemon writes files and renames them into place.
    pub const FILES_DIR: Rights =
        Rights(Self::MAKE_REG.0 | Self::WRITE_FILE.0 | Self::TRUNCATE.0 | Self::REMOVE_FILE.0);
    /// What an operator's `landlock_paths` entry allows: reading and writing, files and
    /// sockets and directories made and removed, device ioctls — not executing, not making
    /// device nodes, fifos or symbolic links, not moving files across directories.
    pub const OPERATOR: Rights = Rights(
        Self::READ_FILE.0
            | Self::WRITE_FILE.0
            | Self::READ_DIR.0
            | Self::REMOVE_DIR.0
            | Self::REMOVE_FILE.0
            | Self::MAKE_DIR.0
            | Self::MAKE_REG.0
            | Self::MAKE_SOCK.0
            | Self::TRUNCATE.0
            | Self::IOCTL_DEV.0
            | Self::RESOLVE_UNIX.0,
    );

    const TABLE: [(Rights, AccessFs, &'static str); 17] = [
        (Rights::EXECUTE, AccessFs::Execute, "execute"),
        (Rights::READ_FILE, AccessFs::ReadFile, "read-file"),
        (Rights::WRITE_FILE, AccessFs::WriteFile, "write-file"),
        (Rights::READ_DIR, AccessFs::ReadDir, "read-dir"),
        (Rights::REMOVE_DIR, AccessFs::RemoveDir, "remove-dir"),
        (Rights::REMOVE_FILE, AccessFs::RemoveFile, "remove-file"),
        (Rights::MAKE_CHAR, AccessFs::MakeChar, "make-char"),
        (Rights::MAKE_DIR, AccessFs::MakeDir, "make-dir"),
        (Rights::MAKE_REG, AccessFs::MakeReg, "make-reg"),
        (Rights::MAKE_SOCK, AccessFs::MakeSock, "make-sock"),
        (Rights::MAKE_FIFO, AccessFs::MakeFifo, "make-fifo"),
        (Rights::MAKE_BLOCK, AccessFs::MakeBlock, "make-block"),
        (Rights::MAKE_SYM, AccessFs::MakeSym, "make-sym"),
        (Rights::REFER, AccessFs::Refer, "refer"),
        (Rights::TRUNCATE, AccessFs::Truncate, "truncate"),
        (Rights::IOCTL_DEV, AccessFs::IoctlDev, "ioctl-dev"),
        (Rights::RESOLVE_UNIX, AccessFs::ResolveUnix, "resolve-unix"),
    ];

    pub const fn union(self, other: Rights) -> Rights {
        Rights(self.0 | other.0)
    }

    pub const fn contains(self, other: Rights) -> bool {
        self.0 & other.0 == other.0
    }

    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub const fn intersect(self, other: Rights) -> Rights {
        Rights(self.0 & other.0)
    }

    /// The names of the rights, as `torii-dataplane landlock` prints them.
    pub fn names(self) -> Vec<&'static str> {
        Self::TABLE
            .iter()
            .filter(|(r, _, _)| self.contains(*r))
            .map(|(_, _, n)| *n)
            .collect()
    }

    fn to_access(self) -> BitFlags<AccessFs> {
        Self::TABLE
            .iter()
            .filter(|(r, _, _)| self.contains(*r))
            .fold(BitFlags::EMPTY, |a, (_, f, _)| a | *f)
    }

    fn from_access(a: BitFlags<AccessFs>) -> Rights {
        Self::TABLE
            .iter()
            .filter(|(_, f, _)| a.contains(*f))
            .fold(Rights::NONE, |r, (x, _, _)| r | *x)
    }
}

impl std::ops::BitOr for Rights {
    type Output = Rights;
    fn bitor(self, o: Rights) -> Rights {
        self.union(o)
    }
}

impl std::ops::BitOrAssign for Rights {
    fn bitor_assign(&mut self, o: Rights) {
        *self = self.union(o);
    }
}

impl fmt::Display for Rights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("(none)");
        }
        f.write_str(&self.names().join(" "))
    }
}

/// The highest ABI this build handles: its rights are all handled (denied unless a rule
/// allows them), the kernel enforcing those it knows.
const HIGHEST: ABI = ABI::V10;

/// One rule: `rights` on `path` (a file, or everything beneath a directory).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub path: PathBuf,
    pub rights: Rights,
    /// Why the daemon needs it (`port "vm1" socket`, `landlock_paths`), for people.
    pub why: String,
    /// A path the operator named: missing is an error. A derived path that is missing is left
    /// out (whatever needed it fails on its own, with its own error).
    pub required: bool,
}

/// The rules of one sandbox, in the order they were derived.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rules {
    rules: Vec<Rule>,
}

/// The directory of `socket` (the current directory for a bare name).
pub fn socket_dir(socket: &Path) -> PathBuf {
    match socket.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// `path`, or its nearest ancestor that exists.
fn nearest_existing(path: &Path) -> Option<PathBuf> {
    path.ancestors()
        .map(|a| {
            if a.as_os_str().is_empty() {
                Path::new(".")
            } else {
                a
            }
        })
        .find(|a| a.exists())
        .map(Path::to_path_buf)
}

impl Rules {
    pub fn new() -> Rules {
        Rules::default()
    }

    /// Allows `rights` on `path`.
    pub fn allow(&mut self, path: impl Into<PathBuf>, rights: Rights, why: impl Into<String>) {
        self.rules.push(Rule {
            path: path.into(),
            rights,
            why: why.into(),
            required: false,
        });
    }

    /// What an operator listed: [`Rights::OPERATOR`] on `path`, which must exist.
    pub fn operator(&mut self, path: impl Into<PathBuf>, why: impl Into<String>) {
        self.rules.push(Rule {
            path: path.into(),
            rights: Rights::OPERATOR,
            why: why.into(),
            required: true,
        });
    }

    /// A Unix socket the daemon binds (`listen`) or connects to: its directory, where it is
    /// made, removed on stop and connected to. A client's directory that does not exist yet
    /// (its frontend makes it later) gets the right to connect beneath its nearest existing
    /// ancestor only.
    pub fn socket(&mut self, socket: &Path, listen: bool, why: impl Into<String>) {
        let dir = socket_dir(socket);
        if listen || dir.exists() {
            self.allow(dir, Rights::SOCKET_DIR, why);
        } else if let Some(a) = nearest_existing(&dir) {
            self.allow(
                a,
                Rights::RESOLVE_UNIX,
                format!("{} (its directory does not exist yet)", why.into()),
            );
        }
    }

    /// A disk image (a file or a block device): read, and written unless `read_only`; a
    /// block device's ioctls too.
    pub fn image(&mut self, path: &Path, read_only: bool, why: impl Into<String>) {
        use std::os::unix::fs::FileTypeExt;
        let mut r = Rights::READ_FILE;
        if !read_only {
            r |= Rights::WRITE_FILE;
        }
        if std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device()) {
            r |= Rights::IOCTL_DEV;
        }
        self.allow(path, r, why);
    }

    /// Adds every rule of `other`.
    pub fn extend(&mut self, other: &Rules) {
        self.rules.extend(other.rules.iter().cloned());
    }

    pub fn iter(&self) -> impl Iterator<Item = &Rule> {
        self.rules.iter()
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The rights on each path (rules on the same path merged), with the reasons, sorted by
    /// path.
    pub fn merged(&self) -> BTreeMap<PathBuf, (Rights, Vec<String>)> {
        let mut m: BTreeMap<PathBuf, (Rights, Vec<String>)> = BTreeMap::new();
        for r in &self.rules {
            let e = m.entry(r.path.clone()).or_default();
            e.0 |= r.rights;
            if !e.1.contains(&r.why) {
                e.1.push(r.why.clone());
            }
        }
        m
    }

    /// Whether the rules allow `need` on `path` (beneath a rule's directory, or the rule's
    /// file itself), paths compared as given and with symbolic links resolved.
    pub fn allows(&self, path: &Path, need: Rights) -> bool {
        let forms = path_forms(path);
        let mut got = Rights::NONE;
        for r in &self.rules {
            let bases = path_forms(&r.path);
            if forms.iter().any(|p| bases.iter().any(|b| p.starts_with(b))) {
                got |= r.rights;
            }
        }
        got.contains(need)
    }
}

/// `p` as given (made absolute) and with its existing part's symbolic links resolved.
fn path_forms(p: &Path) -> Vec<PathBuf> {
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(p)
    };
    let mut v = vec![abs.clone()];
    // Resolve the longest existing prefix, keep the rest as written.
    let mut rest = Vec::new();
    let mut cur = abs.as_path();
    loop {
        if let Ok(real) = std::fs::canonicalize(cur) {
            let mut r = real;
            for c in rest.iter().rev() {
                r.push(c);
            }
            if r != abs {
                v.push(r);
            }
            break;
        }
        match (cur.parent(), cur.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                cur = parent;
            }
            _ => break,
        }
    }
    v
}

/// Checks an operator's `landlock_paths` entry without touching the host: an absolute path
/// without NUL bytes. (Whether it exists is checked when the sandbox is applied.)
pub fn check_operator_path(p: &Path) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt;
    if p.as_os_str().as_bytes().contains(&0) {
        return Err(format!("{p:?} contains a NUL byte"));
    }
    if !p.is_absolute() {
        return Err(format!("{} is not an absolute path", p.display()));
    }
    Ok(())
}

/// Why the sandbox could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("landlock = \"enforce\", but {0}; set landlock = \"off\" to run without the sandbox")]
    Unsupported(String),
    #[error("landlock: cannot allow {path} ({why}): {source}")]
    Path {
        path: PathBuf,
        why: String,
        source: io::Error,
    },
    #[error("landlock: {0}")]
    Ruleset(#[from] landlock::RulesetError),
}

/// What [`restrict`] achieved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    /// The Landlock ABI the kernel offers (and the crate knows), e.g. 7.
    pub abi: u32,
    /// Every handled right is enforced (`false`: the kernel's ABI lacks some, which are then
    /// allowed everywhere).
    pub fully: bool,
    /// The rights this kernel enforces (the others are allowed everywhere).
    pub enforced: Rights,
    /// Every thread of the process was restricted at once (TSYNC, ABI 8).
    pub all_threads: bool,
    /// Threads that were running when the sandbox was applied and do not have it (none
    /// with TSYNC), by name.
    pub left_out: Vec<String>,
    /// Rules applied, and derived paths left out because they do not exist.
    pub rules: usize,
    pub missing: Vec<PathBuf>,
}

impl Applied {
    /// "fully enforced" or "partially enforced".
    pub fn status(&self) -> &'static str {
        if self.fully {
            "fully enforced"
        } else {
            "partially enforced"
        }
    }
}

/// The kernel's Landlock ABI (`landlock_create_ruleset(NULL, 0, VERSION)`), or why there is
/// none.
pub fn kernel_abi() -> Result<u32, String> {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
    // SAFETY: with a NULL attribute, size 0 and the VERSION flag the call reads and writes no
    // memory; it returns the ABI version or -1 with errno.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    if v > 0 {
        return Ok(v as u32);
    }
    Err(match io::Error::last_os_error().raw_os_error() {
        Some(libc::EOPNOTSUPP) => "this kernel has Landlock but it is not enabled (add landlock to the lsm= boot parameter)".into(),
        Some(libc::ENOSYS) => "this kernel has no Landlock (it needs CONFIG_SECURITY_LANDLOCK=y, Linux 5.13 or later)".into(),
        e => format!("cannot query Landlock: {}", io::Error::from_raw_os_error(e.unwrap_or(0))),
    })
}

/// The other threads of this process, by name (`/proc/self/task`).
fn other_threads() -> Vec<String> {
    // SAFETY: gettid has no preconditions.
    let me = unsafe { libc::gettid() }.to_string();
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    let mut v: Vec<String> = dir
        .flatten()
        .filter(|e| e.file_name().to_str() != Some(me.as_str()))
        .map(|e| {
            let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            format!("{} ({})", comm.trim(), e.file_name().to_string_lossy())
        })
        .collect();
    v.sort();
    v
}

/// Set once the daemon's sandbox is in place.
static ENFORCED: AtomicBool = AtomicBool::new(false);

/// The sandbox in force: its rules, the rights the kernel enforces, and how an operator
/// extends it (for [`explain`]).
struct InForce {
    rules: Rules,
    enforced: Rights,
    extend: &'static str,
}

static IN_FORCE: OnceLock<Mutex<Option<InForce>>> = OnceLock::new();

/// Whether this process restricted itself with [`restrict`] (cheap: one atomic load).
pub fn enforced() -> bool {
    ENFORCED.load(Ordering::Acquire)
}

/// Restricts the calling thread — every thread with TSYNC (ABI 8) — to `rules`: every
/// right this build knows is handled, and allowed only where a rule allows it. `extend` says
/// how an operator adds a path (e.g. "`landlock_paths` in [dataplane]"), for the errors of
/// later denials ([`explain`]). May be called again: layers stack, each narrowing the last.
///
/// Fails if the kernel has no Landlock, if a path the operator named cannot be opened, or if
/// the kernel refuses the ruleset; nothing is restricted then.
pub fn restrict(rules: &Rules, extend: &'static str) -> Result<Applied, Error> {
    let abi = kernel_abi().map_err(Error::Unsupported)?;
    let handled = AccessFs::from_all(HIGHEST);
    let mut created = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(handled)?
        .create()?;
    let mut missing = Vec::new();
    let mut count = 0;
    // One rule per path, with every right asked for it.
    for (path, (rights, why)) in rules.merged() {
        let required = rules.rules.iter().any(|r| r.required && r.path == path);
        let path_err = |source| Error::Path {
            path: path.clone(),
            why: why.join("; "),
            source,
        };
        let fd = match PathFd::new(&path) {
            Ok(fd) => fd,
            Err(landlock::PathFdError::OpenCall { source, .. }) => {
                if !required && source.kind() == io::ErrorKind::NotFound {
                    missing.push(path.clone());
                    continue;
                }
                return Err(path_err(source));
            }
            Err(e) => return Err(path_err(io::Error::other(e.to_string()))),
        };
        let is_dir = std::fs::metadata(&path).is_ok_and(|m| m.is_dir());
        let rights = if is_dir {
            rights
        } else {
            rights.intersect(Rights::FILE)
        };
        if rights.is_empty() {
            continue;
        }
        created = created.add_rule(PathBeneath::new(fd, rights.to_access()))?;
        count += 1;
    }
    let left_out = other_threads();
    let status = created.all_threads(true)?.restrict_self()?;
    let effective = match status.landlock {
        LandlockStatus::Available { effective_abi, .. } => effective_abi,
        _ => ABI::Unsupported,
    };
    if status.ruleset == RulesetStatus::NotEnforced {
        return Err(Error::Unsupported(format!(
            "the kernel did not enforce the ruleset (Landlock ABI {abi})"
        )));
    }
    let enforced = Rights::from_access(AccessFs::from_all(effective));
    let applied = Applied {
        abi: effective as u32,
        fully: status.ruleset == RulesetStatus::FullyEnforced,
        enforced,
        all_threads: status.all_threads,
        left_out: if status.all_threads {
            Vec::new()
        } else {
            left_out
        },
        rules: count,
        missing,
    };
    let state = IN_FORCE.get_or_init(|| Mutex::new(None));
    let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
    // A later layer narrows the earlier ones: it is what [`explain`] checks against.
    *s = Some(InForce {
        rules: rules.clone(),
        enforced,
        extend,
    });
    ENFORCED.store(true, Ordering::Release);
    Ok(applied)
}

/// For an error of an operation on `path` that needed `need`: if the sandbox is in force,
/// the error is a permission error and the sandbox's rules do not allow `need` there, a
/// sentence (to append to the error) that says so and which setting to extend; otherwise
/// nothing. Cheap when the sandbox is off: one atomic load.
pub fn explain(err: &io::Error, path: &Path, need: Rights) -> String {
    if !enforced() || err.raw_os_error() != Some(libc::EACCES) {
        return String::new();
    }
    let Some(state) = IN_FORCE.get() else {
        return String::new();
    };
    let s = state.lock().unwrap_or_else(|e| e.into_inner());
    let Some(f) = &*s else {
        return String::new();
    };
    let need = need.intersect(f.enforced);
    if need.is_empty() || f.rules.allows(path, need) {
        return String::new();
    }
    // Rights used on a directory's entries: allow the directory.
    let in_dir = Rights::MAKE_SOCK
        | Rights::RESOLVE_UNIX
        | Rights::REMOVE_FILE
        | Rights::MAKE_REG
        | Rights::MAKE_DIR;
    let target = if need.intersect(in_dir).is_empty() {
        format!("{} (or its directory)", path.display())
    } else {
        socket_dir(path).display().to_string()
    };
    format!(
        " (denied by the Landlock sandbox, landlock = \"enforce\": {} is outside the paths it allows; add {} to {} and restart the daemon)",
        path.display(),
        target,
        f.extend
    )
}

/// A note for errors whose cause cannot be told apart (a DPDK device's probe): that the
/// sandbox is in force and how to extend it; empty when it is not.
pub fn note() -> String {
    if !enforced() {
        return String::new();
    }
    let extend = IN_FORCE
        .get()
        .and_then(|s| {
            s.lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .map(|f| f.extend)
        })
        .unwrap_or("landlock_paths");
    format!(" (the Landlock sandbox is enforced: a file or socket this needs may be outside the paths it allows; add it to {extend} and restart the daemon)")
}

/// The rules as text, one path per line with its rights and reasons (for `landlock` /
/// `--print-landlock` and the docs).
pub fn describe(rules: &Rules) -> String {
    let mut s = String::new();
    for (path, (rights, why)) in rules.merged() {
        s.push_str(&format!(
            "{}\n  {}\n  for: {}\n",
            path.display(),
            rights,
            why.join("; ")
        ));
    }
    if s.is_empty() {
        s.push_str("(no path: nothing in the file system is allowed)\n");
    }
    s
}

/// One log line's worth of what [`restrict`] did.
pub fn summary(a: &Applied) -> String {
    let mut s = format!(
        "Landlock ABI {} (this build handles up to {}): {}, {} rules",
        a.abi,
        HIGHEST as u32,
        a.status(),
        a.rules
    );
    if !a.fully {
        let lacking = Rights::ALL.intersect(Rights(!a.enforced.0));
        s.push_str(&format!("; not enforced by this kernel: {lacking}"));
    }
    if a.all_threads {
        s.push_str("; every thread restricted at once (TSYNC)");
    } else if a.left_out.is_empty() {
        s.push_str("; no other thread was running, every later thread inherits it");
    } else {
        s.push_str(&format!(
            "; threads already running do not get this layer (TSYNC needs ABI 8): {}",
            a.left_out.join(", ")
        ));
    }
    if !a.missing.is_empty() {
        let m: Vec<String> = a.missing.iter().map(|p| p.display().to_string()).collect();
        s.push_str(&format!("; left out (missing): {}", m.join(", ")));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_print() {
        for m in [Mode::Off, Mode::Enforce] {
            assert_eq!(m.as_str().parse::<Mode>(), Ok(m));
        }
        assert!("log"
            .parse::<Mode>()
            .unwrap_err()
            .contains("off or enforce"));
        assert_eq!(Mode::default(), Mode::Off);
    }

    #[test]
    fn rights_map_to_the_crate_both_ways() {
        assert_eq!(Rights::from_access(Rights::ALL.to_access()), Rights::ALL);
        assert_eq!(
            Rights::from_access(AccessFs::from_all(HIGHEST)),
            Rights::ALL,
            "the table misses a right of ABI {}",
            HIGHEST as u32
        );
        assert_eq!(
            Rights::SOCKET_DIR.to_string(),
            "remove-file make-sock resolve-unix"
        );
        for r in [Rights::OPERATOR, Rights::SOCKET_DIR, Rights::DEVICE] {
            assert!(!r.contains(Rights::EXECUTE), "{r}");
        }
        assert!(!Rights::OPERATOR.contains(Rights::MAKE_CHAR));
        assert!(!Rights::OPERATOR.contains(Rights::MAKE_BLOCK));
    }

    #[test]
    fn sockets_allow_their_directory_and_missing_client_directories_only_connect() {
        let dir = std::env::temp_dir();
        let mut r = Rules::new();
        r.socket(&dir.join("a.sock"), true, "a");
        r.socket(Path::new("b.sock"), true, "b");
        r.socket(&dir.join("nope-torii-x/y/c.sock"), false, "c");
        let v: Vec<_> = r.iter().cloned().collect();
        assert_eq!(
            (v[0].path.as_path(), v[0].rights),
            (dir.as_path(), Rights::SOCKET_DIR)
        );
        assert_eq!(v[1].path, PathBuf::from("."));
        assert_eq!(
            (v[2].path.as_path(), v[2].rights),
            (dir.as_path(), Rights::RESOLVE_UNIX)
        );
        assert!(v[2].why.contains("does not exist yet"));
        assert!(r.allows(&dir.join("other.sock"), Rights::MAKE_SOCK));
        assert!(!r.allows(Path::new("/nonexistent-torii/x.sock"), Rights::MAKE_SOCK));
        // Reading is not among a socket directory's rights.
        assert!(!r.allows(&dir.join("f"), Rights::READ_FILE));
    }

    #[test]
    fn merged_rules_union_rights_and_reasons() {
        let mut r = Rules::new();
        r.allow("/x", Rights::READ_FILE, "one");
        r.allow("/x", Rights::WRITE_FILE, "two");
        r.allow("/x", Rights::WRITE_FILE, "two");
        r.operator("/y", "landlock_paths");
        let m = r.merged();
        assert_eq!(
            m[Path::new("/x")],
            (
                Rights::READ_FILE | Rights::WRITE_FILE,
                vec!["one".to_string(), "two".to_string()]
            )
        );
        let text = describe(&r);
        assert!(
            text.contains("/x\n  read-file write-file\n  for: one; two\n"),
            "{text}"
        );
        assert!(text.contains("/y\n"), "{text}");
        assert!(describe(&Rules::new()).contains("nothing in the file system"));
    }

    #[test]
    fn explain_says_nothing_when_the_sandbox_is_off() {
        let e = io::Error::from_raw_os_error(libc::EACCES);
        // This test process never restricts itself.
        assert_eq!(explain(&e, Path::new("/x"), Rights::READ_FILE), "");
        assert_eq!(note(), "");
    }

    #[test]
    fn the_summary_names_abi_status_and_threads() {
        let a = Applied {
            abi: 7,
            fully: false,
            enforced: Rights::from_access(AccessFs::from_all(ABI::V7)),
            all_threads: false,
            left_out: vec!["dpdk-intr (12)".into()],
            rules: 3,
            missing: vec![PathBuf::from("/gone")],
        };
        let s = summary(&a);
        for want in [
            "Landlock ABI 7",
            "partially enforced",
            "3 rules",
            "not enforced by this kernel: resolve-unix",
            "dpdk-intr (12)",
            "left out (missing): /gone",
        ] {
            assert!(s.contains(want), "{want:?} not in {s:?}");
        }
    }

    /// A child test process (this binary, run again) restricts itself and shows what the
    /// kernel then allows and refuses. Needs a kernel with Landlock: fails without.
    #[test]
    fn a_restricted_process_opens_only_what_its_rules_allow() {
        const ENV: &str = "TORII_LANDLOCK_CHILD";
        if let Ok(dir) = std::env::var(ENV) {
            child(Path::new(&dir));
            return;
        }
        if let Err(e) = kernel_abi() {
            panic!("prerequisite: a kernel with Landlock is needed: {e}");
        }
        let dir = std::env::temp_dir().join(format!("torii-landlock-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("allowed")).unwrap();
        std::fs::create_dir_all(dir.join("denied")).unwrap();
        std::fs::write(dir.join("allowed/img"), b"ok").unwrap();
        std::fs::write(dir.join("denied/img"), b"no").unwrap();
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "landlock::tests::a_restricted_process_opens_only_what_its_rules_allow",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(ENV, &dir)
            .output()
            .unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "child failed:\n{text}");
        assert!(text.contains("child: all checks passed"), "{text}");
    }

    fn child(dir: &Path) {
        use std::os::unix::net::UnixListener;
        let mut r = Rules::new();
        r.image(&dir.join("allowed/img"), false, "image");
        r.socket(&dir.join("allowed/s.sock"), true, "socket");
        r.allow(dir.join("gone"), Rights::READ, "missing, left out");
        let a = restrict(&r, "`landlock_paths` in [test]").unwrap();
        assert!(a.abi >= 1 && a.rules == 2, "{a:?}");
        assert_eq!(a.missing, vec![dir.join("gone")]);
        assert!(enforced());
        // Allowed: the image, read and written; a socket bound and removed in its directory.
        assert_eq!(std::fs::read(dir.join("allowed/img")).unwrap(), b"ok");
        std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("allowed/img"))
            .unwrap();
        let s = dir.join("allowed/s.sock");
        drop(UnixListener::bind(&s).unwrap());
        std::fs::remove_file(&s).unwrap();
        // Refused: a file next to it, one elsewhere, a socket elsewhere, any other file.
        for p in [dir.join("denied/img"), PathBuf::from("/etc/passwd")] {
            let e = std::fs::read(&p).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{}", p.display());
            let m = explain(&e, &p, Rights::READ_FILE);
            assert!(
                m.contains("denied by the Landlock sandbox")
                    && m.contains("`landlock_paths` in [test]"),
                "{m}"
            );
        }
        let s = dir.join("denied/s.sock");
        let e = UnixListener::bind(&s).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EACCES));
        let m = explain(&e, &s, Rights::MAKE_SOCK);
        assert!(
            m.contains(&format!("add {}", dir.join("denied").display())),
            "{m}"
        );
        // An allowed path's own permission error is not blamed on the sandbox.
        let e = io::Error::from_raw_os_error(libc::EACCES);
        assert_eq!(explain(&e, &dir.join("allowed/img"), Rights::READ_FILE), "");
        // A thread started now inherits the sandbox.
        let p = dir.join("denied/img");
        let e = std::thread::spawn(move || std::fs::read(p).unwrap_err())
            .join()
            .unwrap();
        assert_eq!(e.raw_os_error(), Some(libc::EACCES));
        println!("child: all checks passed");
    }
}
