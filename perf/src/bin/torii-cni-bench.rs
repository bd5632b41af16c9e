//! `torii-cni-bench`: how long torii-cni takes to ADD and DEL an attachment, run as a runtime
//! runs it (the `CNI_*` environment, the configuration on stdin, a real network namespace)
//! with host-local IPAM, in each mode asked for (vhost-user against a real torii-dataplane;
//! tap on a host bridge), the modes interleaved cycle by cycle. Prints the median, p90, p99
//! and max of each and writes the series as JSON. `perf/run-cni-bench` builds the release
//! binaries first.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use serde_json::json;
use torii_perf::bench;
use torii_perf::proc_util::{self, ChildGuard};

#[derive(Parser, Debug)]
#[command(name = "torii-cni-bench", version)]
struct Cli {
    /// ADD/DEL cycles.
    #[arg(long, default_value_t = 300)]
    cycles: u32,
    /// The torii-cni binary.
    #[arg(long, default_value = "target/release/torii-cni")]
    cni: PathBuf,
    /// The torii-dataplane binary.
    #[arg(long, default_value = "target/release/torii-dataplane")]
    dataplane: PathBuf,
    /// Where the reference plugins (host-local) are.
    #[arg(long, default_value = "/usr/lib/cni")]
    cni_path: PathBuf,
    /// Modes to measure, interleaved: vhost-user, tap, and host-local (the IPAM plugin alone,
    /// the floor every mode's ADD stands on).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "vhost-user,tap,host-local"
    )]
    modes: Vec<String>,
    /// Also measure the sriov mode (netdev and vfio), in the SR-IOV rig: a TCG guest with an
    /// emulated igb, so the times are the emulator's, not a node's. Cycles per mode.
    #[arg(long, value_name = "CYCLES")]
    sriov_rig: Option<u32>,
    /// Results file (JSON).
    #[arg(long, default_value = "perf/results/cni-latest.json")]
    out: PathBuf,
}

fn call(
    cli: &Cli,
    bin: &Path,
    command: &str,
    cid: &str,
    netns: &str,
    conf: &[u8],
) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    let mut child = Command::new(bin)
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", cid)
        .env("CNI_IFNAME", "net1")
        .env("CNI_NETNS", netns)
        .env("CNI_PATH", &cli.cni_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", bin.display()))?;
    child.stdin.take().context("stdin")?.write_all(conf)?;
    let out = child.wait_with_output()?;
    let took = t0.elapsed();
    if !out.status.success() {
        bail!(
            "{command} {cid} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(took)
}

fn stats(mut v: Vec<Duration>) -> serde_json::Value {
    v.sort();
    let at = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e3;
    json!({ "median_ms": at(0.5), "p90_ms": at(0.9), "p99_ms": at(0.99), "max_ms": at(1.0) })
}

fn stats_ms(v: &[f64]) -> serde_json::Value {
    stats(v.iter().map(|m| Duration::from_secs_f64(m / 1e3)).collect())
}

/// ADD/DEL times (ms) of the sriov mode's netdev and vfio variants in the SR-IOV rig, each
/// call timed inside the guest around the plugin run as a runtime runs it.
type Series = (Vec<f64>, Vec<f64>);

fn sriov_rig(cli: &Cli, cycles: u32) -> anyhow::Result<Vec<(String, Series)>> {
    use torii_perf::sriov_rig::SriovRig;
    let cni = std::fs::canonicalize(&cli.cni)?;
    let mut g = SriovRig::boot();
    let (_, pf) = g.pf();
    g.ok(&format!(
        "echo 1 > /sys/class/net/{pf}/device/sriov_numvfs; for i in $(seq 100); do ls /sys/class/net/{pf}/device/virtfn0/net >/dev/null 2>&1 && break; sleep 0.1; done; ip netns add pod"
    ));
    let vf = g
        .ok(&format!(
            "basename $(readlink /sys/class/net/{pf}/device/virtfn0)"
        ))
        .trim()
        .to_string();
    let mut out = Vec::new();
    for (mode, vfio) in [("sriov-netdev", false), ("sriov-vfio", true)] {
        let conf = json!({
            "cniVersion": "1.1.0",
            "name": mode,
            "type": "torii-cni",
            "mode": "sriov",
            "deviceID": vf,
            "vfio": vfio,
            "vlan": 100,
            "spoofchk": "off",
            "stateDir": "/run/rig/state",
            "ipam": {"type": "host-local", "subnet": "10.88.0.0/24", "dataDir": "/run/rig/ipam"},
        });
        let env = format!(
            "CNI_CONTAINERID=bench CNI_IFNAME=net1 CNI_NETNS=/run/netns/pod CNI_PATH={}",
            cli.cni_path.display()
        );
        // host-local alone on the same IPAM config, in the same cycles: the floor, as on the
        // host.
        let mut floor = conf.clone();
        floor["type"] = json!("host-local");
        floor["cniVersion"] = json!("1.0.0");
        let hl = cli.cni_path.join("host-local");
        g.ok(&format!(
            "echo '{conf}' > /run/rig/conf.json; echo '{floor}' > /run/rig/floor.json"
        ));
        let (cni, hl, cp) = (cni.display(), hl.display(), cli.cni_path.display());
        let fail = "|| { cat /run/rig/out; exit 1; }";
        let cycle = format!(
            "a=$(date +%s%N); CNI_COMMAND=ADD {env} {cni} < /run/rig/conf.json > /run/rig/out {fail}; \
             b=$(date +%s%N); CNI_COMMAND=DEL {env} {cni} < /run/rig/conf.json > /run/rig/out {fail}; \
             c=$(date +%s%N); CNI_COMMAND=ADD CNI_CONTAINERID=floor CNI_IFNAME=net1 CNI_NETNS=/run/netns/pod CNI_PATH={cp} {hl} < /run/rig/floor.json > /run/rig/out {fail}; \
             d=$(date +%s%N); CNI_COMMAND=DEL CNI_CONTAINERID=floor CNI_IFNAME=net1 CNI_NETNS=/run/netns/pod CNI_PATH={cp} {hl} < /run/rig/floor.json > /run/rig/out {fail}; \
             e=$(date +%s%N); echo $((b-a)) $((c-b)) $((d-c)) $((e-d))"
        );
        // In batches: one guest command may take two minutes, a cycle takes seconds in TCG.
        let mut text = String::new();
        for batch in (0..cycles).step_by(10) {
            let n = (cycles - batch).min(10);
            text += &g.ok(&format!("for i in $(seq {n}); do {cycle}; done"));
        }
        let (mut series, mut floor_series): (Series, Series) = Default::default();
        for l in text.lines() {
            let w: Vec<f64> = l
                .split_whitespace()
                .filter_map(|x| x.parse::<f64>().ok())
                .map(|ns| ns / 1e6)
                .collect();
            if let [a, d, fa, fd] = w[..] {
                series.0.push(a);
                series.1.push(d);
                floor_series.0.push(fa);
                floor_series.1.push(fd);
            }
        }
        if series.0.len() != cycles as usize {
            bail!("{mode}: expected {cycles} timings from the rig, got: {text}");
        }
        out.push((mode.to_string(), series));
        out.push((format!("host-local, beside {mode}"), floor_series));
    }
    Ok(out)
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    let dir = proc_util::unique_tmp_dir("torii-cni-bench")?;
    let control = dir.join("control.sock");
    let cfg = dir.join("dataplane.toml");
    std::fs::write(
        &cfg,
        format!(
            "[dataplane]\npmd_mode = \"adaptive\"\ncontrol_socket = \"{}\"\n",
            control.display()
        ),
    )?;
    let mut cmd = Command::new(&cli.dataplane);
    cmd.args(["run", "-c"])
        .arg(&cfg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    proc_util::die_with_parent(&mut cmd);
    let _dp = ChildGuard::new(
        cmd.spawn().context("starting torii-dataplane")?,
        "torii-dataplane",
    );
    proc_util::wait_for_path(&control, Duration::from_secs(20))?;
    let ns_name = format!("torii-cni-bench-{}", std::process::id());
    proc_util::sh(&format!("ip netns add {ns_name}"));
    let netns = format!("/run/netns/{ns_name}");
    let bridge = format!("tcb{}", std::process::id() % 100_000);
    let mut confs = Vec::new();
    for mode in &cli.modes {
        let mut c = json!({
            "cniVersion": "1.1.0",
            "name": format!("bench-{mode}"),
            "type": "torii-cni",
            "mode": mode,
            "stateDir": dir.join("state"),
            "ipam": {"type": "host-local", "subnet": "10.78.0.0/16", "dataDir": dir.join("ipam")},
        });
        match mode.as_str() {
            "vhost-user" => {
                c["controlSocket"] = json!(control);
                c["socketDir"] = json!(dir.join("pods"));
            }
            "tap" => {
                c["bridge"] = json!(bridge);
                c["socketDir"] = json!(dir.join("pods"));
            }
            "host-local" => {
                c.as_object_mut().expect("object").remove("mode");
                c["type"] = json!("host-local");
                // Debian's host-local speaks up to 1.0.0 (torii-cni asks it in that version).
                c["cniVersion"] = json!("1.0.0");
                confs.push((cli.cni_path.join("host-local"), c.to_string()));
                continue;
            }
            m => bail!("mode {m}: this bench measures vhost-user, tap and host-local"),
        }
        confs.push((cli.cni.clone(), c.to_string()));
    }
    let mut series = vec![(Vec::new(), Vec::new()); confs.len()];
    let result = (|| -> anyhow::Result<()> {
        for i in 0..cli.cycles {
            let cid = format!("bench{i}");
            for ((bin, conf), (adds, dels)) in confs.iter().zip(series.iter_mut()) {
                adds.push(call(cli, bin, "ADD", &cid, &netns, conf.as_bytes())?);
                dels.push(call(cli, bin, "DEL", &cid, &netns, conf.as_bytes())?);
            }
        }
        Ok(())
    })();
    let _ = Command::new("ip").args(["netns", "del", &ns_name]).output();
    let _ = Command::new("ip").args(["link", "del", &bridge]).output();
    result?;
    let root = bench::workspace_root();
    let (commit, dirty) = bench::git_info(&root);
    let ms = |v: &[Duration]| v.iter().map(|d| d.as_secs_f64() * 1e3).collect::<Vec<_>>();
    let mut modes = serde_json::Map::new();
    for (mode, (adds, dels)) in cli.modes.iter().zip(&series) {
        let (add, del) = (stats(adds.clone()), stats(dels.clone()));
        println!("{mode} ADD: {add}\n{mode} DEL: {del}");
        modes.insert(
            mode.clone(),
            json!({
                "add": add,
                "del": del,
                "add_series_ms": ms(adds),
                "del_series_ms": ms(dels),
            }),
        );
    }
    if let Some(n) = cli.sriov_rig {
        for (mode, ms) in sriov_rig(cli, n)? {
            let (add, del) = (stats_ms(&ms.0), stats_ms(&ms.1));
            println!("{mode} ADD (TCG rig): {add}\n{mode} DEL (TCG rig): {del}");
            modes.insert(
                mode,
                json!({
                    "where": "SR-IOV rig: QEMU TCG guest, emulated igb",
                    "add": add,
                    "del": del,
                    "add_series_ms": ms.0,
                    "del_series_ms": ms.1,
                }),
            );
        }
    }
    let report = json!({
        "bench": "torii-cni-bench",
        "commit": commit,
        "dirty": dirty,
        "cycles": cli.cycles,
        "ipam": "host-local",
        "interleaved": true,
        "modes": modes,
    });
    if let Some(p) = cli.out.parent() {
        std::fs::create_dir_all(p)?;
    }
    std::fs::write(&cli.out, serde_json::to_string_pretty(&report)?)?;
    println!("results: {}", cli.out.display());
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    for (what, p) in [("torii-cni", &cli.cni), ("torii-dataplane", &cli.dataplane)] {
        if !Path::new(p).is_file() {
            eprintln!(
                "torii-cni-bench: {what} binary {} not found (perf/run-cni-bench builds it)",
                p.display()
            );
            return ExitCode::FAILURE;
        }
    }
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("torii-cni-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
