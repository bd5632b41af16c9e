//! The host's disks: a virtio-blk disk found by its serial or its PCI address (or a device
//! path), waited for, and mounted where the host says (`unmount` is in [`crate::filesystems`]).

use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::mounts;
use crate::protocol::{quote, RpcError};
use crate::server::Roots;

/// The longest virtio-blk serial (`VIRTIO_BLK_ID_BYTES`).
pub const MAX_SERIAL: usize = 20;

/// Which disk.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Source {
    /// A virtio-blk disk's serial (`/sys/block/*/serial`).
    Serial(String),
    /// The PCI address of a virtio-blk device (`0000:00:05.0`; the domain may be left out).
    Pci(String),
    /// A block device node.
    Path(String),
}

/// `mount_block` parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MountBlock {
    pub source: Source,
    pub target: String,
    #[serde(default = "ext4")]
    pub fstype: String,
    /// Mount options, as mount(8) takes them: the generic ones (`noatime`, `nodev`, …)
    /// become flags, the rest goes to the file system.
    #[serde(default)]
    pub options: String,
    #[serde(default)]
    pub read_only: bool,
}

fn ext4() -> String {
    "ext4".into()
}

fn bad(msg: impl Into<String>) -> RpcError {
    RpcError::new("bad_params", msg)
}

fn failed(msg: impl Into<String>) -> RpcError {
    RpcError::new("failed", msg)
}

/// `s`, if it is an absolute path with no NUL.
fn absolute<'a>(what: &str, s: &'a str) -> Result<&'a Path, RpcError> {
    if !s.starts_with('/') || s.contains('\0') {
        return Err(bad(format!("{what} {} is not an absolute path", quote(s))));
    }
    Ok(Path::new(s))
}

/// A PCI address in sysfs's form (`0000:00:05.0`), from that or `00:05.0`.
pub fn pci_address(s: &str) -> Option<String> {
    let s = s.to_ascii_lowercase();
    let full = if s.len() == 7 { format!("0000:{s}") } else { s };
    let b = full.as_bytes();
    let hex = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_hexdigit);
    let ok = b.len() == 12
        && hex(0..4)
        && b[4] == b':'
        && hex(5..7)
        && b[7] == b':'
        && hex(8..10)
        && b[10] == b'.'
        && (b'0'..=b'7').contains(&b[11]);
    ok.then_some(full)
}

/// The entries of `dir`, sorted (none if it cannot be read).
fn entries(dir: &Path) -> Vec<OsString> {
    let mut v: Vec<OsString> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| Some(e.ok()?.file_name())).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// `src` for a message.
fn describe(src: &Source) -> String {
    match src {
        Source::Serial(s) => format!("serial {}", quote(s)),
        Source::Pci(a) => format!("PCI address {}", quote(a)),
        Source::Path(p) => quote(p),
    }
}

/// A disk's [`Source`], checked: a serial of 1 to [`MAX_SERIAL`] bytes, a PCI address in
/// sysfs's form (`0000:00:05.0`, lower case), an absolute path with no NUL. Made only by its
/// `TryFrom<Source>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Disk(Source);

impl TryFrom<Source> for Disk {
    type Error = RpcError;

    fn try_from(src: Source) -> Result<Disk, RpcError> {
        Ok(Disk(match src {
            Source::Serial(s) if s.is_empty() || s.len() > MAX_SERIAL => {
                return Err(bad(format!(
                    "serial {}: a virtio-blk serial has 1 to {MAX_SERIAL} bytes",
                    quote(&s)
                )))
            }
            Source::Pci(a) => Source::Pci(pci_address(&a).ok_or_else(|| {
                bad(format!("{} is not a PCI address (0000:00:05.0)", quote(&a)))
            })?),
            Source::Path(p) => Source::Path(absolute("source path", &p)?.display().to_string()),
            s @ Source::Serial(_) => s,
        }))
    }
}

impl Disk {
    pub fn source(&self) -> &Source {
        &self.0
    }
}

/// One look for disk `d`: its device node, if it is there.
pub fn find_disk(d: &Disk, roots: &Roots) -> Result<Option<PathBuf>, RpcError> {
    let src = &d.0;
    let disks: Vec<OsString> = match src {
        Source::Path(p) => return Ok(Path::new(p).exists().then(|| PathBuf::from(p))),
        Source::Serial(serial) => {
            let block = roots.sys.join("block");
            entries(&block)
                .into_iter()
                .filter(|d| {
                    std::fs::read_to_string(block.join(d).join("serial"))
                        .is_ok_and(|s| s.trim_end_matches('\n') == serial)
                })
                .collect()
        }
        Source::Pci(addr) => {
            let dev = roots.sys.join("bus/pci/devices").join(addr);
            entries(&dev)
                .into_iter()
                .filter(|v| v.to_string_lossy().starts_with("virtio"))
                .flat_map(|v| entries(&dev.join(v).join("block")))
                .collect()
        }
    };
    match &disks[..] {
        [] => Ok(None),
        // The node comes with the disk (devtmpfs), maybe a moment after sysfs shows it.
        [disk] => Ok(Some(roots.dev.join(disk)).filter(|n| n.exists())),
        _ => Err(failed(format!(
            "{} disks match {}: {}",
            disks.len(),
            describe(src),
            disks
                .iter()
                .map(|d| d.to_string_lossy())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// Disk `d`, waited for up to `roots.patience`.
pub fn resolve(d: &Disk, roots: &Roots) -> Result<PathBuf, RpcError> {
    let deadline = Instant::now() + roots.patience;
    loop {
        if let Some(dev) = find_disk(d, roots)? {
            return Ok(dev);
        }
        if Instant::now() >= deadline {
            return Err(RpcError::new(
                "not_found",
                format!("no disk for {} after {:?}", describe(&d.0), roots.patience),
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// The longest file system type `mount_block` takes.
pub const MAX_FSTYPE: usize = 32;

/// `mount_block`, checked: the disk's source, an absolute target, a file system type's name,
/// mount(8)'s options split into flags and the file system's (no bind or propagation, no
/// NUL). Made only by its `TryFrom<MountBlock>`, in [`crate::server::Call::decode`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckedMountBlock {
    disk: Disk,
    target: String,
    fstype: String,
    /// mount(2)'s flags, `MS_RDONLY` included if `read_only`.
    flags: libc::c_ulong,
    data: String,
}

impl TryFrom<MountBlock> for CheckedMountBlock {
    type Error = RpcError;

    fn try_from(m: MountBlock) -> Result<CheckedMountBlock, RpcError> {
        absolute("target", &m.target)?;
        if m.fstype.is_empty()
            || m.fstype.len() > MAX_FSTYPE
            || !m
                .fstype
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return Err(bad(format!(
                "{} is not a file system type",
                quote(&m.fstype)
            )));
        }
        if m.options.contains('\0') {
            return Err(bad("options hold a NUL byte"));
        }
        let o = mounts::parse_options([m.options.as_str()]);
        if o.flags & libc::MS_BIND != 0 || !o.propagation.is_empty() {
            return Err(bad(format!(
                "options {}: bind and propagation options are for `mount`",
                quote(&m.options)
            )));
        }
        Ok(CheckedMountBlock {
            disk: m.source.try_into()?,
            target: m.target,
            fstype: m.fstype,
            flags: o.flags | if m.read_only { libc::MS_RDONLY } else { 0 },
            data: o.data,
        })
    }
}

impl CheckedMountBlock {
    pub fn disk(&self) -> &Disk {
        &self.disk
    }

    /// Absolute, no NUL.
    pub fn target(&self) -> &Path {
        Path::new(&self.target)
    }

    /// 1 to [`MAX_FSTYPE`] of ASCII letters, digits, `.`, `_` and `-`.
    pub fn fstype(&self) -> &str {
        &self.fstype
    }

    /// mount(2)'s flags: never `MS_BIND`.
    pub fn flags(&self) -> libc::c_ulong {
        self.flags
    }

    /// The file system's options, no NUL.
    pub fn data(&self) -> &str {
        &self.data
    }
}

/// `mount_block`.
pub fn mount_block(m: CheckedMountBlock, roots: &Roots) -> Result<Value, RpcError> {
    let target = m.target();
    let device = resolve(&m.disk, roots)?;
    let answer = json!({ "device": device, "target": m.target });
    std::fs::create_dir_all(target)
        .map_err(|e| failed(format!("creating {}: {e}", quote(&m.target))))?;
    // This disk mounted there already (a request sent again): done.
    let shown = quote(&device.to_string_lossy());
    let rdev = std::fs::metadata(&device)
        .map_err(|e| failed(format!("{shown}: {e}")))?
        .rdev();
    let here =
        std::fs::canonicalize(target).map_err(|e| failed(format!("{}: {e}", quote(&m.target))))?;
    let mountinfo = std::fs::read_to_string(&roots.mountinfo).unwrap_or_default();
    if mounts::mounted_at(&mountinfo, &here)
        .is_some_and(|x| x.dev == format!("{}:{}", libc::major(rdev), libc::minor(rdev)))
    {
        return Ok(answer);
    }
    mounts::mount(
        &device.to_string_lossy(),
        target,
        &m.fstype,
        m.flags,
        &m.data,
    )
    .map_err(|e| {
        failed(format!(
            "mounting {shown} on {} ({}): {e}",
            quote(&m.target),
            m.fstype
        ))
    })?;
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A fake sysfs and /dev: vda (serial "root"), vdb (serial "disk1", PCI 0000:00:05.0),
    /// vdc and vdd (both serial "twin"), and vde whose node is missing.
    fn fake() -> (PathBuf, Roots) {
        let root = std::env::temp_dir().join(format!(
            "torii-agent-block-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let (sys, dev) = (root.join("sys"), root.join("dev"));
        for (disk, serial) in [
            ("vda", "root"),
            ("vdb", "disk1"),
            ("vdc", "twin"),
            ("vdd", "twin"),
            ("vde", "late"),
        ] {
            std::fs::create_dir_all(sys.join("block").join(disk)).unwrap();
            std::fs::write(sys.join("block").join(disk).join("serial"), serial).unwrap();
        }
        let pci = sys.join("bus/pci/devices/0000:00:05.0");
        std::fs::create_dir_all(pci.join("virtio3/block/vdb")).unwrap();
        std::fs::create_dir_all(pci.join("driver")).unwrap();
        std::fs::create_dir_all(sys.join("bus/pci/devices/0000:00:06.0/virtio4")).unwrap();
        std::fs::create_dir_all(&dev).unwrap();
        for d in ["vda", "vdb", "vdc", "vdd"] {
            std::fs::write(dev.join(d), "").unwrap();
        }
        let roots = Roots {
            sys,
            dev,
            mountinfo: root.join("mountinfo"),
            patience: Duration::from_millis(200),
        };
        (root, roots)
    }

    #[test]
    fn disks_are_found_by_serial_pci_address_or_path() {
        let (root, roots) = fake();
        let find = |s: Source| resolve(&Disk::try_from(s).unwrap(), &roots);
        let serial = find(Source::Serial("disk1".into()));
        let pci = find(Source::Pci("00:05.0".into()));
        let path = find(Source::Path(roots.dev.join("vda").display().to_string()));
        let twin = find(Source::Serial("twin".into()));
        let t = Instant::now();
        let late = find(Source::Serial("late".into()));
        let waited = t.elapsed();
        let none = find(Source::Pci("0000:00:06.0".into()));
        let missing = find(Source::Serial("nope".into()));
        let _ = std::fs::remove_dir_all(&root);
        assert_eq!(serial.unwrap(), roots.dev.join("vdb"));
        assert_eq!(pci.unwrap(), roots.dev.join("vdb"));
        assert_eq!(path.unwrap(), roots.dev.join("vda"));
        let e = twin.unwrap_err();
        assert_eq!(e.code, "failed");
        assert!(e.message.contains("vdc, vdd"), "{e}");
        // A disk without its node is waited for, then not found.
        assert_eq!(late.unwrap_err().code, "not_found");
        assert!(waited >= roots.patience, "{waited:?}");
        assert_eq!(none.unwrap_err().code, "not_found");
        assert_eq!(missing.unwrap_err().code, "not_found");
    }

    /// What `mount_block` refuses without looking at the system is refused by
    /// [`Call::decode`], with the words the call used to answer with when run.
    #[test]
    fn decode_refuses_bad_sources_targets_types_and_options() {
        use crate::server::Call;
        let mb = |source: Value, target: &str, fstype: &str, options: &str| json!({"source": source, "target": target, "fstype": fstype, "options": options});
        let vdb = || json!({"path": "/dev/vdb"});
        for (params, message) in [
            (
                mb(json!({"serial": ""}), "/mnt", "ext4", ""),
                "serial \"\": a virtio-blk serial has 1 to 20 bytes".to_string(),
            ),
            (
                mb(json!({"serial": "x".repeat(21)}), "/mnt", "ext4", ""),
                format!(
                    "serial \"{}\": a virtio-blk serial has 1 to 20 bytes",
                    "x".repeat(21)
                ),
            ),
            (
                mb(json!({"pci": "0000:00:05"}), "/mnt", "ext4", ""),
                "\"0000:00:05\" is not a PCI address (0000:00:05.0)".into(),
            ),
            (
                mb(json!({"pci": "../../../../etc"}), "/mnt", "ext4", ""),
                "\"../../../../etc\" is not a PCI address (0000:00:05.0)".into(),
            ),
            (
                mb(json!({"pci": "0000:00:05.8"}), "/mnt", "ext4", ""),
                "\"0000:00:05.8\" is not a PCI address (0000:00:05.0)".into(),
            ),
            (
                mb(json!({"path": "vdb"}), "/mnt", "ext4", ""),
                "source path \"vdb\" is not an absolute path".into(),
            ),
            (
                mb(json!({"path": "/dev/vd\0"}), "/mnt", "ext4", ""),
                "source path \"/dev/vd\\0\" is not an absolute path".into(),
            ),
            (
                mb(vdb(), "mnt", "ext4", ""),
                "target \"mnt\" is not an absolute path".into(),
            ),
            (
                mb(vdb(), "/mnt", "ext4 -o x", ""),
                "\"ext4 -o x\" is not a file system type".into(),
            ),
            (
                mb(vdb(), "/mnt", "", ""),
                "\"\" is not a file system type".into(),
            ),
            (
                mb(vdb(), "/mnt", &"x".repeat(33), ""),
                format!("\"{}\" is not a file system type", "x".repeat(33)),
            ),
            (
                mb(vdb(), "/mnt", "ext4", "noatime\0"),
                "options hold a NUL byte".into(),
            ),
            (
                mb(vdb(), "/mnt", "ext4", "noatime,bind"),
                "options \"noatime,bind\": bind and propagation options are for `mount`".into(),
            ),
            (
                mb(vdb(), "/mnt", "ext4", "rbind"),
                "options \"rbind\": bind and propagation options are for `mount`".into(),
            ),
            (
                mb(vdb(), "/mnt", "ext4", "shared"),
                "options \"shared\": bind and propagation options are for `mount`".into(),
            ),
            // The target is checked before the source, as it was.
            (
                mb(json!({"serial": ""}), "rel", "ext4", ""),
                "target \"rel\" is not an absolute path".into(),
            ),
        ] {
            let e = Call::decode("mount_block", params.clone()).unwrap_err();
            assert_eq!(
                (e.code.as_str(), e.message.as_str()),
                ("bad_params", message.as_str()),
                "{params}"
            );
        }
        // Decoded: the PCI address in sysfs's form, the flags with read_only's.
        let p = json!({"source": {"pci": "00:1F.7"}, "target": "/mnt", "fstype": "xfs",
            "options": "noatime,nouuid", "read_only": true});
        let Ok(Call::MountBlock(m)) = Call::decode("mount_block", p) else {
            panic!("not decoded");
        };
        assert_eq!(m.disk().source(), &Source::Pci("0000:00:1f.7".into()));
        assert_eq!(m.flags(), libc::MS_NOATIME | libc::MS_RDONLY);
        assert_eq!((m.fstype(), m.data()), ("xfs", "nouuid"));
        assert_eq!(pci_address("0000:00:1F.7").as_deref(), Some("0000:00:1f.7"));
    }
}
