//! torii-cni driven as a runtime drives it: every operation in every supported version against
//! a real torii-dataplane with host-local IPAM, the errors a runtime can provoke (bad
//! environment, bad JSON, unknown fields, an unsupported version, a missing IPAM plugin, the
//! data plane down) each with the spec's code and nothing left behind, idempotent DEL, GC,
//! STATUS, and chaining with Debian's `tuning`.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use common::{prerequisites, run_plugin, OrFail, Out, Rig, CNI_PATH, NOBODY};
use serde_json::{json, Value};

/// What an attachment leaves: data plane ports, files under pods/ and state/, IP leases.
fn leftovers(r: &Rig) -> (Vec<String>, Vec<String>, Vec<String>, Vec<String>) {
    (
        r.ports(),
        r.files("pods"),
        r.files("state/tnet"),
        r.ipam_leases(),
    )
}

fn nothing(r: &Rig) -> (Vec<String>, Vec<String>, Vec<String>, Vec<String>) {
    let _ = r;
    (Vec::new(), Vec::new(), Vec::new(), Vec::new())
}

#[test]
fn add_check_del_in_every_version() {
    prerequisites();
    let mut r = Rig::start("torii-cni-conf", "");
    for (i, version) in ["0.4.0", "1.0.0", "1.1.0"].into_iter().enumerate() {
        let ns = r.netns();
        let cid = format!("c{i}abcdef0123456789");
        let conf = r.conf(version);
        let add = r.cni("ADD", Some(&cid), Some("net1"), Some(&ns), &conf);
        assert!(add.ok, "{version} ADD: {add:?}");
        let res = &add.json;
        assert_eq!(res["cniVersion"], version, "{res}");
        let iface = &res["interfaces"][0];
        assert_eq!(iface["name"], "net1");
        assert_eq!(iface["sandbox"], ns.as_str());
        assert!(
            iface["mac"].as_str().is_some_and(|m| m.starts_with("02:")),
            "{res}"
        );
        assert_eq!(
            res["ips"][0]["address"],
            format!("10.77.0.{}/24", i + 2),
            "{res}"
        );
        assert_eq!(res["ips"][0]["interface"], 0, "{res}");
        assert_eq!(res["routes"][0]["dst"], "0.0.0.0/0", "{res}");
        match version {
            "1.1.0" => assert!(iface["socketPath"].as_str().is_some(), "{res}"),
            _ => assert!(iface.get("socketPath").is_none(), "{res}"),
        }
        match version {
            "0.4.0" => assert_eq!(res["ips"][0]["version"], "4", "{res}"),
            _ => assert!(res["ips"][0].get("version").is_none(), "{res}"),
        }
        // The data plane has the port, listening on the socket; the pod file tells the VM
        // launcher what to connect.
        let ports = r.ports();
        assert_eq!(ports.len(), 1, "{ports:?}");
        assert!(ports[0].starts_with(&cid[..12]), "{ports:?}");
        let pod_file = r
            .files("pods")
            .into_iter()
            .find(|f| f.ends_with("net1.json"))
            .unwrap();
        let pod: Value =
            serde_json::from_str(&std::fs::read_to_string(&pod_file).unwrap()).unwrap();
        assert!(Path::new(pod["socket"].as_str().unwrap()).exists(), "{pod}");
        assert_eq!(pod["mac"], iface["mac"]);
        assert_eq!(pod["ips"][0]["address"], res["ips"][0]["address"]);

        // CHECK with the ADD result.
        let mut check_conf = conf.clone();
        check_conf["prevResult"] = res.clone();
        let check = r.cni("CHECK", Some(&cid), Some("net1"), Some(&ns), &check_conf);
        assert!(check.ok, "{version} CHECK: {check:?}");
        assert!(check.stdout.trim().is_empty());
        // CHECK of an attachment that was never added: code 3.
        let c2 = r.cni("CHECK", Some("other"), Some("net1"), Some(&ns), &check_conf);
        assert_eq!(c2.code(), Some(3), "{c2:?}");

        // ADD again for the same attachment is refused, and changes nothing.
        let again = r.cni("ADD", Some(&cid), Some("net1"), Some(&ns), &conf);
        assert!(
            !again.ok && again.stdout.contains("already has an interface"),
            "{again:?}"
        );
        assert_eq!(r.ports().len(), 1);

        // DEL, with prevResult; then again, without a netns, without prevResult.
        let del = r.cni("DEL", Some(&cid), Some("net1"), Some(&ns), &check_conf);
        assert!(del.ok, "{version} DEL: {del:?}");
        assert_eq!(leftovers(&r), nothing(&r), "{version}: DEL left something");
        let del2 = r.cni("DEL", Some(&cid), Some("net1"), None, &conf);
        assert!(del2.ok, "{version} second DEL: {del2:?}");
        let del3 = r.cni("DEL", Some("never-added"), Some("net9"), None, &conf);
        assert!(del3.ok, "{version} DEL of nothing: {del3:?}");
    }
}

#[test]
fn bad_requests_get_the_spec_codes_and_leave_nothing() {
    prerequisites();
    let mut r = Rig::start("torii-cni-bad", "");
    let ns = r.netns();
    let conf = r.conf("1.1.0");
    let stdin = conf.to_string();
    let cases: Vec<(&str, Out, u64, &str)> = vec![
        (
            "no CNI_IFNAME",
            r.cni_raw("ADD", Some("c1"), None, Some(&ns), stdin.as_bytes(), &[]),
            4,
            "CNI_IFNAME",
        ),
        (
            "bad CNI_COMMAND",
            r.cni_raw(
                "PATCH",
                Some("c1"),
                Some("net1"),
                Some(&ns),
                stdin.as_bytes(),
                &[],
            ),
            4,
            "PATCH",
        ),
        (
            "bad interface name",
            r.cni_raw(
                "ADD",
                Some("c1"),
                Some("a/b"),
                Some(&ns),
                stdin.as_bytes(),
                &[],
            ),
            4,
            "CNI_IFNAME",
        ),
        (
            "bad JSON",
            r.cni_raw(
                "ADD",
                Some("c1"),
                Some("net1"),
                Some(&ns),
                b"{\"cniVersion\":",
                &[],
            ),
            6,
            "network configuration",
        ),
        (
            "unknown field",
            {
                let mut c = conf.clone();
                c["hairpinMode"] = json!(true);
                r.cni("ADD", Some("c1"), Some("net1"), Some(&ns), &c)
            },
            2,
            "\"hairpinMode\" (value true)",
        ),
        (
            "a key of another mode",
            {
                let mut c = conf.clone();
                c["bridge"] = json!("br0");
                r.cni("ADD", Some("c1"), Some("net1"), Some(&ns), &c)
            },
            7,
            "bridge is for mode tap, not vhost-user",
        ),
        (
            "unsupported version",
            r.cni("ADD", Some("c1"), Some("net1"), Some(&ns), &r.conf("0.3.1")),
            1,
            "0.3.1",
        ),
        (
            "missing IPAM plugin",
            {
                let mut c = conf.clone();
                c["ipam"]["type"] = json!("no-such-ipam");
                r.cni("ADD", Some("c1"), Some("net1"), Some(&ns), &c)
            },
            50,
            "no-such-ipam",
        ),
        (
            "netns gone",
            r.cni(
                "ADD",
                Some("c1"),
                Some("net1"),
                Some("/run/netns/does-not-exist"),
                &conf,
            ),
            3,
            "does-not-exist",
        ),
        (
            "data plane not there",
            {
                let mut c = conf.clone();
                c["controlSocket"] = json!(r.dir.join("nobody.sock"));
                r.cni("ADD", Some("c1"), Some("net1"), Some(&ns), &c)
            },
            50,
            "not reachable",
        ),
        (
            "socket path too long",
            {
                let mut c = conf.clone();
                c["socketDir"] = json!(format!("/run/{}", "d".repeat(100)));
                r.cni("ADD", Some("c1"), Some("net1"), Some(&ns), &c)
            },
            7,
            "socketDir",
        ),
        (
            "socket directory others can write",
            {
                use std::os::unix::fs::PermissionsExt;
                let open = r.dir.join("open");
                std::fs::create_dir_all(&open).unwrap();
                std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
                let mut c = conf.clone();
                c["socketDir"] = json!(open);
                r.cni("ADD", Some("c1"), Some("net1"), Some(&ns), &c)
            },
            7,
            "writable by other users",
        ),
        (
            "GC in 1.0.0",
            r.cni("GC", None, None, None, &r.conf("1.0.0")),
            1,
            "1.1.0",
        ),
    ];
    for (what, out, code, want) in cases {
        assert!(!out.ok, "{what}: succeeded: {out:?}");
        assert_eq!(out.code(), Some(code), "{what}: {out:?}");
        assert!(
            out.json["msg"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: {out:?}"
        );
        assert!(
            out.json["details"]
                .as_str()
                .is_some_and(|d| d.contains(want)),
            "{what}: details do not say {want:?}: {out:?}"
        );
        assert_eq!(leftovers(&r), nothing(&r), "{what} left something");
    }
    assert!(
        !r.dir.join("open").join("c1").exists(),
        "a pod directory was made in a directory others can write"
    );

    // A failure after IPAM gave an address undoes everything: here the data plane refuses
    // the port, because another port already uses the socket path this attachment gets.
    let squatter = r.dir.join("pods").join("c1").join("net1.sock");
    std::fs::create_dir_all(squatter.parent().unwrap()).unwrap();
    let put = torii_dataplane::ctl::request(
        &r.control_socket(),
        "PUT",
        "/v1/ports/squatter",
        Some(&json!({"type": "vhost-user", "socket": squatter})),
    )
    .unwrap();
    assert_eq!(put.status, 201, "{}", put.body);
    let out = r.cni("ADD", Some("c1"), Some("net1"), Some(&ns), &conf);
    assert_eq!(out.code(), Some(100), "{out:?}");
    assert!(
        out.json["details"].as_str().unwrap().contains("used twice"),
        "{out:?}"
    );
    assert!(r.ipam_leases().is_empty(), "the address was not released");
    assert!(r.files("state/tnet").is_empty());
    assert_eq!(r.ports(), ["squatter"]);
    assert!(squatter.exists(), "the other port's socket was removed");
    let del =
        torii_dataplane::ctl::request(&r.control_socket(), "DELETE", "/v1/ports/squatter", None);
    assert_eq!(del.unwrap().status, 204);
}

#[test]
fn status_gc_version_and_chaining() {
    prerequisites();
    let mut r = Rig::start("torii-cni-gc", "");
    let conf = r.conf("1.1.0");
    // VERSION.
    let v = r.cni_raw(
        "VERSION",
        None,
        None,
        None,
        br#"{"cniVersion": "1.0.0"}"#,
        &[],
    );
    assert!(v.ok, "{v:?}");
    assert_eq!(v.json["cniVersion"], "1.0.0");
    assert_eq!(
        v.json["supportedVersions"],
        json!(["0.4.0", "1.0.0", "1.1.0"])
    );
    // STATUS: ready; then, with the data plane down, 50.
    let s = r.cni("STATUS", None, None, None, &conf);
    assert!(s.ok && s.stdout.trim().is_empty(), "{s:?}");

    // GC: three attachments, one still valid.
    let mut ids = Vec::new();
    for i in 0..3 {
        let ns = r.netns();
        let cid = format!("gc{i}");
        assert!(r.cni("ADD", Some(&cid), Some("net1"), Some(&ns), &conf).ok);
        ids.push(cid);
    }
    assert_eq!(r.ports().len(), 3);
    // A GC without the list of attachments in use removes nothing.
    let out = r.cni("GC", None, None, None, &conf);
    assert_eq!(out.code(), Some(7), "{out:?}");
    assert_eq!(r.ports().len(), 3);
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "gc1", "ifname": "net1"}]);
    let out = r.cni("GC", None, None, None, &gc);
    assert!(out.ok, "{out:?}");
    let ports = r.ports();
    assert_eq!(ports.len(), 1, "{ports:?}");
    assert!(ports[0].starts_with("gc1."), "{ports:?}");
    assert_eq!(r.ipam_leases(), ["10.77.0.3"]);
    assert_eq!(r.files("state/tnet").len(), 1);

    // Chained: tuning after torii-cni gets our result and passes it on.
    let ns = r.netns();
    let add = r.cni("ADD", Some("chain"), Some("net1"), Some(&ns), &conf);
    assert!(add.ok, "{add:?}");
    let tuning = json!({
        "cniVersion": "1.0.0",
        "name": "tnet",
        "type": "tuning",
        "sysctl": {"net.core.somaxconn": "512"},
        "prevResult": r.cni("ADD", Some("chain10"), Some("net1"), Some(&ns), &r.conf("1.0.0")).json,
    });
    let t = run_plugin(
        &Path::new(CNI_PATH).join("tuning"),
        "ADD",
        Some("chain10"),
        Some("net1"),
        Some(&ns),
        tuning.to_string().as_bytes(),
        &[],
    );
    assert!(t.ok, "tuning after torii-cni: {t:?}");
    assert_eq!(
        t.json["interfaces"], tuning["prevResult"]["interfaces"],
        "{t:?}"
    );
    assert_eq!(t.json["ips"], tuning["prevResult"]["ips"], "{t:?}");
    // And torii-cni after another plugin keeps that plugin's result and adds its own.
    let mut after = conf.clone();
    after["prevResult"] = json!({
        "cniVersion": "1.1.0",
        "interfaces": [{"name": "eth0", "sandbox": ns}],
        "ips": [{"address": "192.0.2.5/24", "interface": 0}],
    });
    let a2 = r.cni("ADD", Some("chain2"), Some("net2"), Some(&ns), &after);
    assert!(a2.ok, "{a2:?}");
    assert_eq!(a2.json["interfaces"][0]["name"], "eth0");
    assert_eq!(a2.json["interfaces"][1]["name"], "net2");
    assert_eq!(a2.json["ips"][0]["address"], "192.0.2.5/24");
    assert_eq!(a2.json["ips"][1]["interface"], 1);

    // Everything not valid any more goes; nothing is left.
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([]);
    assert!(r.cni("GC", None, None, None, &gc).ok);
    assert_eq!(leftovers(&r), nothing(&r));

    r.stop_dataplane();
    let s = r.cni("STATUS", None, None, None, &conf);
    assert_eq!(s.code(), Some(50), "{s:?}");
    // DEL with the data plane gone still succeeds (its ports went with it).
    assert!(r.cni("DEL", Some("gone"), Some("net1"), None, &conf).ok);
}

/// The data plane dies (SIGKILL) under attachments: DEL still cleans up everything that is
/// torii-cni's (the address, the pod's files and state) and succeeds, whether the data plane
/// is still down or already restarted without the port; the same attachment can then be added
/// again.
#[test]
fn del_after_a_dataplane_crash_cleans_up() {
    prerequisites();
    let mut r = Rig::start("torii-cni-crash", "");
    let conf = r.conf("1.1.0");
    let files_and_leases = |r: &Rig| (r.files("pods"), r.files("state/tnet"), r.ipam_leases());
    let none = || {
        (
            Vec::<String>::new(),
            Vec::<String>::new(),
            Vec::<String>::new(),
        )
    };
    for restart_first in [false, true] {
        let ns = r.netns();
        let add = r.cni("ADD", Some("c1"), Some("net1"), Some(&ns), &conf);
        assert!(add.ok, "ADD: {add:?}");
        assert_eq!(r.ports().len(), 1);
        r.kill_dataplane();
        if restart_first {
            r.start_dataplane();
            assert!(r.ports().is_empty(), "{:?}", r.ports());
        }
        let mut del_conf = conf.clone();
        del_conf["prevResult"] = add.json.clone();
        let del = r.cni("DEL", Some("c1"), Some("net1"), Some(&ns), &del_conf);
        assert!(
            del.ok,
            "DEL after the crash (restarted: {restart_first}): {del:?}"
        );
        assert_eq!(files_and_leases(&r), none(), "DEL left something");
        if !restart_first {
            r.start_dataplane();
        }
        assert!(r.ports().is_empty(), "{:?}", r.ports());
        // The same attachment again, on the new data plane.
        let add = r.cni("ADD", Some("c1"), Some("net1"), Some(&ns), &conf);
        assert!(add.ok, "ADD after the crash: {add:?}");
        assert_eq!(r.ports().len(), 1);
        let del = r.cni("DEL", Some("c1"), Some("net1"), Some(&ns), &conf);
        assert!(del.ok, "{del:?}");
        assert_eq!(leftovers(&r), nothing(&r));
    }
}

/// A data plane that runs as `nobody` without capabilities binds its vhost-user sockets in a
/// `dataplane` subdirectory of the pod directory that torii-cni (root) makes and hands to the
/// data plane's user; the pod directory itself, with the network files the VM launcher reads,
/// stays root's, and the directories above can be passed through. DEL removes them all.
#[test]
fn a_non_root_data_plane_gets_its_pod_directories() {
    prerequisites();
    let r = Rig::start_as("torii-cni-nobody", "", Some((NOBODY, NOBODY)));
    let conf = r.conf("1.1.0");
    let mut r = r;
    let ns = r.netns();
    let add = r.cni("ADD", Some("c1"), Some("net1"), Some(&ns), &conf);
    assert!(add.ok, "ADD: {add:?}");
    let socket = PathBuf::from(
        add.json["interfaces"][0]["socketPath"]
            .as_str()
            .expect("socketPath"),
    );
    let sockets = socket.parent().expect("socket directory");
    assert_eq!(
        sockets.file_name().and_then(|n| n.to_str()),
        Some("dataplane")
    );
    let own = std::fs::metadata(sockets).or_fail("socket directory");
    assert_eq!(
        (own.uid(), own.gid(), own.mode() & 0o777),
        (NOBODY, NOBODY, 0o750),
        "{}",
        sockets.display()
    );
    let pod = sockets.parent().expect("pod directory");
    for d in [pod, &r.dir.join("pods")] {
        let m = std::fs::metadata(d).or_fail("directory");
        assert_eq!((m.uid(), m.mode() & 0o777), (0, 0o751), "{}", d.display());
    }
    let json = pod.join("net1.json");
    assert_eq!(std::fs::metadata(&json).or_fail("network file").uid(), 0);
    // The data plane bound the socket, as nobody, and it answers.
    let sock = std::fs::metadata(&socket).or_fail("socket");
    assert_eq!(sock.uid(), NOBODY);
    std::os::unix::net::UnixStream::connect(&socket).or_fail("connecting to the port");
    let del = r.cni("DEL", Some("c1"), Some("net1"), Some(&ns), &conf);
    assert!(del.ok, "DEL: {del:?}");
    assert!(!pod.exists(), "{} left", pod.display());
    assert_eq!(leftovers(&r), nothing(&r));
}
