//! `torii-boot-bench`: how long a pod VM takes from the VMM's start to its agent's first
//! answer, against a bare kernel boot of the same VM (same QEMU command line, with
//! `rdinit=/bin/true`: the kernel boots, runs a trivial init and stops, so the time is the
//! kernel's own boot), interleaved round by round; and the agent's RSS once it is idle.
//! Prints medians and the ratio, writes the series as JSON. `perf/run-boot-bench` builds first.

use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use serde_json::json;
use torii_perf::bench;
use torii_runtime::pod::Pod;
use torii_runtime::qemu;
use torii_runtime::spec::{Accel, SandboxSpec, VmSpec};
use torii_runtime::vmm::VmmProcess;

#[derive(Parser, Debug)]
#[command(name = "torii-boot-bench", version)]
struct Cli {
    /// Rounds (each boots the pod VM once and the bare kernel once).
    #[arg(long, default_value_t = 10)]
    rounds: u32,
    /// The image folder (scripts/image).
    #[arg(long, default_value = "target/torii-image")]
    image: PathBuf,
    #[arg(long, default_value_t = 256)]
    memory_mib: u32,
    /// Results file (JSON).
    #[arg(long, default_value = "perf/results/boot-latest.json")]
    out: PathBuf,
}

fn stats(v: &[f64]) -> serde_json::Value {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    json!({
        "median": bench::median(&s),
        "min": s.first(),
        "max": s.last(),
        "samples": v,
    })
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("torii-boot-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let spec = SandboxSpec {
        name: format!("boot-bench-{}", std::process::id()),
        hypervisor: Default::default(),
        netns: None,
        vm: VmSpec {
            accel: Accel::Tcg,
            memory_mib: cli.memory_mib,
            kernel: cli.image.join("vmlinuz"),
            initramfs: cli.image.join("initramfs.cpio.gz"),
            ..Default::default()
        },
        interfaces: Vec::new(),
        disks: Vec::new(),
        neighbors: Vec::new(),
        agent: Default::default(),
    };
    let sb = spec
        .resolve(&torii_vfio::pci::Sysfs::default())
        .context("sandbox")?;
    let run_dir = std::env::temp_dir().join(format!("torii-boot-bench-{}", std::process::id()));
    // Removed however the run ends.
    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(run_dir.clone());
    let qemu_bin = torii_runtime::vmm::find_binary("qemu-system-x86_64")
        .context("qemu-system-x86_64 not found: run scripts/setup")?;
    let (mut agent_ms, mut bare_ms, mut rss_kib) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=cli.rounds {
        // The pod VM: launch to the agent's first answer.
        let pod = Pod::start(sb.clone(), &run_dir, None).context("pod VM")?;
        agent_ms.push(pod.boot_to_agent.as_secs_f64() * 1e3);
        // Idle RSS: after its first answers, as a pod sees it between requests.
        std::thread::sleep(Duration::from_millis(500));
        let m = pod
            .agent()
            .call("metrics", serde_json::Value::Null, Duration::from_secs(30))
            .context("metrics")?;
        let rss = m["agent"]["VmRSS"].as_u64().map(|b| b / 1024);
        if let Some(r) = rss {
            rss_kib.push(r as f64);
        }
        pod.stop(Duration::from_secs(20))
            .context("stopping the pod VM")?;

        // The bare kernel: the same command line, init replaced by /bin/true.
        let dir = run_dir.join("bare");
        std::fs::create_dir_all(&dir)?;
        let paths = qemu::Paths::new(&dir);
        let mut args = qemu::args(&sb, &paths);
        let i = args
            .iter()
            .position(|a| a == "-append")
            .context("-append")?;
        args[i + 1].push_str(" rdinit=/bin/true");
        let mut cmd = Command::new(&qemu_bin);
        cmd.args(&args);
        // The console FIFOs the command line names, as the runtime makes them.
        let _console = qemu::ConsoleTail::start(&paths.console).context("console FIFOs")?;
        let t0 = Instant::now();
        let mut p = VmmProcess::spawn(cmd, &paths.log, None).context("bare QEMU")?;
        if !p.wait_exit(Duration::from_secs(120)) {
            bail!(
                "the bare kernel did not stop within 120 s:\n{}",
                p.log_tail()
            );
        }
        let bare = t0.elapsed();
        // A kernel cannot boot under TCG in this time: QEMU refused to start.
        if bare < Duration::from_millis(500) {
            bail!("the bare QEMU exited after {bare:?}:\n{}", p.log_tail());
        }
        bare_ms.push(bare.as_secs_f64() * 1e3);
        let _ = std::fs::remove_dir_all(&dir);
        eprintln!(
            "round {round}: agent ready {:.0} ms, bare kernel {:.0} ms, agent RSS {} KiB",
            agent_ms.last().unwrap_or(&0.0),
            bare_ms.last().unwrap_or(&0.0),
            rss.map_or("?".into(), |r| r.to_string())
        );
    }
    let (a, b) = (
        bench::median(&agent_ms).unwrap_or(0.0),
        bench::median(&bare_ms).unwrap_or(0.0),
    );
    println!(
        "boot to agent ready: median {a:.0} ms; bare kernel boot: median {b:.0} ms; ratio {:.2}; agent RSS median {:.0} KiB",
        a / b,
        bench::median(&rss_kib).unwrap_or(0.0)
    );
    let v = json!({
        "scenario": "boot",
        "when": bench::format_utc(bench::unix_now()),
        "host": bench::host_info(),
        "accel": "tcg",
        "memory_mib": cli.memory_mib,
        "rounds": cli.rounds,
        "agent_ready_ms": stats(&agent_ms),
        "bare_kernel_ms": stats(&bare_ms),
        "ratio_median": a / b,
        "agent_rss_kib": stats(&rss_kib),
    });
    if let Some(d) = cli.out.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(&cli.out, serde_json::to_string_pretty(&v)?)?;
    Ok(())
}
