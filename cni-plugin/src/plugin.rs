//! The operations. Each checks everything it can before it changes anything; ADD records what
//! it is about to make before it makes it and undoes it all if any step fails; DEL and GC undo
//! whatever exists and succeed when there is nothing left.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::config::{fits_sun_path, Command, Env, Mode, NetConf};
use crate::delegate::Delegate;
use crate::sriov::{self, Host};
use crate::state::{Attachment, Kind, Phase, Store};
use crate::tap;
use crate::types::{AddResult, CniError, CniResult, Code, Interface, SUPPORTED_VERSIONS};

/// FNV-1a: a stable hash for names and MACs derived from an attachment (stable across
/// builds, unlike std's hasher).
fn fnv1a(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain([0]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// A locally administered unicast MAC derived from the attachment.
fn derived_mac(conf: &NetConf, env: &Env) -> String {
    let h = fnv1a(&[&conf.name, env.container_id(), env.ifname()]).to_be_bytes();
    format!(
        "02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        h[0], h[1], h[2], h[3], h[4]
    )
}

/// The data plane port of an attachment: readable (the container id's start and the
/// interface) and unique (a hash of the whole key). At most 12 + 1 + 15 + 1 + 8 = 37 bytes.
pub fn port_name(conf: &NetConf, env: &Env) -> String {
    let cid = env.container_id();
    let short = &cid[..cid.len().min(12)];
    let h = fnv1a(&[&conf.name, cid, env.ifname()]) as u32;
    // The name goes into API paths: characters other than these become `_` (the hash keeps
    // it unique).
    let ifname: String = env
        .ifname()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{short}.{ifname}.{h:08x}")
}

/// The pod's directory of sockets and network files (one per container; the runtime shares
/// it with the VM launcher): the container id, or for ids over 32 characters (which would not
/// leave room in a socket address) their first 24 and a hash of the whole.
fn pod_dir(conf: &NetConf, env: &Env) -> PathBuf {
    let cid = env.container_id();
    if cid.len() <= 32 {
        return conf.socket_dir.join(cid);
    }
    let h = fnv1a(&[cid]) as u32;
    conf.socket_dir.join(format!("{}-{h:08x}", &cid[..24]))
}

/// The subdirectory of a pod directory where a data plane that is not root binds its sockets.
const DATAPLANE_DIR: &str = "dataplane";

/// Where the attachment's vhost-user socket goes: in the pod directory, or, when the data
/// plane runs as another user, in a subdirectory that user owns. The pod directory itself
/// stays root's: it holds the network files the VM launcher (root) reads, which the data
/// plane's user must not be able to replace.
fn socket_path(conf: &NetConf, env: &Env, dir: &Path) -> PathBuf {
    let name = format!("{}.sock", env.ifname());
    match dataplane_user(&conf.control_socket) {
        Some(_) => dir.join(DATAPLANE_DIR).join(name),
        None => dir.join(name),
    }
}

/// The tap mode's record: the links named after the attachment (`tvh`/`tvp` and the hash
/// of the data plane port name, 11 bytes).
fn tap_kind(conf: &NetConf, env: &Env) -> Kind {
    let h = fnv1a(&[&conf.name, env.container_id(), env.ifname()]) as u32;
    Kind::Tap {
        bridge: conf.bridge.clone(),
        host_veth: format!("tvh{h:08x}"),
        pod_veth: format!("tvp{h:08x}"),
        queues: conf.queues,
        pod_dir: pod_dir(conf, env),
    }
}

/// The link names of a tap attachment's record, and the tag its links carry.
fn tap_names(conf: &NetConf, a: &Attachment) -> Option<tap::Names> {
    match &a.kind {
        Kind::Tap {
            bridge,
            host_veth,
            pod_veth,
            ..
        } => Some(tap::Names {
            bridge: bridge.clone(),
            host_veth: host_veth.clone(),
            pod_veth: pod_veth.clone(),
            tap: a.ifname.clone(),
            owner: format!("torii-cni:{}/{}/{}", conf.name, a.container_id, a.ifname),
        }),
        _ => None,
    }
}

fn tap_err(e: io::Error) -> CniError {
    CniError::new(Code::Setup, e.to_string())
}

/// The guest's MAC: the runtime's, the config's, or one derived from the attachment.
fn guest_mac(conf: &NetConf, env: &Env) -> String {
    conf.runtime
        .mac
        .clone()
        .or_else(|| conf.mac.clone())
        .unwrap_or_else(|| derived_mac(conf, env))
}

/// The data plane's control API.
struct DataPlane<'a> {
    socket: &'a Path,
}

/// Whether an error of the control API client means nobody is listening.
fn is_unreachable(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<io::Error>().is_some_and(|io| {
            matches!(
                io.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            )
        })
    })
}

impl DataPlane<'_> {
    fn request(&self, method: &str, path: &str, body: Option<&Value>) -> CniResult<(u16, Value)> {
        match torii_dataplane::ctl::request(self.socket, method, path, body) {
            Ok(r) => Ok((
                r.status,
                serde_json::from_str(&r.body).unwrap_or(Value::String(r.body)),
            )),
            Err(e) if is_unreachable(&e) => Err(CniError::new(
                Code::NotAvailable,
                format!("torii-dataplane is not reachable: {e:#}"),
            )),
            Err(e) => Err(CniError::new(Code::DataPlane, format!("{e:#}"))),
        }
    }

    fn fail(what: &str, status: u16, body: &Value) -> CniError {
        CniError::new(
            Code::DataPlane,
            format!(
                "{what}: HTTP {status}: {}",
                body["error"]
                    .as_str()
                    .map_or_else(|| body.to_string(), str::to_string)
            ),
        )
    }

    fn version(&self) -> CniResult<()> {
        match self.request("GET", "/v1/version", None)? {
            (200, _) => Ok(()),
            (s, b) => Err(Self::fail("version", s, &b)),
        }
    }

    fn add_port(&self, name: &str, settings: &Value) -> CniResult<Value> {
        match self.request("PUT", &format!("/v1/ports/{name}"), Some(settings))? {
            (201, b) => Ok(b),
            (s, b) => Err(Self::fail(&format!("adding port {name}"), s, &b)),
        }
    }

    /// Removes port `name`; a port (or a data plane) that is not there is removed already.
    /// Whether its socket may still be on disk (the port was ours, or the data plane died
    /// without removing it).
    fn remove_port(&self, name: &str) -> CniResult<bool> {
        match self.request("DELETE", &format!("/v1/ports/{name}"), None) {
            Ok((204, _)) => Ok(true),
            Ok((404, _)) => Ok(false),
            Ok((s, b)) => Err(Self::fail(&format!("removing port {name}"), s, &b)),
            // Ports added through the API do not outlive the daemon.
            Err(e) if e.code == Code::NotAvailable as u32 => Ok(true),
            Err(e) => Err(e),
        }
    }

    fn port(&self, name: &str) -> CniResult<Option<Value>> {
        match self.request("GET", &format!("/v1/ports/{name}"), None)? {
            (200, b) => Ok(Some(b)),
            (404, _) => Ok(None),
            (s, b) => Err(Self::fail(&format!("port {name}"), s, &b)),
        }
    }
}

fn remove_file(p: &Path) -> CniResult<()> {
    match fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(CniError::new(Code::Io, format!("{}: {e}", p.display()))),
    }
}

fn write_file(p: &Path, v: &Value) -> CniResult<()> {
    let io = |e: io::Error| CniError::new(Code::Io, format!("{}: {e}", p.display()));
    if let Some(d) = p.parent() {
        fs::create_dir_all(d).map_err(io)?;
    }
    let tmp = p.with_extension(format!("tmp{}", std::process::id()));
    fs::write(&tmp, serde_json::to_vec_pretty(v).expect("JSON")).map_err(io)?;
    fs::rename(&tmp, p).map_err(io)
}

/// Runs `env.command` with `stdin` on this machine; the text to print on success.
pub fn run(env: &Env, stdin: &[u8]) -> CniResult<Option<Value>> {
    run_on(&mut Host::kernel(), env, stdin)
}

/// [`run`] on `host`: the kernel's, or a fake sysfs tree and PF driver for the sriov mode.
pub fn run_on(host: &mut Host, env: &Env, stdin: &[u8]) -> CniResult<Option<Value>> {
    if env.command == Command::Version {
        let v: Value = serde_json::from_slice(stdin).unwrap_or(Value::Null);
        let version = v["cniVersion"].as_str().unwrap_or("1.1.0");
        return Ok(Some(json!({
            "cniVersion": version,
            "supportedVersions": SUPPORTED_VERSIONS,
        })));
    }
    let conf = NetConf::parse(stdin)?;
    if matches!(env.command, Command::Status | Command::Gc) && conf.cni_version != "1.1.0" {
        return Err(CniError::new(
            Code::IncompatibleVersion,
            format!(
                "STATUS and GC need cniVersion 1.1.0, not {}",
                conf.cni_version
            ),
        ));
    }
    let store = Store::new(conf.network_state_dir());
    match env.command {
        Command::Add => add(host, env, &conf, &store).map(Some),
        Command::Del => del(host, env, &conf, &store).map(|_| None),
        Command::Check => check(host, env, &conf, &store).map(|_| None),
        Command::Status => status(env, &conf).map(|_| None),
        Command::Gc => gc(host, env, &conf, &store).map(|_| None),
        Command::Version => unreachable!("answered above"),
    }
}

fn ipam(env: &Env, conf: &NetConf) -> CniResult<Option<Delegate>> {
    let cache = conf.state_dir.join(".cache");
    conf.ipam_type()
        .map(|t| Delegate::find(env, t, Some(cache.clone())))
        .transpose()
}

fn add(host: &mut Host, env: &Env, conf: &NetConf, store: &Store) -> CniResult<Value> {
    if let Some(a) = store.load(env.container_id(), env.ifname())? {
        return Err(CniError::new(
            Code::InvalidConfig,
            format!(
                "{} already has an interface {} on network {} (phase {:?}): DEL it first",
                a.container_id, a.ifname, conf.name, a.phase
            ),
        ));
    }
    let netns = env.netns.clone().expect("checked for ADD");
    if !netns.exists() {
        return Err(CniError::new(
            Code::UnknownContainer,
            format!("network namespace {} does not exist", netns.display()),
        ));
    }
    let ipam = ipam(env, conf)?;
    // Checked before anything is recorded: what the mode needs.
    let kind = match (&conf.mode, &conf.sriov) {
        (Mode::VhostUser, _) => {
            let dir = pod_dir(conf, env);
            let socket = socket_path(conf, env, &dir);
            if !fits_sun_path(&socket) {
                return Err(CniError::new(
                    Code::InvalidConfig,
                    format!(
                        "socket path {} is {} bytes, more than a Unix socket address takes (107): use a shorter socketDir",
                        socket.display(),
                        socket.as_os_str().len()
                    ),
                ));
            }
            DataPlane {
                socket: &conf.control_socket,
            }
            .version()?;
            Kind::VhostUser {
                port: port_name(conf, env),
                socket,
                pod_dir: dir,
            }
        }
        (Mode::Sriov, Some(s)) => Kind::Sriov {
            device: sriov::device(conf, s)?.to_string(),
            vfio: s.vfio,
        },
        (Mode::Sriov, None) => unreachable!("parsed with the mode"),
        (Mode::Tap, _) => {
            let kind = tap_kind(conf, env);
            let probe = Attachment {
                container_id: env.container_id().into(),
                ifname: env.ifname().into(),
                netns: None,
                phase: Phase::Adding,
                device_info_file: None,
                result: None,
                kind,
            };
            let names = tap_names(conf, &probe).expect("a tap record");
            tap::precheck(&netns, &names)
                .map_err(|e| CniError::new(Code::InvalidConfig, e.to_string()))?;
            probe.kind
        }
    };
    let mut a = Attachment {
        container_id: env.container_id().to_string(),
        ifname: env.ifname().to_string(),
        netns: Some(netns.clone()),
        phase: Phase::Adding,
        device_info_file: conf.runtime.device_info_file.clone(),
        result: None,
        kind,
    };
    store.save(&a)?;
    let made = (|| -> CniResult<AddResult> {
        let result = match &ipam {
            Some(d) => d.add(env, &conf.raw, &conf.cni_version)?,
            None => AddResult::default(),
        };
        match &a.kind {
            Kind::VhostUser {
                port,
                socket,
                pod_dir,
            } => add_vhost_user(env, conf, port, socket, pod_dir, result),
            Kind::Sriov { .. } => add_sriov(host, env, conf, result),
            Kind::Tap { .. } => add_tap(env, conf, &a, result),
        }
    })();
    match made {
        Ok(out) => {
            a.phase = Phase::Added;
            a.result = Some(out.to_json("1.1.0"));
            if let Err(e) = store.save(&a) {
                if let Err(u) = undo(host, env, conf, &a, ipam.as_ref()) {
                    eprintln!("torii-cni: undoing the failed ADD: {u}");
                }
                return Err(e);
            }
            Ok(out.to_json(&conf.cni_version))
        }
        Err(e) => {
            // Undo what was made; the first error is the one to report, the undo's are logged
            // (the record stays for DEL or GC to finish).
            if let Err(u) = undo(host, env, conf, &a, ipam.as_ref()) {
                eprintln!("torii-cni: undoing the failed ADD: {u}");
            }
            Err(e)
        }
    }
}

/// The result: a chained plugin's (prevResult) with our interface, and IPAM's addresses on
/// it, added.
fn merge_result(conf: &NetConf, iface: Interface, mut ipam: AddResult) -> CniResult<AddResult> {
    let mut out = match &conf.prev_result {
        Some(p) => AddResult::from_json(p)?,
        None => AddResult::default(),
    };
    let index = out.interfaces.len() as u32;
    out.interfaces.push(iface);
    for ip in &mut ipam.ips {
        ip.interface = Some(index);
    }
    out.ips.append(&mut ipam.ips);
    out.routes.append(&mut ipam.routes);
    // host-local always gives a "dns" object, empty when it knows none.
    let given = |d: &Option<Value>| {
        d.as_ref()
            .filter(|v| v.as_object().is_none_or(|o| !o.is_empty()))
            .cloned()
    };
    out.dns = given(&ipam.dns)
        .or_else(|| given(&out.dns))
        .or_else(|| conf.dns.clone());
    Ok(out)
}

/// Gives `socket`'s directory, Torii's `dataplane` subdirectory of a pod directory, to the
/// data plane's `user` if it is still root's.
fn hand_over(socket: &Path, user: Option<(u32, u32)>) -> io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let (Some((uid, gid)), Some(d)) = (user, socket.parent()) else {
        return Ok(());
    };
    if d.file_name() != Some(std::ffi::OsStr::new(DATAPLANE_DIR)) || fs::metadata(d)?.uid() != 0 {
        return Ok(());
    }
    fs::set_permissions(d, fs::Permissions::from_mode(0o750))?;
    std::os::unix::fs::chown(d, Some(uid), Some(gid))
}

/// The data plane's user and group, when not root: the owner of its control socket.
fn dataplane_user(control_socket: &Path) -> Option<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    let m = fs::metadata(control_socket).ok()?;
    (m.uid() != 0).then(|| (m.uid(), m.gid()))
}

fn add_vhost_user(
    env: &Env,
    conf: &NetConf,
    port: &str,
    socket: &Path,
    dir: &Path,
    ipam: AddResult,
) -> CniResult<AddResult> {
    let dp = DataPlane {
        socket: &conf.control_socket,
    };
    let mac = guest_mac(conf, env);
    // The socket's directory: made private if new, refused if others could write it (they
    // could stand in for the data plane's socket and get the pod's memory). A data plane that
    // runs as another user (its control socket's owner) gets the subdirectory it binds in
    // (`socket_path`), also when an earlier ADD made it but failed before handing it over.
    let user = dataplane_user(&conf.control_socket);
    let prepared = torii_vhost_user::sockdir::prepare_for(socket, user).and_then(|()| {
        hand_over(socket, user).map_err(|source| torii_vhost_user::sockdir::SockDirError::Io {
            socket: socket.to_path_buf(),
            dir: socket.parent().unwrap_or(dir).to_path_buf(),
            source,
        })
    });
    prepared.map_err(|e| {
        use torii_vhost_user::sockdir::SockDirError;
        let code = match e {
            SockDirError::Io { .. } => Code::Io,
            _ => Code::InvalidConfig,
        };
        CniError::new(code, format!("socketDir: {e}"))
    })?;
    let mut settings = json!({
        "type": "vhost-user",
        "socket": socket,
        "mode": "server",
        "queues": conf.queues,
        "mac": mac,
    });
    if let Some(m) = conf.mtu {
        settings["mtu"] = json!(m);
    }
    if let Some(v) = conf.vlan {
        settings["vlan"] = json!(v);
    }
    dp.add_port(port, &settings)?;
    let out = merge_result(
        conf,
        Interface {
            name: env.ifname().to_string(),
            mac: Some(mac.clone()),
            mtu: conf.mtu,
            sandbox: env.netns.as_ref().map(|n| n.display().to_string()),
            socket_path: Some(socket.display().to_string()),
            pci_id: None,
        },
        ipam,
    )?;
    let index = out.interfaces.len() as u32 - 1;
    // What the VM launcher needs to give the VM this interface.
    write_file(
        &dir.join(format!("{}.json", env.ifname())),
        &json!({
            "ifname": env.ifname(),
            "type": "vhost-user",
            "socket": socket,
            "mode": "client",
            "mac": mac,
            "mtu": conf.mtu,
            "queues": conf.queues,
            "ips": out.ips.iter().filter(|i| i.interface == Some(index)).collect::<Vec<_>>(),
            "routes": out.routes,
            "dns": out.dns,
        }),
    )?;
    if let Some(f) = &conf.runtime.device_info_file {
        // The Network Plumbing WG device-info format: the pod's side of the socket is the
        // client (Torii listens).
        write_file(
            f,
            &json!({
                "type": "vhost-user",
                "version": "1.1.0",
                "vhost-user": { "mode": "client", "path": socket },
            }),
        )?;
    }
    Ok(out)
}

fn add_tap(env: &Env, conf: &NetConf, a: &Attachment, ipam: AddResult) -> CniResult<AddResult> {
    let Kind::Tap {
        host_veth, pod_dir, ..
    } = &a.kind
    else {
        unreachable!("a tap record")
    };
    let names = tap_names(conf, a).expect("a tap record");
    let netns = env.netns.as_deref().expect("checked for ADD");
    tap::plug(
        netns,
        &tap::Spec {
            names: &names,
            queues: conf.queues,
            mtu: conf.mtu,
        },
    )
    .map_err(tap_err)?;
    let mac = guest_mac(conf, env);
    // The host's end first (as the bridge plugin lists its host side), then the pod's tap.
    let mut out = merge_result(
        conf,
        Interface {
            name: env.ifname().to_string(),
            mac: Some(mac.clone()),
            mtu: conf.mtu,
            sandbox: Some(netns.display().to_string()),
            socket_path: None,
            pci_id: None,
        },
        ipam,
    )?;
    let index = out.interfaces.len() as u32 - 1;
    out.interfaces.insert(
        index as usize,
        Interface {
            name: host_veth.clone(),
            mac: None,
            mtu: conf.mtu,
            sandbox: None,
            socket_path: None,
            pci_id: None,
        },
    );
    for ip in out.ips.iter_mut().filter(|i| i.interface == Some(index)) {
        ip.interface = Some(index + 1);
    }
    write_file(
        &pod_dir.join(format!("{}.json", env.ifname())),
        &json!({
            "ifname": env.ifname(),
            "type": "tap",
            "tap": env.ifname(),
            "netns": netns,
            "mac": mac,
            "mtu": conf.mtu,
            "queues": conf.queues,
            "ips": out.ips.iter().filter(|i| i.interface == Some(index + 1)).collect::<Vec<_>>(),
            "routes": out.routes,
            "dns": out.dns,
        }),
    )?;
    Ok(out)
}

fn add_sriov(host: &mut Host, env: &Env, conf: &NetConf, ipam: AddResult) -> CniResult<AddResult> {
    let s = conf.sriov.as_ref().expect("sriov mode");
    let device = sriov::device(conf, s)?;
    let saved = sriov::claim(host, env, conf, s, device)?;
    let mac = sriov::setting_mac(&s.settings);
    let netns = env.netns.as_deref().expect("checked for ADD");
    if s.vfio {
        sriov::bind_vfio(host, device)?;
    } else {
        sriov::plug_netdev(host, netns, &saved, env.ifname(), mac, conf.mtu, &ipam)?;
    }
    let mac_text = mac.or(saved.mac).map(|m| {
        m.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    });
    if let Some(f) = &conf.runtime.device_info_file {
        write_file(
            f,
            &json!({
                "type": "pci",
                "version": "1.1.0",
                "pci": { "pci-address": device.to_string() },
            }),
        )?;
    }
    merge_result(
        conf,
        Interface {
            name: env.ifname().to_string(),
            mac: mac_text,
            mtu: conf.mtu,
            sandbox: Some(netns.display().to_string()),
            socket_path: None,
            pci_id: Some(device.to_string()),
        },
        ipam,
    )
}

/// Removes everything an attachment may hold, then its record. Every step runs; the first
/// error is returned (with the record kept, so a later DEL or GC tries again).
fn undo(
    host: &mut Host,
    env: &Env,
    conf: &NetConf,
    a: &Attachment,
    ipam: Option<&Delegate>,
) -> CniResult<()> {
    let mut first: Option<CniError> = None;
    let mut keep = |r: CniResult<()>| {
        if let Err(e) = r {
            first.get_or_insert(e);
        }
    };
    match &a.kind {
        Kind::VhostUser {
            port,
            socket,
            pod_dir,
        } => {
            let dp = DataPlane {
                socket: &conf.control_socket,
            };
            // The socket path is this attachment's, but a socket there is ours only if our
            // port made it: the port was there, or the ADD got as far as having one (a data
            // plane that restarted since leaves its socket file behind).
            match dp.remove_port(port) {
                Ok(true) => keep(remove_file(socket)),
                Ok(false) if a.phase == Phase::Added => keep(remove_file(socket)),
                Ok(false) => {}
                Err(e) => keep(Err(e)),
            }
            keep(remove_file(&pod_dir.join(format!("{}.json", a.ifname))));
            // The data plane's subdirectory and the pod directory go with their last
            // interface.
            if let Some(d) = socket.parent().filter(|d| d != pod_dir) {
                let _ = fs::remove_dir(d);
            }
            let _ = fs::remove_dir(pod_dir);
        }
        Kind::Sriov { device, vfio } => keep(sriov::release(
            host,
            conf,
            &a.container_id,
            a.netns.as_deref(),
            &a.ifname,
            device,
            *vfio,
        )),
        Kind::Tap { pod_dir, .. } => {
            let names = tap_names(conf, a).expect("a tap record");
            keep(tap::unplug(a.netns.as_deref(), &names).map_err(tap_err));
            keep(remove_file(&pod_dir.join(format!("{}.json", a.ifname))));
            let _ = fs::remove_dir(pod_dir);
        }
    }
    if let Some(f) = &a.device_info_file {
        keep(remove_file(f));
    }
    if let Some(d) = ipam {
        keep(
            d.run(
                Command::Del,
                Some((&a.container_id, &a.ifname)),
                env,
                &conf.raw,
                &conf.cni_version,
            )
            .map(|_| ()),
        );
    }
    match first {
        Some(e) => Err(e),
        None => Store::new(conf.network_state_dir()).remove(&a.container_id, &a.ifname),
    }
}

fn del(host: &mut Host, env: &Env, conf: &NetConf, store: &Store) -> CniResult<()> {
    let a = match store.load(env.container_id(), env.ifname())? {
        Some(a) => a,
        // No record: clean up what an ADD of this attachment would have made.
        None => Attachment {
            container_id: env.container_id().to_string(),
            ifname: env.ifname().to_string(),
            netns: env.netns.clone(),
            phase: Phase::Adding,
            device_info_file: conf.runtime.device_info_file.clone(),
            result: None,
            kind: match (&conf.mode, &conf.sriov) {
                (Mode::Sriov, Some(s)) => match sriov::device(conf, s) {
                    Ok(d) => Kind::Sriov {
                        device: d.to_string(),
                        vfio: s.vfio,
                    },
                    // No VF named anywhere: none can have been taken for this attachment.
                    Err(_) => return release_ipam_only(env, conf),
                },
                (Mode::Tap, _) => tap_kind(conf, env),
                _ => {
                    let dir = pod_dir(conf, env);
                    Kind::VhostUser {
                        port: port_name(conf, env),
                        socket: socket_path(conf, env, &dir),
                        pod_dir: dir,
                    }
                }
            },
        },
    };
    // A missing IPAM plugin cannot have allocated anything for us.
    let ipam = match ipam(env, conf) {
        Ok(d) => d,
        Err(e) if e.code == Code::NotAvailable as u32 => None,
        Err(e) => return Err(e),
    };
    undo(host, env, conf, &a, ipam.as_ref())
}

/// DEL of an sriov attachment with no record and no VF: only IPAM may hold something.
fn release_ipam_only(env: &Env, conf: &NetConf) -> CniResult<()> {
    match ipam(env, conf) {
        Ok(Some(d)) => d
            .run(Command::Del, None, env, &conf.raw, &conf.cni_version)
            .map(|_| ()),
        Ok(None) => Ok(()),
        Err(e) if e.code == Code::NotAvailable as u32 => Ok(()),
        Err(e) => Err(e),
    }
}

fn check(host: &mut Host, env: &Env, conf: &NetConf, store: &Store) -> CniResult<()> {
    let prev = conf.prev_result.as_ref().ok_or_else(|| {
        CniError::new(
            Code::InvalidConfig,
            "CHECK needs prevResult (the ADD result)",
        )
    })?;
    let prev = AddResult::from_json(prev)?;
    let a = store
        .load(env.container_id(), env.ifname())?
        .filter(|a| a.phase == Phase::Added)
        .ok_or_else(|| {
            CniError::new(
                Code::UnknownContainer,
                format!(
                    "no interface {} of {} on network {}",
                    env.ifname(),
                    env.container_id(),
                    conf.name
                ),
            )
        })?;
    let fail = |what: String| CniError::new(Code::Setup, what);
    let ours = prev
        .interfaces
        .iter()
        .find(|i| {
            i.name == a.ifname
                && i.sandbox.as_deref() == env.netns.as_deref().and_then(Path::to_str)
        })
        .ok_or_else(|| {
            fail(format!(
                "prevResult has no interface {} in {:?}",
                a.ifname, env.netns
            ))
        })?;
    match &a.kind {
        Kind::VhostUser { port, socket, .. } => {
            if conf.cni_version == "1.1.0" && ours.socket_path.as_deref() != socket.to_str() {
                return Err(fail(format!(
                    "prevResult's socketPath {:?} is not {}",
                    ours.socket_path,
                    socket.display()
                )));
            }
            let dp = DataPlane {
                socket: &conf.control_socket,
            };
            if dp.port(port)?.is_none() {
                return Err(fail(format!("torii-dataplane has no port {port}")));
            }
            if !socket.exists() {
                return Err(fail(format!("socket {} is missing", socket.display())));
            }
        }
        Kind::Sriov { device, vfio } => sriov::check(host, conf, env, device, *vfio)?,
        Kind::Tap { queues, .. } => {
            let names = tap_names(conf, &a).expect("a tap record");
            let netns = env.netns.as_deref().expect("checked for CHECK");
            tap::check(
                netns,
                &tap::Spec {
                    names: &names,
                    queues: *queues,
                    mtu: conf.mtu,
                },
            )
            .map_err(tap_err)?;
        }
    }
    if let Some(d) = ipam(env, conf)? {
        d.run(Command::Check, None, env, &conf.raw, &conf.cni_version)?;
    }
    Ok(())
}

fn status(env: &Env, conf: &NetConf) -> CniResult<()> {
    // Only the vhost-user mode needs the data plane.
    if conf.mode == Mode::VhostUser {
        DataPlane {
            socket: &conf.control_socket,
        }
        .version()?;
    }
    if let Some(d) = ipam(env, conf)? {
        d.run(Command::Status, None, env, &conf.raw, &conf.cni_version)?;
    }
    Ok(())
}

fn gc(host: &mut Host, env: &Env, conf: &NetConf, store: &Store) -> CniResult<()> {
    // Without the list every attachment would look stale: refuse rather than undo them all.
    let valid = conf.valid_attachments.clone().ok_or_else(|| {
        CniError::new(
            Code::InvalidConfig,
            "GC needs cni.dev/valid-attachments (the attachments still in use)",
        )
    })?;
    // Go on past every error, report the first at the end.
    let mut first: Option<CniError> = None;
    let ipam = match ipam(env, conf) {
        Ok(d) => d,
        Err(e) => {
            first = Some(e);
            None
        }
    };
    let (attachments, unreadable) = store.list()?;
    for e in unreadable {
        first.get_or_insert(e);
    }
    for a in attachments {
        if valid
            .iter()
            .any(|v| v.container_id == a.container_id && v.ifname == a.ifname)
        {
            continue;
        }
        if let Err(e) = undo(host, env, conf, &a, ipam.as_ref()) {
            first.get_or_insert(e);
        }
    }
    if let Some(d) = &ipam {
        if let Err(e) = d.run(Command::Gc, None, env, &conf.raw, &conf.cni_version) {
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), Err)
}
