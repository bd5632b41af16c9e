//! The body of the `cni_input` fuzz target (fuzz/fuzz_targets/cni_input.rs) and its seeds:
//! what a container runtime hands the plugin — the `CNI_*` environment and the network
//! configuration on stdin — through every check the plugin makes before it touches the host.
//! Nothing here writes a file, opens a netlink socket, reaches the data plane or runs a
//! delegated plugin.

use std::collections::HashMap;
use std::path::PathBuf;

use serde_json::{json, Value};

use crate::config::{check_mac, valid_container_id, valid_ifname, Command, Env, Mode, NetConf};
use crate::plugin;
use crate::sriov;
use crate::types::{AddResult, CniError, SUPPORTED_VERSIONS};

/// The environment of an input with no NUL: an ADD.
const DEFAULT_ENV: &str = "CNI_COMMAND=ADD\nCNI_CONTAINERID=0a1b2c3d4e5f\n\
    CNI_NETNS=/var/run/netns/cni-0a1b2c3d\nCNI_IFNAME=net1\nCNI_PATH=/opt/cni/bin";

/// The spec's codes and the plugin's own.
const CODES: [u32; 11] = [1, 2, 3, 4, 5, 6, 7, 11, 50, 100, 101];

/// An environment block: `KEY=VALUE` lines. A value that is not UTF-8 reads as unset, as
/// `std::env::var` makes it; a later line wins.
fn env_block(b: &[u8]) -> HashMap<String, Option<String>> {
    let mut m = HashMap::new();
    for line in b.split(|&c| c == b'\n') {
        let Some(eq) = line.iter().position(|&c| c == b'=') else {
            continue;
        };
        let Ok(k) = std::str::from_utf8(&line[..eq]) else {
            continue;
        };
        m.insert(
            k.to_string(),
            String::from_utf8(line[eq + 1..].to_vec()).ok(),
        );
    }
    m
}

/// Runs `data` through what the plugin does before it touches the host: `data` is an
/// environment block (`KEY=VALUE` lines) and stdin, split at the first NUL byte (no NUL: all
/// stdin, with an ADD's environment). [`Env::read`] and [`NetConf::parse`], then what ADD, DEL,
/// CHECK and VERSION derive from them that is pure: the data plane port's name, the network's
/// state directory, the VF's address, prevResult, VERSION's answer, and every error as the
/// runtime gets it. Checks that nothing panics, that errors render with a known code, and
/// that what was accepted has what the checks promise. Returns whether both the environment
/// and the configuration were accepted.
pub fn fuzz_input(data: &[u8]) -> bool {
    let (vars, stdin) = match data.iter().position(|&b| b == 0) {
        Some(i) => (env_block(&data[..i]), &data[i + 1..]),
        None => (env_block(DEFAULT_ENV.as_bytes()), data),
    };
    let get = |k: &str| vars.get(k).cloned().flatten();
    // Errors are reported in the version stdin asks for, if it says (as main does).
    let version = serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v["cniVersion"].as_str().map(String::from))
        .unwrap_or_else(|| "1.1.0".into());
    let env = Env::read(get);
    match &env {
        Ok(e) => check_env(e, &get),
        Err(e) => check_error(e, &version),
    }
    if let Ok(e) = &env {
        if e.command == Command::Version {
            // VERSION answers from stdin alone, whatever it holds.
            let v = plugin::run(e, stdin)
                .expect("VERSION always answers")
                .expect("VERSION prints its answer");
            assert!(v["cniVersion"].is_string(), "{v}");
            assert_eq!(v["supportedVersions"], json!(SUPPORTED_VERSIONS));
        }
    }
    let conf = NetConf::parse(stdin);
    match &conf {
        Ok(c) => check_conf(c),
        Err(e) => check_error(e, &version),
    }
    if let (Ok(e), Ok(c)) = (&env, &conf) {
        check_operation(e, c, &version);
    }
    env.is_ok() && conf.is_ok()
}

/// An error as the runtime reads it (main prints `to_json`).
fn check_error(e: &CniError, version: &str) {
    assert!(CODES.contains(&e.code), "{e:?}");
    assert!(!e.msg.is_empty(), "{e:?}");
    let v = e.to_json(version);
    let text = v.to_string();
    let back: Value = serde_json::from_str(&text).expect("an error's JSON reads back");
    assert_eq!(back["code"], json!(e.code));
    assert_eq!(back["msg"], json!(e.msg));
    assert_eq!(back["details"], json!(e.details));
    assert_eq!(back["cniVersion"], json!(version));
    let _ = e.to_string();
}

/// What [`Env::read`] promises of the environment it accepts.
fn check_env(e: &Env, get: &dyn Fn(&str) -> Option<String>) {
    let set = |k: &str| get(k).filter(|v| !v.is_empty());
    let command = match set("CNI_COMMAND").as_deref() {
        Some("ADD") => Command::Add,
        Some("DEL") => Command::Del,
        Some("CHECK") => Command::Check,
        Some("VERSION") => Command::Version,
        Some("STATUS") => Command::Status,
        Some("GC") => Command::Gc,
        other => panic!("CNI_COMMAND {other:?} was taken"),
    };
    assert_eq!(e.command, command);
    assert_eq!(e.container_id, set("CNI_CONTAINERID"));
    assert_eq!(e.ifname, set("CNI_IFNAME"));
    assert_eq!(e.netns, set("CNI_NETNS").map(PathBuf::from));
    if matches!(e.command, Command::Add | Command::Check | Command::Del) {
        assert!(e.container_id.is_some() && e.ifname.is_some(), "{e:?}");
    }
    if matches!(e.command, Command::Add | Command::Check) {
        assert!(e.netns.is_some(), "{e:?}");
    }
    if let Some(c) = &e.container_id {
        // ASCII: names and paths cut it by bytes.
        assert!(valid_container_id(c) && c.is_ascii(), "{c:?}");
    }
    if let Some(i) = &e.ifname {
        assert!(valid_ifname(i) && (1..16).contains(&i.len()), "{i:?}");
        assert!(!i.contains(['/', ':']) && i != "." && i != "..", "{i:?}");
    }
    for (k, v) in &e.args {
        assert!(!k.contains(['=', ';']) && !v.contains(';'), "{k:?}={v:?}");
    }
    for p in &e.path {
        let s = p.as_os_str().to_string_lossy();
        assert!(!s.is_empty() && !s.contains(':'), "{p:?}");
    }
}

/// What [`NetConf::parse`] promises of a configuration it accepts.
fn check_conf(c: &NetConf) {
    assert!(
        SUPPORTED_VERSIONS.contains(&c.cni_version.as_str()),
        "{c:?}"
    );
    assert!(valid_container_id(&c.name) && c.name.is_ascii(), "{c:?}");
    for p in [&c.control_socket, &c.socket_dir, &c.state_dir] {
        assert!(p.is_absolute(), "{p:?}");
    }
    for m in [&c.mac, &c.runtime.mac].into_iter().flatten() {
        assert!(check_mac(m).is_ok(), "{m:?}");
    }
    assert!(c.vlan.is_none_or(|v| v <= 4094), "{c:?}");
    assert!((1..=16).contains(&c.queues), "{c:?}");
    assert!(c.mtu.is_none_or(|m| (68..=65535).contains(&m)), "{c:?}");
    assert_eq!(c.mode == Mode::Sriov, c.sriov.is_some(), "{c:?}");
    if c.mode == Mode::Tap {
        assert!(c.vlan.is_none(), "{c:?}");
    }
    assert!(valid_ifname(&c.bridge), "{:?}", c.bridge);
    match (&c.ipam, c.ipam_type()) {
        (None, None) => {}
        (Some(_), Some(t)) => assert!(!t.is_empty() && !t.contains('/'), "{t:?}"),
        _ => panic!("ipam {:?} of type {:?}", c.ipam, c.ipam_type()),
    }
    // The network's records are one directory right under stateDir.
    let dir = c.network_state_dir();
    assert_eq!(dir.parent(), Some(c.state_dir.as_path()), "{dir:?}");
    assert_eq!(
        dir.file_name().and_then(|n| n.to_str()),
        Some(c.name.as_str())
    );
    if let Some(s) = &c.sriov {
        let mac = sriov::setting_mac(&s.settings);
        assert_eq!(mac.is_some(), c.runtime.mac.is_some() || c.mac.is_some());
        assert!(mac.is_none_or(|m| m[0] & 1 == 0), "{mac:?}");
    }
    // What is passed on to delegated plugins reads back the same.
    let again = NetConf::parse(&serde_json::to_vec(&c.raw).expect("JSON"))
        .expect("a configuration taken once is taken again");
    assert_eq!(
        (again.name, again.mode, again.vlan, again.queues, again.mtu),
        (c.name.clone(), c.mode, c.vlan, c.queues, c.mtu)
    );
}

/// The pure steps of the operations, on an environment and a configuration both accepted.
fn check_operation(e: &Env, c: &NetConf, version: &str) {
    if matches!(e.command, Command::Add | Command::Del | Command::Check) {
        // The data plane port: readable, unique, at most 37 bytes, safe in an API path.
        let port = plugin::port_name(c, e);
        assert!(port.len() <= 37, "{port:?}");
        assert!(
            port.chars()
                .all(|x| x.is_ascii_alphanumeric() || matches!(x, '.' | '_' | '-')),
            "{port:?}"
        );
        let cid = e.container_id();
        assert!(port.starts_with(&format!("{}.", &cid[..cid.len().min(12)])));
    }
    if let Some(s) = &c.sriov {
        match sriov::device(c, s) {
            Ok(d) => assert_eq!(d.to_string().parse().ok(), Some(d)),
            Err(err) => {
                assert_eq!(err.code, 7, "{err:?}");
                check_error(&err, version);
            }
        }
    }
    // ADD merges a chained plugin's prevResult, CHECK compares with it.
    if let Some(prev) = &c.prev_result {
        match AddResult::from_json(prev) {
            Ok(r) => {
                for v in SUPPORTED_VERSIONS {
                    let back = AddResult::from_json(&r.to_json(v))
                        .unwrap_or_else(|err| panic!("{v}: {err}: {r:?}"));
                    assert_eq!(back.ips, r.ips, "{v}");
                    if v == "1.1.0" {
                        assert_eq!(back, r);
                    }
                }
            }
            Err(err) => check_error(&err, version),
        }
    }
}

/// `KEY=VALUE` lines.
fn env_text(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// An input: the environment, a NUL, the configuration.
fn input(env: &[(&str, &str)], conf: &Value) -> Vec<u8> {
    let mut d = env_text(env).into_bytes();
    d.push(0);
    d.extend(serde_json::to_vec_pretty(conf).expect("JSON"));
    d
}

const CID: &str = "6f1d0b8e9c2a4d3b8f7e6a5c4b3a29180716253443526170819a0b1c2d3e4f50";
const NETNS: &str = "/var/run/netns/cni-5b9e2f6d-0c1a-4e7b-9d3f-2a8c6e4b1f07";
const ARGS: &str = "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=vm-0;\
    K8S_POD_INFRA_CONTAINER_ID=6f1d0b8e9c2a4d3b;K8S_POD_UID=0c6f3a1e-8f5d-4b2a-9e7c-1d3f5a7b9c0e";

fn env_for(command: &str, netns: bool) -> Vec<(&str, &str)> {
    let mut e = vec![
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", CID),
        ("CNI_IFNAME", "net1"),
        ("CNI_ARGS", ARGS),
        ("CNI_PATH", "/opt/cni/bin:/usr/lib/cni"),
        (
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        ),
    ];
    if netns {
        e.push(("CNI_NETNS", NETNS));
    }
    e
}

/// The networks of deploy/ (one per mode), as Multus hands them over.
fn configs() -> Vec<Value> {
    vec![
        json!({
            "cniVersion": "1.1.0", "name": "torii-fast", "type": "torii-cni",
            "mode": "vhost-user", "controlSocket": "/run/torii/dataplane.sock",
            "socketDir": "/run/torii/pods", "stateDir": "/var/lib/cni/torii", "vlan": 100,
            "queues": 2, "mtu": 1500, "capabilities": {"mac": true, "CNIDeviceInfoFile": true},
            "ipam": {"type": "host-local", "subnet": "10.100.0.0/24",
                "routes": [{"dst": "10.100.0.0/16"}]},
            "runtimeConfig": {"mac": "02:00:00:00:10:01",
                "CNIDeviceInfoFile": "/var/run/k8s.cni.cncf.io/devinfo/dp/torii-fast-net1.json"}
        }),
        json!({
            "cniVersion": "1.1.0", "name": "torii-kernel", "type": "torii-cni", "mode": "tap",
            "bridge": "torii-br", "socketDir": "/run/torii/pods",
            "stateDir": "/var/lib/cni/torii", "queues": 2, "mtu": 1500,
            "capabilities": {"mac": true},
            "ipam": {"type": "host-local", "subnet": "10.101.0.0/24", "gateway": "10.101.0.1"},
            "dns": {"nameservers": ["10.96.0.10"], "search": ["default.svc.cluster.local"]}
        }),
        json!({
            "cniVersion": "1.1.0", "name": "torii-sriov", "type": "torii-cni", "mode": "sriov",
            "stateDir": "/var/lib/cni/torii", "vlan": 300, "vlanQoS": 0, "spoofchk": "on",
            "trust": "off", "capabilities": {"mac": true, "CNIDeviceInfoFile": true},
            "ipam": {"type": "host-local", "subnet": "10.30.0.0/24", "gateway": "10.30.0.1"},
            "runtimeConfig": {"deviceID": "0000:3b:02.1", "mac": "02:00:00:00:30:05"},
            "pciBusID": "0000:3b:02.1"
        }),
        json!({
            "cniVersion": "1.1.0", "name": "torii-sriov-vfio", "type": "torii-cni",
            "mode": "sriov", "vfio": true, "stateDir": "/var/lib/cni/torii", "vlan": 301,
            "vlanProto": "802.1Q", "maxTxRate": 10000, "linkState": "enable",
            "capabilities": {"CNIDeviceInfoFile": true},
            "ipam": {"type": "host-local", "subnet": "10.31.0.0/24"},
            "deviceID": "0000:3b:02.2",
            "runtimeConfig": {"CNIDeviceInfoFile":
                "/var/run/k8s.cni.cncf.io/devinfo/dp/torii-sriov-vfio-net1.json"}
        }),
    ]
}

/// The ADD result of `conf`'s mode, as prevResult (in `version`'s form).
fn prev_result(conf: &Value, version: &str) -> Value {
    let mode = conf["mode"].as_str().unwrap_or_default();
    let mut ifaces = vec![];
    if mode == "tap" {
        ifaces.push(json!({"name": "tvh1a2b3c4d", "mtu": 1500}));
    }
    let mut pod = json!({"name": "net1", "mac": "02:00:00:00:10:01", "mtu": 1500,
        "sandbox": NETNS});
    match mode {
        "vhost-user" => pod["socketPath"] = json!(format!("/run/torii/pods/{CID}/net1.sock")),
        "sriov" => pod["pciID"] = json!("0000:3b:02.1"),
        _ => {}
    }
    ifaces.push(pod);
    let r = AddResult::from_json(&json!({
        "interfaces": ifaces,
        "ips": [{"address": "10.100.0.7/24", "gateway": "10.100.0.1",
            "interface": ifaces.len() - 1}],
        "routes": [{"dst": "10.100.0.0/16"}],
        "dns": {"nameservers": ["10.96.0.10"]},
    }))
    .expect("a result");
    r.to_json(version)
}

/// Well-formed inputs for the fuzzer to start from: every mode's network with ADD, CHECK and
/// DEL (with prevResult), the older versions, VERSION, STATUS and GC, and configurations alone.
pub fn fuzz_seeds() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    for conf in configs() {
        seeds.push(input(&env_for("ADD", true), &conf));
        let mut with_prev = conf.clone();
        with_prev["prevResult"] = prev_result(&conf, "1.1.0");
        seeds.push(input(&env_for("CHECK", true), &with_prev));
        seeds.push(input(&env_for("DEL", true), &with_prev));
        // DEL after the pod's namespace went away.
        seeds.push(input(&env_for("DEL", false), &conf));
        // Configurations alone: an ADD's environment.
        seeds.push(serde_json::to_vec(&conf).expect("JSON"));
    }
    let fast = configs().swap_remove(0);
    for v in ["0.4.0", "1.0.0"] {
        let mut c = fast.clone();
        c["cniVersion"] = json!(v);
        seeds.push(input(&env_for("ADD", true), &c));
        c["prevResult"] = prev_result(&fast, v);
        seeds.push(input(&env_for("CHECK", true), &c));
    }
    // A chained ADD: a previous plugin's result to add to.
    let mut chained = fast.clone();
    chained["prevResult"] = json!({"cniVersion": "1.1.0",
        "interfaces": [{"name": "eth0", "sandbox": NETNS}],
        "ips": [{"address": "10.244.1.5/24", "gateway": "10.244.1.1", "interface": 0}]});
    seeds.push(input(&env_for("ADD", true), &chained));
    seeds.push(input(
        &[("CNI_COMMAND", "VERSION")],
        &json!({"cniVersion": "1.0.0", "name": "probe", "mode": "tap"}),
    ));
    seeds.push(input(&env_for("VERSION", false), &fast));
    seeds.push(input(&[("CNI_COMMAND", "STATUS")], &fast));
    let mut gc = fast.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": CID, "ifname": "net1"}, {"containerID": "abc123", "ifname": "net2"}]);
    seeds.push(input(
        &[("CNI_COMMAND", "GC"), ("CNI_PATH", "/opt/cni/bin")],
        &gc,
    ));
    seeds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_are_all_accepted() {
        let seeds = fuzz_seeds();
        assert!(seeds.len() > 20);
        for (i, s) in seeds.iter().enumerate() {
            assert!(fuzz_input(s), "seed {i}: {}", String::from_utf8_lossy(s));
        }
    }

    #[test]
    fn errors_are_rendered() {
        // Not JSON, an unknown command, a NUL-free config with an unknown key.
        assert!(!fuzz_input(b"CNI_COMMAND=ADD\0{"));
        assert!(!fuzz_input(b"CNI_COMMAND=FOO\n\xff=1\nCNI_IFNAME=\xff\0{}"));
        assert!(!fuzz_input(
            br#"{"cniVersion": "1.1.0", "name": "n", "mode": "tap", "color": 1}"#
        ));
        // VERSION answers whatever stdin holds.
        assert!(!fuzz_input(b"CNI_COMMAND=VERSION\0\xff\xfe"));
    }

    #[test]
    fn fuzz_body_on_mutated_seeds() {
        let seeds = fuzz_seeds();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let tokens: [&[u8]; 16] = [
            b"null",
            b"{}",
            b"[]",
            b"\"\"",
            b"-1",
            b"0",
            b"1e999",
            b"18446744073709551616",
            b"\"\\u0000\"",
            b"\"\\ud800\"",
            b"true",
            b"\"..\"",
            b"\"\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\"",
            b"\"0000:3b:02.1\"",
            b"\"02:00:00:00:00:01\"",
            b"\n",
        ];
        let mut accepted = 0;
        for _ in 0..4000 {
            let mut d = seeds[next() as usize % seeds.len()].clone();
            for _ in 0..1 + next() % 3 {
                let at = next() as usize % (d.len() + 1);
                match next() % 6 {
                    0 if at < d.len() => d[at] ^= 1 << (next() % 8),
                    1 if at < d.len() => d[at] = next() as u8,
                    2 => d.insert(at, next() as u8),
                    3 => {
                        let end = (at + (next() as usize % 24)).min(d.len());
                        d.drain(at..end);
                    }
                    4 => {
                        let t = tokens[next() as usize % tokens.len()];
                        let end = (at + (next() as usize % 12)).min(d.len());
                        d.splice(at..end, t.iter().copied());
                    }
                    _ => {
                        let end = (at + next() as usize % 48).min(d.len());
                        let piece = d[at..end].to_vec();
                        d.splice(at..at, piece);
                    }
                }
            }
            accepted += usize::from(fuzz_input(&d));
        }
        // Many mutations land where they change nothing the checks look at.
        assert!(accepted > 400, "only {accepted} mutated inputs accepted");
    }

    #[test]
    fn fuzz_body_on_pseudo_random_inputs() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for len in 0..3000usize {
            let mut d = Vec::with_capacity(len % 300);
            for _ in 0..len % 300 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                d.push(x as u8);
            }
            fuzz_input(&d);
        }
    }
}
