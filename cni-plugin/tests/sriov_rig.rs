//! torii-cni's sriov mode on a real kernel: the SR-IOV rig (an igb PF with VFs under QEMU,
//! see `torii_perf::sriov_rig`) runs this build's torii-cni and Debian's host-local as a
//! runtime would. A VF goes into a pod's namespace with its address, routes and PF settings,
//! is refused to a second pod, comes back exactly as it was on DEL (also when the pod's
//! namespace went first); another is bound to vfio-pci for a VM and given back.

use serde_json::{json, Value};
use torii_perf::prereq;
use torii_perf::sriov_rig::SriovRig;
use torii_perf::OrFail;

const CNI: &str = env!("CARGO_BIN_EXE_torii-cni");

fn conf(device: &str, extra: Value) -> Value {
    let mut c = json!({
        "cniVersion": "1.1.0",
        "name": "sriovnet",
        "type": "torii-cni",
        "mode": "sriov",
        "deviceID": device,
        "stateDir": "/run/rig/state",
        "ipam": {
            "type": "host-local",
            "subnet": "10.88.0.0/24",
            "gateway": "10.88.0.1",
            "dataDir": "/run/rig/ipam",
            "routes": [{"dst": "10.99.0.0/16"}],
        },
    });
    for (k, v) in extra.as_object().into_iter().flatten() {
        c[k] = v.clone();
    }
    c
}

/// Runs torii-cni in the rig; (exit code, stdout JSON).
fn cni(
    g: &mut SriovRig,
    command: &str,
    cid: &str,
    netns: Option<&str>,
    conf: &Value,
) -> (i32, Value) {
    let netns = netns.map(|n| format!("CNI_NETNS={n} ")).unwrap_or_default();
    let (rc, out, _) = g.chroot(&format!(
        "echo '{conf}' | CNI_COMMAND={command} CNI_CONTAINERID={cid} CNI_IFNAME=net1 {netns}CNI_PATH=/usr/lib/cni {CNI}"
    ));
    (rc, serde_json::from_str(&out).unwrap_or(Value::Null))
}

/// The PF's view of its VFs and every VF's driver and interface: what DEL must restore.
fn snapshot(g: &mut SriovRig, pf: &str) -> String {
    g.ok(&format!(
        "ip -d link show {pf} | grep -E '^ +vf '; for d in /sys/class/net/{pf}/device/virtfn*; do echo $(readlink $d) $(basename $(readlink $d/driver)) $(ls $d/net 2>/dev/null) $(cat $d/net/*/address 2>/dev/null) $(cat $d/net/*/mtu 2>/dev/null); done"
    ))
}

#[test]
fn sriov_attachments_on_a_real_kernel() {
    prereq::require_root().or_fail("prerequisite");
    prereq::require_qemu().or_fail("prerequisite");
    prereq::guest_image().or_fail("prerequisite");
    let _heavy = torii_perf::heavy_test_lock();
    let mut g = SriovRig::boot();
    let (_, pf) = g.pf();
    g.ok(&format!(
        "echo 2 > /sys/class/net/{pf}/device/sriov_numvfs; for i in $(seq 100); do ls /sys/class/net/{pf}/device/virtfn1/net >/dev/null 2>&1 && break; sleep 0.1; done"
    ));
    let vf = |g: &mut SriovRig, i: u32| {
        g.ok(&format!(
            "basename $(readlink /sys/class/net/{pf}/device/virtfn{i})"
        ))
        .trim()
        .to_string()
    };
    let (vf0, vf1) = (vf(&mut g, 0), vf(&mut g, 1));
    let before = snapshot(&mut g, &pf);

    // Netdev mode: VF 0 into pod1 with its PF settings, address and route.
    g.ok("ip netns add pod1 && ip netns add pod2");
    let c0 = conf(
        &vf0,
        json!({"mac": "02:00:00:00:aa:01", "vlan": 100, "vlanQoS": 2, "spoofchk": "off", "trust": "on", "mtu": 1400}),
    );
    let (rc, add) = cni(&mut g, "ADD", "pod1", Some("/run/netns/pod1"), &c0);
    assert_eq!(rc, 0, "{add}");
    assert_eq!(add["interfaces"][0]["pciID"], vf0.as_str(), "{add}");
    assert_eq!(add["interfaces"][0]["mac"], "02:00:00:00:aa:01", "{add}");
    assert_eq!(add["ips"][0]["address"], "10.88.0.2/24", "{add}");
    let inside =
        g.ok("ip -n pod1 -o addr show net1; ip -n pod1 route show; ip -n pod1 -o link show net1");
    for want in [
        "10.88.0.2/24",
        "10.99.0.0/16 via 10.88.0.1",
        "mtu 1400",
        "02:00:00:00:aa:01",
        "UP",
    ] {
        assert!(inside.contains(want), "{want:?} not in the pod: {inside}");
    }
    let vfline = g.ok(&format!("ip -d link show {pf} | grep -E '^ +vf 0 '"));
    for want in [
        "02:00:00:00:aa:01",
        "vlan 100",
        "qos 2",
        "spoof checking off",
        "trust on",
    ] {
        assert!(vfline.contains(want), "{want:?} not on the PF: {vfline}");
    }
    let mut check = c0.clone();
    check["prevResult"] = add.clone();
    let (rc, out) = cni(&mut g, "CHECK", "pod1", Some("/run/netns/pod1"), &check);
    assert_eq!(rc, 0, "CHECK: {out}");

    // The same VF for another pod: refused, and pod1 keeps it.
    let (rc, err) = cni(&mut g, "ADD", "pod2", Some("/run/netns/pod2"), &c0);
    assert_ne!(rc, 0);
    assert!(
        err["details"]
            .as_str()
            .unwrap_or("")
            .contains("already allocated"),
        "{err}"
    );
    g.ok("ip -n pod1 link show net1");

    // DEL: the VF back under its own name with its own settings; the address released.
    let (rc, out) = cni(&mut g, "DEL", "pod1", Some("/run/netns/pod1"), &c0);
    assert_eq!(rc, 0, "DEL: {out}");
    assert_eq!(snapshot(&mut g, &pf), before, "VF 0 not restored");
    let (rc, out) = cni(&mut g, "DEL", "pod1", Some("/run/netns/pod1"), &c0);
    assert_eq!(rc, 0, "second DEL: {out}");

    // Four pods asking for the same VF at once: exactly one gets it.
    g.ok("for p in r1 r2 r3 r4; do ip netns add $p; done");
    let conf_text = c0.to_string();
    let out = g.ok(&format!(
        "for p in r1 r2 r3 r4; do (echo '{conf_text}' | CNI_COMMAND=ADD CNI_CONTAINERID=$p CNI_IFNAME=net1 CNI_NETNS=/run/netns/$p CNI_PATH=/usr/lib/cni {CNI} >/dev/null 2>&1; echo $p $?) & done; wait"
    ));
    let winners: Vec<&str> = out
        .lines()
        .filter(|l| l.ends_with(" 0"))
        .map(|l| l.split_whitespace().next().unwrap_or(""))
        .collect();
    assert_eq!(winners.len(), 1, "parallel ADDs of one VF: {out}");
    for p in ["r1", "r2", "r3", "r4"] {
        let (rc, out) = cni(&mut g, "DEL", p, Some(&format!("/run/netns/{p}")), &c0);
        assert_eq!(rc, 0, "DEL {p}: {out}");
    }
    g.ok("for p in r1 r2 r3 r4; do ip netns del $p; done");
    assert_eq!(
        snapshot(&mut g, &pf),
        before,
        "VF 0 not restored after the race"
    );

    // The pod's namespace goes before DEL: the kernel hands the VF back, DEL restores it.
    let (rc, add) = cni(&mut g, "ADD", "pod2", Some("/run/netns/pod2"), &c0);
    assert_eq!(rc, 0, "{add}");
    g.ok("ip netns del pod2");
    let (rc, out) = cni(&mut g, "DEL", "pod2", None, &c0);
    assert_eq!(rc, 0, "DEL after the namespace: {out}");
    assert_eq!(
        snapshot(&mut g, &pf),
        before,
        "VF 0 not restored after its namespace went"
    );

    // Vfio mode: VF 1 to vfio-pci for a VM, and back to igbvf.
    let c1 = conf(&vf1, json!({"vfio": true, "vlan": 200}));
    let (rc, add) = cni(&mut g, "ADD", "vm1", Some("/run/netns/pod1"), &c1);
    assert_eq!(rc, 0, "{add}");
    assert_eq!(add["interfaces"][0]["pciID"], vf1.as_str(), "{add}");
    let drv = g.ok(&format!(
        "basename $(readlink /sys/bus/pci/devices/{vf1}/driver)"
    ));
    assert_eq!(drv.trim(), "vfio-pci");
    let (rc, out) = cni(&mut g, "DEL", "vm1", Some("/run/netns/pod1"), &c1);
    assert_eq!(rc, 0, "DEL: {out}");
    assert_eq!(snapshot(&mut g, &pf), before, "VF 1 not restored");
    let leases = g.ok("ls /run/rig/ipam/sriovnet 2>/dev/null | grep -c '^10\\.' || true");
    assert_eq!(leases.trim(), "0", "addresses left");
    g.ok(&format!("echo 0 > /sys/class/net/{pf}/device/sriov_numvfs"));
}
