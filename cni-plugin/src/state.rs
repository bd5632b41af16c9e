//! Per-attachment state: one file per (network, container, interface) under
//! `<stateDir>/<network>/`, written whole or not at all (a temporary file renamed over it).
//! ADD writes it before it changes anything (phase `adding`), so that a DEL or GC after a
//! crash finds and undoes what was half made.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::types::{CniError, CniResult, Code};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// ADD started: any of the resources below may exist.
    Adding,
    /// ADD finished.
    Added,
}

/// What an attachment holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Attachment {
    pub container_id: String,
    pub ifname: String,
    pub netns: Option<PathBuf>,
    pub phase: Phase,
    pub device_info_file: Option<PathBuf>,
    /// The ADD result (1.1.0 form), once there is one.
    pub result: Option<Value>,
    pub kind: Kind,
}

/// What the attachment is made of, by mode.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "kebab-case")]
pub enum Kind {
    VhostUser {
        /// The data plane port and its socket.
        port: String,
        socket: PathBuf,
        /// The pod's directory of sockets and network files.
        pod_dir: PathBuf,
    },
    Sriov {
        /// The VF's PCI address.
        device: String,
        /// Bound to vfio-pci (else its interface is in the pod's namespace).
        vfio: bool,
    },
    Tap {
        /// The host's bridge and the veth's ends (the tap is named like the attachment).
        bridge: String,
        host_veth: String,
        pod_veth: String,
        /// Queues of the tap.
        queues: u16,
        /// The pod's directory of network files.
        pod_dir: PathBuf,
    },
}

fn io(path: &Path, e: io::Error) -> CniError {
    CniError::new(Code::Io, format!("{}: {e}", path.display()))
}

/// The state files of one network.
pub struct Store {
    dir: PathBuf,
}

impl Store {
    pub fn new(dir: PathBuf) -> Store {
        Store { dir }
    }

    fn path(&self, container_id: &str, ifname: &str) -> PathBuf {
        // Container ids have no `:` and interface names neither: the pair maps to one name.
        self.dir.join(format!("{container_id}:{ifname}.json"))
    }

    pub fn load(&self, container_id: &str, ifname: &str) -> CniResult<Option<Attachment>> {
        let p = self.path(container_id, ifname);
        match fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| CniError::new(Code::Decode, format!("{}: {e}", p.display()))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&p, e)),
        }
    }

    /// Writes `a` atomically: a crash of the plugin leaves the old record or the new one (the
    /// rename). Not fsynced: what a record describes (namespaces, ports, taps) does not outlive
    /// the machine either, and a DEL that finds no record still undoes what the attachment's
    /// names lead to, IPAM included; an fsync would cost every ADD a journal commit.
    pub fn save(&self, a: &Attachment) -> CniResult<()> {
        fs::create_dir_all(&self.dir).map_err(|e| io(&self.dir, e))?;
        let p = self.path(&a.container_id, &a.ifname);
        let tmp = p.with_extension(format!("tmp{}", std::process::id()));
        let text = serde_json::to_vec_pretty(a).expect("attachment serializes");
        let mut f = fs::File::create(&tmp).map_err(|e| io(&tmp, e))?;
        f.write_all(&text).map_err(|e| io(&tmp, e))?;
        fs::rename(&tmp, &p).map_err(|e| io(&p, e))
    }

    pub fn remove(&self, container_id: &str, ifname: &str) -> CniResult<()> {
        let p = self.path(container_id, ifname);
        match fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(&p, e)),
        }
    }

    /// Every attachment on record, and the files that could not be read (reported by the
    /// caller, which goes on with the rest).
    pub fn list(&self) -> CniResult<(Vec<Attachment>, Vec<CniError>)> {
        let rd = match fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((Vec::new(), Vec::new())),
            Err(e) => return Err(io(&self.dir, e)),
        };
        let (mut out, mut bad) = (Vec::new(), Vec::new());
        for e in rd {
            let p = e.map_err(|e| io(&self.dir, e))?.path();
            if p.extension().is_some_and(|x| x == "json") {
                let read = fs::read(&p).map_err(|e| io(&p, e)).and_then(|b| {
                    serde_json::from_slice::<Attachment>(&b)
                        .map_err(|e| CniError::new(Code::Decode, format!("{}: {e}", p.display())))
                });
                match read {
                    Ok(a) => out.push(a),
                    Err(e) => bad.push(e),
                }
            }
        }
        Ok((out, bad))
    }
}
