//! The Landlock file-system sandbox a configuration implies (`landlock = "enforce"`;
//! docs/security.md#landlock): what `torii-dataplane` touches in the file system after it
//! started, derived from the configuration, plus the operator's `landlock_paths`.
//!
//! - the control socket's directory, each vhost-user port's and each disk's socket directory
//!   (sockets made, removed, connected to), each disk's image (read, written unless
//!   read-only; a block device's ioctls);
//! - `/dev/net/tun` (opened, ioctls) when a tap port is configured;
//! - the stats file's directory (the file written next to it and renamed into place);
//! - `/sys/devices/system/cpu`, read: the CPUs online, which configuration checks count;
//! - with DPDK: `/sys` and `/proc` read (devices, NUMA nodes, hugepage counts, the process's
//!   memory map and page frames), hugetlbfs mounts (hugepage files, when DPDK does not get
//!   them from memfd), `/dev/vfio` for PCI devices, and what each device's arguments name:
//!   a memif socket's directory (unless abstract), a vhost or virtio-user socket's directory
//!   or device, `/dev/net/tun` for net_tap;
//! - `landlock_paths`: read, write, make and remove beneath each.
//!
//! DPDK's initialisation reads much more (its drivers' shared objects, libraries, all of
//! sysfs): it runs under a wider first layer, [`dpdk_init_rules`], and the daemon's own
//! rules follow as a second layer once it is done.

use std::path::{Path, PathBuf};

use torii_vhost_user::landlock::{socket_dir, Rights, Rules};

use crate::config::{dpdk_device_name, Config, DpdkConfig, PortKind};

/// How an operator extends the data plane's sandbox (in the errors of denied accesses).
pub const EXTEND: &str = "`landlock_paths` in [dataplane]";

/// Hugepage files in a hugetlbfs mount: made, mapped, removed.
const HUGEPAGES: Rights = Rights::READ_FILE
    .union(Rights::WRITE_FILE)
    .union(Rights::READ_DIR)
    .union(Rights::MAKE_REG)
    .union(Rights::REMOVE_FILE)
    .union(Rights::TRUNCATE);

/// DPDK's default memif socket (`socket=` not given).
const MEMIF_DEFAULT_SOCKET: &str = "/run/memif.sock";

/// Whether the configuration uses DPDK (a `[dpdk]` section or a `dpdk` port) in a build
/// that has it.
pub fn uses_dpdk(cfg: &Config) -> bool {
    cfg!(feature = "dpdk")
        && (cfg.dpdk.is_some()
            || cfg
                .ports
                .iter()
                .any(|p| matches!(p.kind, PortKind::Dpdk(_))))
}

/// The daemon's rules: what the configuration implies, and `landlock_paths`.
pub fn rules(cfg: &Config) -> Rules {
    let mut r = Rules::new();
    let d = &cfg.dataplane;
    r.socket(&d.control_socket, true, "control socket");
    if let Some(f) = &d.stats_file {
        r.allow(
            socket_dir(f),
            Rights::FILES_DIR,
            "stats_file (written beside, then renamed into place)",
        );
    }
    r.allow(
        "/sys/devices/system/cpu",
        Rights::READ,
        "the CPUs online (configuration checks)",
    );
    for p in &cfg.ports {
        let why = format!("port {:?}", p.name);
        match &p.kind {
            PortKind::VhostUser { socket, mode, .. } => {
                r.socket(socket, mode != "client", format!("{why} socket"));
            }
            PortKind::Tap { .. } => r.allow(
                crate::port::tap::TUN,
                Rights::DEVICE,
                format!("{why} (tap)"),
            ),
            PortKind::Dpdk(c) => dpdk_device(&mut r, &c.device, &why),
            PortKind::Source { .. } | PortKind::Sink => {}
        }
    }
    for k in &cfg.disks {
        // A disk that does not check out has no rule (it fails to start on its own).
        if let Ok(e) = k.to_config() {
            torii_vhost_user_blk::settings::landlock_export(&mut r, &e, "disk");
        }
    }
    if uses_dpdk(cfg) {
        dpdk_rules(&mut r, &cfg.dpdk.clone().unwrap_or_default(), cfg);
    }
    for p in &d.landlock_paths {
        r.operator(p, "landlock_paths");
    }
    r
}

/// What DPDK needs once it is initialised: reading sysfs and procfs, hugepage files, VFIO,
/// and the files its configured devices name.
fn dpdk_rules(r: &mut Rules, d: &DpdkConfig, cfg: &Config) {
    r.allow(
        "/sys",
        Rights::READ,
        "DPDK: devices, NUMA nodes, hugepage counts (sysfs)",
    );
    r.allow(
        "/proc",
        Rights::READ,
        "DPDK: the process's memory map and page frames, mounts (procfs)",
    );
    if d.hugepages {
        for m in hugetlbfs_mounts() {
            r.allow(m, HUGEPAGES, "DPDK: hugepage files (hugetlbfs)");
        }
    }
    let pci = !d.allow.is_empty()
        || cfg.ports.iter().any(|p| match &p.kind {
            PortKind::Dpdk(c) => crate::config::is_pci_device(&c.device),
            _ => false,
        });
    if pci {
        r.allow(
            "/dev/vfio",
            Rights::DEVICE | Rights::READ_DIR,
            "DPDK: PCI devices through VFIO",
        );
    }
    for v in &d.vdevs {
        dpdk_device(r, v, "[dpdk] vdevs");
    }
}

/// A DPDK device string's `key=value` arguments (after the device's name).
fn dpdk_args(device: &str) -> impl Iterator<Item = (&str, &str)> {
    device
        .split(',')
        .skip(1)
        .filter_map(|kv| kv.split_once('='))
}

/// The files DPDK device `device` (its arguments, as a port's `device` or a `[dpdk] vdevs`
/// entry spells them) opens or makes: a memif socket's directory (not for an abstract
/// socket, DPDK's default), a vhost or virtio-user socket's directory, a virtio-user kernel
/// device (`path=/dev/vhost-net`), `/dev/net/tun` for net_tap and net_tun. Other drivers
/// need nothing beyond sysfs (af_packet), or more than is derived here (af_xdp's BPF objects
/// and pins, pcap files): `landlock_paths`.
pub fn dpdk_device(r: &mut Rules, device: &str, why: &str) {
    let name = dpdk_device_name(device);
    let arg = |k: &str| dpdk_args(device).find(|(key, _)| *key == k).map(|(_, v)| v);
    let why = format!("{why}: {name}");
    if name.starts_with("net_memif") {
        if arg("socket-abstract") == Some("no") {
            let socket = arg("socket").unwrap_or(MEMIF_DEFAULT_SOCKET);
            let server = arg("role") != Some("client");
            r.socket(Path::new(socket), server, format!("{why} socket"));
        }
    } else if name.starts_with("net_vhost") {
        if let Some(iface) = arg("iface") {
            let client = arg("client") == Some("1");
            r.socket(Path::new(iface), !client, format!("{why} socket"));
        }
    } else if name.starts_with("net_virtio_user") {
        if let Some(path) = arg("path") {
            if path.starts_with("/dev/") {
                r.allow(path, Rights::DEVICE, format!("{why} device"));
            } else {
                let server = arg("server") == Some("1");
                r.socket(Path::new(path), server, format!("{why} socket"));
            }
        }
    } else if name.starts_with("net_tap") || name.starts_with("net_tun") {
        r.allow(crate::port::tap::TUN, Rights::DEVICE, why);
    }
}

/// The mount points of hugetlbfs file systems (`/proc/self/mounts`).
pub fn hugetlbfs_mounts() -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mounts")
        .map(|t| parse_hugetlbfs_mounts(&t))
        .unwrap_or_default()
}

fn parse_hugetlbfs_mounts(text: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_dev, point, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "hugetlbfs").then(|| PathBuf::from(unescape_mount(point)))
        })
        .collect();
    v.sort();
    v.dedup();
    v
}

/// A mount point as /proc/mounts writes it: space, tab, newline and backslash as `\ooo`.
fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let oct = &b[i + 1..i + 4];
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                let v = oct.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0'));
                if let Ok(v) = u8::try_from(v) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The first layer, for DPDK's initialisation: the daemon's rules and [`dpdk_init_extra`].
/// Nothing written beyond the daemon's own rules but its threads' names. On kernels without
/// TSYNC (Landlock ABI < 8) the threads DPDK starts keep this layer; every other thread also
/// gets the second, [`rules`].
pub fn dpdk_init_rules(tight: &Rules) -> Rules {
    let mut r = tight.clone();
    r.extend(&dpdk_init_extra());
    r
}

/// What DPDK's initialisation needs beyond the daemon's rules: reading anything (it loads its
/// drivers' shared objects with their libraries, and reads sysfs and procfs), and naming its
/// threads (`/proc/self/task/*/comm`).
pub fn dpdk_init_extra() -> Rules {
    let mut r = Rules::new();
    r.allow(
        "/",
        Rights::READ,
        "DPDK initialisation: drivers' shared objects, libraries, sysfs, procfs",
    );
    r.allow(
        "/proc/self/task",
        Rights::WRITE_FILE,
        "DPDK initialisation: its threads' names (/proc/self/task/*/comm)",
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rights(r: &Rules, p: &str) -> Option<Rights> {
        r.merged().get(Path::new(p)).map(|e| e.0)
    }

    #[test]
    fn rules_follow_ports_disks_and_files() {
        let c = Config::parse(
            r#"
            [dataplane]
            control_socket = "/run/torii-test/ctl.sock"
            stats_file = "/var/lib/torii-test/stats.json"
            landlock = "enforce"
            landlock_paths = ["/srv/torii"]
            [[port]]
            name = "vm1"
            type = "vhost-user"
            socket = "/run/torii-test/vm1/net.sock"
            [[port]]
            name = "vm2"
            type = "vhost-user"
            socket = "/nonexistent-torii/vm2/net.sock"
            mode = "client"
            [[port]]
            name = "tap0"
            type = "tap"
            ifname = "torii0"
            [[port]]
            name = "src"
            type = "source"
            [[disk]]
            name = "d1"
            socket = "/run/torii-test/d1.sock"
            file = "/var/lib/torii-test/d1.img"
            [[disk]]
            name = "d2"
            socket = "/run/torii-test/d2.sock"
            file = "/var/lib/torii-test/d2.img"
            read_only = true
            "#,
        )
        .unwrap();
        assert_eq!(
            c.dataplane.landlock,
            torii_vhost_user::landlock::Mode::Enforce
        );
        let r = rules(&c);
        assert_eq!(rights(&r, "/run/torii-test"), Some(Rights::SOCKET_DIR));
        assert_eq!(rights(&r, "/run/torii-test/vm1"), Some(Rights::SOCKET_DIR));
        // A client's directory that does not exist: connect beneath its nearest ancestor.
        assert_eq!(rights(&r, "/"), Some(Rights::RESOLVE_UNIX));
        assert_eq!(rights(&r, "/dev/net/tun"), Some(Rights::DEVICE));
        assert_eq!(
            rights(&r, "/var/lib/torii-test"),
            Some(Rights::FILES_DIR),
            "the stats file's directory"
        );
        assert_eq!(
            rights(&r, "/var/lib/torii-test/d1.img"),
            Some(Rights::READ_FILE | Rights::WRITE_FILE)
        );
        assert_eq!(
            rights(&r, "/var/lib/torii-test/d2.img"),
            Some(Rights::READ_FILE)
        );
        assert_eq!(rights(&r, "/sys/devices/system/cpu"), Some(Rights::READ));
        assert_eq!(rights(&r, "/srv/torii"), Some(Rights::OPERATOR));
        // Nothing else: no DPDK paths without DPDK, nothing writable at the top.
        assert_eq!(rights(&r, "/sys"), None);
        assert_eq!(rights(&r, "/proc"), None);
        assert_eq!(
            r.merged().len(),
            9,
            "{}",
            torii_vhost_user::landlock::describe(&r)
        );
        // Only the operator's path must exist.
        let req: Vec<_> = r.iter().filter(|x| x.required).map(|x| &x.path).collect();
        assert_eq!(req, [Path::new("/srv/torii")]);
        let text = torii_vhost_user::landlock::describe(&r);
        assert!(text.contains("port \"vm1\" socket"), "{text}");
        assert!(text.contains("disk \"d2\" image"), "{text}");
    }

    #[test]
    fn the_default_config_allows_its_control_socket_and_the_cpu_count_only() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.dataplane.landlock, torii_vhost_user::landlock::Mode::Off);
        let r = rules(&c);
        let m = r.merged();
        assert_eq!(m.len(), 2, "{m:?}");
        assert_eq!(
            rights(
                &r,
                &socket_dir(&c.dataplane.control_socket).to_string_lossy()
            ),
            Some(Rights::SOCKET_DIR)
        );
    }

    #[test]
    fn bad_landlock_settings_are_refused() {
        for (text, want) in [
            ("[dataplane]\nlandlock = \"log\"\n", "unknown variant `log`"),
            (
                "[dataplane]\nlandlock_paths = [\"relative/dir\"]\n",
                "landlock_paths: relative/dir is not an absolute path",
            ),
            (
                "[dataplane]\nlandlock_paths = [\"/a\\u0000b\"]\n",
                "contains a NUL byte",
            ),
        ] {
            let e = Config::parse(text).unwrap_err().to_string();
            assert!(e.contains(want), "{e:?} should mention {want:?}");
        }
    }

    #[test]
    fn dpdk_devices_name_their_files() {
        let mut r = Rules::new();
        dpdk_device(
            &mut r,
            "net_memif0,role=server,socket=/run/m/memif.sock,socket-abstract=no",
            "port \"m\"",
        );
        // Abstract sockets (DPDK's default) are not files.
        dpdk_device(&mut r, "net_memif1,socket=/run/abstract/x.sock", "p");
        dpdk_device(&mut r, "net_memif2,role=client,socket-abstract=no", "p");
        dpdk_device(&mut r, "net_vhost0,iface=/run/vh/v.sock,queues=2", "p");
        dpdk_device(&mut r, "net_virtio_user0,path=/dev/vhost-net,queues=1", "p");
        dpdk_device(&mut r, "net_virtio_user1,path=/run/vu/s.sock,server=1", "p");
        dpdk_device(&mut r, "net_tap0,iface=dtap0", "p");
        dpdk_device(&mut r, "net_af_packet0,iface=eth1", "p");
        dpdk_device(&mut r, "0000:03:00.0", "p");
        let m = r.merged();
        assert_eq!(m[Path::new("/run/m")].0, Rights::SOCKET_DIR);
        assert!(m[Path::new("/run/m")].1[0].contains("port \"m\": net_memif0 socket"));
        assert!(!m.contains_key(Path::new("/run/abstract")));
        assert_eq!(m[Path::new("/dev/vhost-net")].0, Rights::DEVICE);
        assert_eq!(m[Path::new("/dev/net/tun")].0, Rights::DEVICE);
        // Sockets: a vhost server's and a virtio-user server's directories (bound there,
        // existing or not), a memif client's default socket's (/run).
        for d in ["/run/vh", "/run/vu", "/run"] {
            assert_eq!(m[Path::new(d)].0, Rights::SOCKET_DIR, "{d}");
        }
        // af_packet and PCI devices name no file.
        assert_eq!(m.len(), 6, "{m:?}");
    }

    #[test]
    fn hugetlbfs_mounts_are_read_from_the_mount_table() {
        let text = "sysfs /sys sysfs rw 0 0\n\
                    hugetlbfs /dev/hugepages hugetlbfs rw,relatime,pagesize=2M 0 0\n\
                    none /mnt/huge\\0401G hugetlbfs rw,pagesize=1024M 0 0\n\
                    tmpfs /run tmpfs rw 0 0\n";
        assert_eq!(
            parse_hugetlbfs_mounts(text),
            [
                PathBuf::from("/dev/hugepages"),
                PathBuf::from("/mnt/huge 1G")
            ]
        );
        assert_eq!(unescape_mount("a\\134b\\"), "a\\b\\");
    }

    #[test]
    fn the_dpdk_init_layer_reads_everything_and_writes_nothing_more() {
        let c = Config::parse("[dataplane]\ncontrol_socket = \"/run/x/c.sock\"\n").unwrap();
        let tight = rules(&c);
        let wide = dpdk_init_rules(&tight);
        assert_eq!(rights(&wide, "/"), Some(Rights::READ));
        // Every rule of the daemon's own layer is in the first layer too (layers intersect).
        for r in tight.iter() {
            assert!(wide.iter().any(|w| w == r), "{r:?}");
        }
        assert_eq!(wide.len(), tight.len() + 2);
    }

    #[cfg(feature = "dpdk")]
    #[test]
    fn dpdk_configs_add_sysfs_procfs_vfio_and_device_files() {
        let c = Config::parse(
            r#"
            [dpdk]
            allow = ["0000:03:00.0"]
            vdevs = ["net_vhost0,iface=/run/torii-test-vh/v.sock"]
            [[port]]
            name = "m"
            type = "dpdk"
            device = "net_memif0,role=server,socket=/run/torii-test-m/m.sock,socket-abstract=no"
            "#,
        )
        .unwrap();
        let r = rules(&c);
        assert_eq!(rights(&r, "/sys"), Some(Rights::READ));
        assert_eq!(rights(&r, "/proc"), Some(Rights::READ));
        assert_eq!(
            rights(&r, "/dev/vfio"),
            Some(Rights::DEVICE | Rights::READ_DIR)
        );
        assert_eq!(rights(&r, "/run/torii-test-m"), Some(Rights::SOCKET_DIR));
        assert_eq!(rights(&r, "/run/torii-test-vh"), Some(Rights::SOCKET_DIR));
    }
}
