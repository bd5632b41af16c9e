//! mount(2), umount(2) and reading /proc/self/mountinfo, for PID 1's file systems, the
//! host's disks and hugetlbfs.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn cstr(s: &[u8]) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte"))
}

/// mount(2): `src` on `target` as `fstype`, with `flags` and the file system's `data`.
pub fn mount(
    src: &str,
    target: &Path,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> io::Result<()> {
    let (src, tgt, fs, data) = (
        cstr(src.as_bytes())?,
        cstr(target.as_os_str().as_bytes())?,
        cstr(fstype.as_bytes())?,
        cstr(data.as_bytes())?,
    );
    // SAFETY: mount(2) with NUL-terminated strings that live across the call; the data is a
    // NUL-terminated string too, as every file system that takes text options expects.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            tgt.as_ptr(),
            fs.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// umount(2).
pub fn umount(target: &Path) -> io::Result<()> {
    let t = cstr(target.as_os_str().as_bytes())?;
    // SAFETY: umount2(2) with a NUL-terminated string that lives across the call.
    if unsafe { libc::umount2(t.as_ptr(), 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A mount, as /proc/self/mountinfo lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    /// `major:minor` of the mounted file system.
    pub dev: String,
    pub fstype: String,
}

/// mountinfo's escapes (`\040` for a space, …) undone.
fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b.get(i + 1..i + 4).and_then(|d| {
            let d = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(d, 8).ok()
        });
        match (b[i], oct) {
            (b'\\', Some(c)) => {
                out.push(c);
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

/// What is mounted at `target` (the topmost mount there), from mountinfo's text.
pub fn mounted_at(mountinfo: &str, target: &Path) -> Option<Mount> {
    mountinfo.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        // id parent major:minor root mount-point options [optional…] - fstype source …
        let sep = f.iter().position(|x| *x == "-")?;
        if unescape(f.get(4)?) != target.as_os_str().as_bytes() {
            return None;
        }
        Some(Mount {
            dev: f.get(2)?.to_string(),
            fstype: f.get(sep + 1)?.to_string(),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_is_read() {
        let t = "22 1 0:21 / /proc rw,nosuid - proc proc rw\n\
                 40 22 254:16 / /mnt/my\\040data rw,relatime shared:1 - ext4 /dev/vdb rw\n\
                 41 22 0:50 / /dev/hugepages rw - hugetlbfs hugetlbfs rw,pagesize=2M\n\
                 42 41 0:51 / /dev/hugepages rw - hugetlbfs hugetlbfs rw,pagesize=1024M\n\
                 garbage\n";
        assert_eq!(
            mounted_at(t, Path::new("/mnt/my data")),
            Some(Mount {
                dev: "254:16".into(),
                fstype: "ext4".into()
            })
        );
        assert_eq!(
            mounted_at(t, Path::new("/dev/hugepages")).unwrap().dev,
            "0:51"
        );
        assert_eq!(mounted_at(t, Path::new("/mnt")), None);
        assert_eq!(unescape("a\\134b\\0"), b"a\\b\\0");
    }
}
