//! Creating and removing VFs through `sriov_numvfs`.

use std::time::{Duration, Instant};

use crate::pci::{PciAddr, PciDevice, Result, Sysfs, SysfsError};

/// Sets PF `pf`'s number of VFs to `n` and waits until sysfs shows exactly those VFs.
/// A change between two non-zero counts goes through 0, as the kernel requires. Returns the PF
/// as it is afterwards.
pub fn set_num_vfs(sys: &Sysfs, pf: PciAddr, n: u32) -> Result<PciDevice> {
    let d = sys.device(pf)?;
    let Some(sr) = &d.sriov else {
        return Err(SysfsError::Invalid(format!(
            "{pf}: not an SR-IOV physical function (no sriov_totalvfs)"
        )));
    };
    if n > sr.total_vfs {
        return Err(SysfsError::Invalid(format!(
            "{pf}: {n} VFs asked, sriov_totalvfs is {}",
            sr.total_vfs
        )));
    }
    if sr.num_vfs == n {
        return Ok(d);
    }
    let path = sys.device_dir(pf).join("sriov_numvfs");
    if sr.num_vfs != 0 && n != 0 {
        sys.write(&path, "0")?;
        sys.write(&path, &n.to_string()).map_err(|e| {
            SysfsError::Invalid(format!(
                "{e}; {pf} is left with 0 VFs (the count went through 0)"
            ))
        })?;
    } else {
        sys.write(&path, &n.to_string())?;
    }
    let t0 = Instant::now();
    loop {
        let d = sys.device(pf)?;
        let shown = d.sriov.as_ref().map_or(0, |s| s.vfs.len());
        if shown == n as usize {
            return Ok(d);
        }
        if t0.elapsed() > sys.settle_time() {
            return Err(SysfsError::Invalid(format!(
                "{pf}: sriov_numvfs is {n} but sysfs shows {shown} VFs after {:?}",
                sys.settle_time()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The VFs of `pf` that setting its count to `n` removes: all of them, on any change (one
/// between two non-zero counts goes through 0).
pub fn vfs_removed(pf: &PciDevice, n: u32) -> Vec<PciAddr> {
    match &pf.sriov {
        Some(sr) if sr.num_vfs != n => sr.vfs.iter().map(|(_, a)| *a).collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeTree;

    #[test]
    fn counts_beyond_totalvfs_and_non_pfs_are_refused() {
        let t = FakeTree::new();
        let pf = t.pf("0000:03:00.0", "ens1f0", 7, 2, 10);
        let s = t.sysfs();
        let e = set_num_vfs(&s, pf, 8).unwrap_err().to_string();
        assert!(
            e.contains("0000:03:00.0: 8 VFs asked, sriov_totalvfs is 7"),
            "{e}"
        );
        // Same count: nothing written.
        std::fs::write(s.device_dir(pf).join("sriov_numvfs"), "2").unwrap();
        set_num_vfs(&s, pf, 2).unwrap();
        let vf = "0000:03:10.0".parse().unwrap();
        let e = set_num_vfs(&s, vf, 1).unwrap_err().to_string();
        assert!(e.contains("not an SR-IOV physical function"), "{e}");
        // What a change removes: every VF, up or down; nothing when the count stays.
        let d = s.device(pf).unwrap();
        assert_eq!(vfs_removed(&d, 2), Vec::<PciAddr>::new());
        assert_eq!(vfs_removed(&d, 0).len(), 2);
        assert_eq!(vfs_removed(&d, 3).len(), 2);
        assert_eq!(
            vfs_removed(&s.device(vf).unwrap(), 0),
            Vec::<PciAddr>::new()
        );
    }
}
