//! Running a delegated plugin (IPAM) as section 4 of the spec says: found in `CNI_PATH`, the
//! same environment (with the command and attachment this call is about), the whole network
//! configuration on stdin, its stderr passed through. A plugin that does not speak the
//! configuration's version gets the newest version it does speak, and its result is read in
//! that version.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command as Process, Stdio};

use serde_json::Value;

use crate::config::{Command, Env};
use crate::types::{AddResult, CniError, CniResult, Code};

/// A delegated plugin found in `CNI_PATH`.
pub struct Delegate {
    name: String,
    bin: PathBuf,
    /// Where its VERSION answer is kept (one process less per call), keyed by the binary's
    /// size and modification time so that an upgraded plugin is asked again.
    cache_dir: Option<PathBuf>,
}

fn command_name(c: Command) -> &'static str {
    match c {
        Command::Add => "ADD",
        Command::Del => "DEL",
        Command::Check => "CHECK",
        Command::Version => "VERSION",
        Command::Status => "STATUS",
        Command::Gc => "GC",
    }
}

impl Delegate {
    /// Finds plugin `name` in `env.path`; code 50 if it is not there (the plugin cannot serve
    /// ADD without it).
    pub fn find(env: &Env, name: &str, cache_dir: Option<PathBuf>) -> CniResult<Delegate> {
        env.path
            .iter()
            .map(|d| d.join(name))
            .find(|p| p.is_file())
            .map(|bin| Delegate {
                name: name.to_string(),
                bin,
                cache_dir,
            })
            .ok_or_else(|| {
                CniError::new(
                    Code::NotAvailable,
                    format!(
                        "IPAM plugin {name:?} not found in CNI_PATH ({})",
                        env.path
                            .iter()
                            .map(|p| p.display().to_string())
                            .collect::<Vec<_>>()
                            .join(":")
                    ),
                )
            })
    }

    /// Runs the plugin; `Ok(stdout)` on success, its error (code and message as it gave
    /// them) otherwise.
    fn exec(
        &self,
        command: Command,
        attachment: Option<(&str, &str)>,
        env: &Env,
        stdin: &[u8],
    ) -> CniResult<Vec<u8>> {
        let mut p = Process::new(&self.bin);
        p.env("CNI_COMMAND", command_name(command))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some((cid, ifname)) = attachment {
            p.env("CNI_CONTAINERID", cid).env("CNI_IFNAME", ifname);
        }
        if env.netns.is_none() || attachment.is_some_and(|(c, _)| c != env.container_id()) {
            // DEL without a netns, or an attachment GC found: no namespace to pass.
            p.env_remove("CNI_NETNS");
        }
        let mut child = p
            .spawn()
            .map_err(|e| CniError::new(Code::Io, format!("running {}: {e}", self.bin.display())))?;
        if let Some(mut i) = child.stdin.take() {
            // A plugin that exits without reading its input is judged by its exit status.
            let _ = i.write_all(stdin);
        }
        let out = child.wait_with_output().map_err(|e| {
            CniError::new(Code::Io, format!("waiting for {}: {e}", self.bin.display()))
        })?;
        if out.status.success() {
            return Ok(out.stdout);
        }
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        let code = v["code"].as_u64().unwrap_or(Code::Setup as u64) as u32;
        let msg = v["msg"].as_str().unwrap_or("delegated plugin failed");
        let details = v["details"].as_str().unwrap_or_default();
        Err(CniError::delegated(
            code,
            format!("{} {}: {msg}", self.name, command_name(command)),
            if details.is_empty() {
                String::from_utf8_lossy(&out.stdout).trim().to_string()
            } else {
                details.to_string()
            },
        ))
    }

    /// The cache file of the VERSION answer: named after the binary's path, size and
    /// modification time.
    fn cache_file(&self) -> Option<PathBuf> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(&self.bin).ok()?;
        let key = format!(
            "{}:{}:{}.{}",
            self.bin.display(),
            m.size(),
            m.mtime(),
            m.mtime_nsec()
        );
        let h = key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        Some(
            self.cache_dir
                .as_ref()?
                .join(format!("{}-{h:016x}.json", self.name)),
        )
    }

    /// The versions the plugin supports (VERSION, or its cached answer).
    pub fn versions(&self, env: &Env) -> CniResult<Vec<String>> {
        let cache = self.cache_file();
        let cached = cache
            .as_ref()
            .and_then(|c| std::fs::read(c).ok())
            .and_then(|b| serde_json::from_slice::<Vec<String>>(&b).ok());
        if let Some(v) = cached {
            return Ok(v);
        }
        let out = self.exec(Command::Version, None, env, br#"{"cniVersion":"1.0.0"}"#)?;
        let v: Value = serde_json::from_slice(&out).map_err(|e| {
            CniError::new(Code::Decode, format!("{} VERSION output: {e}", self.name))
        })?;
        let versions: Vec<String> = v["supportedVersions"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        if let Some(c) = cache {
            // Best effort: without the cache the next call asks again. Written whole (a
            // rename), since plugins run in parallel.
            let tmp = c.with_extension(format!("tmp{}", std::process::id()));
            let written = c
                .parent()
                .is_some_and(|d| std::fs::create_dir_all(d).is_ok())
                && std::fs::write(&tmp, serde_json::to_vec(&versions).unwrap_or_default()).is_ok();
            if written {
                let _ = std::fs::rename(&tmp, &c);
            }
        }
        Ok(versions)
    }

    /// The configuration for the plugin: `raw` with `cniVersion` lowered to the newest version
    /// the plugin supports if it lacks the configuration's own; `None` if it supports none
    /// of ours at or below it.
    fn config_for(&self, env: &Env, raw: &Value, version: &str) -> CniResult<Option<Value>> {
        let theirs = self.versions(env)?;
        if theirs.iter().any(|v| v == version) {
            return Ok(Some(raw.clone()));
        }
        let best = crate::types::SUPPORTED_VERSIONS
            .iter()
            .rev()
            .filter(|v| **v <= version)
            .find(|v| theirs.iter().any(|t| t == *v));
        Ok(best.map(|b| {
            let mut c = raw.clone();
            c["cniVersion"] = Value::String(b.to_string());
            // A prevResult in a newer form than the plugin reads is of no use to it.
            if let Some(o) = c.as_object_mut() {
                o.remove("prevResult");
            }
            c
        }))
    }

    /// ADD: the plugin's result (IPs, routes, DNS).
    pub fn add(&self, env: &Env, raw: &Value, version: &str) -> CniResult<AddResult> {
        let cfg = self.config_for(env, raw, version)?.ok_or_else(|| {
            CniError::new(
                Code::IncompatibleVersion,
                format!("{} supports no CNI version up to {version}", self.name),
            )
        })?;
        let out = self.exec(Command::Add, None, env, cfg.to_string().as_bytes())?;
        let v: Value = serde_json::from_slice(&out)
            .map_err(|e| CniError::new(Code::Decode, format!("{} ADD output: {e}", self.name)))?;
        AddResult::from_json(&v)
    }

    /// DEL, CHECK, STATUS or GC; `attachment` overrides the environment's (GC releasing the
    /// attachments it found stale). Commands the plugin's versions do not have (STATUS and GC
    /// before 1.1.0) are skipped: `Ok(false)`.
    pub fn run(
        &self,
        command: Command,
        attachment: Option<(&str, &str)>,
        env: &Env,
        raw: &Value,
        version: &str,
    ) -> CniResult<bool> {
        let Some(cfg) = self.config_for(env, raw, version)? else {
            return Ok(false);
        };
        let needs_1_1 = matches!(command, Command::Status | Command::Gc);
        if needs_1_1 && cfg["cniVersion"] != "1.1.0" {
            return Ok(false);
        }
        self.exec(command, attachment, env, cfg.to_string().as_bytes())?;
        Ok(true)
    }
}
