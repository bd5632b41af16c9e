//! The Kubernetes manifests under deploy/ carry configurations that must be valid: each
//! NetworkAttachmentDefinition's CNI configuration parses as torii-cni parses it, and the
//! ConfigMap's data plane configuration as torii-dataplane reads it.

use std::path::Path;

/// The lines of the YAML block scalar introduced by `key: |` or `key: |-` in `text`, with the
/// block's indentation removed.
fn block(text: &str, key: &str) -> String {
    let mut lines = text.lines();
    let start = lines
        .by_ref()
        .find(|l| {
            let t = l.trim_start();
            t.starts_with(&format!("{key}: |"))
        })
        .unwrap_or_else(|| panic!("no block {key:?}"));
    let key_indent = start.len() - start.trim_start().len();
    let body: Vec<&str> = lines
        .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > key_indent)
        .collect();
    let indent = body
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    body.iter()
        .map(|l| l.get(indent..).unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

fn read(name: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn the_network_attachment_definition_is_a_valid_torii_cni_config() {
    let conf = block(&read("nad-vhost-user.yaml"), "config");
    let c = torii_cni::config::NetConf::parse(conf.as_bytes())
        .unwrap_or_else(|e| panic!("{e}\n{conf}"));
    assert_eq!(c.name, "torii-fast");
    assert_eq!((c.vlan, c.queues), (Some(100), 2));
}

#[test]
fn the_sriov_network_attachment_definitions_are_valid_torii_cni_configs() {
    for (file, vfio) in [("nad-sriov.yaml", false), ("nad-sriov-vfio.yaml", true)] {
        let conf = block(&read(file), "config");
        let c = torii_cni::config::NetConf::parse(conf.as_bytes())
            .unwrap_or_else(|e| panic!("{file}: {e}\n{conf}"));
        let s = c.sriov.unwrap_or_else(|| panic!("{file}: not sriov"));
        assert_eq!(s.vfio, vfio, "{file}");
        assert!(!s.settings.is_empty(), "{file}");
    }
}

#[test]
fn the_tap_network_attachment_definition_is_a_valid_torii_cni_config() {
    let conf = block(&read("nad-tap.yaml"), "config");
    let c = torii_cni::config::NetConf::parse(conf.as_bytes())
        .unwrap_or_else(|e| panic!("{e}\n{conf}"));
    assert_eq!(c.mode, torii_cni::config::Mode::Tap);
    assert_eq!((c.bridge.as_str(), c.queues), ("torii-br", 2));
}

#[test]
fn the_daemonset_config_is_a_valid_dataplane_config() {
    let text = block(&read("torii.yaml"), "dataplane.toml");
    // Parsed, not validated: pmd_cpus names the node's CPUs, not this machine's.
    let c: torii_dataplane::config::Config =
        toml::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(c.dataplane.pmd_cpus, [2]);
    assert_eq!(c.ports[0].name, "uplink");
}
