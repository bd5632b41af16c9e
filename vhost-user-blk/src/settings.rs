//! The daemon's configuration file: any number of exports and where metrics are served.
//!
//! ```toml
//! [daemon]
//! metrics_listen = "127.0.0.1:9101"   # optional
//! seccomp = "enforce"                 # enforce | log | off (docs/security.md)
//! landlock = "off"                    # off | enforce: the file-system sandbox
//! landlock_paths = ["/run/torii"]     # allowed besides the exports' images and sockets
//!
//! [[export]]
//! name = "vm1-root"                   # logs and metrics; also the default serial
//! socket = "/run/torii/vm1-root.sock"
//! file = "/var/lib/vm1/root.img"      # raw image file or block device
//! queues = 2                          # default 1
//! workers = 1                         # default 1
//! read_only = false
//! direct = true                       # O_DIRECT
//! block_size = 512
//! physical_block_size = 4096         # default: block_size
//! serial = "vm1-root"
//! writethrough = false
//! poll_mode = "adaptive"              # poll | event | adaptive
//! poll_us = 200
//! client = false                      # connect to the socket instead of listening
//! ```
//!
//! The whole file is checked before anything starts: unknown keys, duplicate names and
//! sockets, and every export's own limits are errors.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use torii_vhost_user::SocketMode;

use crate::device::ExportConfig;
use crate::worker::PollMode;

/// What the file asks for.
#[derive(Debug)]
pub struct Settings {
    pub metrics_listen: Option<SocketAddr>,
    /// Per-thread seccomp filters.
    pub seccomp: torii_vhost_user::seccomp::Mode,
    /// The Landlock file-system sandbox, and what it allows besides the exports' own files.
    pub landlock: torii_vhost_user::landlock::Mode,
    pub landlock_paths: Vec<PathBuf>,
    pub exports: Vec<ExportConfig>,
}

/// How an operator extends the block daemon's sandbox (for the errors of denied accesses).
pub const LANDLOCK_EXTEND: &str = "`landlock_paths` in [daemon] (or --landlock-path)";

impl Settings {
    /// The Landlock rules these settings imply: each export's image (written unless
    /// read-only) and its socket's directory, and the operator's `landlock_paths`.
    pub fn landlock_rules(&self) -> torii_vhost_user::landlock::Rules {
        let mut r = torii_vhost_user::landlock::Rules::new();
        for e in &self.exports {
            landlock_export(&mut r, e, "export");
        }
        for p in &self.landlock_paths {
            r.operator(p, "landlock_paths");
        }
        r
    }
}

/// Adds what export `e` needs to `rules`: its image (read, and written unless read-only)
/// and its socket's directory (made and removed there, or connected to in client mode).
/// `what` names the section (`export`, `disk`).
pub fn landlock_export(
    rules: &mut torii_vhost_user::landlock::Rules,
    e: &ExportConfig,
    what: &str,
) {
    rules.image(&e.path, e.read_only, format!("{what} {:?} image", e.name));
    rules.socket(
        &e.socket,
        e.mode == SocketMode::Server,
        format!("{what} {:?} socket", e.name),
    );
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRepr {
    #[serde(default)]
    daemon: DaemonRepr,
    #[serde(default, rename = "export")]
    exports: Vec<ExportSettings>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DaemonRepr {
    metrics_listen: Option<SocketAddr>,
    #[serde(default)]
    seccomp: torii_vhost_user::seccomp::Mode,
    #[serde(default)]
    landlock: torii_vhost_user::landlock::Mode,
    #[serde(default)]
    landlock_paths: Vec<PathBuf>,
}

/// `poll_mode`: how an export's workers wait for work.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ModeSetting {
    Poll,
    Event,
    #[default]
    Adaptive,
}

fn one() -> u16 {
    1
}

fn sector() -> u32 {
    512
}

fn poll_us() -> u64 {
    200
}

/// One export as a configuration file (or the data plane's control API) spells it: an
/// `[[export]]` section here, a `[[disk]]` section in the data plane's file.
#[derive(Serialize, Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct ExportSettings {
    pub name: String,
    pub socket: PathBuf,
    pub file: PathBuf,
    #[serde(default = "one")]
    pub queues: u16,
    #[serde(default = "one")]
    pub workers: u16,
    #[serde(default)]
    pub read_only: bool,
    #[serde(default)]
    pub direct: bool,
    #[serde(default = "sector")]
    pub block_size: u32,
    pub physical_block_size: Option<u32>,
    pub serial: Option<String>,
    #[serde(default)]
    pub writethrough: bool,
    #[serde(default)]
    pub poll_mode: ModeSetting,
    #[serde(default = "poll_us")]
    pub poll_us: u64,
    #[serde(default)]
    pub client: bool,
}

impl ExportSettings {
    /// The export these settings describe, checked against the export's own limits.
    pub fn to_config(&self) -> Result<ExportConfig, String> {
        if !torii_vhost_user::valid_device_name(&self.name) {
            return Err(format!(
                "export name {:?}: 1 to 64 printable characters, no spaces or /",
                self.name
            ));
        }
        let poll = match self.poll_mode {
            ModeSetting::Poll => PollMode::Poll,
            ModeSetting::Event => PollMode::Event,
            ModeSetting::Adaptive => PollMode::Adaptive(Duration::from_micros(self.poll_us)),
        };
        let cfg = ExportConfig {
            serial: self.serial.clone().unwrap_or_else(|| self.name.clone()),
            name: self.name.clone(),
            socket: self.socket.clone(),
            mode: if self.client {
                SocketMode::Client
            } else {
                SocketMode::Server
            },
            path: self.file.clone(),
            read_only: self.read_only,
            direct: self.direct,
            num_queues: self.queues,
            workers: self.workers,
            block_size: self.block_size,
            physical_block_size: self.physical_block_size.unwrap_or(self.block_size),
            writeback: !self.writethrough,
            poll,
            reconnect_interval: Duration::from_millis(500),
        };
        cfg.validate()
            .map_err(|err| format!("export {}: {err}", cfg.name))?;
        Ok(cfg)
    }
}

/// Parses and checks a configuration file's text.
pub fn parse(text: &str) -> Result<Settings, String> {
    let f: FileRepr = toml::from_str(text).map_err(|e| e.to_string())?;
    if f.exports.is_empty() {
        return Err("no [[export]] section".into());
    }
    for p in &f.daemon.landlock_paths {
        torii_vhost_user::landlock::check_operator_path(p)
            .map_err(|e| format!("landlock_paths: {e}"))?;
    }
    let (mut names, mut sockets) = (HashSet::new(), HashSet::new());
    let mut exports = Vec::new();
    for e in f.exports {
        let cfg = e.to_config()?;
        if !names.insert(cfg.name.clone()) {
            return Err(format!("export {}: name used twice", cfg.name));
        }
        if !sockets.insert(cfg.socket.clone()) {
            return Err(format!(
                "export {}: socket {} used twice",
                cfg.name,
                cfg.socket.display()
            ));
        }
        exports.push(cfg);
    }
    Ok(Settings {
        metrics_listen: f.daemon.metrics_listen,
        seccomp: f.daemon.seccomp,
        landlock: f.daemon.landlock,
        landlock_paths: f.daemon.landlock_paths,
        exports,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        [daemon]
        metrics_listen = "127.0.0.1:9101"
        [[export]]
        name = "a"
        socket = "/tmp/a.sock"
        file = "/tmp/a.img"
        queues = 2
        direct = true
        [[export]]
        name = "b"
        socket = "/tmp/b.sock"
        file = "/dev/loop0"
        read_only = true
        poll_mode = "event"
        serial = "disk-b"
    "#;

    #[test]
    fn a_good_file() {
        let s = parse(GOOD).unwrap();
        assert_eq!(s.metrics_listen, Some("127.0.0.1:9101".parse().unwrap()));
        assert_eq!(s.seccomp, torii_vhost_user::seccomp::Mode::Enforce);
        let off = parse(&GOOD.replace("[daemon]", "[daemon]\nseccomp = \"off\"")).unwrap();
        assert_eq!(off.seccomp, torii_vhost_user::seccomp::Mode::Off);
        assert_eq!(s.exports.len(), 2);
        let (a, b) = (&s.exports[0], &s.exports[1]);
        assert_eq!(
            (a.num_queues, a.workers, a.direct, a.serial.as_str()),
            (2, 1, true, "a")
        );
        assert_eq!(a.poll, PollMode::Adaptive(Duration::from_micros(200)));
        assert!(b.read_only && b.writeback);
        assert_eq!((b.poll, b.serial.as_str()), (PollMode::Event, "disk-b"));
    }

    #[test]
    fn landlock_rules_follow_the_exports() {
        use torii_vhost_user::landlock::{Mode, Rights};
        let s = parse(&GOOD.replace(
            "[daemon]",
            "[daemon]\nlandlock = \"enforce\"\nlandlock_paths = [\"/srv/images\"]",
        ))
        .unwrap();
        assert_eq!(s.landlock, Mode::Enforce);
        assert_eq!(parse(GOOD).unwrap().landlock, Mode::Off);
        let m = s.landlock_rules().merged();
        let rights = |p: &str| m.get(std::path::Path::new(p)).map(|e| e.0);
        // Both sockets' directory, each image (b read-only), the operator's path; nothing else.
        assert_eq!(rights("/tmp"), Some(Rights::SOCKET_DIR));
        assert_eq!(
            rights("/tmp/a.img"),
            Some(Rights::READ_FILE | Rights::WRITE_FILE)
        );
        let b = rights("/dev/loop0").unwrap();
        assert!(
            b.contains(Rights::READ_FILE) && !b.contains(Rights::WRITE_FILE),
            "{b}"
        );
        assert_eq!(rights("/srv/images"), Some(Rights::OPERATOR));
        assert_eq!(m.len(), 4, "{m:?}");
        assert!(m[std::path::Path::new("/tmp")]
            .1
            .contains(&"export \"a\" socket".to_string()));
        let req: Vec<_> = s
            .landlock_rules()
            .iter()
            .filter(|r| r.required)
            .map(|r| r.path.clone())
            .collect();
        assert_eq!(req, vec![PathBuf::from("/srv/images")]);
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        let cases = [
            ("", "no [[export]]"),
            (
                &GOOD.replace("queues = 2", "queus = 2"),
                "unknown field `queus`",
            ),
            (&GOOD.replace("\"b\"", "\"a\""), "name used twice"),
            (&GOOD.replace("/tmp/b.sock", "/tmp/a.sock"), "used twice"),
            (
                &GOOD.replace("queues = 2", "queues = 0"),
                "queues must be between 1",
            ),
            (
                &GOOD.replace("queues = 2", "queues = 2\nworkers = 3"),
                "workers",
            ),
            (
                &GOOD.replace("direct = true", "block_size = 1000"),
                "block_size",
            ),
            (
                &GOOD.replace(
                    "direct = true",
                    "block_size = 4096\nphysical_block_size = 512",
                ),
                "physical_block_size",
            ),
            (&GOOD.replace("\"event\"", "\"busy\""), "unknown variant"),
            (
                &GOOD.replace("[daemon]", "[daemon]\nseccomp = \"lax\""),
                "unknown variant `lax`",
            ),
            (
                &GOOD.replace("127.0.0.1:9101", "nowhere"),
                "invalid socket address",
            ),
            (
                &GOOD.replace("[daemon]", "[daemon]\nlandlock = \"log\""),
                "unknown variant `log`",
            ),
            (
                &GOOD.replace("[daemon]", "[daemon]\nlandlock_paths = [\"run/torii\"]"),
                "landlock_paths: run/torii is not an absolute path",
            ),
        ];
        for (text, want) in cases {
            let err = parse(text).unwrap_err();
            assert!(err.contains(want), "{want:?} not in {err:?}");
        }
    }
}
