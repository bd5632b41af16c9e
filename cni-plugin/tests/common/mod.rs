//! The CNI tests' harness: torii-cni run exactly as a runtime runs it (the `CNI_*`
//! environment, the configuration on stdin, a real network namespace), a real
//! torii-dataplane, and Debian's reference plugins (host-local, tuning) from /usr/lib/cni.

#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use torii_perf::proc_util::{self, ChildGuard, TmpDir};
pub use torii_perf::OrFail;

/// Where Debian's containernetworking-plugins puts the reference plugins.
pub const CNI_PATH: &str = "/usr/lib/cni";

pub fn prerequisites() {
    torii_perf::prereq::require_root().or_fail("prerequisite");
    assert!(
        Path::new(CNI_PATH).join("host-local").is_file(),
        "{CNI_PATH}/host-local is missing: apt-get install containernetworking-plugins (or run scripts/setup)"
    );
}

/// The torii-dataplane binary of this build (cargo builds every workspace binary for a
/// workspace test run).
pub fn dataplane_bin() -> PathBuf {
    let exe = std::env::current_exe().or_fail("test binary path");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("torii-dataplane"))
        .expect("target directory");
    assert!(
        bin.is_file(),
        "{} is missing: build it first (cargo build -p torii-dataplane, or run scripts/test)",
        bin.display()
    );
    bin
}

/// A torii-dataplane with its control socket, state and pod directories under `dir`.
pub struct Rig {
    pub dir: TmpDir,
    dp: Option<ChildGuard>,
    pub netns: Vec<String>,
    extra_ports: String,
    /// The data plane's user when not root (uid, gid).
    user: Option<(u32, u32)>,
}

/// The unprivileged user `nobody`.
pub const NOBODY: u32 = 65534;

/// What one CNI call gave back.
#[derive(Debug)]
pub struct Out {
    pub ok: bool,
    pub json: Value,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn code(&self) -> Option<u64> {
        self.json["code"].as_u64()
    }
}

impl Rig {
    /// A rig whose data plane also has these `[[port]]` sections.
    pub fn start(tag: &str, extra_ports: &str) -> Rig {
        Rig::start_as(tag, extra_ports, None)
    }

    /// A rig whose data plane runs as `user` (uid, gid) without any capability; its control
    /// socket is in a directory of that user's.
    pub fn start_as(tag: &str, extra_ports: &str, user: Option<(u32, u32)>) -> Rig {
        let dir = proc_util::unique_tmp_dir(tag).or_fail("tmp dir");
        if let Some((uid, gid)) = user {
            use std::os::unix::fs::PermissionsExt;
            let run = dir.join("run");
            std::fs::create_dir(&run).or_fail("run dir");
            std::os::unix::fs::chown(&run, Some(uid), Some(gid)).or_fail("chown");
            std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o750)).or_fail("chmod");
        }
        let mut r = Rig {
            dir,
            dp: None,
            netns: Vec::new(),
            extra_ports: extra_ports.to_string(),
            user,
        };
        r.start_dataplane();
        r
    }

    pub fn control_socket(&self) -> PathBuf {
        match self.user {
            Some(_) => self.dir.join("run/control.sock"),
            None => self.dir.join("control.sock"),
        }
    }

    pub fn start_dataplane(&mut self) {
        let cfg = self.dir.join("dataplane.toml");
        std::fs::write(
            &cfg,
            format!(
                "[dataplane]\npmd_mode = \"adaptive\"\ncontrol_socket = \"{}\"\n{}",
                self.control_socket().display(),
                self.extra_ports
            ),
        )
        .or_fail("dataplane config");
        let log = std::fs::File::create(self.dir.join("dataplane.log")).or_fail("log");
        let mut cmd = match self.user {
            Some((uid, gid)) => {
                let mut c = Command::new("setpriv");
                c.args([
                    format!("--reuid={uid}"),
                    format!("--regid={gid}"),
                    "--clear-groups".into(),
                    "--no-new-privs".into(),
                    "--inh-caps=-all".into(),
                    "--bounding-set=-all".into(),
                ])
                .arg(dataplane_bin());
                c
            }
            None => Command::new(dataplane_bin()),
        };
        cmd.args(["run", "-c"])
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(log.try_clone().or_fail("log"))
            .stderr(log);
        proc_util::die_with_parent(&mut cmd);
        let child = cmd.spawn().or_fail("starting torii-dataplane");
        self.dp = Some(ChildGuard::new(child, "torii-dataplane"));
        // Answering, not just there: a killed daemon leaves its socket file behind.
        let up = proc_util::wait_until(Duration::from_secs(20), Duration::from_millis(20), || {
            std::os::unix::net::UnixStream::connect(self.control_socket()).is_ok()
        });
        assert!(up, "torii-dataplane's control socket does not answer");
    }

    pub fn stop_dataplane(&mut self) {
        if let Some(mut c) = self.dp.take() {
            let _ = c.signal(libc::SIGINT);
            let _ = c.wait_timeout(Duration::from_secs(10));
        }
    }

    /// SIGKILL: the data plane dies with its ports, nothing cleaned up.
    pub fn kill_dataplane(&mut self) {
        if let Some(mut c) = self.dp.take() {
            c.kill().or_fail("SIGKILL torii-dataplane");
        }
    }

    pub fn dataplane_pid(&self) -> u32 {
        self.dp.as_ref().expect("data plane running").pid()
    }

    /// A new network namespace (removed with the rig); its path.
    pub fn netns(&mut self) -> String {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "torii-cni-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        proc_util::sh(&format!("ip netns add {name}"));
        self.netns.push(name.clone());
        format!("/run/netns/{name}")
    }

    /// The network configuration the tests use: host-local IPAM over `subnet` with its data
    /// under the rig, every path under the rig.
    pub fn conf(&self, version: &str) -> Value {
        json!({
            "cniVersion": version,
            "name": "tnet",
            "type": "torii-cni",
            "mode": "vhost-user",
            "controlSocket": self.control_socket(),
            "socketDir": self.dir.join("pods"),
            "stateDir": self.dir.join("state"),
            "ipam": {
                "type": "host-local",
                "subnet": "10.77.0.0/24",
                "dataDir": self.dir.join("ipam"),
                "routes": [{"dst": "0.0.0.0/0"}],
            },
        })
    }

    /// Runs torii-cni `command` as a runtime would.
    pub fn cni(
        &self,
        command: &str,
        container: Option<&str>,
        ifname: Option<&str>,
        netns: Option<&str>,
        conf: &Value,
    ) -> Out {
        self.cni_raw(
            command,
            container,
            ifname,
            netns,
            conf.to_string().as_bytes(),
            &[],
        )
    }

    pub fn cni_raw(
        &self,
        command: &str,
        container: Option<&str>,
        ifname: Option<&str>,
        netns: Option<&str>,
        stdin: &[u8],
        env: &[(&str, &str)],
    ) -> Out {
        run_plugin(
            Path::new(env!("CARGO_BIN_EXE_torii-cni")),
            command,
            container,
            ifname,
            netns,
            stdin,
            env,
        )
    }

    /// IP addresses host-local holds for the network.
    pub fn ipam_leases(&self) -> Vec<String> {
        let d = self.dir.join("ipam").join("tnet");
        let mut v: Vec<String> = std::fs::read_dir(&d)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// The data plane's port names.
    pub fn ports(&self) -> Vec<String> {
        let r = torii_dataplane::ctl::request(&self.control_socket(), "GET", "/v1/ports", None)
            .or_fail("listing ports");
        let v: Value = serde_json::from_str(&r.body).or_fail("ports JSON");
        v.as_array()
            .expect("ports array")
            .iter()
            .map(|p| p["name"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    /// Files left under `sub` of the rig (state, pods).
    pub fn files(&self, sub: &str) -> Vec<String> {
        fn walk(p: &Path, out: &mut Vec<String>) {
            if let Ok(rd) = std::fs::read_dir(p) {
                for e in rd.flatten() {
                    let q = e.path();
                    if q.is_dir() {
                        walk(&q, out);
                    } else {
                        out.push(q.display().to_string());
                    }
                }
            }
        }
        let mut v = Vec::new();
        walk(&self.dir.join(sub), &mut v);
        v
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.stop_dataplane();
        for n in &self.netns {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}

/// Runs a CNI plugin binary as a runtime would.
pub fn run_plugin(
    bin: &Path,
    command: &str,
    container: Option<&str>,
    ifname: Option<&str>,
    netns: Option<&str>,
    stdin: &[u8],
    env: &[(&str, &str)],
) -> Out {
    let mut c = Command::new(bin);
    c.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", command)
        .env("CNI_PATH", CNI_PATH)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in [
        ("CNI_CONTAINERID", container),
        ("CNI_IFNAME", ifname),
        ("CNI_NETNS", netns),
    ] {
        if let Some(v) = v {
            c.env(k, v);
        }
    }
    for (k, v) in env {
        c.env(k, v);
    }
    let mut child = c.spawn().or_fail("running the plugin");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin)
        .or_fail("writing stdin");
    let out = child.wait_with_output().or_fail("waiting for the plugin");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    Out {
        ok: out.status.success(),
        json: serde_json::from_str(&stdout).unwrap_or(Value::Null),
        stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}
