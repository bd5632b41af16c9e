//! The sriov mode on a fake sysfs tree and a fake PF driver that records every VF request (the
//! same code runs against a real igb PF in `tests/sriov_rig.rs`): the settings applied in
//! order and the VF put back exactly as it was; a setting the driver refuses undoes the whole
//! ADD; one VF is never given to two pods; CHECK; GC. The vfio mode, whose VF has no interface
//! for the kernel to move (netdev mode needs a real one: the rig).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use torii_cni::config::Env;
use torii_cni::plugin::run_on;
use torii_cni::sriov::Host;
use torii_cni::types::CniResult;
use torii_vfio::fake::{FakeTree, FakeVfs};
use torii_vfio::netlink::VfInfoReport;

const VF0: &str = "0000:03:10.0";

struct Fixture {
    tree: FakeTree,
    fake: Arc<Mutex<FakeVfs>>,
    host: Host,
}

impl Fixture {
    /// A PF `ens1f0` with two VFs, VF 0 on vfio-pci; the fake driver knows both.
    fn new() -> Fixture {
        let tree = FakeTree::new();
        tree.pf("0000:03:00.0", "ens1f0", 7, 2, 10);
        tree.to_vfio(VF0.parse().unwrap());
        // Stand-ins for the pods' namespaces: the vfio mode only records whose the VF is.
        for p in ["podA", "podB"] {
            std::fs::write(tree.root().join(p), "").unwrap();
        }
        let fake = Arc::new(Mutex::new(FakeVfs::with_pf("ens1f0", 2)));
        let host = Host::new(tree.sysfs(), Box::new(fake.clone()));
        Fixture { tree, fake, host }
    }

    fn netns(&self, pod: &str) -> PathBuf {
        self.tree.root().join(pod)
    }

    fn conf(&self, extra: Value) -> Value {
        let mut c = json!({
            "cniVersion": "1.1.0",
            "name": "sr",
            "type": "torii-cni",
            "mode": "sriov",
            "vfio": true,
            "deviceID": VF0,
            "stateDir": self.tree.root().join("state"),
        });
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    }

    fn call(
        &mut self,
        cmd: &str,
        pod: &str,
        netns: Option<&Path>,
        conf: &Value,
    ) -> CniResult<Option<Value>> {
        let mut vars: HashMap<&str, String> = HashMap::new();
        vars.insert("CNI_COMMAND", cmd.into());
        vars.insert("CNI_CONTAINERID", pod.into());
        vars.insert("CNI_IFNAME", "net1".into());
        if let Some(n) = netns {
            vars.insert("CNI_NETNS", n.display().to_string());
        }
        let env = Env::read(|k| vars.get(k).cloned())?;
        run_on(&mut self.host, &env, conf.to_string().as_bytes())
    }

    fn vfs(&self) -> Vec<VfInfoReport> {
        self.fake.lock().unwrap().reports("ens1f0")
    }

    fn log(&self) -> Vec<String> {
        self.fake.lock().unwrap().log.clone()
    }

    /// Allocation records and network records left.
    fn records(&self) -> Vec<String> {
        let mut out = Vec::new();
        for d in ["state/.vfio/alloc", "state/sr"] {
            if let Ok(rd) = std::fs::read_dir(self.tree.root().join(d)) {
                out.extend(rd.flatten().map(|e| e.path().display().to_string()));
            }
        }
        out
    }
}

#[test]
fn vfio_mode_applies_the_settings_in_order_and_puts_the_vf_back() {
    let mut f = Fixture::new();
    let before = f.vfs();
    let conf = f.conf(json!({
        "mac": "02:00:00:00:00:01", "vlan": 100, "vlanQoS": 3, "vlanProto": "802.1ad",
        "spoofchk": "off", "trust": "on", "minTxRate": 10, "maxTxRate": 1000,
        "runtimeConfig": {"CNIDeviceInfoFile": f.tree.root().join("devinfo.json")},
    }));
    let ns = f.netns("podA");
    let res = f.call("ADD", "podA", Some(&ns), &conf).unwrap().unwrap();
    assert_eq!(res["interfaces"][0]["pciID"], VF0, "{res}");
    assert_eq!(res["interfaces"][0]["mac"], "02:00:00:00:00:01", "{res}");
    let info: Value =
        serde_json::from_str(&std::fs::read_to_string(f.tree.root().join("devinfo.json")).unwrap())
            .unwrap();
    assert_eq!(info["pci"]["pci-address"], VF0, "{info}");
    // One request per setting, in the order sriov-cni applies them, all on VF 0 of ens1f0.
    let names: Vec<String> = f
        .log()
        .iter()
        .map(|l| l.split_whitespace().take(4).collect::<Vec<_>>().join(" "))
        .collect();
    assert_eq!(
        names,
        [
            "ens1f0 vf 0 mac",
            "ens1f0 vf 0 vlan",
            "ens1f0 vf 0 spoofchk",
            "ens1f0 vf 0 trust",
            "ens1f0 vf 0 rate"
        ]
    );
    let vf0 = &f.vfs()[0];
    assert_eq!(
        (
            vf0.mac,
            vf0.vlan,
            vf0.qos,
            vf0.spoofchk,
            vf0.trust,
            vf0.min_tx_rate,
            vf0.max_tx_rate
        ),
        (
            [2, 0, 0, 0, 0, 1],
            100,
            3,
            Some(false),
            Some(true),
            10,
            1000
        )
    );
    assert_eq!(f.vfs()[1], before[1], "VF 1 was touched");

    // CHECK with the ADD result; then DEL puts VF 0 back as it was, and again changes nothing.
    let mut check = conf.clone();
    check["prevResult"] = res.clone();
    f.call("CHECK", "podA", Some(&ns), &check).unwrap();
    f.call("DEL", "podA", Some(&ns), &check).unwrap();
    assert_eq!(f.vfs(), before, "VF 0 not restored: {:?}", f.log());
    assert!(f.records().is_empty(), "{:?}", f.records());
    assert!(!f.tree.root().join("devinfo.json").exists());
    let n = f.log().len();
    f.call("DEL", "podA", None, &conf).unwrap();
    assert_eq!(f.log().len(), n, "a second DEL sent requests");
}

#[test]
fn every_version_and_status() {
    let mut f = Fixture::new();
    let before = f.vfs();
    let ns = f.netns("podA");
    for version in ["0.4.0", "1.0.0", "1.1.0"] {
        let mut conf = f.conf(json!({"vlan": 5, "trust": "on"}));
        conf["cniVersion"] = json!(version);
        let res = f.call("ADD", "podA", Some(&ns), &conf).unwrap().unwrap();
        assert_eq!(res["cniVersion"], version, "{res}");
        match version {
            "1.1.0" => assert_eq!(res["interfaces"][0]["pciID"], VF0, "{res}"),
            _ => assert!(res["interfaces"][0].get("pciID").is_none(), "{res}"),
        }
        let mut check = conf.clone();
        check["prevResult"] = res;
        f.call("CHECK", "podA", Some(&ns), &check).unwrap();
        f.call("DEL", "podA", Some(&ns), &check).unwrap();
        assert_eq!(f.vfs(), before, "{version}");
        assert!(f.records().is_empty(), "{version}: {:?}", f.records());
    }
    // STATUS needs no data plane in this mode.
    f.call("STATUS", "", None, &f.conf(json!({}))).unwrap();
}

#[test]
fn a_setting_the_driver_refuses_undoes_the_whole_add() {
    let mut f = Fixture::new();
    // As igb does.
    f.fake.lock().unwrap().refuse = vec!["state"];
    let before = f.vfs();
    let conf = f.conf(json!({"mac": "02:00:00:00:00:02", "vlan": 7, "linkState": "enable"}));
    let ns = f.netns("podA");
    let e = f.call("ADD", "podA", Some(&ns), &conf).unwrap_err();
    assert_eq!(e.code, 101, "{e}");
    assert!(
        e.details
            .contains("VF 0 of ens1f0: the driver refused state"),
        "{e}"
    );
    assert!(f
        .log()
        .iter()
        .any(|l| l.contains(" state ") && l.ends_with("refused")));
    // MAC and VLAN, taken before the refusal, are back as they were; nothing is recorded.
    assert_eq!(f.vfs(), before, "{:?}", f.log());
    assert!(f.records().is_empty(), "{:?}", f.records());
}

#[test]
fn one_vf_is_never_given_to_two_pods_and_gc_gives_it_back() {
    let mut f = Fixture::new();
    let before = f.vfs();
    let conf = f.conf(json!({"vlan": 42}));
    let (a, b) = (f.netns("podA"), f.netns("podB"));
    f.call("ADD", "podA", Some(&a), &conf).unwrap();
    let e = f.call("ADD", "podB", Some(&b), &conf).unwrap_err();
    assert_eq!(e.code, 101, "{e}");
    assert!(
        e.details
            .contains(&format!("VF {VF0} is already allocated to"))
            && e.details.contains("sr/podA/net1"),
        "{e}"
    );
    // podB's failed ADD undid only its own: podA's VF keeps its VLAN.
    assert_eq!(f.vfs()[0].vlan, 42);
    // GC with only podB valid: podA's attachment goes, and the VF comes back.
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "podB", "ifname": "net1"}]);
    f.call("GC", "", None, &gc).unwrap();
    assert_eq!(f.vfs(), before);
    assert!(f.records().is_empty(), "{:?}", f.records());
    // Now podB gets it.
    f.call("ADD", "podB", Some(&b), &conf).unwrap();
    assert_eq!(f.vfs()[0].vlan, 42);
    f.call("DEL", "podB", Some(&b), &conf).unwrap();
    assert_eq!(f.vfs(), before);
}
