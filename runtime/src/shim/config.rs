//! The shim's configuration (a TOML file) and the OCI annotations that tune one sandbox: together
//! they make the sandbox spec its VM is launched from.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::spec::SandboxSpec;

/// Environment variable naming the configuration file.
pub const CONFIG_ENV: &str = "TORII_SHIM_CONFIG";
/// The configuration file when the variable is not set.
pub const DEFAULT_CONFIG: &str = "/etc/torii/shim.toml";
/// Containers carrying this annotation belong to the sandbox it names (set by containerd's CRI).
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
/// Where each container's root file system is mounted in the guest: `<GUEST_ROOTS>/<id>`.
pub const GUEST_ROOTS: &str = "/run/torii/containers";

/// Annotations of a sandbox's first container (see docs/containerd.md).
pub mod annotation {
    pub const VCPUS: &str = "io.torii.vcpus";
    pub const MEMORY_MIB: &str = "io.torii.memory_mib";
    pub const PIN: &str = "io.torii.pin";
    pub const HUGEPAGES: &str = "io.torii.hugepages";
    pub const NETWORK: &str = "io.torii.network";
    pub const VFIO: &str = "io.torii.vfio";
    pub const DISKS: &str = "io.torii.disks";
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShimConfig {
    /// Everything the shim makes (VM folders, disk images, sockets): `<state_dir>/<sandbox>/`.
    pub state_dir: PathBuf,
    /// The vhost-user-blk backend serving the containers' root file systems.
    pub blk_backend: PathBuf,
    /// Its poll mode (`event` leaves the host's CPUs to the guests; `poll`, `adaptive`).
    pub blk_poll_mode: String,
    /// Free space in each container's root file system image, beyond its files.
    pub rootfs_free_mib: u64,
    pub kernel: Option<PathBuf>,
    pub initramfs: Option<PathBuf>,
    pub vcpus: Option<u32>,
    pub memory_mib: Option<u32>,
    pub hugepages: Option<bool>,
    /// The rest of a sandbox spec (`[sandbox]`, without `name`): every pod starts from it.
    pub sandbox: toml::Table,
}

impl Default for ShimConfig {
    fn default() -> Self {
        ShimConfig {
            state_dir: PathBuf::from("/run/torii/shim"),
            blk_backend: PathBuf::from("torii-vhost-user-blk"),
            blk_poll_mode: "event".into(),
            rootfs_free_mib: 256,
            kernel: None,
            initramfs: None,
            vcpus: None,
            memory_mib: None,
            hugepages: None,
            sandbox: toml::Table::new(),
        }
    }
}

impl ShimConfig {
    /// Reads the file named by `TORII_SHIM_CONFIG`, else the default file if there is one.
    pub fn load() -> Result<ShimConfig, String> {
        let (path, required) = match std::env::var_os(CONFIG_ENV) {
            Some(p) => (PathBuf::from(p), true),
            None => (PathBuf::from(DEFAULT_CONFIG), false),
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => Self::parse(&text).map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => {
                Ok(ShimConfig::default())
            }
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    pub fn parse(text: &str) -> Result<ShimConfig, String> {
        let c: ShimConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        if c.sandbox.contains_key("name") {
            return Err("[sandbox] takes no name: each pod is named after its sandbox".into());
        }
        if !["event", "poll", "adaptive"].contains(&c.blk_poll_mode.as_str()) {
            return Err(format!(
                "blk_poll_mode: {:?} is none of event, poll, adaptive",
                c.blk_poll_mode
            ));
        }
        Ok(c)
    }

    /// The spec of sandbox `name`: the `[sandbox]` base, this file's VM keys, then the
    /// annotations of its first container.
    pub fn sandbox_spec(
        &self,
        name: &str,
        annotations: &HashMap<String, String>,
    ) -> Result<SandboxSpec, String> {
        let mut t = self.sandbox.clone();
        t.insert("name".into(), name.into());
        let vm = t
            .entry("vm")
            .or_insert_with(|| toml::Table::new().into())
            .as_table_mut()
            .ok_or("[sandbox.vm] must be a table")?;
        let set = |vm: &mut toml::Table, k: &str, v: Option<toml::Value>| {
            if let Some(v) = v {
                vm.insert(k.into(), v);
            }
        };
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string().into());
        set(vm, "kernel", path(&self.kernel));
        set(vm, "initramfs", path(&self.initramfs));
        set(vm, "vcpus", self.vcpus.map(|v| i64::from(v).into()));
        set(
            vm,
            "memory_mib",
            self.memory_mib.map(|v| i64::from(v).into()),
        );
        set(vm, "hugepages", self.hugepages.map(Into::into));
        apply_annotations(&mut t, annotations)?;
        t.try_into::<SandboxSpec>()
            .map_err(|e| format!("sandbox spec: {e}"))
    }
}

fn number(key: &str, v: &str) -> Result<toml::Value, String> {
    v.trim()
        .parse::<u32>()
        .map(|n| i64::from(n).into())
        .map_err(|_| format!("annotation {key}: {v:?} is not a number"))
}

fn list(v: &str) -> impl Iterator<Item = &str> {
    v.split(',').map(str::trim).filter(|s| !s.is_empty())
}

/// Applies the `io.torii.*` annotations to a sandbox spec table. An unknown `io.torii.` key
/// is an error: a misspelt knob must not be silently ignored.
fn apply_annotations(
    t: &mut toml::Table,
    annotations: &HashMap<String, String>,
) -> Result<(), String> {
    use annotation::*;
    let mut keys: Vec<_> = annotations
        .iter()
        .filter(|(k, _)| k.starts_with("io.torii."))
        .collect();
    keys.sort();
    for (k, v) in keys {
        let k = k.as_str();
        match k {
            VCPUS | MEMORY_MIB | PIN | HUGEPAGES => {
                let vm = t
                    .get_mut("vm")
                    .and_then(|v| v.as_table_mut())
                    .ok_or("[sandbox.vm] must be a table")?;
                let (field, value) = match k {
                    VCPUS => ("vcpus", number(k, v)?),
                    MEMORY_MIB => ("memory_mib", number(k, v)?),
                    PIN => {
                        let cpus = list(v)
                            .map(|c| number(k, c))
                            .collect::<Result<Vec<_>, _>>()?;
                        ("pin", cpus.into())
                    }
                    _ => match v.trim() {
                        "true" => ("hugepages", true.into()),
                        "false" => ("hugepages", false.into()),
                        _ => return Err(format!("annotation {k}: {v:?} is not true or false")),
                    },
                };
                vm.insert(field.into(), value);
            }
            NETWORK | VFIO => {
                let ifs = t
                    .entry("interface")
                    .or_insert_with(|| toml::value::Array::new().into())
                    .as_array_mut()
                    .ok_or("[[sandbox.interface]] must be an array")?;
                for item in list(v) {
                    let mut i = toml::Table::new();
                    if k == NETWORK {
                        i.insert("type".into(), "pod-network".into());
                        i.insert("file".into(), item.into());
                    } else {
                        i.insert("type".into(), "vfio".into());
                        i.insert("pci".into(), item.into());
                    }
                    ifs.push(i.into());
                }
            }
            DISKS => {
                let disks = t
                    .entry("disk")
                    .or_insert_with(|| toml::value::Array::new().into())
                    .as_array_mut()
                    .ok_or("[[sandbox.disk]] must be an array")?;
                for item in list(v) {
                    // SOCKET=MOUNT[:ro]
                    let (socket, rest) = item.split_once('=').ok_or_else(|| {
                        format!("annotation {k}: {item:?} is not SOCKET=MOUNT[:ro]")
                    })?;
                    let (mount, ro) = match rest.strip_suffix(":ro") {
                        Some(m) => (m, true),
                        None => (rest, false),
                    };
                    if !Path::new(socket).is_absolute() || !mount.starts_with('/') {
                        return Err(format!(
                            "annotation {k}: {item:?}: the socket and the mount point must be absolute"
                        ));
                    }
                    let mut d = toml::Table::new();
                    d.insert("socket".into(), socket.into());
                    d.insert("mount".into(), mount.into());
                    d.insert("read_only".into(), ro.into());
                    disks.push(d.into());
                }
            }
            _ => return Err(format!("unknown annotation {k}")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn config_keys_and_annotations_make_the_spec() {
        let c = ShimConfig::parse(
            r#"
            kernel = "/k"
            initramfs = "/i"
            vcpus = 1
            memory_mib = 384
            [sandbox.vm]
            cmdline = "quiet"
            [sandbox.agent]
            timeout_s = 30
            "#,
        )
        .unwrap();
        let s = c
            .sandbox_spec(
                "pod1",
                &ann(&[
                    (annotation::VCPUS, "2"),
                    (annotation::PIN, "0, 1"),
                    (annotation::HUGEPAGES, "true"),
                    (annotation::NETWORK, "/run/a.json,/run/b.json"),
                    (annotation::VFIO, "0000:01:10.0"),
                    (annotation::DISKS, "/run/d.sock=/data:ro"),
                    ("io.kubernetes.cri.container-type", "sandbox"),
                ]),
            )
            .unwrap();
        assert_eq!(s.name, "pod1");
        assert_eq!(s.vm.kernel, Path::new("/k"));
        assert_eq!((s.vm.vcpus, s.vm.memory_mib), (2, 384));
        assert_eq!(s.vm.pin, [0, 1]);
        assert!(s.vm.hugepages);
        assert_eq!(s.vm.cmdline, "quiet");
        assert_eq!(s.agent.timeout_s, 30);
        assert_eq!(s.interfaces.len(), 3);
        assert_eq!(
            s.interfaces[1].file.as_deref(),
            Some(Path::new("/run/b.json"))
        );
        assert_eq!(s.interfaces[2].pci.as_deref(), Some("0000:01:10.0"));
        assert_eq!(s.disks[0].mount.as_deref(), Some("/data"));
        assert!(s.disks[0].read_only);
    }

    #[test]
    fn bad_knobs_are_named() {
        let c = ShimConfig::default();
        for (kv, want) in [
            ((annotation::VCPUS, "two"), "io.torii.vcpus"),
            ((annotation::HUGEPAGES, "yes"), "not true or false"),
            ((annotation::DISKS, "rel.sock=/x"), "must be absolute"),
            ((annotation::DISKS, "/x.sock"), "SOCKET=MOUNT"),
            (("io.torii.vcpu", "2"), "unknown annotation io.torii.vcpu"),
        ] {
            let e = c.sandbox_spec("p", &ann(&[kv])).unwrap_err();
            assert!(e.contains(want), "{kv:?}: {e}");
        }
        let e = ShimConfig::parse("[sandbox]\nname = \"x\"").unwrap_err();
        assert!(e.contains("takes no name"), "{e}");
        let e = ShimConfig::parse("blk_poll_mode = \"busy\"").unwrap_err();
        assert!(e.contains("blk_poll_mode"), "{e}");
        let e = ShimConfig::parse("kernal = \"/k\"").unwrap_err();
        assert!(e.contains("kernal"), "{e}");
    }
}
