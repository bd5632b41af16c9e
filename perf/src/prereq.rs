//! Prerequisite checks. Every harness test calls these first so that a
//! missing prerequisite makes the test **fail** with a message saying what to
//! install or run — tests never silently skip.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Install hint for QEMU.
pub const QEMU_HINT: &str = "apt-get install -t bookworm-backports qemu-system-x86";
/// Install hint for dpdk-testpmd and the PMDs the harness uses.
pub const TESTPMD_HINT: &str =
    "apt-get install dpdk-dev librte-net-vhost23 librte-net-virtio23 librte-mempool-ring23";
/// Hint when hugepages are missing.
/// qemu-storage-daemon 10 is in qemu-utils (backports).
pub const QSD_HINT: &str =
    "apt-get install -t bookworm-backports qemu-utils (or run scripts/setup)";
/// fio (the raw-file ceiling of the blk benchmark).
pub const FIO_HINT: &str = "apt-get install fio (or run scripts/setup)";
pub const HUGEPAGES_HINT: &str = "run scripts/setup (reserves hugepages)";
/// Hint when the guest image is missing.
pub const GUEST_IMAGE_HINT: &str = "run scripts/setup";
/// Environment variable naming the guest image directory.
pub const GUEST_DIR_ENV: &str = "TORII_GUEST_DIR";
/// Default guest image directory.
pub const DEFAULT_GUEST_DIR: &str = "/var/cache/torii/guest";
/// Minimum QEMU major version (for `reconnect-ms=` and current vhost-user).
pub const MIN_QEMU_MAJOR: u32 = 10;

/// A missing or unusable prerequisite. `Display` is a full sentence that
/// says what is wrong and how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum PrereqError {
    /// Not running as root.
    #[error("this test must run as root (effective uid is {euid}); run it with sudo or as root")]
    NotRoot {
        /// The effective uid found.
        euid: u32,
    },
    /// A binary is not in `PATH`.
    #[error("required program `{name}` was not found in PATH; install it with: {hint}")]
    MissingBinary {
        /// Binary name.
        name: String,
        /// What to install.
        hint: String,
    },
    /// A binary exists but cannot be run or reports an unusable version.
    #[error("`{name}` is unusable: {problem}; fix it with: {hint}")]
    BadBinary {
        /// Binary name or path.
        name: String,
        /// What is wrong.
        problem: String,
        /// What to install.
        hint: String,
    },
    /// Not enough free 2 MiB hugepages.
    #[error(
        "at least {needed} free 2 MiB hugepages are needed but only {free} are free \
         ({total} reserved); {hint}"
    )]
    Hugepages {
        /// Pages needed.
        needed: u64,
        /// Pages free.
        free: u64,
        /// Pages reserved in total.
        total: u64,
        /// How to fix.
        hint: String,
    },
    /// `/proc/meminfo` could not be read or parsed.
    #[error("cannot read hugepage counters from /proc/meminfo ({reason}); {hint}")]
    Meminfo {
        /// Why.
        reason: String,
        /// How to fix.
        hint: String,
    },
    /// A guest image file is missing or empty.
    #[error(
        "guest image file {} is missing or empty (image directory from {GUEST_DIR_ENV}, \
         default {DEFAULT_GUEST_DIR}); {hint}", path.display()
    )]
    GuestImage {
        /// Missing file.
        path: PathBuf,
        /// How to fix.
        hint: String,
    },
    /// A required DPDK driver library is not installed.
    #[error("DPDK driver library {lib} was not found under /usr/lib/*/dpdk/pmds-*; install it with: {hint}")]
    MissingPmd {
        /// Library file name prefix, e.g. `librte_net_vhost.so`.
        lib: String,
        /// What to install.
        hint: String,
    },
}

/// Kernel and initramfs of the test guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImage {
    /// `vmlinuz`.
    pub kernel: PathBuf,
    /// `initramfs.cpio.gz`.
    pub initrd: PathBuf,
}

/// The pod VM image scripts/image builds (`TORII_IMAGE_DIR`, default `target/torii-image`).
pub fn pod_vm_image_dir() -> Result<PathBuf, String> {
    let dir = std::env::var_os("TORII_IMAGE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/torii-image"));
    if dir.join("initramfs.cpio.gz").is_file() && dir.join("vmlinuz").is_file() {
        Ok(dir)
    } else {
        Err(format!(
            "no pod VM image in {}: build it with scripts/image (scripts/test does)",
            dir.display()
        ))
    }
}

/// A usable QEMU binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuInfo {
    /// Full path of `qemu-system-x86_64`.
    pub path: PathBuf,
    /// `(major, minor, micro)`.
    pub version: (u32, u32, u32),
}

/// Fails unless the effective uid is 0.
pub fn require_root() -> Result<(), PrereqError> {
    // SAFETY: geteuid(2) cannot fail and has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid == 0 {
        Ok(())
    } else {
        Err(PrereqError::NotRoot { euid })
    }
}

fn is_executable(p: &Path) -> bool {
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Finds `name` in `PATH` (or checks it directly if it contains a `/`).
pub fn find_binary(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        let p = PathBuf::from(name);
        return is_executable(&p).then_some(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

/// Fails with `install_hint` unless `name` is an executable in `PATH`;
/// returns its full path.
pub fn require_binary(name: &str, install_hint: &str) -> Result<PathBuf, PrereqError> {
    find_binary(name).ok_or_else(|| PrereqError::MissingBinary {
        name: name.to_string(),
        hint: install_hint.to_string(),
    })
}

/// Hugepage counters parsed from `/proc/meminfo` text, in 2 MiB pages:
/// `(total, free)`.
pub fn parse_hugepages_2m(meminfo: &str) -> Result<(u64, u64), String> {
    let field = |key: &str| -> Result<u64, String> {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|rest| rest.trim_start_matches(':').split_whitespace().next())
            .ok_or_else(|| format!("field {key} not found"))?
            .parse::<u64>()
            .map_err(|e| format!("field {key} unparsable: {e}"))
    };
    let total = field("HugePages_Total")?;
    let free = field("HugePages_Free")?;
    let size_kb = field("Hugepagesize")?;
    // Express the default-size pages as 2 MiB equivalents.
    let scale = |pages: u64| pages * size_kb / 2048;
    Ok((scale(total), scale(free)))
}

/// Fails unless at least `min_free_2m_pages` 2 MiB hugepages are free.
pub fn require_hugepages(min_free_2m_pages: u64) -> Result<(), PrereqError> {
    let text = std::fs::read_to_string("/proc/meminfo").map_err(|e| PrereqError::Meminfo {
        reason: e.to_string(),
        hint: HUGEPAGES_HINT.into(),
    })?;
    let (total, free) = parse_hugepages_2m(&text).map_err(|reason| PrereqError::Meminfo {
        reason,
        hint: HUGEPAGES_HINT.into(),
    })?;
    if free >= min_free_2m_pages {
        Ok(())
    } else {
        Err(PrereqError::Hugepages {
            needed: min_free_2m_pages,
            free,
            total,
            hint: HUGEPAGES_HINT.into(),
        })
    }
}

/// Directory of the guest image: `$TORII_GUEST_DIR` or the default.
pub fn guest_dir() -> PathBuf {
    std::env::var_os(GUEST_DIR_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_GUEST_DIR))
}

/// Locates the guest kernel and initramfs built by `scripts/setup`.
pub fn guest_image() -> Result<GuestImage, PrereqError> {
    let dir = guest_dir();
    let img = GuestImage {
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initramfs.cpio.gz"),
    };
    for p in [&img.kernel, &img.initrd] {
        let ok = p
            .metadata()
            .map(|m| m.is_file() && m.len() > 0)
            .unwrap_or(false);
        if !ok {
            return Err(PrereqError::GuestImage {
                path: p.clone(),
                hint: GUEST_IMAGE_HINT.into(),
            });
        }
    }
    Ok(img)
}

/// Parses `QEMU emulator version X.Y.Z ...` into `(X, Y, Z)`.
pub fn parse_qemu_version(output: &str) -> Option<(u32, u32, u32)> {
    let rest = output.split("version").nth(1)?;
    let ver = rest.split_whitespace().next()?;
    let mut nums = ver
        .split(|c: char| !c.is_ascii_digit())
        .map(|s| s.parse::<u32>().ok());
    let major = nums.next()??;
    let minor = nums.next().flatten().unwrap_or(0);
    let micro = nums.next().flatten().unwrap_or(0);
    Some((major, minor, micro))
}

/// Fails unless `qemu-system-x86_64` exists and is at least version 10.
pub fn require_qemu() -> Result<QemuInfo, PrereqError> {
    let name = "qemu-system-x86_64";
    let path = require_binary(name, QEMU_HINT)?;
    let bad = |problem: String| PrereqError::BadBinary {
        name: path.display().to_string(),
        problem,
        hint: QEMU_HINT.into(),
    };
    let out = Command::new(&path)
        .arg("--version")
        .output()
        .map_err(|e| bad(format!("running `--version` failed: {e}")))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let version = parse_qemu_version(&text)
        .ok_or_else(|| bad(format!("cannot parse version from {:?}", text.trim())))?;
    if version.0 < MIN_QEMU_MAJOR {
        return Err(bad(format!(
            "version {}.{}.{} is too old (need >= {MIN_QEMU_MAJOR})",
            version.0, version.1, version.2
        )));
    }
    Ok(QemuInfo { path, version })
}

/// Whether a PMD library whose file name starts with `lib` exists in any
/// `/usr/lib/<triple>/dpdk/pmds-*` directory.
fn pmd_installed(lib: &str) -> bool {
    let Ok(triples) = std::fs::read_dir("/usr/lib") else {
        return false;
    };
    for triple in triples.flatten() {
        let Ok(dirs) = std::fs::read_dir(triple.path().join("dpdk")) else {
            continue;
        };
        for d in dirs.flatten() {
            if !d.file_name().to_string_lossy().starts_with("pmds-") {
                continue;
            }
            let Ok(files) = std::fs::read_dir(d.path()) else {
                continue;
            };
            if files
                .flatten()
                .any(|f| f.file_name().to_string_lossy().starts_with(lib))
            {
                return true;
            }
        }
    }
    false
}

/// Fails unless `dpdk-testpmd` is installed, together with the vhost,
/// virtio and ring-mempool drivers when it is the distribution's build
/// (whose drivers are separately packaged plugins). Returns its path.
pub fn require_testpmd() -> Result<PathBuf, PrereqError> {
    let path = require_binary("dpdk-testpmd", TESTPMD_HINT)?;
    // Resolve /bin -> /usr/bin (merged-usr) before deciding it is packaged.
    let real = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
    if real.starts_with("/usr/bin") {
        for lib in [
            "librte_net_vhost.so",
            "librte_net_virtio.so",
            "librte_mempool_ring.so",
        ] {
            if !pmd_installed(lib) {
                return Err(PrereqError::MissingPmd {
                    lib: lib.into(),
                    hint: TESTPMD_HINT.into(),
                });
            }
        }
    }
    Ok(path)
}

/// What a testpmd-peer benchmark needs: root, dpdk-testpmd (the one given, or from PATH),
/// `hugepages` free 2 MiB pages and two CPUs (`placement` says what goes where, for the
/// error).
pub fn require_testpmd_bench(
    testpmd: Option<&Path>,
    hugepages: u64,
    placement: &str,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    require_root()?;
    match testpmd {
        Some(p) => {
            find_binary(&p.display().to_string()).with_context(|| {
                format!(
                    "--testpmd {} is not an executable; install with: {TESTPMD_HINT}",
                    p.display()
                )
            })?;
        }
        None => {
            require_testpmd()?;
        }
    }
    require_hugepages(hugepages)?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    anyhow::ensure!(
        cpus >= 2,
        "the bench pins {placement}, but this host has {cpus} CPU(s)"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_version() {
        assert_eq!(
            parse_qemu_version(
                "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\nCopyright"
            ),
            Some((10, 0, 2))
        );
        assert_eq!(
            parse_qemu_version("QEMU emulator version 7.2"),
            Some((7, 2, 0))
        );
        assert_eq!(parse_qemu_version("garbage"), None);
    }

    #[test]
    fn hugepages() {
        let m = "MemTotal: 1 kB\nHugePages_Total:    1024\nHugePages_Free:     1000\n\
                 HugePages_Rsvd:        0\nHugepagesize:       2048 kB\n";
        assert_eq!(parse_hugepages_2m(m), Ok((1024, 1000)));
        assert!(parse_hugepages_2m("MemTotal: 1 kB\n").is_err());
    }

    #[test]
    fn messages_are_sentences() {
        let e = require_binary("torii-definitely-missing", "apt-get install foo").unwrap_err();
        let s = e.to_string();
        assert!(s.contains("torii-definitely-missing") && s.contains("apt-get install foo"));
        let e = PrereqError::Hugepages {
            needed: 512,
            free: 3,
            total: 4,
            hint: HUGEPAGES_HINT.into(),
        };
        assert!(e
            .to_string()
            .contains("run scripts/setup (reserves hugepages)"));
    }
}
