//! Handing out devices: a per-device lock so two allocations never take the same VF, and
//! allocation records on disk that survive a restart of whoever allocates (the CNI plugin is a
//! new process each call) and are freed when their owner, a network namespace, is gone.
//!
//! Layout under the state directory (default `/run/torii/vfio`):
//! `locks/<addr>.lock` (flock, held while a device's record is checked or changed) and
//! `alloc/<addr>.json` (the record: owner, when, the device's state before it was handed out).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::pci::{PciAddr, PciDevice, Sysfs};
use crate::select::Selector;
use crate::state::VfState;

pub const DEFAULT_STATE_DIR: &str = "/run/torii/vfio";
/// Where torii-cni records its allocations with its default `stateDir`.
pub const CNI_STATE_DIR: &str = "/var/lib/cni/torii/.vfio";

/// Who holds a device: a network namespace, known by its path and identity (device and inode
/// of the namespace file, so a new namespace at the same path is another owner).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub netns: PathBuf,
    pub netns_dev: u64,
    pub netns_ino: u64,
    /// Free text: a container id, an interface name.
    pub tag: String,
}

impl Owner {
    /// The owner whose namespace is at `netns` now.
    pub fn of_netns(netns: &Path, tag: &str) -> io::Result<Owner> {
        let m = fs::metadata(netns)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", netns.display())))?;
        Ok(Owner {
            netns: netns.to_path_buf(),
            netns_dev: m.dev(),
            netns_ino: m.ino(),
            tag: tag.to_string(),
        })
    }

    /// Whether the namespace still exists (same path, same namespace). Only a path that is
    /// gone, or is now another namespace, counts as dead: an error reading it (permissions, no
    /// memory) says nothing of the owner, which is then taken as alive.
    pub fn is_alive(&self) -> bool {
        match fs::metadata(&self.netns) {
            Ok(m) => m.dev() == self.netns_dev && m.ino() == self.netns_ino,
            Err(e) => e.kind() != io::ErrorKind::NotFound,
        }
    }
}

/// One device handed out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    pub addr: PciAddr,
    pub owner: Owner,
    /// Seconds since the epoch.
    pub since: u64,
    /// The VF's state before it was handed out, restored on release.
    pub saved: Option<VfState>,
}

#[derive(Debug, thiserror::Error)]
pub enum AllocError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{}", none_free(*.candidates, *.busy, *.unreadable))]
    NoneFree {
        candidates: usize,
        /// Locked by another allocator at the time: may be free a moment later.
        busy: usize,
        /// With a record that cannot be read, so taken as allocated.
        unreadable: usize,
    },
    #[error("no device matches the selectors")]
    NoMatch,
    #[error("{0} is not allocated")]
    NotAllocated(PciAddr),
    #[error("{addr}: {what}")]
    Device { addr: PciAddr, what: String },
    #[error(transparent)]
    Sysfs(#[from] crate::pci::SysfsError),
}

fn none_free(candidates: usize, busy: usize, unreadable: usize) -> String {
    let mut m = format!(
        "no free device matches the selectors ({candidates} candidates: {} allocated",
        candidates - busy - unreadable
    );
    if busy > 0 {
        m += &format!(", {busy} being changed by another allocator, try again");
    }
    if unreadable > 0 {
        m += &format!(", {unreadable} with an unreadable record");
    }
    m + ")"
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> AllocError + '_ {
    move |source| AllocError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// An exclusive flock on a device's lock file, released on drop.
struct DeviceLock {
    _file: File,
}

impl DeviceLock {
    /// Waits for the lock: its holder lets go within one save or restore.
    fn take(path: &Path) -> Result<DeviceLock, AllocError> {
        Self::lock(path, libc::LOCK_EX).map(|l| l.expect("a blocking flock returns with it"))
    }

    /// The lock if it is free now (`None`: another allocator holds it).
    fn try_take(path: &Path) -> Result<Option<DeviceLock>, AllocError> {
        Self::lock(path, libc::LOCK_EX | libc::LOCK_NB)
    }

    fn lock(path: &Path, op: libc::c_int) -> Result<Option<DeviceLock>, AllocError> {
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(io_at(path))?;
        loop {
            // SAFETY: flock on an fd we own.
            if unsafe { libc::flock(f.as_raw_fd(), op) } == 0 {
                return Ok(Some(DeviceLock { _file: f }));
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EWOULDBLOCK) => return Ok(None),
                _ => return Err(io_at(path)(e)),
            }
        }
    }
}

/// Devices' locks held together (see [`Allocator::hold`]); released on drop.
pub struct Held {
    _locks: Vec<DeviceLock>,
}

/// The allocation records under a state directory.
pub struct Allocator {
    dir: PathBuf,
}

impl Allocator {
    pub fn new(dir: impl Into<PathBuf>) -> Result<Allocator, AllocError> {
        let dir = dir.into();
        for d in [dir.join("locks"), dir.join("alloc")] {
            fs::create_dir_all(&d).map_err(io_at(&d))?;
        }
        Ok(Allocator { dir })
    }

    fn lock_path(&self, a: PciAddr) -> PathBuf {
        self.dir.join("locks").join(format!("{a}.lock"))
    }

    fn record_path(&self, a: PciAddr) -> PathBuf {
        self.dir.join("alloc").join(format!("{a}.json"))
    }

    fn read_record(&self, a: PciAddr) -> Result<Option<Allocation>, AllocError> {
        let p = self.record_path(a);
        match fs::read_to_string(&p) {
            Ok(t) => serde_json::from_str(&t)
                .map(Some)
                .map_err(|e| io_at(&p)(io::Error::new(io::ErrorKind::InvalidData, e))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_at(&p)(e)),
        }
    }

    /// Takes the locks of `addrs` (waiting for each), so that none of them is allocated or
    /// released until the returned guard is dropped: for changes that remove the devices.
    pub fn hold(&self, addrs: &[PciAddr]) -> Result<Held, AllocError> {
        let mut sorted = addrs.to_vec();
        // One order for everyone who takes several: no deadlock between two holders.
        sorted.sort();
        sorted.dedup();
        let locks = sorted
            .iter()
            .map(|a| DeviceLock::take(&self.lock_path(*a)))
            .collect::<Result<_, _>>()?;
        Ok(Held { _locks: locks })
    }

    /// The allocation of `addr`, if it has one.
    pub fn get(&self, addr: PciAddr) -> Result<Option<Allocation>, AllocError> {
        self.read_record(addr)
    }

    /// Every allocation on record, and the records that could not be read (each error names
    /// its file); one bad record does not hide the others.
    pub fn list(&self) -> Result<(Vec<Allocation>, Vec<AllocError>), AllocError> {
        let dir = self.dir.join("alloc");
        let (mut out, mut bad) = (Vec::new(), Vec::new());
        for e in fs::read_dir(&dir).map_err(io_at(&dir))? {
            let name = e.map_err(io_at(&dir))?.file_name();
            let Some(a) = name
                .to_string_lossy()
                .strip_suffix(".json")
                .and_then(|s| s.parse().ok())
            else {
                continue;
            };
            match self.read_record(a) {
                Ok(r) => out.extend(r),
                Err(e) => bad.push(e),
            }
        }
        out.sort_by_key(|a| a.addr);
        Ok((out, bad))
    }

    /// Takes the first free device `selector` picks for `owner`. `save` reads the device's
    /// state to restore on release (`None`: nothing to restore); it runs under the device's
    /// lock, before the record is written. A device another allocator is working on is passed
    /// over rather than waited for, and so is one whose record cannot be read.
    pub fn allocate(
        &self,
        sys: &Sysfs,
        selector: &Selector,
        owner: &Owner,
        mut save: impl FnMut(&PciDevice) -> Result<Option<VfState>, String>,
    ) -> Result<Allocation, AllocError> {
        let all = sys.devices()?;
        let candidates = selector.select(&all);
        if candidates.is_empty() {
            return Err(AllocError::NoMatch);
        }
        let (mut busy, mut unreadable) = (0, 0);
        for d in &candidates {
            let Some(_lock) = DeviceLock::try_take(&self.lock_path(d.addr))? else {
                busy += 1;
                continue;
            };
            match self.read_record(d.addr) {
                Ok(None) => {}
                Ok(Some(_)) => continue,
                Err(_) => {
                    unreadable += 1;
                    continue;
                }
            }
            let saved = save(d).map_err(|what| AllocError::Device { addr: d.addr, what })?;
            let a = Allocation {
                addr: d.addr,
                owner: owner.clone(),
                since: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
                saved,
            };
            self.write_record(&a)?;
            return Ok(a);
        }
        Err(AllocError::NoneFree {
            candidates: candidates.len(),
            busy,
            unreadable,
        })
    }

    /// Writes the record whole or not at all (a temporary file renamed over it).
    fn write_record(&self, a: &Allocation) -> Result<(), AllocError> {
        let p = self.record_path(a.addr);
        let tmp = p.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(a).expect("allocation serializes");
        let mut f = File::create(&tmp).map_err(io_at(&tmp))?;
        f.write_all(&text)
            .and_then(|_| f.sync_all())
            .map_err(io_at(&tmp))?;
        fs::rename(&tmp, &p).map_err(io_at(&p))
    }

    /// Releases `addr`: `restore` puts back its saved state (under the device's lock), then
    /// the record goes. A failed restore keeps the record, so the release can be retried.
    pub fn release(
        &self,
        addr: PciAddr,
        restore: impl FnOnce(&Allocation) -> Result<(), String>,
    ) -> Result<Allocation, AllocError> {
        let _lock = DeviceLock::take(&self.lock_path(addr))?;
        let a = self
            .read_record(addr)?
            .ok_or(AllocError::NotAllocated(addr))?;
        restore(&a).map_err(|what| AllocError::Device { addr, what })?;
        let p = self.record_path(addr);
        fs::remove_file(&p).map_err(io_at(&p))?;
        Ok(a)
    }

    /// Releases every allocation whose owner is gone; returns what was released and what
    /// failed (unreadable records among them, left in place for an operator to look at).
    pub fn collect_garbage(
        &self,
        mut restore: impl FnMut(&Allocation) -> Result<(), String>,
    ) -> Result<(Vec<Allocation>, Vec<AllocError>), AllocError> {
        let (records, mut failed) = self.list()?;
        let mut freed = Vec::new();
        for a in records {
            if a.owner.is_alive() {
                continue;
            }
            match self.release(a.addr, |r| {
                // Someone may have re-allocated it between the listing and the lock.
                if r.owner != a.owner {
                    return Err("re-allocated meanwhile".into());
                }
                restore(r)
            }) {
                Ok(r) => freed.push(r),
                Err(e) => failed.push(e),
            }
        }
        Ok((freed, failed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeTree;
    use crate::select::Selectors;
    use std::sync::Arc;

    fn selector(pf_names: &str) -> Selector {
        Selectors {
            pf_names: vec![pf_names.into()],
            ..Default::default()
        }
        .compile()
        .unwrap()
    }

    #[test]
    fn concurrent_allocations_never_share_a_device() {
        let t = Arc::new(FakeTree::new());
        t.pf("0000:03:00.0", "ens1f0", 7, 4, 10);
        let dir = t.root().join("state");
        let ns = t.root().join("ns");
        fs::write(&ns, "").unwrap();
        let owner = Owner::of_netns(&ns, "pod").unwrap();
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (t, dir, owner) = (t.clone(), dir.clone(), owner.clone());
                std::thread::spawn(move || {
                    Allocator::new(dir).unwrap().allocate(
                        &t.sysfs(),
                        &selector("ens1f0"),
                        &owner,
                        |_| Ok(None),
                    )
                })
            })
            .collect();
        let results: Vec<_> = threads.into_iter().map(|h| h.join().unwrap()).collect();
        let mut got: Vec<PciAddr> = results
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .map(|a| a.addr)
            .collect();
        got.sort();
        got.dedup();
        assert_eq!(got.len(), 4, "{results:?}");
        assert_eq!(
            results
                .iter()
                .filter(|r| matches!(r, Err(AllocError::NoneFree { candidates: 4, .. })))
                .count(),
            4
        );
    }

    #[test]
    fn records_survive_a_restart_and_gc_frees_the_dead_owners() {
        let t = FakeTree::new();
        t.pf("0000:03:00.0", "ens1f0", 7, 2, 10);
        let dir = t.root().join("state");
        let (ns1, ns2) = (t.root().join("ns1"), t.root().join("ns2"));
        fs::write(&ns1, "").unwrap();
        fs::write(&ns2, "").unwrap();
        let s = t.sysfs();
        let al = Allocator::new(&dir).unwrap();
        let a1 = al
            .allocate(
                &s,
                &selector("ens1f0"),
                &Owner::of_netns(&ns1, "a").unwrap(),
                |_| Ok(None),
            )
            .unwrap();
        let a2 = al
            .allocate(
                &s,
                &selector("ens1f0"),
                &Owner::of_netns(&ns2, "b").unwrap(),
                |_| Ok(None),
            )
            .unwrap();
        assert_ne!(a1.addr, a2.addr);
        // A new allocator (a new process) sees both.
        let al = Allocator::new(&dir).unwrap();
        assert_eq!(al.list().unwrap().0, vec![a1.clone(), a2.clone()]);
        assert!(matches!(
            al.allocate(
                &s,
                &selector("ens1f0"),
                &Owner::of_netns(&ns1, "c").unwrap(),
                |_| Ok(None)
            ),
            Err(AllocError::NoneFree {
                candidates: 2,
                busy: 0,
                unreadable: 0
            })
        ));
        // ns1 goes; a namespace of the same path but another identity is another owner.
        fs::remove_file(&ns1).unwrap();
        let restored = std::sync::Mutex::new(Vec::new());
        let (freed, failed) = al
            .collect_garbage(|a| {
                restored.lock().unwrap().push(a.addr);
                Ok(())
            })
            .unwrap();
        assert!(failed.is_empty(), "{failed:?}");
        assert_eq!(freed, vec![a1.clone()]);
        assert_eq!(*restored.lock().unwrap(), vec![a1.addr]);
        assert_eq!(al.list().unwrap().0, vec![a2.clone()]);
        // A release whose restore fails keeps the record.
        let e = al
            .release(a2.addr, |_| Err("driver would not bind".into()))
            .unwrap_err();
        assert_eq!(e.to_string(), format!("{}: driver would not bind", a2.addr));
        assert_eq!(al.list().unwrap().0.len(), 1);
        al.release(a2.addr, |_| Ok(())).unwrap();
        assert!(al.list().unwrap().0.is_empty());
        assert!(matches!(
            al.release(a2.addr, |_| Ok(())),
            Err(AllocError::NotAllocated(_))
        ));
    }

    #[test]
    fn busy_devices_and_unreadable_records_are_passed_over() {
        let t = FakeTree::new();
        t.pf("0000:03:00.0", "ens1f0", 7, 3, 10);
        let dir = t.root().join("state");
        let ns = t.root().join("ns");
        fs::write(&ns, "").unwrap();
        let owner = Owner::of_netns(&ns, "pod").unwrap();
        let (s, al) = (t.sysfs(), Allocator::new(&dir).unwrap());
        let vfs: Vec<PciAddr> = ["0000:03:10.0", "0000:03:10.2", "0000:03:10.4"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        // VF 0 is being changed by another allocator (its lock held), VF 1 has a record
        // that cannot be read: VF 2 is taken, without waiting.
        let held = DeviceLock::take(&al.lock_path(vfs[0])).unwrap();
        fs::write(al.record_path(vfs[1]), "{ not json").unwrap();
        let a = al
            .allocate(&s, &selector("ens1f0"), &owner, |_| Ok(None))
            .unwrap();
        assert_eq!(a.addr, vfs[2]);
        let e = al
            .allocate(&s, &selector("ens1f0"), &owner, |_| Ok(None))
            .unwrap_err();
        assert!(
            matches!(
                e,
                AllocError::NoneFree {
                    candidates: 3,
                    busy: 1,
                    unreadable: 1
                }
            ),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            "no free device matches the selectors (3 candidates: 1 allocated, 1 being changed \
             by another allocator, try again, 1 with an unreadable record)"
        );
        // The listing shows the good record and names the bad one; so does GC, which leaves
        // the bad record where it is.
        let (good, bad) = al.list().unwrap();
        assert_eq!(good, vec![a.clone()]);
        assert_eq!(bad.len(), 1);
        assert!(
            bad[0].to_string().contains("0000:03:10.2.json"),
            "{}",
            bad[0]
        );
        let (_, failed) = al.collect_garbage(|_| Ok(())).unwrap();
        assert_eq!(failed.len(), 1);
        assert!(al.record_path(vfs[1]).exists());
        assert_eq!(al.get(vfs[2]).unwrap(), Some(a));
        assert_eq!(al.get(vfs[0]).unwrap(), None);
        // Held for a change that removes it (as `vfs` does), VF 0 stays busy.
        drop(held);
        let hold = al.hold(&[vfs[0], vfs[0]]).unwrap();
        assert!(matches!(
            al.allocate(&s, &selector("ens1f0"), &owner, |_| Ok(None)),
            Err(AllocError::NoneFree { busy: 1, .. })
        ));
        // Released by its holder, VF 0 is free again.
        drop(hold);
        let a0 = al
            .allocate(&s, &selector("ens1f0"), &owner, |_| Ok(None))
            .unwrap();
        assert_eq!(a0.addr, vfs[0]);
    }
}
