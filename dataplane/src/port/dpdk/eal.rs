//! DPDK's Environment Abstraction Layer: initialised once per process, from the `[dpdk]`
//! section of the configuration (or its defaults when a `dpdk` port is the first thing that
//! needs it), and the registration of PMD threads as DPDK threads so that they get an lcore id
//! and with it a per-thread cache of every mempool.

use std::cell::Cell;
use std::ffi::{CStr, CString};
use std::os::raw::c_char;
use std::sync::Mutex;

use torii_dpdk_sys as sys;

use crate::config::DpdkConfig;

/// The outcome of the one initialisation: DPDK cannot be initialised twice in a process,
/// nor again after a failure.
static EAL: Mutex<Option<Result<(), String>>> = Mutex::new(None);

/// The EAL command line for `cfg`. PMD threads are Torii's own (pinned by `pmd_cpus`), so the
/// main lcore is mapped onto every CPU `cfg.cpus` allows — DPDK pins the thread that
/// initialises it, and a single-CPU mapping would pin the daemon's control thread and every
/// thread it starts later. `--in-memory` keeps DPDK's state out of the file system (no
/// runtime directory, no hugepage files), so several daemons and DPDK peers can run side by
/// side.
pub fn eal_args(cfg: &DpdkConfig) -> Vec<String> {
    let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpus: Vec<String> = if cfg.cpus.is_empty() {
        (0..ncpu).map(|c| c.to_string()).collect()
    } else {
        cfg.cpus.iter().map(|c| c.to_string()).collect()
    };
    let mut a = vec![
        "torii-dataplane".to_string(),
        "--lcores".into(),
        format!("0@({})", cpus.join(",")),
        "--in-memory".into(),
        "--no-telemetry".into(),
        "-m".into(),
        cfg.memory_mib.to_string(),
    ];
    if cfg.hugepages {
        a.push("--single-file-segments".into());
    } else {
        a.push("--no-huge".into());
    }
    if cfg.allow.is_empty() {
        a.push("--no-pci".into());
    }
    for d in &cfg.allow {
        a.push("-a".into());
        a.push(d.clone());
    }
    for v in &cfg.vdevs {
        a.push("--vdev".into());
        a.push(v.clone());
    }
    a.extend(cfg.eal_args.iter().cloned());
    a
}

/// Initialises DPDK with `cfg` unless it already is; the first outcome is kept (and returned
/// again to every later call, whatever its `cfg`).
pub fn init(cfg: &DpdkConfig) -> Result<(), String> {
    let mut state = EAL.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(r) = &*state {
        return r.clone();
    }
    // EAL initialisation loads the drivers (executable mappings) and maps its memory: not
    // allowed under the control thread's seccomp filter. The daemon initialises DPDK before
    // installing it when the configuration uses DPDK; a port added at run time to a daemon
    // that did not would be killed.
    {
        use torii_vhost_user::seccomp;
        if seccomp::installed() && seccomp::mode() == seccomp::Mode::Enforce {
            return Err("DPDK is not initialised and cannot be once the seccomp filters are in place: add a [dpdk] section to the configuration (DPDK is then initialised at start), or set seccomp = \"log\" or \"off\"".into());
        }
    }
    let args = eal_args(cfg);
    tracing::info!(args = %args.join(" "), "initialising DPDK");
    let r = run_init(&args);
    if let Err(e) = &r {
        tracing::error!("DPDK initialisation failed: {e}");
    } else if let Err(e) = super::shm_guard::install() {
        tracing::warn!("{e}: a memif peer that goes away during a burst will end the daemon");
    }
    *state = Some(r.clone());
    r
}

fn run_init(args: &[String]) -> Result<(), String> {
    let cargs: Vec<CString> = args
        .iter()
        .map(|a| CString::new(a.as_str()).map_err(|_| format!("EAL argument {a:?} has a NUL byte")))
        .collect::<Result<_, _>>()?;
    // rte_eal_init may permute argv and keeps pointers into it: the strings live for the
    // process (leaked once).
    let cargs: &'static [CString] = Vec::leak(cargs);
    let mut argv: Vec<*mut c_char> = cargs.iter().map(|c| c.as_ptr() as *mut c_char).collect();
    argv.push(std::ptr::null_mut());
    let argv: &'static mut [*mut c_char] = Vec::leak(argv);
    // SAFETY: argv is a NULL-terminated array of `argc` valid C strings that outlive the call
    // (leaked above); this is the process's only call (guarded by EAL).
    let rc = unsafe { sys::rte_eal_init((argv.len() - 1) as i32, argv.as_mut_ptr()) };
    if rc < 0 {
        return Err(format!(
            "rte_eal_init failed: {} (EAL arguments: {})",
            last_error(),
            args.join(" ")
        ));
    }
    Ok(())
}

/// The directory DPDK makes for its runtime files (`eal_create_runtime_dir`): under
/// `/var/run` for root, `$XDG_RUNTIME_DIR` or `/tmp` for other users, then `dpdk/` and the
/// file prefix (`--file-prefix`, default `rte`). Even with `--in-memory` DPDK makes it (and
/// puts nothing in it).
pub fn runtime_dir(cfg: &DpdkConfig) -> std::path::PathBuf {
    // SAFETY: getuid has no preconditions.
    let base = if unsafe { libc::getuid() } == 0 {
        std::path::PathBuf::from("/var/run")
    } else {
        std::env::var_os("XDG_RUNTIME_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| std::path::PathBuf::from("/tmp"))
    };
    let mut prefix = "rte".to_string();
    let mut args = cfg.eal_args.iter();
    while let Some(a) = args.next() {
        if let Some(p) = a.strip_prefix("--file-prefix=") {
            prefix = p.to_string();
        } else if a == "--file-prefix" {
            if let Some(p) = args.next() {
                prefix = p.clone();
            }
        }
    }
    base.join("dpdk").join(prefix)
}

/// Whether DPDK is up in this process.
pub fn initialized() -> bool {
    matches!(
        &*EAL.lock().unwrap_or_else(|e| e.into_inner()),
        Some(Ok(()))
    )
}

/// `rte_errno` of this thread, as text.
pub fn last_error() -> String {
    // SAFETY: reads this thread's rte_errno.
    let e = unsafe { sys::torii_errno() };
    strerror(e)
}

/// DPDK's text for error `e` (positive errno or DPDK's own codes; the sign is ignored).
pub fn strerror(e: i32) -> String {
    // SAFETY: rte_strerror returns a pointer to a static or thread-local string.
    let s = unsafe { CStr::from_ptr(sys::rte_strerror(e.abs())) };
    format!("{} ({})", s.to_string_lossy(), e.abs())
}

thread_local! {
    static REGISTERED: Cell<bool> = const { Cell::new(false) };
}

/// Registers the calling thread with DPDK (once per thread): it gets an lcore id, so mbuf
/// allocations and frees go through its own mempool caches instead of the shared ring. A
/// thread DPDK will not register (no lcore id left) still works, without the caches.
#[inline]
pub fn register_thread() {
    if REGISTERED.with(|r| r.replace(true)) {
        return;
    }
    // SAFETY: called once per thread after rte_eal_init (a DPDK port exists only then).
    if unsafe { sys::rte_thread_register() } != 0 {
        tracing::warn!("this PMD thread could not be registered with DPDK ({}): mbufs go without per-thread caches", last_error());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eal_command_line_follows_the_config() {
        let mut c = DpdkConfig::default();
        let a = eal_args(&c);
        assert!(a.contains(&"--no-pci".to_string()));
        assert!(a.contains(&"--in-memory".to_string()));
        assert!(a.contains(&"--single-file-segments".to_string()));
        let l = a.iter().position(|x| x == "--lcores").unwrap();
        assert!(a[l + 1].starts_with("0@(0"), "{}", a[l + 1]);
        c.cpus = vec![1];
        c.hugepages = false;
        c.allow = vec!["0000:03:00.0".into()];
        c.vdevs = vec!["net_null0".into()];
        c.eal_args = vec!["--log-level=8".into()];
        let a = eal_args(&c);
        assert_eq!(a[l + 1], "0@(1)");
        assert!(a.contains(&"--no-huge".to_string()));
        assert!(!a.contains(&"--no-pci".to_string()));
        let w = a.iter().position(|x| x == "-a").unwrap();
        assert_eq!(a[w + 1], "0000:03:00.0");
        let v = a.iter().position(|x| x == "--vdev").unwrap();
        assert_eq!(a[v + 1], "net_null0");
        assert_eq!(a.last().unwrap(), "--log-level=8");
    }

    #[test]
    fn the_runtime_directory_follows_the_file_prefix() {
        let mut c = DpdkConfig::default();
        assert!(runtime_dir(&c).ends_with("dpdk/rte"));
        c.eal_args = vec!["--file-prefix".into(), "tor".into()];
        assert!(runtime_dir(&c).ends_with("dpdk/tor"));
        c.eal_args = vec!["--file-prefix=x1".into()];
        assert!(runtime_dir(&c).ends_with("dpdk/x1"));
    }
}
