//! Huge pages for the guest's data plane: a pool of one page size reserved through sysfs (all
//! of it, or nothing changes), and hugetlbfs mounted for that size.

use std::io;
use std::path::Path;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::mounts;
use crate::protocol::{quote, RpcError};
use crate::server::Roots;

/// `setup_hugepages` parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hugepages {
    #[serde(default = "two_mb")]
    pub size_kb: u64,
    /// The pool's size, in pages.
    pub count: u64,
    #[serde(default = "dev_hugepages")]
    pub mount: String,
}

fn two_mb() -> u64 {
    2048
}

fn dev_hugepages() -> String {
    "/dev/hugepages".into()
}

fn failed(msg: impl Into<String>) -> RpcError {
    RpcError::new("failed", msg)
}

fn read_count(p: &Path) -> io::Result<u64> {
    std::fs::read_to_string(p)?
        .trim()
        .parse()
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not a number"))
}

/// Sets a pool of `before` pages to `count` with `write`, and reads back with `read` what the
/// kernel made of it: its new size. Fewer than `count`: the pool is set back to `before` and
/// the answer says how many could be had.
pub fn reserve(
    count: u64,
    before: u64,
    read: impl Fn() -> io::Result<u64>,
    write: impl Fn(u64) -> io::Result<()>,
) -> Result<u64, RpcError> {
    if count == before {
        return Ok(before);
    }
    let io = |what: &str, e: io::Error| failed(format!("{what} the huge page pool: {e}"));
    write(count).map_err(|e| io("setting", e))?;
    let got = read().map_err(|e| io("reading", e))?;
    if got < count {
        let undo = match write(before) {
            Ok(()) => String::new(),
            Err(e) => format!(" (and setting it back to {before} failed: {e})"),
        };
        return Err(failed(format!(
            "only {got} of the {count} huge pages asked for could be reserved{undo}"
        )));
    }
    Ok(got)
}

/// `setup_hugepages`, checked: an absolute mount point with no NUL. Made only by its
/// `TryFrom<Hugepages>`, in [`crate::server::Call::decode`]. The page size and the count are
/// the kernel's to take or refuse: which sizes it has is in sysfs (a size it does not have is
/// `not_found`, with those it has), how many pages it can give is found by asking.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckedHugepages {
    size_kb: u64,
    count: u64,
    mount: String,
}

impl TryFrom<Hugepages> for CheckedHugepages {
    type Error = RpcError;

    fn try_from(h: Hugepages) -> Result<CheckedHugepages, RpcError> {
        if !h.mount.starts_with('/') || h.mount.contains('\0') {
            return Err(RpcError::new(
                "bad_params",
                format!("mount {} is not an absolute path", quote(&h.mount)),
            ));
        }
        Ok(CheckedHugepages {
            size_kb: h.size_kb,
            count: h.count,
            mount: h.mount,
        })
    }
}

impl CheckedHugepages {
    pub fn size_kb(&self) -> u64 {
        self.size_kb
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// Where hugetlbfs goes: absolute, no NUL.
    pub fn mount(&self) -> &Path {
        Path::new(&self.mount)
    }
}

/// `setup_hugepages`.
pub fn setup(h: CheckedHugepages, roots: &Roots) -> Result<Value, RpcError> {
    let pools = roots.sys.join("kernel/mm/hugepages");
    let dir = pools.join(format!("hugepages-{}kB", h.size_kb));
    if !dir.is_dir() {
        let mut sizes: Vec<String> = std::fs::read_dir(&pools)
            .map(|d| {
                d.filter_map(|e| {
                    let n = e.ok()?.file_name().to_string_lossy().into_owned();
                    Some(
                        n.strip_prefix("hugepages-")?
                            .strip_suffix("kB")?
                            .to_string(),
                    )
                })
                .collect()
            })
            .unwrap_or_default();
        sizes.sort_by_key(|s| s.parse::<u64>().unwrap_or(0));
        return Err(RpcError::new(
            "not_found",
            format!(
                "no huge pages of {} kB here (sizes in kB: {})",
                h.size_kb,
                sizes.join(", ")
            ),
        ));
    }
    let nr = dir.join("nr_hugepages");
    let before = read_count(&nr).map_err(|e| failed(format!("{}: {e}", nr.display())))?;
    let total = reserve(
        h.count,
        before,
        || read_count(&nr),
        |n| std::fs::write(&nr, n.to_string()),
    )?;
    let undo = |e: RpcError| {
        if total != before {
            let _ = std::fs::write(&nr, before.to_string());
        }
        e
    };
    let free_path = dir.join("free_hugepages");
    let free = read_count(&free_path)
        .map_err(|e| undo(failed(format!("{}: {e}", free_path.display()))))?;
    let mount = Path::new(&h.mount);
    std::fs::create_dir_all(mount)
        .map_err(|e| undo(failed(format!("creating {}: {e}", quote(&h.mount)))))?;
    let here = std::fs::canonicalize(mount)
        .map_err(|e| undo(failed(format!("{}: {e}", quote(&h.mount)))))?;
    let mountinfo = std::fs::read_to_string(&roots.mountinfo).unwrap_or_default();
    if mounts::mounted_at(&mountinfo, &here).is_none_or(|m| m.fstype != "hugetlbfs") {
        mounts::mount(
            "hugetlbfs",
            mount,
            "hugetlbfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            &format!("pagesize={}K", h.size_kb),
        )
        .map_err(|e| {
            undo(failed(format!(
                "mounting hugetlbfs on {}: {e}",
                quote(&h.mount)
            )))
        })?;
    }
    Ok(json!({
        "size_kb": h.size_kb,
        "total": total,
        "free": free,
        "mount": h.mount,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn a_short_reservation_is_undone() {
        // A kernel that has room for 5 pages.
        let pool = Cell::new(2);
        let read = || Ok(pool.get());
        let write = |n: u64| {
            pool.set(n.min(5));
            Ok(())
        };
        assert_eq!(reserve(4, 2, read, write).unwrap(), 4);
        let e = reserve(8, 4, read, write).unwrap_err();
        assert_eq!(e.code, "failed");
        assert!(e.message.contains("only 5 of the 8"), "{e}");
        assert_eq!(pool.get(), 4);
        // Shrinking, and asking for what is there.
        assert_eq!(reserve(1, 4, read, write).unwrap(), 1);
        assert_eq!(reserve(1, 1, read, |_| panic!("no write")).unwrap(), 1);
    }

    #[test]
    fn a_pool_is_set_in_a_fake_sysfs() {
        let root = std::env::temp_dir().join(format!("torii-agent-huge-{}", std::process::id()));
        let pool = root.join("sys/kernel/mm/hugepages/hugepages-2048kB");
        std::fs::create_dir_all(&pool).unwrap();
        std::fs::create_dir_all(root.join("sys/kernel/mm/hugepages/hugepages-1048576kB")).unwrap();
        std::fs::write(pool.join("nr_hugepages"), "0\n").unwrap();
        std::fs::write(pool.join("free_hugepages"), "7\n").unwrap();
        let mnt = root.join("hugepages");
        std::fs::create_dir_all(&mnt).unwrap();
        let mnt = std::fs::canonicalize(mnt).unwrap();
        // hugetlbfs is mounted there already: no mount(2).
        std::fs::write(
            root.join("mountinfo"),
            format!(
                "1 0 0:20 / {} rw - hugetlbfs hugetlbfs rw,pagesize=2M\n",
                mnt.display()
            ),
        )
        .unwrap();
        let roots = Roots {
            sys: root.join("sys"),
            mountinfo: root.join("mountinfo"),
            ..Roots::default()
        };
        let ask = |size_kb, mount: &str| {
            CheckedHugepages::try_from(Hugepages {
                size_kb,
                count: 8,
                mount: mount.into(),
            })
        };
        let m = mnt.display().to_string();
        let done = ask(2048, &m).and_then(|h| setup(h, &roots));
        let written = std::fs::read_to_string(pool.join("nr_hugepages"));
        let no_size = ask(4096, &m).and_then(|h| setup(h, &roots));
        let relative = ask(2048, "hugepages");
        let _ = std::fs::remove_dir_all(&root);
        assert_eq!(
            done.unwrap(),
            json!({"size_kb": 2048, "total": 8, "free": 7, "mount": m})
        );
        assert_eq!(written.unwrap(), "8");
        let e = no_size.unwrap_err();
        assert_eq!(e.code, "not_found");
        assert!(e.message.contains("2048, 1048576"), "{e}");
        assert_eq!(relative.unwrap_err().code, "bad_params");
    }

    /// What `setup_hugepages` refuses without looking at the system is refused by
    /// [`Call::decode`], with the words the call used to answer with when run.
    #[test]
    fn decode_refuses_a_mount_point_that_is_not_absolute() {
        use crate::server::Call;
        for (params, message) in [
            (
                json!({"count": 8, "mount": "hugepages"}),
                "mount \"hugepages\" is not an absolute path",
            ),
            (
                json!({"count": 8, "mount": ""}),
                "mount \"\" is not an absolute path",
            ),
            (
                json!({"count": 8, "mount": "/dev/huge\0"}),
                "mount \"/dev/huge\\0\" is not an absolute path",
            ),
        ] {
            let e = Call::decode("setup_hugepages", params.clone()).unwrap_err();
            assert_eq!(
                (e.code.as_str(), e.message.as_str()),
                ("bad_params", message),
                "{params}"
            );
        }
        // Sizes and counts are the kernel's to refuse (a size it lacks is `not_found`).
        let Ok(Call::SetupHugepages(h)) =
            Call::decode("setup_hugepages", json!({"size_kb": 3, "count": 0}))
        else {
            panic!("not decoded");
        };
        assert_eq!(
            (h.size_kb(), h.count(), h.mount()),
            (3, 0, Path::new("/dev/hugepages"))
        );
    }
}
