//! A busybox OCI image built on this machine, without a registry: the host's static busybox
//! and its applet links in one gzip layer, packed as an OCI image layout tarball for
//! `ctr image import`.
//!
//! The image's name comes from the index entry's `io.containerd.image.name` annotation:
//! containerd 1.6 names an imported manifest by that annotation first, then by
//! `org.opencontainers.image.ref.name` (a full reference is kept as it is, a bare tag becomes
//! `import-<date>:<tag>` unless `ctr image import --base-name` says otherwise), and an entry
//! with neither is imported as content only: no image, and `ctr image import` still succeeds.

use std::io::Write;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use flate2::write::GzEncoder;
use sha2::{Digest, Sha256};

/// The busybox applets linked in the image's `/bin`.
pub const APPLETS: &[&str] = &[
    "sh", "echo", "cat", "sleep", "nproc", "ls", "true", "false", "mount", "umount", "ps", "uname",
    "head", "tail", "grep", "wc", "kill", "id", "env", "pwd", "touch", "stat", "test", "mkdir",
    "rm", "df", "hostname", "free", "tr", "printf",
];

/// Where the host's static busybox may be (Debian's `busybox-static` installs `/bin/busybox`).
const BUSYBOX: &[&str] = &["/bin/busybox", "/usr/bin/busybox"];

/// The OCI image layout tarball of a busybox image, ready for `ctr image import`.
#[derive(Debug, Clone)]
pub struct BusyboxImage {
    /// The reference the image is imported as (`io.containerd.image.name`).
    pub name: String,
    /// The OCI image layout, packed (`oci-layout`, `index.json`, `blobs/sha256/…`).
    pub tarball: PathBuf,
    /// `sha256:…` of the image manifest.
    pub manifest_digest: String,
    /// `sha256:…` of the uncompressed layer (the config's `rootfs.diff_ids[0]`).
    pub diff_id: String,
    /// The busybox binary inside the image (a copy of the host's).
    pub busybox: PathBuf,
}

/// The host's busybox, which must be statically linked: the containers run it in a guest that
/// has no libc. Panics naming the package to install otherwise.
pub fn host_busybox() -> PathBuf {
    let hint = "install busybox-static (scripts/setup does)";
    let path = BUSYBOX
        .iter()
        .map(Path::new)
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("no busybox in {BUSYBOX:?}: {hint}"))
        .to_path_buf();
    let elf = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    match elf_has_interpreter(&elf) {
        Some(false) => path,
        Some(true) => panic!(
            "{} is dynamically linked; the image needs a static busybox: {hint}",
            path.display()
        ),
        None => panic!("{} is not a 64-bit ELF executable: {hint}", path.display()),
    }
}

/// Whether a little-endian ELF64 file asks for a program interpreter (a `PT_INTERP` program
/// header: dynamically linked); `None` if it is no such ELF file.
fn elf_has_interpreter(elf: &[u8]) -> Option<bool> {
    const PT_INTERP: u32 = 3;
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 || elf[5] != 1 {
        return None;
    }
    let u16_at = |o: usize| Some(u16::from_le_bytes(elf.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(elf.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(elf.get(o..o + 8)?.try_into().ok()?));
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    let mut interp = false;
    for i in 0..phnum {
        interp |= u32_at(phoff + i * phentsize)? == PT_INTERP;
    }
    Some(interp)
}

/// The OCI (Go) name of this machine's architecture.
pub fn oci_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        other => other,
    }
}

/// Stores `data` as a blob of the layout under `blobs`; its `sha256:…` digest and size.
fn put_blob(blobs: &Path, data: &[u8]) -> (String, usize) {
    let hex = format!("{:x}", Sha256::digest(data));
    std::fs::write(blobs.join(&hex), data).expect("writing an OCI blob");
    (format!("sha256:{hex}"), data.len())
}

/// Runs `tar ARGS` (GNU tar), which must succeed.
fn tar(args: &[&std::ffi::OsStr]) {
    let out = Command::new("tar")
        .args(args)
        .output()
        .expect("running tar (apt-get install tar)");
    assert!(
        out.status.success(),
        "tar {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Builds the busybox image under `work` (which must exist) and packs it; `name` is the
/// reference it is to be imported as (e.g. `docker.io/torii/busybox:test`).
pub fn build_busybox(work: &Path, name: &str) -> BusyboxImage {
    // 1. The root file system: /bin/busybox, its applets, the usual empty mount points.
    let rootfs = work.join("rootfs");
    for d in [
        "bin", "dev", "proc", "sys", "tmp", "etc", "run", "root", "var",
    ] {
        std::fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    std::fs::set_permissions(rootfs.join("tmp"), std::fs::Permissions::from_mode(0o1777)).unwrap();
    let busybox = rootfs.join("bin/busybox");
    std::fs::copy(host_busybox(), &busybox).unwrap();
    std::fs::set_permissions(&busybox, std::fs::Permissions::from_mode(0o755)).unwrap();
    for applet in APPLETS {
        symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
    }
    std::fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    std::fs::write(rootfs.join("etc/group"), "root:x:0:\n").unwrap();

    // 2. The layer: a reproducible tar of it (root-owned, sorted, epoch times), gzipped. The
    //    config names the uncompressed tar (diff_id), the manifest the gzip blob.
    let layout = work.join("oci");
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let layer_tar = work.join("layer.tar");
    tar(&[
        "-C".as_ref(),
        rootfs.as_os_str(),
        "--sort=name".as_ref(),
        "--owner=0".as_ref(),
        "--group=0".as_ref(),
        "--numeric-owner".as_ref(),
        "--mtime=@0".as_ref(),
        "-cf".as_ref(),
        layer_tar.as_os_str(),
        ".".as_ref(),
    ]);
    let layer = std::fs::read(&layer_tar).unwrap();
    let diff_id = format!("sha256:{:x}", Sha256::digest(&layer));
    let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&layer).unwrap();
    let (layer_digest, layer_size) = put_blob(&blobs, &gz.finish().unwrap());

    // 3. The image config, the manifest and the index that names it.
    let arch = oci_architecture();
    let config = serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["sh"],
            "WorkingDir": "/",
        },
        "rootfs": { "type": "layers", "diff_ids": [diff_id] },
        "history": [{ "created_by": "torii tests: host busybox-static and its applet links" }],
    });
    let (config_digest, config_size) = put_blob(&blobs, config.to_string().as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config_size,
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": layer_digest,
            "size": layer_size,
        }],
    });
    let (manifest_digest, manifest_size) = put_blob(&blobs, manifest.to_string().as_bytes());
    let tag = name.rsplit_once(':').map_or("latest", |(_, t)| t);
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest_size,
            "platform": { "architecture": arch, "os": "linux" },
            "annotations": {
                // What containerd names the image by.
                "io.containerd.image.name": name,
                // The OCI layout's own (tag) name, for other tools; containerd prefers the above.
                "org.opencontainers.image.ref.name": tag,
            },
        }],
    });
    std::fs::write(layout.join("index.json"), index.to_string()).unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();

    // 4. The layout, packed.
    let tarball = work.join("busybox-oci.tar");
    tar(&[
        "-C".as_ref(),
        layout.as_os_str(),
        "-cf".as_ref(),
        tarball.as_os_str(),
        "oci-layout".as_ref(),
        "index.json".as_ref(),
        "blobs".as_ref(),
    ]);
    BusyboxImage {
        name: name.to_string(),
        tarball,
        manifest_digest,
        diff_id,
        busybox,
    }
}
