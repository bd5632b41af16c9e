//! Shared pieces of the data plane's end-to-end tests: the daemon under test, run as the real
//! `torii-dataplane` binary with a generated config, and host network namespaces.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use torii_perf::proc_util::{wait_until, ChildGuard};

pub use torii_perf::OrFail;

/// A `torii-dataplane run` process.
pub struct Daemon {
    child: Option<ChildGuard>,
    dir: PathBuf,
    config: PathBuf,
    stats: PathBuf,
    log: PathBuf,
    starts: u32,
    /// A command the daemon runs under (e.g. `setpriv` with another user and capabilities).
    wrapper: Vec<String>,
}

impl Daemon {
    /// Writes `body` (ports and cross-connects) under a `[dataplane]` section with
    /// `dataplane_extra` lines, and starts the daemon.
    pub fn start(dir: &Path, dataplane_extra: &str, body: &str) -> Daemon {
        Self::start_under(&[], dir, dataplane_extra, body)
    }

    /// [`Daemon::start`], the daemon run by `wrapper` (a program and its arguments, which
    /// end with the daemon's command line).
    pub fn start_under(wrapper: &[&str], dir: &Path, dataplane_extra: &str, body: &str) -> Daemon {
        let stats = dir.join("stats.json");
        let config = dir.join("dataplane.toml");
        let text = format!(
            "[dataplane]\nstats_file = \"{}\"\ncontrol_socket = \"{}\"\n{dataplane_extra}\n{body}",
            stats.display(),
            dir.join("control.sock").display()
        );
        std::fs::write(&config, text).or_fail("writing config");
        let mut d = Daemon {
            child: None,
            dir: dir.to_path_buf(),
            config,
            stats,
            log: dir.join("dataplane.log"),
            starts: 0,
            wrapper: wrapper.iter().map(|s| s.to_string()).collect(),
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        self.spawn_nowait();
        let ok = wait_until(Duration::from_secs(20), Duration::from_millis(100), || {
            self.stats.exists()
        });
        assert!(
            ok,
            "torii-dataplane wrote no stats file; log:\n{}",
            self.log_text()
        );
    }

    /// Starts the daemon and returns at once (a supervisor restarting it after a crash).
    pub fn spawn_nowait(&mut self) {
        let _ = std::fs::remove_file(&self.stats);
        self.starts += 1;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .or_fail("daemon log");
        let bin = env!("CARGO_BIN_EXE_torii-dataplane");
        let mut cmd = match self.wrapper.split_first() {
            Some((w, args)) => {
                let mut c = Command::new(w);
                c.args(args).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let child = cmd
            .args(["run", "-c"])
            .arg(&self.config)
            .env("TORII_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .or_fail("spawning torii-dataplane");
        self.child = Some(ChildGuard::new(child, "torii-dataplane"));
    }

    /// SIGKILL: the daemon dies wherever it is, with no chance to clean up; reaped.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().or_fail("SIGKILL torii-dataplane");
        }
    }

    /// The control API's socket.
    pub fn control_socket(&self) -> PathBuf {
        self.dir.join("control.sock")
    }

    /// Runs `torii-dataplane ctl --socket <this daemon's> args…`.
    pub fn ctl(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_torii-dataplane"))
            .arg("ctl")
            .arg("--socket")
            .arg(self.control_socket())
            .args(args)
            .output()
            .or_fail("running torii-dataplane ctl")
    }

    /// `ctl` that must succeed; returns its stdout.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let o = self.ctl(args);
        assert!(
            o.status.success(),
            "ctl {args:?} failed: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// `ctl` that must fail; returns its stderr.
    pub fn ctl_err(&self, args: &[&str]) -> String {
        let o = self.ctl(args);
        assert!(
            !o.status.success(),
            "ctl {args:?} should have failed: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        String::from_utf8_lossy(&o.stderr).into_owned()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The latest stats report (written once a second).
    pub fn report(&self) -> Value {
        let text = std::fs::read_to_string(&self.stats).or_fail("reading stats file");
        serde_json::from_str(&text).or_fail("parsing stats file")
    }

    /// One port of the latest report.
    pub fn port(&self, name: &str) -> Value {
        self.report()["ports"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == name).cloned())
            .unwrap_or_else(|| panic!("port {name} missing from report {}", self.report()))
    }

    pub fn counter(&self, port: &str, field: &str) -> u64 {
        self.port(port)[field]
            .as_u64()
            .unwrap_or_else(|| panic!("{port}.{field} missing"))
    }

    /// Waits until `pred` holds for port `name`; panics with the report and log otherwise.
    pub fn wait_port(
        &self,
        name: &str,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) {
        // A port added at runtime shows up in the next report.
        let ok = wait_until(timeout, Duration::from_millis(200), || {
            self.report()["ports"]
                .as_array()
                .and_then(|ps| ps.iter().find(|p| p["name"] == name))
                .is_some_and(&pred)
        });
        assert!(
            ok,
            "port {name}: timed out waiting for {what}; port now {}\nlog:\n{}",
            self.port(name),
            self.log_text()
        );
    }

    /// Waits for two consecutive reports (1 s apart) with the same counters for `port`.
    pub fn wait_settled(&self, port: &str) -> Value {
        let mut last = self.port(port);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            std::thread::sleep(Duration::from_millis(1200));
            let now = self.port(port);
            if now == last || Instant::now() > deadline {
                return now;
            }
            last = now;
        }
    }

    /// SIGINT, wait for a clean exit, return what it printed.
    pub fn stop(&mut self) -> String {
        if let Some(mut c) = self.child.take() {
            c.signal(libc::SIGINT).or_fail("SIGINT");
            let st = c.wait_timeout(Duration::from_secs(15)).or_fail("waiting");
            assert!(
                matches!(st, Some(s) if s.success()),
                "torii-dataplane did not exit cleanly: {st:?}\n{}",
                self.log_text()
            );
        }
        self.log_text()
    }

    /// Stops and starts the daemon with the same config.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon running").pid()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.signal(libc::SIGINT);
            if !matches!(c.wait_timeout(Duration::from_secs(10)), Ok(Some(_))) {
                let _ = c.kill();
            }
        }
    }
}

pub use torii_perf::proc_util::sh;

/// A network namespace for the host side of a test, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = format!("torii-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        sh(&format!(
            "ip netns add {name} && ip -n {name} link set lo up"
        ));
        Netns { name }
    }

    /// Moves `ifname` (made by the daemon in the root namespace) here and gives it `cidr` and
    /// a fixed MAC, so that a tap made again after a daemon restart looks the same to the
    /// guest's ARP cache.
    pub fn adopt(&self, ifname: &str, cidr: &str) {
        let n = &self.name;
        sh(&format!(
            "ip link set {ifname} netns {n} && ip -n {n} link set {ifname} address 02:00:00:00:fe:01 && ip -n {n} addr add {cidr} dev {ifname} && ip -n {n} link set {ifname} up"
        ));
    }

    pub fn exec(&self, cmd: &str) -> String {
        sh(&format!("ip netns exec {} {cmd}", self.name))
    }

    /// `ip netns exec` as a Command, for children.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A short unique interface name (≤ 15 bytes).
pub fn ifname(tag: &str) -> String {
    format!("t{tag}{}", std::process::id() % 100000)
}

/// Boots a QEMU (TCG) guest whose virtio-net (`props`: extra device properties such as
/// `guest_tso4=off`) connects to the Torii vhost-user socket `sock`, reconnecting every
/// second, and gives its eth0 `ip_cidr`.
pub fn boot_guest(
    sock: &Path,
    mac: &str,
    ip_cidr: &str,
    queues: u16,
    smp: u32,
    props: &[&str],
) -> torii_perf::guest::Guest {
    use torii_perf::guest::{ChardevMode, GuestBuilder};
    let mut b = GuestBuilder::new().memory_mib(512).smp(smp).net_vhost_user(
        sock,
        mac,
        queues,
        ChardevMode::Client {
            reconnect_ms: Some(1000),
        },
    );
    for p in props {
        b = b.net_device_prop(*p);
    }
    start_guest(b, ip_cidr)
}

/// Boots `b`, waits for its shell and gives its eth0 `ip_cidr`.
pub fn start_guest(b: torii_perf::guest::GuestBuilder, ip_cidr: &str) -> torii_perf::guest::Guest {
    let mut g = b.spawn().or_fail("starting QEMU");
    g.wait_ready(Duration::from_secs(90)).or_fail("guest boot");
    g.run_ok(
        &format!("ip link set eth0 up && ip addr add {ip_cidr} dev eth0"),
        Duration::from_secs(30),
    )
    .or_fail("guest network setup");
    g
}

/// Pings `ip` from guest `g`: first until one reply comes back (bounded: ARP after a link
/// change, a reconnect), then three in a row that must all be answered.
pub fn ping_from(g: &mut torii_perf::guest::Guest, ip: &str) {
    let out = g
        .run(
            &format!(
                "i=0; until ping -c 1 -W 2 {ip} >/dev/null; do i=$((i+1)); [ $i -ge 15 ] && break; done; ping -c 3 -W 2 {ip}"
            ),
            Duration::from_secs(60),
        )
        .or_fail("ping from guest");
    assert!(
        out.stdout.contains(" 0% packet loss"),
        "ping from guest to {ip} failed:\n{}",
        out.stdout
    );
}

/// Ports `a` and `b`, vhost-user on sockets `a` and `b`, cross-connected; `b_client`: Torii
/// connects to a frontend listening on `b` instead of listening itself.
pub fn vhost_pair_config(a: &Path, b: &Path, b_client: bool) -> String {
    format!(
        r#"
[[port]]
name = "a"
type = "vhost-user"
socket = "{}"
[[port]]
name = "b"
type = "vhost-user"
socket = "{}"
mode = "{}"
[[xconnect]]
ports = ["a", "b"]
"#,
        a.display(),
        b.display(),
        if b_client { "client" } else { "server" }
    )
}

/// Runs `f` on a helper thread inside network namespace `ns` (by name).
pub fn in_netns<R: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> R + Send + 'static,
) -> std::thread::JoinHandle<R> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).or_fail("netns file");
        // SAFETY: setns on this thread only, with a valid netns fd.
        let r = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
}

/// SHA-256 of `data`, hex (sha256sum, as the guest computes it).
pub fn sha256_host(data: &[u8]) -> String {
    use std::io::Write;
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .or_fail("sha256sum");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(data)
        .or_fail("sha256sum stdin");
    let out = child.wait_with_output().or_fail("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Host (namespace `ns`) → guest: 4 MiB over TCP to `guest_ip:port` (the guest listens with
/// nc), compared by SHA-256 in the guest.
pub fn download_to_guest(g: &mut torii_perf::guest::Guest, ns: &str, guest_ip: &str, port: u16) {
    use std::io::Write;
    const T: Duration = Duration::from_secs(30);
    let data: Vec<u8> = (0..(4u32 << 20))
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let want = sha256_host(&data);
    g.spawn_bg(&format!("nc -l -p {port} > /tmp/down"))
        .or_fail("guest listener");
    let ip: std::net::IpAddr = guest_ip.parse().or_fail("guest address");
    let sender = in_netns(ns, move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut s = loop {
            match std::net::TcpStream::connect((ip, port)) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => panic!("connect to guest: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(300)),
            }
        };
        s.write_all(&data).or_fail("send download");
    });
    sender.join().expect("download thread");
    let ok = wait_until(Duration::from_secs(60), Duration::from_millis(500), || {
        g.run("stat -c %s /tmp/down", T)
            .map(|o| o.stdout.trim() == (4u32 << 20).to_string())
            .unwrap_or(false)
    });
    assert!(ok, "download incomplete: {:?}", g.run("ls -l /tmp/down", T));
    let got = g
        .run_ok("sha256sum /tmp/down", T)
        .or_fail("sha256 in guest");
    assert_eq!(
        got.split_whitespace().next().unwrap(),
        want,
        "download corrupted"
    );
}

/// Guest → host (namespace `ns`): `blocks` × 64 KiB of random data over TCP to
/// `host_ip:port` (nc in the guest), compared by SHA-256.
pub fn upload_from_guest(
    g: &mut torii_perf::guest::Guest,
    ns: &str,
    host_ip: &str,
    port: u16,
    blocks: usize,
) {
    use std::io::Read;
    const T: Duration = Duration::from_secs(30);
    let ip: std::net::IpAddr = host_ip.parse().or_fail("host address");
    let upload = in_netns(ns, move || {
        let l = std::net::TcpListener::bind((ip, port)).or_fail("bind");
        let (mut s, _) = l.accept().or_fail("accept");
        let mut v = Vec::new();
        s.read_to_end(&mut v).or_fail("receive upload");
        v
    });
    let want = g
        .run_ok(
            &format!("dd if=/dev/urandom of=/tmp/up bs=64k count={blocks} 2>/dev/null && sha256sum /tmp/up"),
            T,
        )
        .or_fail("make upload file");
    g.run_ok(
        &format!("nc {host_ip} {port} < /tmp/up"),
        Duration::from_secs(120),
    )
    .or_fail("upload");
    let got = upload.join().expect("upload thread");
    assert_eq!(got.len(), blocks << 16, "upload length");
    assert_eq!(
        want.split_whitespace().next().unwrap(),
        sha256_host(&got),
        "upload corrupted"
    );
}

/// A DPDK frontend (testpmd `net_virtio_user`, client of Torii's socket `sock`) sending 64-byte
/// frames as fast as it can, on CPUs 0 and 1.
pub fn sender(sock: &Path) -> torii_perf::testpmd::Testpmd {
    use torii_perf::testpmd::{FwdMode, TestpmdBuilder};
    TestpmdBuilder::new()
        .virtio_user(sock, 1, false)
        .forward_mode(FwdMode::TxOnly)
        .pkt_size(64)
        .mem_mib(256)
        .total_num_mbufs(8192)
        .lcores("0,1", 0)
        .spawn()
        .or_fail("starting testpmd")
}

/// Ports and a disk: vhost-user port `v` (socket `v`) cross-connected to a sink, and disk
/// `d` (socket `d`) on the image `img`.
pub fn vhost_to_sink_and_disk(v: &Path, d: &Path, img: &Path) -> String {
    format!(
        "[[port]]\nname = \"v\"\ntype = \"vhost-user\"\nsocket = \"{}\"\n\
         [[port]]\nname = \"sink\"\ntype = \"sink\"\n\
         [[xconnect]]\nports = [\"v\", \"sink\"]\n\
         [[disk]]\nname = \"d\"\nsocket = \"{}\"\nfile = \"{}\"\n",
        v.display(),
        d.display(),
        img.display()
    )
}

/// The unprivileged user `nobody`.
pub const NOBODY: u32 = 65534;

/// `setpriv` running a program as `nobody` with exactly the capabilities `caps` (e.g.
/// `"+net_admin"`, or `""` for none) in its effective, inheritable, ambient and bounding sets.
pub fn as_nobody(caps: &str) -> Vec<String> {
    let set = format!("-all{}", if caps.is_empty() { "" } else { "," }) + caps;
    let mut v = vec![
        "setpriv".to_string(),
        format!("--reuid={NOBODY}"),
        format!("--regid={NOBODY}"),
        "--clear-groups".into(),
        "--no-new-privs".into(),
        format!("--inh-caps={set}"),
        format!("--bounding-set={set}"),
    ];
    if !caps.is_empty() {
        v.push(format!("--ambient-caps={set}"));
    }
    v
}

/// Runs torii-dataplane under `wrapper` (a command line that ends by running the program it is
/// given) with its control socket in `run` and `body` as the rest of its configuration, where
/// it must fail to start: its stderr.
pub fn refused(wrapper: &[String], run: &Path, body: &str) -> String {
    let cfg = run.join("refused.toml");
    std::fs::write(
        &cfg,
        format!(
            "[dataplane]\ncontrol_socket = \"{}\"\n{body}",
            run.join("control.sock").display()
        ),
    )
    .or_fail("config");
    let out = Command::new(&wrapper[0])
        .args(&wrapper[1..])
        .arg(env!("CARGO_BIN_EXE_torii-dataplane"))
        .args(["run", "-c"])
        .arg(&cfg)
        .output()
        .or_fail("running torii-dataplane");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "it started: {err}");
    err
}

/// A directory `nobody` owns (0750) under a fresh test directory.
pub fn nobody_dir(tag: &str) -> (torii_perf::proc_util::TmpDir, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let dir = torii_perf::proc_util::unique_tmp_dir(tag).or_fail("tmp dir");
    let run = dir.join("run");
    std::fs::create_dir(&run).or_fail("dir");
    std::os::unix::fs::chown(&run, Some(NOBODY), Some(NOBODY)).or_fail("chown");
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o750)).or_fail("chmod");
    (dir, run)
}
