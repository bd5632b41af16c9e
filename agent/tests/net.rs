//! torii-agent's network methods against the real kernel, in a network namespace made for the
//! test (as the guest's would be): an interface found by its MAC renamed, its MTU and addresses
//! set (and replaced), routes replaced, a permanent neighbour added — each read back with
//! iproute2; bad requests change nothing.

mod common;

use std::process::Command;

use common::Host;
use serde_json::json;

fn sh(cmd: &str) -> String {
    let out = Command::new("sh").args(["-c", cmd]).output().unwrap();
    assert!(
        out.status.success(),
        "`{cmd}`: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

#[test]
fn interfaces_routes_and_neighbours() {
    // SAFETY: geteuid(2) has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test makes network namespaces: run it as root"
    );
    let ns = Netns(format!("torii-agent-{}", std::process::id()));
    let n = &ns.0;
    sh(&format!(
        "ip netns add {n} && ip -n {n} link add a0 address 02:00:00:00:50:02 type veth peer name a1 && ip -n {n} link set a1 up"
    ));
    let f = std::fs::File::open(format!("/run/netns/{n}")).unwrap();
    let mut h = Host::start_in(Some(f));

    let i = h.call(
        "update_interface",
        json!({"mac": "02:00:00:00:50:02", "name": "eth7", "mtu": 1400,
               "addresses": ["10.50.0.2/24", "fd00:50::2/64"]}),
    );
    assert_eq!(i["name"], "eth7", "{i}");
    assert_eq!(i["mtu"], 1400, "{i}");
    assert_eq!(i["up"], true, "{i}");
    let link = sh(&format!("ip -n {n} -o addr show dev eth7"));
    assert!(
        link.contains("10.50.0.2/24") && link.contains("fd00:50::2/64"),
        "{link}"
    );
    // The addresses are replaced, not added to.
    h.call(
        "update_interface",
        json!({"mac": "02:00:00:00:50:02", "addresses": ["10.50.0.3/24"]}),
    );
    let link = sh(&format!("ip -n {n} -o addr show dev eth7"));
    assert!(
        link.contains("10.50.0.3/24") && !link.contains("10.50.0.2/"),
        "{link}"
    );
    assert!(!link.contains("fd00:50::2"), "{link}");
    let listed = h.call("list_interfaces", json!({}));
    let eth7 = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "eth7")
        .unwrap_or_else(|| panic!("{listed}"));
    assert_eq!(eth7["mac"], "02:00:00:00:50:02");
    assert_eq!(eth7["addresses"][0], "10.50.0.3/24", "{eth7}");

    // Routes: a default and a network, via the gateway; a second update replaces them.
    h.call(
        "update_routes",
        json!({"routes": [
            {"dest": "default", "gateway": "10.50.0.1", "device": "eth7"},
            {"dest": "10.60.0.0/16", "gateway": "10.50.0.1", "device": "eth7"},
        ]}),
    );
    let r = sh(&format!("ip -n {n} route show"));
    assert!(r.contains("default via 10.50.0.1 dev eth7"), "{r}");
    assert!(r.contains("10.60.0.0/16 via 10.50.0.1 dev eth7"), "{r}");
    let table = h.call(
        "update_routes",
        json!({"routes": [{"dest": "10.70.0.0/16", "gateway": "10.50.0.1", "device": "eth7"}]}),
    );
    let r = sh(&format!("ip -n {n} route show"));
    assert!(r.contains("10.70.0.0/16 via 10.50.0.1 dev eth7"), "{r}");
    assert!(!r.contains("default") && !r.contains("10.60.0.0"), "{r}");
    // The kernel's own route for the subnet stays, and is listed as such.
    assert!(r.contains("10.50.0.0/24 dev eth7"), "{r}");
    assert!(
        table
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["dest"] == "10.50.0.0/24" && x["kernel"] == true),
        "{table}"
    );

    // A permanent neighbour.
    h.call(
        "add_arp_neighbors",
        json!({"neighbors": [{"ip": "10.50.0.9", "mac": "02:00:00:00:00:09", "device": "eth7"}]}),
    );
    let nb = sh(&format!("ip -n {n} neigh show dev eth7"));
    assert!(
        nb.contains("10.50.0.9 lladdr 02:00:00:00:00:09 PERMANENT"),
        "{nb}"
    );

    // Bad requests: nothing changes.
    let before = sh(&format!(
        "ip -n {n} -o addr show dev eth7; ip -n {n} route show"
    ));
    assert_eq!(
        h.call_err("update_interface", json!({"mac": "02:00:00:00:99:99"}))["code"],
        "not_found"
    );
    assert_eq!(
        h.call_err(
            "update_interface",
            json!({"mac": "02:00:00:00:50:02", "addresses": ["10.50.0.4/24", "10.50.0.5/99"]})
        )["code"],
        "bad_params"
    );
    assert_eq!(
        h.call_err(
            "update_routes",
            json!({"routes": [{"dest": "10.80.0.0/16", "gateway": "fd00::1", "device": "eth7"}]})
        )["code"],
        "bad_params"
    );
    assert_eq!(
        h.call_err(
            "update_routes",
            json!({"routes": [{"dest": "10.80.0.0/16", "device": "nosuch0"}]})
        )["code"],
        "not_found"
    );
    assert_eq!(
        h.call_err(
            "update_interface",
            json!({"mac": "02:00:00:00:50:02", "name": "a/b"})
        )["code"],
        "bad_params"
    );
    assert_eq!(
        h.call_err(
            "update_routes",
            json!({"routes": [{"dest": "10.80.0.1/16", "device": "eth7"}]})
        )["code"],
        "bad_params"
    );
    assert_eq!(
        h.call_err(
            "update_routes",
            json!({"routes": [{"dest": "10.80.0.0/16", "device": "eth7"}], "devices": ["nosuch0"]})
        )["code"],
        "not_found"
    );
    assert_eq!(
        sh(&format!(
            "ip -n {n} -o addr show dev eth7; ip -n {n} route show"
        )),
        before
    );

    // Addresses: dropping an IPv4 primary drops its secondaries with it; that is no error,
    // and a secondary that is wanted is there afterwards.
    let addrs = |h: &mut Host, a: serde_json::Value| {
        h.call(
            "update_interface",
            json!({"mac": "02:00:00:00:50:02", "addresses": a}),
        );
        sh(&format!("ip -n {n} -o -4 addr show dev eth7"))
    };
    addrs(&mut h, json!(["10.50.0.3/24", "10.50.0.4/24"]));
    let a = addrs(&mut h, json!(["10.50.0.9/24"]));
    assert!(
        a.contains("10.50.0.9/24") && !a.contains("10.50.0.3/") && !a.contains("10.50.0.4/"),
        "{a}"
    );
    addrs(&mut h, json!(["10.50.0.3/24", "10.50.0.4/24"]));
    let a = addrs(&mut h, json!(["10.50.0.4/24"]));
    assert!(
        a.contains("10.50.0.4/24") && !a.contains("10.50.0.3/"),
        "{a}"
    );
    let a = addrs(&mut h, json!(["10.50.0.3/24", "fd00:50::2/64"]));
    assert!(a.contains("10.50.0.3/24"), "{a}");

    // Routes: one the kernel refuses (its gateway is unreachable) undoes the whole update.
    h.call(
        "update_routes",
        json!({"routes": [
            {"dest": "default", "gateway": "10.50.0.1", "device": "eth7"},
            {"dest": "10.60.0.0/16", "gateway": "10.50.0.1", "device": "eth7"},
        ]}),
    );
    let before = sh(&format!("ip -n {n} route show"));
    let e = h.call_err(
        "update_routes",
        json!({"routes": [
            {"dest": "default", "gateway": "10.50.0.254", "device": "eth7"},
            {"dest": "10.70.0.0/16", "gateway": "10.50.0.1", "device": "eth7"},
            {"dest": "10.80.0.0/16", "gateway": "10.99.0.1", "device": "eth7"},
        ]}),
    );
    assert_eq!(e["code"], "failed");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("nothing was changed"),
        "{e}"
    );
    assert_eq!(sh(&format!("ip -n {n} route show")), before);
    // A new default gateway replaces the old one; on-link routes go in before the routes
    // through a gateway they make reachable.
    h.call(
        "update_routes",
        json!({"routes": [
            {"dest": "default", "gateway": "10.51.0.1", "device": "eth7"},
            {"dest": "10.51.0.0/24", "device": "eth7"},
        ]}),
    );
    let r = sh(&format!("ip -n {n} route show"));
    assert!(r.contains("default via 10.51.0.1 dev eth7"), "{r}");
    assert!(r.contains("10.51.0.0/24 dev eth7"), "{r}");
    assert!(!r.contains("10.50.0.1") && !r.contains("10.60.0.0"), "{r}");
    // IPv6 default routes, by `default` with an IPv6 gateway or by `::/0`.
    let table = h.call(
        "update_routes",
        json!({"routes": [
            {"dest": "default", "gateway": "10.51.0.1", "device": "eth7"},
            {"dest": "10.51.0.0/24", "device": "eth7"},
            {"dest": "default", "gateway": "fd00:50::1", "device": "eth7"},
        ]}),
    );
    let r6 = sh(&format!("ip -n {n} -6 route show"));
    assert!(r6.contains("default via fd00:50::1 dev eth7"), "{r6}");
    assert!(
        table
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["family"] == "ipv6"
                && x["dest"] == "default"
                && x["gateway"] == "fd00:50::1"),
        "{table}"
    );
    h.call(
        "update_routes",
        json!({"routes": [{"dest": "::/0", "gateway": "fd00:50::9", "device": "eth7"}]}),
    );
    let r6 = sh(&format!("ip -n {n} -6 route show"));
    assert!(r6.contains("default via fd00:50::9 dev eth7"), "{r6}");
    assert!(!r6.contains("fd00:50::1 "), "{r6}");
    // The IPv4 routes went: eth7 was named, and they were not given.
    let r = sh(&format!("ip -n {n} route show"));
    assert!(!r.contains("10.51.0."), "{r}");
    // A route in the place of another device's, when that device is not named: refused.
    sh(&format!(
        "ip -n {n} link add d0 type veth peer name d1 && ip -n {n} link set d1 up && ip -n {n} link set d0 up && ip -n {n} route add 10.90.0.0/16 dev d0"
    ));
    let before = sh(&format!("ip -n {n} route show; ip -n {n} -6 route show"));
    let e = h.call_err(
        "update_routes",
        json!({"routes": [{"dest": "10.90.0.0/16", "device": "eth7"}]}),
    );
    assert!(e["message"].as_str().unwrap().contains("dev d0"), "{e}");
    assert_eq!(
        sh(&format!("ip -n {n} route show; ip -n {n} -6 route show")),
        before
    );
    // `devices` with no routes clears a device.
    h.call(
        "update_routes",
        json!({"routes": [], "devices": ["eth7", "d0"]}),
    );
    let r = sh(&format!("ip -n {n} route show; ip -n {n} -6 route show"));
    assert!(!r.contains("10.90.0.0") && !r.contains("default"), "{r}");
    // The kernel's own stay.
    assert!(r.contains("10.50.0.0/24 dev eth7"), "{r}");
}
