//! `torii-vfio` on fake sysfs trees: listing (table, JSON, selectors) and the errors an
//! operator gets for a bad request, naming the device and the cause. The same commands run
//! against the real kernel in `sriov_rig.rs`.

use std::process::Command;

use serde_json::Value;
use torii_vfio::fake::{FakeDevice, FakeTree};

fn run(t: &FakeTree, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_torii-vfio"))
        .arg("--sysfs-root")
        .arg(t.root())
        .args(args)
        .output()
        .expect("running torii-vfio");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn tree() -> FakeTree {
    let t = FakeTree::new();
    t.pf("0000:03:00.0", "tfake0", 7, 2, 10);
    t.device(FakeDevice {
        addr: "0000:05:00.0",
        vendor: 0x15b3,
        device: 0x1017,
        class: 0x020000,
        driver: Some("mlx5_core"),
        iommu_group: Some(30),
        netdev: Some("tfake1"),
    });
    t
}

#[test]
fn lists_pfs_and_vfs_as_a_table_and_as_json() {
    let t = tree();
    let (ok, table, err) = run(&t, &["list"]);
    assert!(ok, "{err}");
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("PCI"), "{table}");
    assert!(
        lines[1].contains("0000:03:00.0")
            && lines[1].contains("PF")
            && lines[1].contains("2/7 VFs"),
        "{table}"
    );
    assert!(
        lines[2].contains("0000:03:10.0")
            && lines[2].contains("igbvf")
            && lines[2].contains("VF of 0000:03:00.0"),
        "{table}"
    );
    assert_eq!(lines.len(), 4, "only PFs and VFs by default: {table}");

    let (ok, json, err) = run(&t, &["--json", "list"]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v[0]["sriov"]["vfs"][1][1], "0000:03:10.2");
    assert_eq!(v[1]["physfn"], "0000:03:00.0");
    assert_eq!(v[1]["iommu_group"], 11);

    let (ok, json, err) = run(
        &t,
        &["--json", "list", "--selectors", r#"{"vendors": ["15b3"]}"#],
    );
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v.as_array().map(Vec::len), Some(1));
    assert_eq!(v[0]["netdevs"][0], "tfake1");
}

#[test]
fn bad_requests_name_the_device_and_the_cause() {
    let t = tree();
    for (args, want) in [
        (
            &["vfs", "0000:03:00.0", "9"][..],
            "0000:03:00.0: 9 VFs asked, sriov_totalvfs is 7",
        ),
        (
            &["vfs", "0000:05:00.0", "1"],
            "0000:05:00.0: not an SR-IOV physical function",
        ),
        (&["vfs", "0000:09:00.0", "1"], "no PCI device 0000:09:00.0"),
        (
            &["spec", "0000:03:10.0"],
            "0000:03:10.0: bound to igbvf, not vfio-pci",
        ),
        (
            &["probe", "0000:03:00.0"],
            "0000:03:00.0: bound to igb, not vfio-pci",
        ),
        (
            &["list", "--selectors", r#"{"pfNames": ["tfake0#4-1"]}"#],
            "tfake0#4-1",
        ),
        (&["list", "--selectors", "{"], "not valid JSON"),
        (
            &["vfs", "0000:03:00", "1"],
            "neither a PCI address nor the network interface",
        ),
    ] {
        let (ok, _, err) = run(&t, args);
        assert!(!ok, "{args:?} succeeded");
        assert!(
            err.contains(want),
            "{args:?}: {err:?} does not say {want:?}"
        );
    }
    // The group check names the device that blocks it.
    t.bind("0000:03:10.0".parse().unwrap(), "vfio-pci");
    t.device(FakeDevice {
        addr: "0000:03:10.1",
        vendor: 0x8086,
        device: 0x10ca,
        class: 0x020000,
        driver: Some("igbvf"),
        iommu_group: Some(11),
        netdev: None,
    });
    let (ok, _, err) = run(&t, &["spec", "0000:03:10.0"]);
    assert!(!ok);
    assert!(
        err.contains("0000:03:10.0: IOMMU group 11 not viable: 0000:03:10.1 still bound to igbvf"),
        "{err}"
    );
}

#[test]
fn vfs_refuses_to_remove_vfs_in_use() {
    use torii_vfio::alloc::{Allocator, Owner};
    use torii_vfio::select::Selectors;
    let t = tree();
    let dir = t.root().join("state");
    let ns = t.root().join("pod");
    std::fs::write(&ns, "").unwrap();
    let select = Selectors {
        pci_addresses: vec!["0000:03:10.2".into()],
        ..Default::default()
    }
    .compile()
    .unwrap();
    Allocator::new(&dir)
        .unwrap()
        .allocate(
            &t.sysfs(),
            &select,
            &Owner::of_netns(&ns, "pod/net1").unwrap(),
            |_| Ok(None),
        )
        .unwrap();
    // VF 0 on a network driver but without its interface here (in a pod), VF 1 allocated.
    let vf0 = "0000:03:10.0".parse().unwrap();
    t.to_vfio(vf0);
    t.bind(vf0, "igbvf");
    let state = dir.display().to_string();
    let (ok, _, err) = run(&t, &["vfs", "--state-dir", &state, "tfake0", "3"]);
    assert!(!ok, "VFs in use were removed");
    for want in [
        "0000:03:00.0: changing the count to 3 removes every VF, and some are in use",
        "0000:03:10.2 is allocated to",
        "(pod/net1)",
        "0000:03:10.0 has no network interface here",
        "pass --force",
    ] {
        assert!(err.contains(want), "{err:?} does not say {want:?}");
    }
    assert_eq!(
        t.read("sys/bus/pci/devices/0000:03:00.0/sriov_numvfs"),
        "2\n"
    );
    // On vfio-pci, a VM may hold it.
    t.to_vfio(vf0);
    let (ok, _, err) = run(&t, &["vfs", "--state-dir", &state, "tfake0", "0"]);
    assert!(!ok);
    assert!(err.contains("0000:03:10.0 is bound to vfio-pci"), "{err}");
}
