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
use crate::blk_job::{run_spec, Pattern, RunReport, RunSpec, CDF_PERCENTILES};
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

/// The default cases, those the regression runs track: 4k random read and write at QD1 and
/// QD32, 128k sequential read and write at QD8 ("randread 4k qd1", "randread 4k qd32",
/// "randwrite 4k qd1", "randwrite 4k qd32", "read 128k qd8", "write 128k qd8").
pub fn default_cases() -> Vec<Case> {
    let c = |pattern, bs, iodepth| Case {
        pattern,
        bs,
        iodepth,
    };
    vec![
        c(Pattern::RandRead, 4096, 1),
        c(Pattern::RandRead, 4096, 32),
        c(Pattern::RandWrite, 4096, 1),
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
    /// The latency CDF: (percentile, latency in µs) at [`CDF_PERCENTILES`], from the client's
    /// histogram (Torii, qemu-storage-daemon) or fio's completion latency percentiles (fio).
    pub lat_cdf_us: Vec<[f64; 2]>,
    pub errors: u64,
    /// CPU the storage side used during the run, in cores (CPU seconds / wall seconds): the
    /// backend process with all its threads (io_uring's workers included) for Torii and
    /// qemu-storage-daemon, which the client's CPU is not part of; fio as a whole, which is
    /// its own client.
    pub cores: f64,
}

/// Whose CPU time to count.
#[derive(Clone, Copy)]
enum CpuOf {
    /// A running process, all its threads (live and exited).
    Process(u32),
    /// This process's children that have been waited for.
    Children,
}

/// User + system CPU seconds of `who`.
fn cpu_seconds(who: CpuOf) -> anyhow::Result<f64> {
    let (path, first) = match who {
        CpuOf::Process(pid) => (format!("/proc/{pid}/stat"), 11),
        CpuOf::Children => ("/proc/self/stat".to_string(), 13),
    };
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The fields after the command name (which may hold spaces) in parentheses: utime and
    // stime are fields 14 and 15, cutime and cstime 16 and 17 (proc(5)), so the 12th and
    // 13th (14th and 15th) of what follows ")".
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow::anyhow!("{path}: unexpected format"))?;
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(first)
        .take(2)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let [user, system] = f[..] else {
        bail!("{path}: unexpected format");
    };
    // SAFETY: sysconf only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    Ok((user + system) as f64 / hz as f64)
}

/// Runs `f` and returns its result with the cores `who` used meanwhile.
fn with_cores<T>(who: CpuOf, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<(T, f64)> {
    let (c0, t0) = (cpu_seconds(who)?, std::time::Instant::now());
    let r = f()?;
    let (c1, wall) = (cpu_seconds(who)?, t0.elapsed().as_secs_f64());
    Ok((r, (c1 - c0) / wall.max(1e-3)))
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
            let pid = _child.pid();
            with_cores(CpuOf::Process(pid), || client(&sock, case, runtime))?
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
            with_cores(CpuOf::Process(q.pid()), || client(&sock, case, runtime))?
        }
    };
    let (report, cores) = report;
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
        lat_cdf_us: report.lat_cdf_us,
        errors: report.errors,
        cores,
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
    let mut cmd = Command::new("taskset");
    cmd.arg("-c")
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
        .arg(fio_percentile_list())
        .arg(format!("--filename={}", target.path.display()))
        .arg(format!("--rw={}", case.fio_rw()))
        .arg(format!("--bs={}", case.bs))
        .arg(format!("--iodepth={}", case.iodepth))
        .arg(format!("--runtime={}ms", runtime.as_millis()))
        .arg(format!("--direct={}", u8::from(target.direct)))
        .stdin(Stdio::null());
    // fio's CPU, all its processes and threads: counted in our children's times once it has
    // been waited for (its start-up included).
    let (out, cores) = with_cores(CpuOf::Children, || cmd.output().context("running fio"))?;
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
    let lat_cdf_us = fio_cdf_us(side).context("fio's JSON")?;
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
        lat_cdf_us,
        errors: job["error"].as_u64().unwrap_or(0),
        cores,
    })
}

/// fio's option asking for the completion latency percentiles of [`CDF_PERCENTILES`].
fn fio_percentile_list() -> String {
    let l: Vec<String> = CDF_PERCENTILES.iter().map(|p| p.to_string()).collect();
    format!("--percentile_list={}", l.join(":"))
}

/// The latency CDF in one direction (`jobs[0].read` or `.write`) of fio's JSON: its
/// `clat_ns.percentile` object (keys printed "%f", e.g. "99.990000"; values in ns) at
/// [`CDF_PERCENTILES`], in µs.
pub fn fio_cdf_us(side: &serde_json::Value) -> anyhow::Result<Vec<[f64; 2]>> {
    let Some(pcts) = side["clat_ns"]["percentile"].as_object() else {
        bail!("no clat_ns.percentile (no I/O done?)");
    };
    let parsed: Vec<(f64, f64)> = pcts
        .iter()
        .filter_map(|(k, v)| Some((k.parse().ok()?, v.as_f64()?)))
        .collect();
    CDF_PERCENTILES
        .iter()
        .map(|&p| {
            parsed
                .iter()
                .find(|(k, _)| (k - p).abs() < 1e-6)
                .map(|&(_, ns)| [p, ns / 1000.0])
                .ok_or_else(|| anyhow::anyhow!("no clat_ns percentile {p}"))
        })
        .collect()
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
    /// Cores used by each (medians; see `Sample::cores`), IOPS per core (median over the
    /// rounds), and Torii's IOPS per core over qemu-storage-daemon's (io_uring, threads).
    pub torii_cores: f64,
    pub qsd_cores: f64,
    pub qsd_threads_cores: f64,
    pub fio_cores: f64,
    pub torii_iops_per_core: f64,
    pub qsd_iops_per_core: f64,
    pub qsd_threads_iops_per_core: f64,
    pub torii_vs_qsd_per_core: f64,
    pub torii_vs_qsd_threads_per_core: f64,
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
            let per_core = |who| {
                let v: Vec<f64> = of(who, |s| s.iops)
                    .iter()
                    .zip(of(who, |s| s.cores))
                    .map(|(i, c)| ratio(*i, c))
                    .collect();
                median(&v).unwrap_or(0.0)
            };
            let (tpc, qpc, qtpc) = (
                per_core(Subject::Torii),
                per_core(Subject::Qsd),
                per_core(Subject::QsdThreads),
            );
            Summary {
                torii_cores: med(Subject::Torii, |s| s.cores),
                qsd_cores: med(Subject::Qsd, |s| s.cores),
                qsd_threads_cores: med(Subject::QsdThreads, |s| s.cores),
                fio_cores: med(Subject::Fio, |s| s.cores),
                torii_iops_per_core: tpc,
                qsd_iops_per_core: qpc,
                qsd_threads_iops_per_core: qtpc,
                torii_vs_qsd_per_core: ratio(tpc, qpc),
                torii_vs_qsd_threads_per_core: ratio(tpc, qtpc),
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
    s.push_str(&format!(
        "\nper core (storage side's CPU: the backend process for Torii and qsd, fio as a whole)\n{:<6} {:<18} | {:>6} {:>9} | {:>6} {:>9} | {:>6} {:>9} | {:>6} | {:>5} {:>5}\n",
        "file", "case", "torii", "iops/core", "qsd-u", "iops/core", "qsd-t", "iops/core", "fio",
        "/qsdu", "/qsdt"
    ));
    for r in rows {
        s.push_str(&format!(
            "{:<6} {:<18} | {:>6.2} {:>9.0} | {:>6.2} {:>9.0} | {:>6.2} {:>9.0} | {:>6.2} | {:>5.2} {:>5.2}\n",
            r.target, r.case, r.torii_cores, r.torii_iops_per_core, r.qsd_cores,
            r.qsd_iops_per_core, r.qsd_threads_cores, r.qsd_threads_iops_per_core, r.fio_cores,
            r.torii_vs_qsd_per_core, r.torii_vs_qsd_threads_per_core
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fio_percentile_option() {
        assert_eq!(
            fio_percentile_list(),
            "--percentile_list=1:5:10:20:30:40:50:60:70:80:90:95:99:99.9:99.99"
        );
    }

    /// A `read` side as fio 3.33 prints it with that percentile list.
    const FIO_READ: &str = r#"{
        "iops": 2117.1,
        "clat_ns": {
            "min": 691, "max": 6639298, "mean": 9813.99, "N": 21171,
            "percentile": {
                "1.000000": 732, "5.000000": 1064, "10.000000": 1160, "20.000000": 5856,
                "30.000000": 7456, "40.000000": 7968, "50.000000": 8256, "60.000000": 8512,
                "70.000000": 8768, "80.000000": 9024, "90.000000": 9664, "95.000000": 10048,
                "99.000000": 22656, "99.900000": 505856, "99.990000": 5275648
            }
        }
    }"#;

    #[test]
    fn fio_cdf_parses_the_percentile_list() {
        let v: serde_json::Value = serde_json::from_str(FIO_READ).unwrap();
        let cdf = fio_cdf_us(&v).unwrap();
        assert_eq!(cdf.len(), CDF_PERCENTILES.len());
        assert_eq!(cdf[0], [1.0, 0.732]);
        assert_eq!(cdf[6], [50.0, 8.256]);
        assert_eq!(cdf[13], [99.9, 505.856]);
        assert_eq!(cdf[14], [99.99, 5275.648]);
        for w in cdf.windows(2) {
            assert!(w[0][0] < w[1][0] && w[0][1] <= w[1][1], "{w:?}");
        }
    }

    #[test]
    fn fio_cdf_wants_every_percentile() {
        let mut v: serde_json::Value = serde_json::from_str(FIO_READ).unwrap();
        v["clat_ns"]["percentile"]
            .as_object_mut()
            .unwrap()
            .remove("99.990000");
        assert!(fio_cdf_us(&v).is_err());
        // The idle direction of a job: no percentiles at all.
        let idle = serde_json::json!({"clat_ns": {"min": 0, "max": 0, "N": 0}});
        assert!(fio_cdf_us(&idle).is_err());
    }

    #[test]
    fn default_case_names_are_the_regression_scenarios() {
        // torii-perf's blk scenarios are named after these cases.
        let names: Vec<String> = default_cases().iter().map(Case::name).collect();
        assert_eq!(names, crate::regress::groups::BLK_CASES);
    }
}
