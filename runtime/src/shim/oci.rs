//! The parts of an OCI runtime spec (a bundle's config.json, an exec's process) the shim uses.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct Spec {
    pub process: Option<Process>,
    pub root: Option<Root>,
    pub mounts: Vec<Mount>,
    pub annotations: HashMap<String, String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct Process {
    pub terminal: bool,
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct Root {
    pub path: String,
    pub readonly: bool,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct Mount {
    pub destination: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

/// Most a config.json may be (a hostile or broken bundle must not exhaust the shim).
const MAX_SPEC: u64 = 4 << 20;

impl Spec {
    /// Reads `<bundle>/config.json`.
    pub fn load(bundle: &Path) -> Result<Spec, String> {
        let path = bundle.join("config.json");
        let text = read_bounded(&path)?;
        serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The root file system's folder on the host (a relative path is the bundle's).
    pub fn root_path(&self, bundle: &Path) -> PathBuf {
        match &self.root {
            Some(r) if !r.path.is_empty() => bundle.join(&r.path),
            _ => bundle.join("rootfs"),
        }
    }
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut buf = Vec::new();
    f.take(MAX_SPEC + 1)
        .read_to_end(&mut buf)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if buf.len() as u64 > MAX_SPEC {
        return Err(format!("{}: over {MAX_SPEC} bytes", path.display()));
    }
    Ok(buf)
}

impl Process {
    /// An exec's process, as containerd sends it (JSON in an `Any`).
    pub fn from_json(data: &[u8]) -> Result<Process, String> {
        serde_json::from_slice(data).map_err(|e| format!("process spec: {e}"))
    }

    /// Checks it can run in the guest.
    pub fn check(&self) -> Result<(), String> {
        if self.terminal {
            return Err(
                "a terminal is not supported: Torii runs the process with pipes (drop -t/--tty)"
                    .into(),
            );
        }
        if self.args.is_empty() {
            return Err("the process has no args".into());
        }
        Ok(())
    }

    /// The working directory in the container (`/` when unset).
    pub fn cwd(&self) -> &str {
        if self.cwd.is_empty() {
            "/"
        } else {
            &self.cwd
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bundle_spec_and_an_exec_process_parse() {
        let s: Spec = serde_json::from_str(
            r#"{"ociVersion":"1.0.2","process":{"terminal":false,"user":{"uid":0,"gid":0},
            "args":["echo","hi"],"env":["PATH=/bin"],"cwd":"/"},"root":{"path":"rootfs"},
            "mounts":[{"destination":"/proc","type":"proc","source":"proc"}],
            "annotations":{"io.kubernetes.cri.sandbox-id":"s1"},"linux":{}}"#,
        )
        .unwrap();
        assert_eq!(s.process.as_ref().unwrap().args, ["echo", "hi"]);
        assert_eq!(s.root_path(Path::new("/b")), Path::new("/b/rootfs"));
        assert_eq!(s.mounts[0].kind, "proc");
        assert_eq!(s.annotations["io.kubernetes.cri.sandbox-id"], "s1");
        let p = Process::from_json(br#"{"args":["sh"],"terminal":true}"#).unwrap();
        assert!(p.check().unwrap_err().contains("terminal"));
        assert_eq!(p.cwd(), "/");
        assert!(Process::default().check().is_err());
    }
}
