//! `torii-blk-bench`: Torii's vhost-user-blk backend against qemu-storage-daemon's, driven by
//! the same userspace client ([`crate::blk_job`]) on the same file, with `fio
//! --ioengine=io_uring` on that file as the ceiling; interleaved and repeated.
//!
//! Placement (2 CPUs): the backend (Torii: its one queue worker; qemu-storage-daemon: all its
//! threads) runs on CPU 1, the client on CPU 0: IOPS per backend core. fio runs on CPU 1 and
//! does the I/O itself: what one core gets from io_uring on that file with no virtqueue in
//! between.
//!
//! Files: one on tmpfs (page-cache speed: the backends' own cost dominates) and one on the
//! root file system opened with O_DIRECT by everyone (the device's speed).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Serialize;

use crate::bench::median;
use crate::blk_job::{run_spec, Pattern, RunReport, RunSpec};
use crate::proc_util::{self, ChildGuard};
use crate::qsd::{Qsd, QsdAio};

/// CPU of the backend (and of fio).
pub const BACKEND_CPU: usize = 1;
/// CPU of the client.
pub const CLIENT_CPU: usize = 0;

/// One measured workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Case {
    pub pattern: Pattern,
    pub bs: u32,
    pub iodepth: u16,
}

impl Case {
    pub fn name(&self) -> String {
        let p = match self.pattern {
            Pattern::RandRead => "randread",
            Pattern::RandWrite => "randwrite",
            Pattern::Read => "read",
            Pattern::Write => "write",
            Pattern::Verify => "verify",
            Pattern::Check => "check",
        };
        format!("{p} {}k qd{}", self.bs / 1024, self.iodepth)
    }

    fn fio_rw(&self) -> &'static str {
        match self.pattern {
            Pattern::RandRead => "randread",
            Pattern::RandWrite => "randwrite",
            Pattern::Read | Pattern::Check => "read",
            Pattern::Write | Pattern::Verify => "write",
        }
    }
}

/// The default cases: 4k random read at QD32 and QD1, 4k random write at QD32, 128k
/// sequential read and write at QD8.
pub fn default_cases() -> Vec<Case> {
    let c = |pattern, bs, iodepth| Case {
        pattern,
        bs,
        iodepth,
    };
    vec![
        c(Pattern::RandRead, 4096, 32),
        c(Pattern::RandRead, 4096, 1),
        c(Pattern::RandWrite, 4096, 32),
        c(Pattern::Read, 128 << 10, 8),
        c(Pattern::Write, 128 << 10, 8),
    ]
}

/// Who serves the I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Subject {
    Torii,
    /// qemu-storage-daemon with aio=io_uring.
    Qsd,
    /// qemu-storage-daemon with its default aio=threads.
    QsdThreads,
    /// fio --ioengine=io_uring on the file itself.
    Fio,
}

impl Subject {
    pub const ALL: [Subject; 4] = [
        Subject::Torii,
        Subject::Qsd,
        Subject::QsdThreads,
        Subject::Fio,
    ];
}

/// Where the file lives.
#[derive(Clone, Debug, Serialize)]
pub struct Target {
    pub name: String,
    #[serde(skip)]
    pub path: PathBuf,
    pub direct: bool,
}

/// One run's numbers.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    pub target: String,
    pub case: String,
    pub subject: Subject,
    pub round: u32,
    pub iops: f64,
    pub mbps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub errors: u64,
}

/// Fills `path` with `mib` MiB of non-zero data (so that reads hit real blocks, not holes).
pub fn prepare_file(path: &Path, mib: u64) -> anyhow::Result<()> {
    use std::io::Write;
    let mut f =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut block = vec![0u8; 1 << 20];
    for i in 0..mib {
        for (k, b) in block.iter_mut().enumerate() {
            *b = (k as u64 ^ i.wrapping_mul(0x9e37)) as u8 | 1;
        }
        f.write_all(&block)?;
    }
    f.sync_all()?;
    Ok(())
}

/// Pins the calling thread to `cpu`.
pub fn pin_current_thread(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET only write it, and
    // sched_setaffinity reads it for the calling thread (pid 0).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn taskset(cpu: usize, bin: &Path) -> Command {
    let mut c = Command::new("taskset");
    c.arg("-c").arg(cpu.to_string()).arg(bin);
    c
}

/// Runs one sample of `case` on `target` with `subject` (Torii: that binary with those extra
/// arguments).
pub fn run_one(
    subject: Subject,
    case: Case,
    target: &Target,
    runtime: Duration,
    (torii, torii_args): (&Path, &[String]),
    dir: &Path,
    round: u32,
) -> anyhow::Result<Sample> {
    let report = match subject {
        Subject::Fio => return fio(case, target, runtime, round),
        Subject::Torii => {
            let sock = dir.join("torii.sock");
            let _ = std::fs::remove_file(&sock);
            let log = std::fs::File::create(dir.join("torii.log"))?;
            let mut cmd = taskset(BACKEND_CPU, torii);
            cmd.arg("--socket")
                .arg(&sock)
                .arg("--file")
                .arg(&target.path)
                .args(torii_args)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log);
            if target.direct {
                cmd.arg("--direct");
            }
            proc_util::die_with_parent(&mut cmd);
            let _child = ChildGuard::new(
                cmd.spawn().context("starting torii-vhost-user-blk")?,
                "torii-vhost-user-blk",
            );
            proc_util::wait_for_path(&sock, Duration::from_secs(10))?;
            client(&sock, case, runtime)?
        }
        Subject::Qsd | Subject::QsdThreads => {
            let sock = dir.join("qsd.sock");
            let aio = if subject == Subject::Qsd {
                QsdAio::IoUring
            } else {
                QsdAio::Threads
            };
            let q = Qsd::start(
                &target.path,
                &sock,
                1,
                aio,
                target.direct,
                &dir.join("qsd.log"),
            )?;
            // Every thread of qemu-storage-daemon on the backend CPU.
            let st = Command::new("taskset")
                .args([
                    "-a",
                    "-p",
                    "-c",
                    &BACKEND_CPU.to_string(),
                    &q.pid().to_string(),
                ])
                .stdout(Stdio::null())
                .status()?;
            if !st.success() {
                bail!("taskset of qemu-storage-daemon failed");
            }
            client(&sock, case, runtime)?
        }
    };
    Ok(Sample {
        target: target.name.clone(),
        case: case.name(),
        subject,
        round,
        iops: report.iops,
        mbps: report.mbps,
        p50_us: report.lat_p50_us,
        p99_us: report.lat_p99_us,
        p999_us: report.lat_p999_us,
        errors: report.errors,
    })
}

/// The client on CPU 0 (in a thread of ours pinned there).
fn client(sock: &Path, case: Case, runtime: Duration) -> anyhow::Result<RunReport> {
    let spec = RunSpec {
        pattern: case.pattern,
        bs: case.bs,
        iodepth: case.iodepth,
        numjobs: 1,
        runtime,
        size: 0,
        seed: 1,
        queue_size: 256,
        segments: 1,
    };
    let sock = sock.to_path_buf();
    let r = std::thread::spawn(move || {
        pin_current_thread(CLIENT_CPU);
        run_spec(&sock, &spec)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    if r.errors > 0 {
        bail!("{} requests failed", r.errors);
    }
    Ok(r)
}

/// fio with io_uring on the file, on the backend CPU.
fn fio(case: Case, target: &Target, runtime: Duration, round: u32) -> anyhow::Result<Sample> {
    let bin = crate::prereq::require_binary("fio", crate::prereq::FIO_HINT)?;
    let out = Command::new("taskset")
        .arg("-c")
        .arg(BACKEND_CPU.to_string())
        .arg(bin)
        .args([
            "--name=ceiling",
            "--ioengine=io_uring",
            "--time_based",
            "--output-format=json",
            "--randrepeat=0",
            "--norandommap",
        ])
        .arg(format!("--filename={}", target.path.display()))
        .arg(format!("--rw={}", case.fio_rw()))
        .arg(format!("--bs={}", case.bs))
        .arg(format!("--iodepth={}", case.iodepth))
        .arg(format!("--runtime={}ms", runtime.as_millis()))
        .arg(format!("--direct={}", u8::from(target.direct)))
        .stdin(Stdio::null())
        .output()
        .context("running fio")?;
    if !out.status.success() {
        bail!("fio failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("fio's JSON")?;
    let job = &v["jobs"][0];
    let side = if matches!(case.pattern, Pattern::RandRead | Pattern::Read) {
        &job["read"]
    } else {
        &job["write"]
    };
    let pct = |p: &str| side["clat_ns"]["percentile"][p].as_f64().unwrap_or(0.0) / 1000.0;
    Ok(Sample {
        target: target.name.clone(),
        case: case.name(),
        subject: Subject::Fio,
        round,
        iops: side["iops"].as_f64().unwrap_or(0.0),
        mbps: side["bw_bytes"].as_f64().unwrap_or(0.0) / 1e6,
        p50_us: pct("50.000000"),
        p99_us: pct("99.000000"),
        p999_us: pct("99.900000"),
        errors: job["error"].as_u64().unwrap_or(0),
    })
}

/// Medians per (target, case, subject) and the ratios the issue asks for.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub target: String,
    pub case: String,
    pub torii_iops: f64,
    pub qsd_iops: f64,
    pub qsd_threads_iops: f64,
    pub fio_iops: f64,
    pub torii_p50_us: f64,
    pub torii_p99_us: f64,
    pub torii_p999_us: f64,
    pub qsd_p50_us: f64,
    pub qsd_p99_us: f64,
    pub qsd_p999_us: f64,
    pub fio_p50_us: f64,
    pub fio_p99_us: f64,
    /// Torii / qemu-storage-daemon (io_uring), Torii / qemu-storage-daemon (threads, its
    /// default), Torii / fio.
    pub torii_vs_qsd: f64,
    pub torii_vs_qsd_threads: f64,
    pub torii_vs_fio: f64,
    /// Torii's IOPS of each round, in order.
    pub torii_series: Vec<f64>,
    pub qsd_series: Vec<f64>,
    pub qsd_threads_series: Vec<f64>,
    pub fio_series: Vec<f64>,
}

pub fn summarize(samples: &[Sample]) -> Vec<Summary> {
    let mut keys: Vec<(String, String)> = Vec::new();
    for s in samples {
        let k = (s.target.clone(), s.case.clone());
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    keys.into_iter()
        .map(|(target, case)| {
            let of = |who: Subject, f: fn(&Sample) -> f64| -> Vec<f64> {
                samples
                    .iter()
                    .filter(|s| s.target == target && s.case == case && s.subject == who)
                    .map(f)
                    .collect()
            };
            let med = |who, f| median(&of(who, f)).unwrap_or(0.0);
            let (t, q, qt, f) = (
                med(Subject::Torii, |s| s.iops),
                med(Subject::Qsd, |s| s.iops),
                med(Subject::QsdThreads, |s| s.iops),
                med(Subject::Fio, |s| s.iops),
            );
            let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
            Summary {
                torii_p50_us: med(Subject::Torii, |s| s.p50_us),
                torii_p99_us: med(Subject::Torii, |s| s.p99_us),
                torii_p999_us: med(Subject::Torii, |s| s.p999_us),
                qsd_p50_us: med(Subject::Qsd, |s| s.p50_us),
                qsd_p99_us: med(Subject::Qsd, |s| s.p99_us),
                qsd_p999_us: med(Subject::Qsd, |s| s.p999_us),
                fio_p50_us: med(Subject::Fio, |s| s.p50_us),
                fio_p99_us: med(Subject::Fio, |s| s.p99_us),
                torii_vs_qsd: ratio(t, q),
                torii_vs_qsd_threads: ratio(t, qt),
                torii_vs_fio: ratio(t, f),
                torii_series: of(Subject::Torii, |s| s.iops),
                qsd_series: of(Subject::Qsd, |s| s.iops),
                qsd_threads_series: of(Subject::QsdThreads, |s| s.iops),
                fio_series: of(Subject::Fio, |s| s.iops),
                torii_iops: t,
                qsd_iops: q,
                qsd_threads_iops: qt,
                fio_iops: f,
                target,
                case,
            }
        })
        .collect()
}

/// The summary as a table.
pub fn table(rows: &[Summary]) -> String {
    let mut s = format!(
        "{:<6} {:<18} | {:>8} {:>6} {:>6} {:>7} | {:>8} {:>6} {:>6} {:>7} | {:>8} | {:>8} {:>6} | {:>5} {:>5} {:>5}\n",
        "file", "case", "torii", "p50", "p99", "p99.9", "qsd-uring", "p50", "p99", "p99.9",
        "qsd-thr", "fio", "p50", "/qsdu", "/qsdt", "/fio"
    );
    for r in rows {
        s.push_str(&format!(
            "{:<6} {:<18} | {:>8.0} {:>6.1} {:>6.1} {:>7.1} | {:>9.0} {:>6.1} {:>6.1} {:>7.1} | {:>8.0} | {:>8.0} {:>6.1} | {:>5.2} {:>5.2} {:>5.2}\n",
            r.target, r.case, r.torii_iops, r.torii_p50_us, r.torii_p99_us, r.torii_p999_us,
            r.qsd_iops, r.qsd_p50_us, r.qsd_p99_us, r.qsd_p999_us, r.qsd_threads_iops,
            r.fio_iops, r.fio_p50_us, r.torii_vs_qsd, r.torii_vs_qsd_threads, r.torii_vs_fio
        ));
    }
    s
}
