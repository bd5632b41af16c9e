//! The guest image: Debian's generic kernel and an initramfs whose init is torii-agent, with
//! static busybox for the commands pods run and the kernel modules the VM's devices need.
//!
//! Reproducible: the same kernel package, agent, busybox and module list give the same bytes
//! (entries sorted, owners, times and inode numbers fixed, gzip without a timestamp). The
//! manifest records what went in, with digests.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;
use sha2::{Digest, Sha256};

/// The modules a pod VM's devices need (their dependencies are added from modules.dep).
pub const MODULES: &[&str] = &[
    "virtio_net",
    "virtio_blk",
    "ext4",
    "crc32c_generic",
    "af_packet",
    "8021q",
    "vmw_vsock_virtio_transport",
];

#[derive(Debug, thiserror::Error)]
#[error("image: {0}")]
pub struct ImageError(pub String);

fn e<T>(msg: impl Into<String>) -> Result<T, ImageError> {
    Err(ImageError(msg.into()))
}

fn io(ctx: impl std::fmt::Display) -> impl FnOnce(io::Error) -> ImageError {
    move |err| ImageError(format!("{ctx}: {err}"))
}

/// What to build from.
#[derive(Clone, Debug)]
pub struct ImageConfig {
    pub out: PathBuf,
    /// An unpacked `linux-image-*` package; `None`: the bookworm-backports kernel is downloaded
    /// and unpacked into `<out>/kernel` (once).
    pub kernel_root: Option<PathBuf>,
    /// A statically linked torii-agent.
    pub agent: PathBuf,
    /// A statically linked busybox.
    pub busybox: PathBuf,
    pub modules: Vec<String>,
}

/// What was built.
#[derive(Clone, Debug, Serialize)]
pub struct Manifest {
    pub kernel_version: String,
    pub kernel_sha256: String,
    pub initramfs_sha256: String,
    pub agent_sha256: String,
    pub busybox_sha256: String,
    /// Loaded in this order by the agent (`/lib/modules/torii.order`).
    pub modules: Vec<String>,
}

fn sha256(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether an ELF file asks for a program interpreter (is dynamically linked).
pub fn is_dynamic_elf(data: &[u8]) -> Result<bool, String> {
    if data.len() < 64 || &data[..4] != b"\x7fELF" || data[4] != 2 || data[5] != 1 {
        return Err("not a 64-bit little-endian ELF file".into());
    }
    let u16_at = |o: usize| u16::from_le_bytes([data[o], data[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(data[32..40].try_into().expect("8 bytes")) as usize;
    let (phentsize, phnum) = (u16_at(54), u16_at(56));
    for i in 0..phnum {
        let o = phoff
            .checked_add(i.checked_mul(phentsize).ok_or("bad program headers")?)
            .ok_or("bad program headers")?;
        if o.checked_add(4).is_none_or(|end| end > data.len()) {
            return Err("program headers past the end".into());
        }
        if u32::from_le_bytes(data[o..o + 4].try_into().expect("4 bytes")) == 3 {
            return Ok(true); // PT_INTERP
        }
    }
    Ok(false)
}

fn read_static(what: &str, p: &Path, hint: &str) -> Result<Vec<u8>, ImageError> {
    let data = std::fs::read(p).map_err(io(format!("{what} {}", p.display())))?;
    match is_dynamic_elf(&data) {
        Ok(false) => Ok(data),
        Ok(true) => e(format!(
            "{what} {} is dynamically linked; the initramfs has no libc: {hint}",
            p.display()
        )),
        Err(m) => e(format!("{what} {}: {m}", p.display())),
    }
}

/// Runs a command, its stdout on success.
fn run(cmd: &mut Command) -> Result<Vec<u8>, ImageError> {
    let what = format!("{cmd:?}");
    let o = cmd.output().map_err(io(&what))?;
    if !o.status.success() {
        return e(format!(
            "{what} failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    Ok(o.stdout)
}

/// Downloads and unpacks the bookworm-backports generic kernel into `dir` (once).
fn fetch_kernel(dir: &Path) -> Result<PathBuf, ImageError> {
    let root = dir.join("root");
    if root.join("boot").is_dir() {
        return Ok(root);
    }
    let show = run(Command::new("apt-cache").args([
        "show",
        "-o",
        "APT::Default-Release=bookworm-backports",
        "linux-image-amd64",
    ]))?;
    // The backports metapackage depends on exactly one ABI package: linux-image-<ver>-amd64.
    let text = String::from_utf8_lossy(&show);
    let pkg = text
        .split("\n\n")
        .find(|s| {
            s.lines()
                .any(|l| l.starts_with("Version:") && l.contains("bpo12"))
        })
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Depends: ")))
        .and_then(|d| d.split([' ', ',']).next())
        .map(str::to_string)
        .ok_or_else(|| {
            ImageError(
                "no bookworm-backports linux-image-amd64 (is bookworm-backports enabled? \
                 run scripts/setup)"
                    .into(),
            )
        })?;
    let tmp = dir.join("download");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io(tmp.display()))?;
    run(Command::new("apt-get")
        .arg("download")
        .arg(&pkg)
        .current_dir(&tmp))?;
    let deb = std::fs::read_dir(&tmp)
        .map_err(io(tmp.display()))?
        .filter_map(Result::ok)
        .map(|d| d.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| ImageError(format!("apt-get download {pkg} gave no package")))?;
    let part = dir.join("root.part");
    let _ = std::fs::remove_dir_all(&part);
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&part))?;
    std::fs::rename(&part, &root).map_err(io(root.display()))?;
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(root)
}

/// The kernel version of an unpacked kernel package (its one `boot/vmlinuz-*`).
fn kernel_version(root: &Path) -> Result<String, ImageError> {
    let boot = root.join("boot");
    let mut v: Vec<String> = std::fs::read_dir(&boot)
        .map_err(io(boot.display()))?
        .filter_map(Result::ok)
        .filter_map(|d| {
            d.file_name()
                .to_str()?
                .strip_prefix("vmlinuz-")
                .map(str::to_string)
        })
        .collect();
    match v.len() {
        1 => Ok(v.remove(0)),
        n => e(format!("{}: {n} kernels, expected one", boot.display())),
    }
}

/// Resolves `wanted` and their dependencies through modules.dep, dependencies first; the
/// paths are relative to the modules folder.
/// A wanted module named in `modules_builtin` (the kernel's modules.builtin) is skipped.
pub fn resolve_modules(
    modules_dep: &str,
    modules_builtin: &str,
    wanted: &[String],
) -> Result<Vec<String>, ImageError> {
    let norm = |s: &str| s.replace('-', "_");
    let mut deps: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    for line in modules_dep.lines() {
        let Some((file, rest)) = line.split_once(':') else {
            continue;
        };
        let name = Path::new(file)
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.split(".ko").next())
            .map(norm)
            .unwrap_or_default();
        deps.insert(
            name,
            (
                file.to_string(),
                rest.split_whitespace().map(str::to_string).collect(),
            ),
        );
    }
    let by_file: BTreeMap<&str, &str> = deps
        .iter()
        .map(|(n, (f, _))| (f.as_str(), n.as_str()))
        .collect();
    let mut order = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    // Iterative depth-first walk; modules.dep lists are acyclic but the input is not trusted.
    fn visit(
        name: &str,
        deps: &BTreeMap<String, (String, Vec<String>)>,
        by_file: &BTreeMap<&str, &str>,
        seen: &mut std::collections::BTreeSet<String>,
        order: &mut Vec<String>,
        depth: usize,
    ) -> Result<(), ImageError> {
        if depth > 64 {
            return e(format!("modules.dep: dependencies of {name} nest too deep"));
        }
        let Some((file, ds)) = deps.get(name) else {
            return Ok(()); // built into the kernel
        };
        if !seen.insert(name.to_string()) {
            return Ok(());
        }
        for d in ds {
            if let Some(n) = by_file.get(d.as_str()) {
                visit(n, deps, by_file, seen, order, depth + 1)?;
            }
        }
        order.push(file.clone());
        Ok(())
    }
    for w in wanted {
        let n = norm(w);
        if !deps.contains_key(&n) {
            let builtin = modules_builtin.lines().any(|l| {
                Path::new(l)
                    .file_name()
                    .and_then(|f| f.to_str())
                    .is_some_and(|f| norm(f.split(".ko").next().unwrap_or_default()) == n)
            });
            if builtin {
                continue;
            }
            return e(format!("module {w}: neither in modules.dep nor built in"));
        }
        visit(&n, &deps, &by_file, &mut seen, &mut order, 0)?;
    }
    Ok(order)
}

/// A deterministic cpio archive in the kernel's `newc` format.
#[derive(Default)]
pub struct Cpio {
    entries: BTreeMap<String, (u32, u32, Vec<u8>)>, // path -> (mode, rdev major:minor, data)
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

impl Cpio {
    fn parents(&mut self, path: &str) {
        let mut p = Path::new(path).parent();
        while let Some(d) = p.and_then(|d| d.to_str()).filter(|d| !d.is_empty()) {
            self.entries
                .entry(d.to_string())
                .or_insert((S_IFDIR | 0o755, 0, Vec::new()));
            p = Path::new(d).parent();
        }
    }

    pub fn dir(&mut self, path: &str) {
        self.parents(path);
        self.entries
            .insert(path.into(), (S_IFDIR | 0o755, 0, Vec::new()));
    }

    pub fn file(&mut self, path: &str, mode: u32, data: Vec<u8>) {
        self.parents(path);
        self.entries.insert(path.into(), (S_IFREG | mode, 0, data));
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        self.parents(path);
        self.entries.insert(
            path.into(),
            (S_IFLNK | 0o777, 0, target.as_bytes().to_vec()),
        );
    }

    pub fn char_dev(&mut self, path: &str, mode: u32, major: u32, minor: u32) {
        self.parents(path);
        self.entries.insert(
            path.into(),
            (S_IFCHR | mode, (major << 16) | minor, Vec::new()),
        );
    }

    /// The archive: entries in path order (parents first), then the trailer.
    pub fn write(&self, w: &mut impl Write) -> io::Result<()> {
        fn entry(
            w: &mut impl Write,
            ino: u32,
            name: &str,
            mode: u32,
            rdev: u32,
            data: &[u8],
        ) -> io::Result<()> {
            let nlink = if mode & 0o170000 == S_IFDIR { 2 } else { 1 };
            let fields = [
                ino,
                mode,
                0, // uid
                0, // gid
                nlink,
                0, // mtime
                data.len() as u32,
                0,
                0,
                rdev >> 16,
                rdev & 0xffff,
                name.len() as u32 + 1,
                0,
            ];
            let mut h = String::from("070701");
            for f in fields {
                h.push_str(&format!("{f:08x}"));
            }
            w.write_all(h.as_bytes())?;
            w.write_all(name.as_bytes())?;
            w.write_all(&[0])?;
            let pad = |n: usize| (4 - n % 4) % 4;
            w.write_all(&[0; 3][..pad(110 + name.len() + 1)])?;
            w.write_all(data)?;
            w.write_all(&[0; 3][..pad(data.len())])
        }
        for (i, (name, (mode, rdev, data))) in self.entries.iter().enumerate() {
            if data.len() > u32::MAX as usize {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "entry over 4 GiB",
                ));
            }
            entry(w, i as u32 + 1, name, *mode, *rdev, data)?;
        }
        entry(w, 0, "TRAILER!!!", 0, 0, &[])?;
        Ok(())
    }
}

fn decompress(path: &Path) -> Result<Vec<u8>, ImageError> {
    let name = path.to_string_lossy();
    if name.ends_with(".xz") {
        run(Command::new("xz").arg("-dc").arg(path))
    } else if name.ends_with(".zst") {
        run(Command::new("zstd").arg("-dcq").arg(path))
    } else if name.ends_with(".gz") {
        run(Command::new("gzip").arg("-dc").arg(path))
    } else {
        std::fs::read(path).map_err(io(path.display()))
    }
}

/// Writes `data` to `path` through a temporary file and a rename.
fn write_atomic(path: &Path, data: &[u8]) -> Result<(), ImageError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data).map_err(io(tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(io(path.display()))
}

/// Builds the image into `cfg.out`: `vmlinuz`, `initramfs.cpio.gz`, `manifest.json`.
pub fn build(cfg: &ImageConfig) -> Result<Manifest, ImageError> {
    let agent = read_static(
        "torii-agent",
        &cfg.agent,
        "build it with RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build --release \
         -p torii-agent --target x86_64-unknown-linux-gnu",
    )?;
    let busybox = read_static("busybox", &cfg.busybox, "install busybox-static")?;
    let root = match &cfg.kernel_root {
        Some(r) => r.clone(),
        None => fetch_kernel(&cfg.out.join("kernel"))?,
    };
    let kver = kernel_version(&root)?;
    let moddir = root.join("lib/modules").join(&kver);
    let dep_path = moddir.join("modules.dep");
    if !dep_path.is_file() {
        run(Command::new("depmod").arg("-b").arg(&root).arg(&kver))?;
    }
    let dep = std::fs::read_to_string(&dep_path).map_err(io(dep_path.display()))?;
    let builtin = std::fs::read_to_string(moddir.join("modules.builtin")).unwrap_or_default();
    let files = resolve_modules(&dep, &builtin, &cfg.modules)?;

    let mut cpio = Cpio::default();
    for d in [
        "dev", "proc", "sys", "tmp", "run", "mnt", "root", "etc", "usr/bin", "usr/sbin",
    ] {
        cpio.dir(d);
    }
    // The kernel opens /dev/console for init's stdio before devtmpfs is mounted.
    cpio.char_dev("dev/console", 0o600, 5, 1);
    cpio.char_dev("dev/null", 0o666, 1, 3);
    cpio.file("init", 0o755, agent.clone());
    cpio.file("bin/busybox", 0o755, busybox.clone());
    let list = run(Command::new(&cfg.busybox).arg("--list-full"))?;
    for applet in String::from_utf8_lossy(&list).lines() {
        let applet = applet.trim();
        if applet.is_empty() || applet == "bin/busybox" || applet.contains("..") {
            continue;
        }
        let depth = applet.matches('/').count();
        cpio.symlink(applet, &format!("{}bin/busybox", "../".repeat(depth)));
    }
    cpio.file(
        "etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\n".to_vec(),
    );
    cpio.file("etc/group", 0o644, b"root:x:0:\n".to_vec());
    cpio.file(
        "etc/hosts",
        0o644,
        b"127.0.0.1 localhost\n::1 localhost\n".to_vec(),
    );
    let mut order = String::new();
    let mut names = Vec::new();
    for f in &files {
        let data = decompress(&moddir.join(f))?;
        let base = Path::new(f)
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.split(".ko").next())
            .unwrap_or_default()
            .to_string();
        cpio.file(&format!("lib/modules/{base}.ko"), 0o644, data);
        order.push_str(&format!("{base}.ko\n"));
        names.push(base);
    }
    cpio.file("lib/modules/torii.order", 0o644, order.into_bytes());

    let mut gz = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::new(6));
    cpio.write(&mut gz).map_err(io("initramfs"))?;
    let initramfs = gz.finish().map_err(io("initramfs"))?;
    let kernel_src = root.join("boot").join(format!("vmlinuz-{kver}"));
    let kernel = std::fs::read(&kernel_src).map_err(io(kernel_src.display()))?;
    let manifest = Manifest {
        kernel_version: kver,
        kernel_sha256: sha256(&kernel),
        initramfs_sha256: sha256(&initramfs),
        agent_sha256: sha256(&agent),
        busybox_sha256: sha256(&busybox),
        modules: names,
    };
    // Only now, with everything read and checked, is the output folder touched.
    std::fs::create_dir_all(&cfg.out).map_err(io(cfg.out.display()))?;
    write_atomic(&cfg.out.join("vmlinuz"), &kernel)?;
    write_atomic(&cfg.out.join("initramfs.cpio.gz"), &initramfs)?;
    let mut m = serde_json::to_vec_pretty(&manifest).expect("JSON");
    m.push(b'\n');
    write_atomic(&cfg.out.join("manifest.json"), &m)?;
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_come_after_their_dependencies_and_unknown_ones_are_refused() {
        let dep = "kernel/a.ko.xz: kernel/b.ko.xz kernel/c.ko.xz\n\
                   kernel/b.ko.xz: kernel/c.ko.xz\n\
                   kernel/c.ko.xz:\n\
                   kernel/d-e.ko.zst:\n";
        let r = resolve_modules(dep, "", &["a".into(), "d_e".into(), "c".into()]).unwrap();
        assert_eq!(
            r,
            [
                "kernel/c.ko.xz",
                "kernel/b.ko.xz",
                "kernel/a.ko.xz",
                "kernel/d-e.ko.zst"
            ]
        );
        let err = resolve_modules(dep, "", &["nope".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("nope"), "{err}");
        // Built into the kernel: nothing to load.
        assert!(
            resolve_modules(dep, "kernel/fs/nope.ko\n", &["nope".into()])
                .unwrap()
                .is_empty()
        );
        // A cycle in a hostile modules.dep ends.
        let cyc = "x.ko: y.ko\ny.ko: x.ko\n";
        assert_eq!(
            resolve_modules(cyc, "", &["x".into()]).unwrap(),
            ["y.ko", "x.ko"]
        );
    }

    #[test]
    fn cpio_is_newc_and_deterministic() {
        let build = || {
            let mut c = Cpio::default();
            c.file("b/file", 0o644, b"hello".to_vec());
            c.symlink("a/link", "../b/file");
            c.char_dev("dev/console", 0o600, 5, 1);
            let mut v = Vec::new();
            c.write(&mut v).unwrap();
            v
        };
        let a = build();
        assert_eq!(a, build());
        assert_eq!(a.len() % 4, 0);
        let text = String::from_utf8_lossy(&a);
        assert!(text.starts_with("070701"));
        // Parents were made, in order: a, a/link, b, b/file, dev, dev/console, trailer.
        let names: Vec<&str> = text
            .split("070701")
            .skip(1)
            .map(|h| {
                let n = &h[104..];
                n.split('\0').next().unwrap()
            })
            .collect();
        assert_eq!(
            names,
            [
                "a",
                "a/link",
                "b",
                "b/file",
                "dev",
                "dev/console",
                "TRAILER!!!"
            ]
        );
        // The console's device number is in rdevmajor/rdevminor.
        let console = text.split("070701").nth(6).unwrap();
        assert_eq!(&console[72..88], "0000000500000001");
    }

    #[test]
    fn dynamic_binaries_are_told_apart() {
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert_eq!(is_dynamic_elf(&me), Ok(true));
        assert!(is_dynamic_elf(b"#!/bin/sh\n").is_err());
        let mut bad = me[..64].to_vec();
        bad[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(is_dynamic_elf(&bad).is_err());
    }
}
