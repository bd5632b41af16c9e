//! A `dpdk` port on a real PCI function: in the SR-IOV rig (a q35 TCG guest with VT-d and an
//! SR-IOV igb NIC), a VF bound to vfio-pci is driven by DPDK's igbvf driver inside this build's
//! torii-dataplane. Traffic both ways between the VF and its PF goes through the NIC's
//! internal switch: Torii's source port sends frames to the PF's MAC out of the VF, and the
//! PF's kernel sends frames to the VF's MAC, which Torii receives.

use serde_json::Value;
use torii_perf::prereq;
use torii_perf::sriov_rig::SriovRig;
use torii_perf::OrFail;

const VF_MAC: &str = "52:54:00:00:20:02";
const PF_MAC: &str = "52:54:00:00:10:01";

fn stats(g: &mut SriovRig) -> Value {
    let text = g.ok("cat /run/rig/stats.json");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("stats: {e}: {text}"))
}

fn port(s: &Value, name: &str) -> Value {
    s["ports"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == name).cloned())
        .unwrap_or_else(|| panic!("no port {name} in {s}"))
}

fn pf_rx(g: &mut SriovRig, pf_if: &str) -> u64 {
    g.ok(&format!("cat /sys/class/net/{pf_if}/statistics/rx_packets"))
        .trim()
        .parse()
        .or_fail("PF rx_packets")
}

#[test]
fn dpdk_port_drives_a_vfio_bound_vf_on_a_real_kernel() {
    prereq::require_root().or_fail("prerequisite");
    prereq::require_qemu().or_fail("prerequisite");
    prereq::guest_image().or_fail("prerequisite");
    let _heavy = torii_perf::heavy_test_lock();
    let bin = env!("CARGO_BIN_EXE_torii-dataplane");
    let mut g = SriovRig::boot();
    let (pf, pf_if) = g.pf();

    // Two VFs; VF 1 gets a MAC from the PF and goes to vfio-pci. DPDK wants hugepages.
    let vf = g.ok(&format!(
        r#"set -e
D=/sys/bus/pci/devices/{pf}
echo 2 > $D/sriov_numvfs
for i in $(seq 100); do [ -e $D/virtfn1 ] && break; sleep 0.1; done
VF=$(basename $(readlink $D/virtfn1))
ip link set {pf_if} vf 1 mac {VF_MAC}
V=/sys/bus/pci/devices/$VF
echo vfio-pci > $V/driver_override
if [ -e $V/driver ]; then echo $VF > $V/driver/unbind; fi
echo $VF > /sys/bus/pci/drivers_probe
test "$(basename $(readlink $V/driver))" = vfio-pci
echo 64 > /proc/sys/vm/nr_hugepages
ip addr add 10.94.0.1/24 dev {pf_if}
ip neigh replace 10.94.0.2 lladdr {VF_MAC} dev {pf_if} nud permanent
echo $VF"#
    ));
    let vf = vf.trim().to_string();
    g.ok(&format!(
        r#"cat > /run/rig/dp.toml <<EOF
[dataplane]
stats_file = "/run/rig/stats.json"
control_socket = "/run/rig/ctl.sock"
[dpdk]
memory_mib = 64
allow = ["{vf}"]
[[port]]
name = "vf"
type = "dpdk"
device = "{vf}"
[[port]]
name = "gen"
type = "source"
src_mac = "{VF_MAC}"
dst_mac = "{PF_MAC}"
[[xconnect]]
ports = ["vf", "gen"]
EOF
setsid {bin} run -c /run/rig/dp.toml > /run/rig/dp.log 2>&1 < /dev/null &
for i in $(seq 300); do [ -e /run/rig/stats.json ] && break; sleep 0.1; done
test -e /run/rig/stats.json || {{ cat /run/rig/dp.log; exit 1; }}"#
    ));
    let s = stats(&mut g);
    let p = port(&s, "vf");
    assert_eq!(p["kind"], "dpdk", "{p}");
    assert_eq!(p["dpdk"]["device"], vf.as_str(), "{p}");
    let driver = p["dpdk"]["driver"].as_str().unwrap_or_default().to_string();
    assert!(
        driver.contains("igb_vf") || driver.contains("igbvf"),
        "DPDK's igbvf driver: {p}"
    );
    assert_eq!(p["dpdk"]["mac"], VF_MAC, "the MAC the PF gave the VF: {p}");

    // VF → PF: the source's frames to the PF's MAC.
    let before = pf_rx(&mut g, &pf_if);
    g.ok("sleep 2");
    let s = stats(&mut g);
    let p = port(&s, "vf");
    assert!(
        p["tx_packets"].as_u64().unwrap_or(0) > 0,
        "the VF sent nothing: {p}"
    );
    let after = pf_rx(&mut g, &pf_if);
    assert!(
        after > before + 10,
        "the PF received {} frames from the VF: {p}",
        after - before
    );

    // PF → VF: pings to an address whose neighbour entry is the VF's MAC (no answers: the
    // source port only counts what it is sent).
    g.chroot("ping -c 5 -i 0.2 -W 1 10.94.0.2");
    g.ok("sleep 1.5");
    let p = port(&stats(&mut g), "vf");
    assert!(
        p["rx_packets"].as_u64().unwrap_or(0) >= 5,
        "the VF received no pings: {p}"
    );

    eprintln!(
        "rig: VF {vf}, PF received {} frames; vf port {p}",
        after - before
    );
    // A clean stop: the device closed, the VF left with vfio-pci.
    g.ok(
        "pkill -INT -f 'torii-dataplane run -c /run/rig/dp.toml'; for i in $(seq 100); do pgrep -f 'torii-dataplane run -c /run/rig' >/dev/null || break; sleep 0.1; done; ! pgrep -f 'torii-dataplane run -c /run/rig'",
    );
    let log = g.ok("cat /run/rig/dp.log");
    assert!(log.contains("DPDK device removed"), "{log}");
}
