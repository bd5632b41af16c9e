//! What the runtime passes: the `CNI_*` environment (checked per operation, section 2 of the
//! spec) and the network configuration on stdin (checked whole before anything is done;
//! unknown keys are refused with code 2, naming the key and its value).

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::types::{CniError, CniResult, Code, SUPPORTED_VERSIONS};

/// `CNI_COMMAND`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

/// The `CNI_*` environment.
#[derive(Clone, Debug)]
pub struct Env {
    pub command: Command,
    pub container_id: Option<String>,
    pub netns: Option<PathBuf>,
    pub ifname: Option<String>,
    pub args: Vec<(String, String)>,
    pub path: Vec<PathBuf>,
}

fn env_err(details: String) -> CniError {
    CniError::new(Code::InvalidEnvironment, details)
}

/// A container id as the spec allows it: an alphanumeric, then alphanumerics, `_`, `.`, `-`.
pub fn valid_container_id(s: &str) -> bool {
    let mut c = s.chars();
    c.next().is_some_and(|f| f.is_ascii_alphanumeric())
        && c.all(|x| x.is_ascii_alphanumeric() || matches!(x, '_' | '.' | '-'))
}

/// An interface name as the spec allows it: 1 to 15 bytes, not `.` or `..`, no `/`, `:` or
/// whitespace.
pub fn valid_ifname(s: &str) -> bool {
    !s.is_empty()
        && s.len() < 16
        && s != "."
        && s != ".."
        && !s.chars().any(|c| c == '/' || c == ':' || c.is_whitespace())
}

impl Env {
    /// Reads the environment through `get` (the process's, or a test's).
    pub fn read(get: impl Fn(&str) -> Option<String>) -> CniResult<Env> {
        let nonempty = |k: &str| get(k).filter(|v| !v.is_empty());
        let command = match nonempty("CNI_COMMAND").as_deref() {
            Some("ADD") => Command::Add,
            Some("DEL") => Command::Del,
            Some("CHECK") => Command::Check,
            Some("VERSION") => Command::Version,
            Some("STATUS") => Command::Status,
            Some("GC") => Command::Gc,
            Some(other) => {
                return Err(env_err(format!(
                    "CNI_COMMAND {other:?} is not ADD, DEL, CHECK, STATUS, GC or VERSION"
                )))
            }
            None => return Err(env_err("CNI_COMMAND is not set".into())),
        };
        let (needs_container, needs_netns) = match command {
            Command::Add | Command::Check => (true, true),
            Command::Del => (true, false),
            Command::Version | Command::Status | Command::Gc => (false, false),
        };
        let mut missing = Vec::new();
        let container_id = nonempty("CNI_CONTAINERID");
        let ifname = nonempty("CNI_IFNAME");
        let netns = nonempty("CNI_NETNS").map(PathBuf::from);
        if needs_container {
            if container_id.is_none() {
                missing.push("CNI_CONTAINERID");
            }
            if ifname.is_none() {
                missing.push("CNI_IFNAME");
            }
        }
        if needs_netns && netns.is_none() {
            missing.push("CNI_NETNS");
        }
        if !missing.is_empty() {
            return Err(env_err(format!("{} not set", missing.join(", "))));
        }
        if let Some(c) = container_id.as_deref().filter(|c| !valid_container_id(c)) {
            return Err(env_err(format!(
                "CNI_CONTAINERID {c:?}: must start with a letter or digit, then letters, digits, _ . -"
            )));
        }
        if let Some(i) = ifname.as_deref().filter(|i| !valid_ifname(i)) {
            return Err(env_err(format!(
                "CNI_IFNAME {i:?} is not a valid interface name (1-15 bytes, no / : or spaces)"
            )));
        }
        let mut args = Vec::new();
        for kv in nonempty("CNI_ARGS").iter().flat_map(|a| a.split(';')) {
            if kv.is_empty() {
                continue;
            }
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| env_err(format!("CNI_ARGS: {kv:?} is not KEY=VALUE")))?;
            args.push((k.to_string(), v.to_string()));
        }
        let path = nonempty("CNI_PATH")
            .map(|p| {
                p.split(':')
                    .filter(|d| !d.is_empty())
                    .map(PathBuf::from)
                    .collect()
            })
            .unwrap_or_default();
        Ok(Env {
            command,
            container_id,
            netns,
            ifname,
            args,
            path,
        })
    }

    pub fn container_id(&self) -> &str {
        self.container_id.as_deref().unwrap_or_default()
    }

    pub fn ifname(&self) -> &str {
        self.ifname.as_deref().unwrap_or_default()
    }
}

/// The interface modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// A vhost-user port on torii-dataplane; the VM connects to its socket.
    VhostUser,
    /// An SR-IOV VF: its interface in the pod, or bound to vfio-pci for a VM.
    Sriov,
    /// A tap in the pod for the VM's QEMU, tc-redirected to a veth on a host bridge: the
    /// kernel's path.
    Tap,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::VhostUser => "vhost-user",
            Mode::Sriov => "sriov",
            Mode::Tap => "tap",
        }
    }
}

/// The `sriov` mode's settings.
#[derive(Clone, Debug)]
pub struct SriovConf {
    /// `deviceID` of the config (the runtime's, if it gives one, comes first).
    pub device: Option<torii_vfio::pci::PciAddr>,
    /// `vfio`: bind the VF to vfio-pci instead of moving its interface into the pod.
    pub vfio: bool,
    /// What to set on the PF for the VF: mac, vlan (+ vlanQoS, vlanProto), spoofchk, trust,
    /// minTxRate/maxTxRate, linkState.
    pub settings: Vec<torii_vfio::netlink::VfSetting>,
}

/// The runtime's capability arguments this plugin takes (section 3 and the conventions).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct RuntimeConfig {
    /// Capability `mac`.
    pub mac: Option<String>,
    /// Capability `CNIDeviceInfoFile` (Multus): where to write the device-info file.
    #[serde(rename = "CNIDeviceInfoFile")]
    pub device_info_file: Option<PathBuf>,
    /// The device the runtime (Multus, from the device plugin) chose: a VF's PCI address.
    #[serde(rename = "deviceID")]
    pub device_id: Option<String>,
}

/// One entry of `cni.dev/valid-attachments`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct ValidAttachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// The network configuration.
#[derive(Clone, Debug)]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    pub mode: Mode,
    /// The `ipam` section, if any (its `type` checked).
    pub ipam: Option<Value>,
    pub dns: Option<Value>,
    pub control_socket: PathBuf,
    pub socket_dir: PathBuf,
    pub state_dir: PathBuf,
    pub mac: Option<String>,
    pub vlan: Option<u16>,
    pub queues: u16,
    pub mtu: Option<u32>,
    pub runtime: RuntimeConfig,
    pub sriov: Option<SriovConf>,
    /// The tap mode's host bridge.
    pub bridge: String,
    pub prev_result: Option<Value>,
    pub valid_attachments: Option<Vec<ValidAttachment>>,
    /// Everything as received, for delegated plugins.
    pub raw: Value,
}

/// The keys this plugin knows; anything else is refused with code 2.
const KNOWN_KEYS: [&str; 22] = [
    "cniVersion",
    "cniVersions",
    "name",
    "type",
    "mode",
    "ipam",
    "dns",
    "ipMasq",
    "capabilities",
    "runtimeConfig",
    "args",
    "prevResult",
    "cni.dev/valid-attachments",
    "controlSocket",
    "socketDir",
    "stateDir",
    "mac",
    "vlan",
    "queues",
    "mtu",
    "disableCheck",
    // Multus adds it beside deviceID for resourceName networks; deviceID says the same.
    "pciBusID",
];

/// The keys of the tap mode, refused in the other modes.
const TAP_KEYS: [&str; 1] = ["bridge"];

/// The keys of the sriov mode (sriov-cni's names), refused in the other modes.
const SRIOV_KEYS: [&str; 9] = [
    "deviceID",
    "vfio",
    "vlanQoS",
    "vlanProto",
    "spoofchk",
    "trust",
    "minTxRate",
    "maxTxRate",
    "linkState",
];

pub const DEFAULT_CONTROL_SOCKET: &str = "/run/torii/dataplane.sock";
pub const DEFAULT_SOCKET_DIR: &str = "/run/torii/pods";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/cni/torii";
pub const DEFAULT_BRIDGE: &str = "torii0";

fn bad(details: String) -> CniError {
    CniError::new(Code::InvalidConfig, details)
}

fn string(m: &Map<String, Value>, k: &str) -> CniResult<Option<String>> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => Err(bad(format!("{k}: expected a string, got {v}"))),
    }
}

fn uint(m: &Map<String, Value>, k: &str, max: u64) -> CniResult<Option<u64>> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n <= max => Ok(Some(n)),
            _ => Err(bad(format!("{k}: expected a number up to {max}, got {v}"))),
        },
    }
}

/// A MAC address: six hex pairs, unicast.
pub fn check_mac(s: &str) -> Result<(), String> {
    let parts: Vec<&str> = s.split(':').collect();
    let bytes: Option<Vec<u8>> = (parts.len() == 6)
        .then(|| {
            parts
                .iter()
                .map(|p| u8::from_str_radix(p, 16).ok())
                .collect()
        })
        .flatten();
    match bytes {
        Some(b) if b[0] & 1 == 0 => Ok(()),
        Some(_) => Err(format!("MAC {s} is a multicast address")),
        None => Err(format!("{s:?} is not a MAC address")),
    }
}

impl NetConf {
    /// Parses and checks stdin, whatever the operation: a config that could not serve an ADD
    /// is a mistake to report in any of them.
    pub fn parse(stdin: &[u8]) -> CniResult<NetConf> {
        let raw: Value = serde_json::from_slice(stdin)
            .map_err(|e| CniError::new(Code::Decode, format!("network configuration: {e}")))?;
        let Some(m) = raw.as_object() else {
            return Err(CniError::new(
                Code::Decode,
                "network configuration: expected a JSON object",
            ));
        };
        for (k, v) in m {
            // Keys under cni.dev/ are the runtime's (section 3): taken or ignored, never refused.
            let known = KNOWN_KEYS.contains(&k.as_str())
                || SRIOV_KEYS.contains(&k.as_str())
                || TAP_KEYS.contains(&k.as_str());
            if !known && !k.starts_with("cni.dev/") {
                return Err(CniError::new(
                    Code::UnsupportedField,
                    format!("unknown key {k:?} (value {v})"),
                ));
            }
        }
        let cni_version =
            string(m, "cniVersion")?.ok_or_else(|| bad("cniVersion is missing".into()))?;
        if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
            return Err(CniError::new(
                Code::IncompatibleVersion,
                format!(
                    "cniVersion {cni_version} is not one of {}",
                    SUPPORTED_VERSIONS.join(", ")
                ),
            ));
        }
        let name = string(m, "name")?.ok_or_else(|| bad("name is missing".into()))?;
        if !valid_container_id(&name) {
            return Err(bad(format!(
                "name {name:?}: must start with a letter or digit, then letters, digits, _ . -"
            )));
        }
        let mode = match m.get("mode") {
            None => return Err(bad("mode is missing (vhost-user, sriov or tap)".into())),
            Some(v) => Mode::deserialize(v)
                .map_err(|_| bad(format!("mode {v} is not vhost-user, sriov or tap")))?,
        };
        let ipam = match m.get("ipam") {
            None | Some(Value::Null) => None,
            Some(v) if v.as_object().is_some_and(|o| o.is_empty()) => None,
            Some(v) => match v["type"].as_str() {
                Some(t) if !t.is_empty() && !t.contains('/') => Some(v.clone()),
                _ => {
                    return Err(bad(format!(
                        "ipam.type: expected a plugin name, got {}",
                        v["type"]
                    )))
                }
            },
        };
        let path = |k: &str, default: &str| -> CniResult<PathBuf> {
            let p = PathBuf::from(string(m, k)?.unwrap_or_else(|| default.to_string()));
            if !p.is_absolute() {
                return Err(bad(format!("{k} {} is not an absolute path", p.display())));
            }
            Ok(p)
        };
        let mac = string(m, "mac")?;
        if let Some(mac) = &mac {
            check_mac(mac).map_err(|e| bad(format!("mac: {e}")))?;
        }
        let runtime: RuntimeConfig = match m.get("runtimeConfig") {
            None | Some(Value::Null) => RuntimeConfig::default(),
            Some(v) => {
                RuntimeConfig::deserialize(v).map_err(|e| bad(format!("runtimeConfig: {e}")))?
            }
        };
        if let Some(mac) = &runtime.mac {
            check_mac(mac).map_err(|e| bad(format!("runtimeConfig.mac: {e}")))?;
        }
        let vlan = uint(m, "vlan", 4094)?.map(|v| v as u16);
        let queues = uint(m, "queues", 16)?.unwrap_or(1) as u16;
        if queues == 0 {
            return Err(bad("queues: at least 1".into()));
        }
        let mtu = uint(m, "mtu", 65535)?.map(|v| v as u32);
        if mtu.is_some_and(|v| v < 68) {
            return Err(bad("mtu: at least 68".into()));
        }
        for (keys, owner) in [(&SRIOV_KEYS[..], Mode::Sriov), (&TAP_KEYS[..], Mode::Tap)] {
            if let Some(k) = keys.iter().find(|k| mode != owner && m.contains_key(**k)) {
                return Err(bad(format!(
                    "{k} is for mode {}, not {}",
                    owner.name(),
                    mode.name()
                )));
            }
        }
        let sriov = match mode {
            Mode::Sriov => Some(sriov_conf(m, runtime.mac.as_ref().or(mac.as_ref()), vlan)?),
            Mode::VhostUser | Mode::Tap => None,
        };
        if mode == Mode::Tap && vlan.is_some() {
            return Err(bad(
                "vlan: the tap mode does not tag; use the vhost-user or sriov mode for VLANs"
                    .into(),
            ));
        }
        let bridge = string(m, "bridge")?.unwrap_or_else(|| DEFAULT_BRIDGE.into());
        if !valid_ifname(&bridge) {
            return Err(bad(format!(
                "bridge {bridge:?} is not a valid interface name (1-15 bytes, no / : or spaces)"
            )));
        }
        let valid_attachments = match m.get("cni.dev/valid-attachments") {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                Vec::<ValidAttachment>::deserialize(v)
                    .map_err(|e| bad(format!("cni.dev/valid-attachments: {e}")))?,
            ),
        };
        Ok(NetConf {
            name,
            mode,
            ipam,
            dns: m.get("dns").cloned().filter(|v| !v.is_null()),
            control_socket: path("controlSocket", DEFAULT_CONTROL_SOCKET)?,
            socket_dir: path("socketDir", DEFAULT_SOCKET_DIR)?,
            state_dir: path("stateDir", DEFAULT_STATE_DIR)?,
            mac,
            vlan,
            queues,
            mtu,
            runtime,
            sriov,
            bridge,
            prev_result: m.get("prevResult").cloned().filter(|v| !v.is_null()),
            valid_attachments,
            cni_version,
            raw,
        })
    }

    /// This network's state directory.
    pub fn network_state_dir(&self) -> PathBuf {
        self.state_dir.join(&self.name)
    }

    /// The IPAM plugin's name.
    pub fn ipam_type(&self) -> Option<&str> {
        self.ipam.as_ref().and_then(|i| i["type"].as_str())
    }
}

fn on_off(m: &Map<String, Value>, k: &str) -> CniResult<Option<bool>> {
    match string(m, k)?.as_deref() {
        None => Ok(None),
        Some("on") => Ok(Some(true)),
        Some("off") => Ok(Some(false)),
        Some(v) => Err(bad(format!("{k} {v:?} is not \"on\" or \"off\""))),
    }
}

/// The sriov mode's keys, as sriov-cni spells them.
fn sriov_conf(
    m: &Map<String, Value>,
    mac: Option<&String>,
    vlan: Option<u16>,
) -> CniResult<SriovConf> {
    use torii_vfio::netlink::{LinkState, VfSetting, VlanProto};
    let device = string(m, "deviceID")?
        .map(|d| d.parse().map_err(|e: String| bad(format!("deviceID: {e}"))))
        .transpose()?;
    let vfio = match m.get("vfio") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(v) => return Err(bad(format!("vfio: expected true or false, got {v}"))),
    };
    let mut settings = Vec::new();
    if let Some(mac) = mac {
        let b: Vec<u8> = mac
            .split(':')
            .filter_map(|x| u8::from_str_radix(x, 16).ok())
            .collect();
        settings.push(VfSetting::Mac(
            b.try_into().map_err(|_| bad(format!("mac {mac}")))?,
        ));
    }
    let qos = uint(m, "vlanQoS", 7)?.map(|q| q as u8);
    let proto = match string(m, "vlanProto")?.as_deref() {
        None => None,
        Some(p) if p.eq_ignore_ascii_case("802.1q") => Some(VlanProto::Dot1Q),
        Some(p) if p.eq_ignore_ascii_case("802.1ad") => Some(VlanProto::Dot1Ad),
        Some(p) => return Err(bad(format!("vlanProto {p:?} is not 802.1Q or 802.1ad"))),
    };
    if vlan.is_some() || qos.is_some() || proto.is_some() {
        settings.push(VfSetting::Vlan(
            vlan.unwrap_or(0),
            qos.unwrap_or(0),
            proto.unwrap_or_default(),
        ));
    }
    settings.extend(on_off(m, "spoofchk")?.map(VfSetting::SpoofChk));
    settings.extend(on_off(m, "trust")?.map(VfSetting::Trust));
    let (min, max) = (
        uint(m, "minTxRate", u32::MAX.into())?,
        uint(m, "maxTxRate", u32::MAX.into())?,
    );
    if min.is_some() || max.is_some() {
        settings.push(VfSetting::Rate {
            min: min.unwrap_or(0) as u32,
            max: max.unwrap_or(0) as u32,
        });
    }
    if let Some(s) = string(m, "linkState")? {
        settings.push(VfSetting::LinkState(match s.as_str() {
            "auto" => LinkState::Auto,
            "enable" => LinkState::Enable,
            "disable" => LinkState::Disable,
            _ => {
                return Err(bad(format!(
                    "linkState {s:?} is not auto, enable or disable"
                )))
            }
        }));
    }
    Ok(SriovConf {
        device,
        vfio,
        settings,
    })
}

/// Whether `p` fits in a Unix socket address (`sun_path`, 108 bytes with the NUL).
pub fn fits_sun_path(p: &Path) -> bool {
    p.as_os_str().len() < 108
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> CniResult<Env> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Env::read(|k| m.get(k).cloned())
    }

    #[test]
    fn the_environment_is_checked_per_operation() {
        let e = env(&[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "abc")]).unwrap_err();
        assert_eq!(e.code, 4);
        assert!(e.details.contains("CNI_IFNAME, CNI_NETNS"), "{e}");
        let d = env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "net1"),
        ])
        .unwrap();
        assert_eq!((d.command, d.netns), (Command::Del, None));
        let e = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "-x"),
            ("CNI_IFNAME", "a"),
            ("CNI_NETNS", "/n"),
        ])
        .unwrap_err();
        assert!(e.details.contains("CNI_CONTAINERID"), "{e}");
        let e = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "x"),
            ("CNI_IFNAME", "a:b"),
            ("CNI_NETNS", "/n"),
        ])
        .unwrap_err();
        assert!(e.details.contains("CNI_IFNAME"), "{e}");
        assert!(env(&[("CNI_COMMAND", "FOO")])
            .unwrap_err()
            .details
            .contains("FOO"));
        assert!(env(&[]).unwrap_err().details.contains("CNI_COMMAND"));
        let a = env(&[
            ("CNI_COMMAND", "GC"),
            ("CNI_ARGS", "A=1;B=2"),
            ("CNI_PATH", "/a:/b"),
        ])
        .unwrap();
        assert_eq!(a.args, [("A".into(), "1".into()), ("B".into(), "2".into())]);
        assert_eq!(a.path.len(), 2);
        assert!(env(&[("CNI_COMMAND", "GC"), ("CNI_ARGS", "A")]).is_err());
    }

    #[test]
    fn configs_are_checked_whole() {
        let good = r#"{"cniVersion": "1.1.0", "name": "net1", "type": "torii-cni", "mode": "vhost-user",
            "ipam": {"type": "host-local", "subnet": "10.9.0.0/24"}, "vlan": 100, "queues": 2,
            "runtimeConfig": {"mac": "02:00:00:00:00:09"}}"#;
        let c = NetConf::parse(good.as_bytes()).unwrap();
        assert_eq!(
            (c.vlan, c.queues, c.ipam_type()),
            (Some(100), 2, Some("host-local"))
        );
        assert_eq!(c.runtime.mac.as_deref(), Some("02:00:00:00:00:09"));
        let t =
            NetConf::parse(br#"{"cniVersion": "1.1.0", "name": "t", "mode": "tap", "queues": 4}"#)
                .unwrap();
        assert_eq!(
            (t.mode, t.bridge.as_str(), t.queues),
            (Mode::Tap, "torii0", 4)
        );
        for (text, code, want) in [
            ("{", 6, "network configuration"),
            (
                r#"{"cniVersion": "0.3.1", "name": "n", "mode": "vhost-user"}"#,
                1,
                "0.3.1",
            ),
            (
                r#"{"cniVersion": "1.1.0", "name": "n", "mode": "vhost-user", "color": "blue"}"#,
                2,
                "\"color\" (value \"blue\")",
            ),
            (
                r#"{"cniVersion": "1.1.0", "name": "n", "mode": "veth"}"#,
                7,
                "mode",
            ),
            (
                r#"{"cniVersion": "1.1.0", "name": "n"}"#,
                7,
                "mode is missing",
            ),
            (
                r#"{"cniVersion": "1.1.0", "name": "n", "mode": "vhost-user", "vlan": 5000}"#,
                7,
                "vlan",
            ),
            (
                r#"{"cniVersion": "1.1.0", "name": "n", "mode": "vhost-user", "mac": "01:00:00:00:00:01"}"#,
                7,
                "multicast",
            ),
            (
                r#"{"cniVersion": "1.1.0", "name": "n", "mode": "vhost-user", "ipam": {"subnet": "x"}}"#,
                7,
                "ipam.type",
            ),
            (
                r#"{"cniVersion": "1.1.0", "name": "n", "mode": "vhost-user", "socketDir": "rel"}"#,
                7,
                "absolute",
            ),
            (
                r#"{"cniVersion": "1.1.0", "name": "n/x", "mode": "vhost-user"}"#,
                7,
                "name",
            ),
            (
                r#"{"cniVersion": "1.1.0", "name": "n", "mode": "vhost-user", "bridge": "br0"}"#,
                7,
                "bridge is for mode tap, not vhost-user",
            ),
            (
                r#"{"cniVersion": "1.1.0", "name": "n", "mode": "tap", "vlan": 10}"#,
                7,
                "the tap mode does not tag",
            ),
            (
                r#"{"cniVersion": "1.1.0", "name": "n", "mode": "tap", "bridge": "a/b"}"#,
                7,
                "bridge \"a/b\" is not a valid interface name",
            ),
            (
                r#"{"cniVersion": "1.1.0", "name": "n", "mode": "tap", "deviceID": "0000:03:10.0"}"#,
                7,
                "deviceID is for mode sriov, not tap",
            ),
        ] {
            let e = NetConf::parse(text.as_bytes()).unwrap_err();
            assert_eq!(e.code, code, "{text}: {e}");
            assert!(e.details.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn sriov_configs_become_vf_settings() {
        use torii_vfio::netlink::{LinkState, VfSetting, VlanProto};
        let good = r#"{"cniVersion": "1.1.0", "name": "s", "mode": "sriov", "deviceID": "0000:03:10.2",
            "mac": "02:00:00:00:00:05", "vlan": 10, "vlanQoS": 3, "vlanProto": "802.1ad",
            "spoofchk": "off", "trust": "on", "maxTxRate": 500, "linkState": "enable"}"#;
        let c = NetConf::parse(good.as_bytes()).unwrap();
        let s = c.sriov.unwrap();
        assert_eq!(s.device.unwrap().to_string(), "0000:03:10.2");
        assert!(!s.vfio);
        assert_eq!(
            s.settings,
            [
                VfSetting::Mac([2, 0, 0, 0, 0, 5]),
                VfSetting::Vlan(10, 3, VlanProto::Dot1Ad),
                VfSetting::SpoofChk(false),
                VfSetting::Trust(true),
                VfSetting::Rate { min: 0, max: 500 },
                VfSetting::LinkState(LinkState::Enable),
            ]
        );
        for (text, want) in [
            (
                r#"{"cniVersion": "1.1.0", "name": "s", "mode": "sriov", "spoofchk": "maybe"}"#,
                "spoofchk",
            ),
            (
                r#"{"cniVersion": "1.1.0", "name": "s", "mode": "sriov", "deviceID": "03:10"}"#,
                "deviceID",
            ),
            (
                r#"{"cniVersion": "1.1.0", "name": "s", "mode": "sriov", "vlanQoS": 9}"#,
                "vlanQoS",
            ),
            (
                r#"{"cniVersion": "1.1.0", "name": "s", "mode": "sriov", "vfio": "yes"}"#,
                "vfio",
            ),
            (
                r#"{"cniVersion": "1.1.0", "name": "s", "mode": "vhost-user", "vfio": true}"#,
                "for mode sriov",
            ),
        ] {
            let e = NetConf::parse(text.as_bytes()).unwrap_err();
            assert_eq!(e.code, 7, "{text}: {e}");
            assert!(e.details.contains(want), "{text}: {e}");
        }
    }
}
