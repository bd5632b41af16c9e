//! QEMU: the command line of a sandbox, and QMP (the machine protocol on a Unix socket) to pin
//! vCPUs and stop the VM. TCG where there is no hardware virtualisation, KVM where there is.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::spec::{Accel, Backend, Disk, HypervisorKind, Sandbox, AGENT_SLOT};
use crate::vmm::{
    connect_unix, find_binary, io_err, pin_thread, Hypervisor, Vm, VmmError, VmmProcess,
};

pub struct Qemu;

/// The sockets and logs of one VM in its folder.
pub struct Paths {
    pub qmp: PathBuf,
    pub agent: PathBuf,
    /// The serial console's pipe pair (`console.in`, `console.out`): QEMU writes the guest's
    /// console into a FIFO whose last 64 KiB the runtime keeps, so a guest writing without end
    /// costs no host memory or disk.
    pub console: PathBuf,
    pub log: PathBuf,
}

impl Paths {
    pub fn new(dir: &Path) -> Paths {
        Paths {
            qmp: dir.join("qmp.sock"),
            agent: dir.join("agent.sock"),
            console: dir.join("console"),
            log: dir.join("vmm.log"),
        }
    }
}

/// The guest console's last bytes, kept by a thread reading QEMU's console FIFO.
pub struct ConsoleTail {
    buf: std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<u8>>>,
    // Writer ends held until the VM is gone, so that QEMU's opens never block and the reader
    // sees the end of the stream only once QEMU closed its end too.
    _keep_out: std::fs::File,
    _input: std::fs::File,
}

const CONSOLE_KEEP: usize = 64 << 10;

impl ConsoleTail {
    /// Makes the FIFO pair at `base` (.in, .out) and starts reading `.out`.
    pub fn start(base: &Path) -> std::io::Result<ConsoleTail> {
        use std::io::Read;
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::fs::OpenOptionsExt;
        let (pin, pout) = (base.with_extension("in"), base.with_extension("out"));
        for p in [&pin, &pout] {
            let c = std::ffi::CString::new(p.as_os_str().as_bytes())
                .map_err(|_| std::io::Error::other("a NUL in the path"))?;
            // SAFETY: mkfifo(3) with a NUL-terminated path that lives across the call.
            if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        // Read-only without waiting for a writer, then back to blocking reads.
        let mut out = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&pout)?;
        // SAFETY: fcntl(2) on a descriptor `out` owns.
        unsafe {
            use std::os::fd::AsRawFd;
            let fl = libc::fcntl(out.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(out.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK);
        }
        let keep_out = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&pout)?;
        let input = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&pin)?;
        let buf = std::sync::Arc::new(std::sync::Mutex::new(std::collections::VecDeque::new()));
        let b = buf.clone();
        std::thread::Builder::new()
            .name("vm-console".into())
            .spawn(move || {
                let mut chunk = [0u8; 4096];
                // Ends when every writer (QEMU, the guard) has closed the FIFO.
                while let Ok(n @ 1..) = out.read(&mut chunk) {
                    let mut q = b.lock().unwrap_or_else(|e| e.into_inner());
                    q.extend(&chunk[..n]);
                    let over = q.len().saturating_sub(CONSOLE_KEEP);
                    q.drain(..over);
                }
            })?;
        Ok(ConsoleTail {
            buf,
            _keep_out: keep_out,
            _input: input,
        })
    }

    /// The last `lines` lines.
    pub fn tail(&self, lines: usize) -> String {
        let q = self.buf.lock().unwrap_or_else(|e| e.into_inner());
        let (a, b) = q.as_slices();
        let text = String::from_utf8_lossy(&[a, b].concat()).into_owned();
        crate::vmm::tail_lines(&text, lines)
    }
}

/// A QEMU option value: commas doubled, as QEMU's option parser expects.
fn q(p: &Path) -> String {
    p.to_string_lossy().replace(',', ",,")
}

fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// The kernel command line the guest boots with.
pub fn kernel_cmdline(sb: &Sandbox, agent: &str) -> String {
    let mut c = format!("console=ttyS0 panic=-1 quiet torii.agent={agent}");
    if !sb.vm.cmdline.is_empty() {
        c.push(' ');
        c.push_str(&sb.vm.cmdline);
    }
    c
}

/// QEMU's arguments for `sb` with its sockets in `paths`.
pub fn args(sb: &Sandbox, paths: &Paths) -> Vec<String> {
    let vm = &sb.vm;
    let kvm = match vm.accel {
        Accel::Kvm => true,
        Accel::Tcg => false,
        Accel::Auto => kvm_usable(),
    };
    let mem = vm.memory_mib;
    let mut a: Vec<String> = vec![
        "-name".into(),
        format!("torii-{},debug-threads=on", sb.name),
        "-machine".into(),
        format!("pc,accel={}", if kvm { "kvm" } else { "tcg" }),
        "-cpu".into(),
        if kvm { "host" } else { "max" }.into(),
        "-smp".into(),
        vm.vcpus.to_string(),
        "-m".into(),
        format!("{mem}M"),
        "-object".into(),
        if vm.hugepages {
            format!("memory-backend-memfd,id=mem,size={mem}M,share=on,hugetlb=on,hugetlbsize=2M")
        } else {
            format!("memory-backend-memfd,id=mem,size={mem}M,share=on")
        },
        "-numa".into(),
        "node,memdev=mem".into(),
        "-kernel".into(),
        vm.kernel.to_string_lossy().into(),
        "-initrd".into(),
        vm.initramfs.to_string_lossy().into(),
        "-append".into(),
        kernel_cmdline(sb, &format!("serial:{}", sb.agent.port)),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-no-reboot".into(),
        "-chardev".into(),
        format!("pipe,id=console,path={}", q(&paths.console)),
        "-serial".into(),
        "chardev:console".into(),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", q(&paths.qmp)),
        "-chardev".into(),
        format!(
            "socket,id=agent,path={},server=on,wait=off",
            q(&paths.agent)
        ),
        "-device".into(),
        format!("virtio-serial-pci,id=vser0,addr={AGENT_SLOT:#04x}"),
        "-device".into(),
        format!(
            "virtserialport,bus=vser0.0,chardev=agent,name={}",
            sb.agent.port
        ),
    ];
    for (i, n) in sb.nics.iter().enumerate() {
        let mq = n.queues > 1;
        let mut dev = match &n.backend {
            Backend::VhostUser { socket } => {
                a.push("-chardev".into());
                a.push(format!(
                    "socket,id=nc{i},path={},reconnect-ms=1000",
                    q(socket)
                ));
                a.push("-netdev".into());
                a.push(format!(
                    "vhost-user,id=net{i},chardev=nc{i},queues={}",
                    n.queues
                ));
                format!("virtio-net-pci,netdev=net{i}")
            }
            Backend::Tap { ifname } => {
                a.push("-netdev".into());
                a.push(format!(
                    "tap,id=net{i},ifname={ifname},script=no,downscript=no,vhost=off,queues={}",
                    n.queues
                ));
                format!("virtio-net-pci,netdev=net{i}")
            }
            Backend::Vfio { addr, .. } => format!("vfio-pci,host={addr}"),
        };
        if !matches!(n.backend, Backend::Vfio { .. }) {
            if let Some(m) = &n.mac {
                dev.push_str(&format!(",mac={m}"));
            }
            if mq {
                dev.push_str(&format!(",mq=on,vectors={}", 2 * n.queues + 2));
            }
        }
        dev.push_str(&format!(",addr={:#04x}", n.slot));
        a.push("-device".into());
        a.push(dev);
    }
    for d in &sb.disks {
        let (chardev, device) = disk_ids(d);
        a.push("-chardev".into());
        a.push(format!(
            "socket,id={chardev},path={},reconnect-ms=1000",
            q(&d.socket)
        ));
        a.push("-device".into());
        a.push(format!(
            "vhost-user-blk-pci,id={device},chardev={chardev},num-queues={},addr={:#04x}",
            d.queues, d.slot
        ));
    }
    a
}

/// The QEMU ids of a disk's chardev and device, named by its slot: the same whether it was
/// given at launch or hot-plugged, so either can be removed.
fn disk_ids(d: &Disk) -> (String, String) {
    (format!("dc{:02x}", d.slot), format!("disk{:02x}", d.slot))
}

/// How long the guest may take to let go of an unplugged disk (ACPI eject, under TCG).
const UNPLUG_TIMEOUT: Duration = Duration::from_secs(20);
/// How long QEMU may take to answer a QMP command (a hot-plug includes the vhost-user
/// handshake with the disk's backend).
const QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// Events kept while waiting for answers, at most (the latest).
const QMP_EVENTS_KEPT: usize = 64;

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// A QMP connection: the greeting read, capabilities negotiated. Commands carry an id, so an
/// answer to a command given up on is never taken for another's; events read meanwhile are
/// kept for [`Qmp::wait_event`].
pub struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
    timeout: Duration,
    next_id: u64,
    events: VecDeque<Value>,
    /// What has been read of a line when a read timed out.
    line: String,
}

impl Qmp {
    /// Connects to QMP at `path`; each command may take `timeout` to be answered.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, VmmError> {
        let s = connect_unix(path, timeout).map_err(io_err(format!("QMP {}", path.display())))?;
        s.set_read_timeout(Some(timeout)).map_err(io_err("QMP"))?;
        let w = s.try_clone().map_err(io_err("QMP"))?;
        let mut qmp = Qmp {
            r: BufReader::new(s),
            w,
            timeout,
            next_id: 0,
            events: VecDeque::new(),
            line: String::new(),
        };
        let greeting = qmp.read()?;
        if greeting.get("QMP").is_none() {
            return Err(VmmError::Api(format!("QMP: no greeting but {greeting}")));
        }
        qmp.execute("qmp_capabilities", Value::Null)?;
        Ok(qmp)
    }

    fn read(&mut self) -> Result<Value, VmmError> {
        // One QMP message per line; a message of over 1 MiB is not something QEMU sends.
        const MAX: usize = 1 << 20;
        let room = MAX.saturating_sub(self.line.len()) as u64;
        // A timed-out read keeps what it got in `line`, for the next one to complete.
        std::io::Read::take(&mut self.r, room)
            .read_line(&mut self.line)
            .map_err(io_err("QMP read"))?;
        if !self.line.ends_with('\n') {
            if self.line.len() >= MAX {
                self.line.clear();
                return Err(VmmError::Api("QMP: a message over 1 MiB".into()));
            }
            // `read_line` stops short of a newline only at the end of the stream.
            return Err(VmmError::Api("QMP: connection closed".into()));
        }
        let line = std::mem::take(&mut self.line);
        serde_json::from_str(&line).map_err(|e| VmmError::Api(format!("QMP: {e}")))
    }

    fn keep_event(&mut self, v: Value) {
        if self.events.len() == QMP_EVENTS_KEPT {
            self.events.pop_front();
        }
        self.events.push_back(v);
    }

    /// Runs a command; QEMU's refusal is an error with its message.
    pub fn execute(&mut self, cmd: &str, args: Value) -> Result<Value, VmmError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": cmd, "id": id });
        if !args.is_null() {
            msg["arguments"] = args;
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.w
            .set_read_timeout(Some(self.timeout))
            .map_err(io_err("QMP"))?;
        self.w
            .write_all(line.as_bytes())
            .map_err(io_err(format!("QMP {cmd}")))?;
        loop {
            let v = self.read().map_err(|e| match e {
                VmmError::Io { source, .. } if is_timeout(&source) => VmmError::Io {
                    context: format!("QMP {cmd}: QEMU did not answer within {:?}", self.timeout),
                    source,
                },
                e => e,
            })?;
            if v.get("event").is_some() {
                self.keep_event(v);
                continue;
            }
            if v["id"] != id {
                continue;
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                let desc = e["desc"]
                    .as_str()
                    .map_or_else(|| e.to_string(), str::to_owned);
                return Err(VmmError::Api(format!("QMP {cmd}: {desc}")));
            }
        }
    }

    /// Takes event `name` whose data has the fields of `data` (others aside), read already or
    /// coming within `timeout`; false if none came. Other events are kept.
    pub fn wait_event(
        &mut self,
        name: &str,
        data: &Value,
        timeout: Duration,
    ) -> Result<bool, VmmError> {
        let wanted = |v: &Value| {
            v["event"] == name
                && data
                    .as_object()
                    .into_iter()
                    .flatten()
                    .all(|(k, want)| &v["data"][k] == want)
        };
        if let Some(i) = self.events.iter().position(wanted) {
            self.events.remove(i);
            return Ok(true);
        }
        let end = Instant::now() + timeout;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            self.w.set_read_timeout(Some(left)).map_err(io_err("QMP"))?;
            let v = match self.read() {
                Ok(v) => v,
                Err(VmmError::Io { source, .. }) if is_timeout(&source) => continue,
                Err(e) => return Err(e),
            };
            if wanted(&v) {
                return Ok(true);
            }
            if v.get("event").is_some() {
                self.keep_event(v);
            }
        }
    }

    /// Whether a device of id `id` (given with `-device id=…` or `device_add`) exists.
    pub fn has_device(&mut self, id: &str) -> Result<bool, VmmError> {
        let v = self.execute("qom-list", json!({ "path": "/machine/peripheral" }))?;
        Ok(v.as_array().into_iter().flatten().any(|p| {
            p["name"] == id && p["type"].as_str().is_some_and(|t| t.starts_with("child<"))
        }))
    }

    /// Whether chardev `id` exists.
    pub fn has_chardev(&mut self, id: &str) -> Result<bool, VmmError> {
        let v = self.execute("query-chardev", Value::Null)?;
        Ok(v.as_array().into_iter().flatten().any(|c| c["label"] == id))
    }

    /// The host thread of each vCPU, in vCPU order.
    pub fn vcpu_threads(&mut self) -> Result<Vec<i32>, VmmError> {
        let v = self.execute("query-cpus-fast", Value::Null)?;
        let mut cpus: Vec<(i64, i32)> = v
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| Some((c["cpu-index"].as_i64()?, c["thread-id"].as_i64()? as i32)))
            .collect();
        cpus.sort();
        Ok(cpus.into_iter().map(|(_, t)| t).collect())
    }
}

/// A VM QEMU runs.
pub struct QemuVm {
    proc: VmmProcess,
    paths: Paths,
    console: ConsoleTail,
}

impl Hypervisor for Qemu {
    fn kind(&self) -> HypervisorKind {
        HypervisorKind::Qemu
    }

    fn launch(&self, sb: &Sandbox, dir: &Path) -> Result<Box<dyn Vm>, VmmError> {
        let bin = match &sb.vm.binary {
            Some(b) => b.clone(),
            None => find_binary("qemu-system-x86_64").ok_or_else(|| {
                VmmError::Launch(
                    "qemu-system-x86_64 not found: install QEMU 10 (apt-get install -t \
                     bookworm-backports qemu-system-x86, or run scripts/setup)"
                        .into(),
                )
            })?,
        };
        let paths = Paths::new(dir);
        let console = ConsoleTail::start(&paths.console).map_err(io_err("the console FIFOs"))?;
        let mut cmd = Command::new(bin);
        cmd.args(args(sb, &paths));
        let mut proc = VmmProcess::spawn(cmd, &paths.log, sb.netns.as_deref())?;
        proc.wait_socket(&paths.qmp, Duration::from_secs(20))?;
        let mut qmp = match Qmp::connect(&paths.qmp, Duration::from_secs(10)) {
            Ok(q) => q,
            Err(_) if proc.wait_exit(Duration::from_millis(500)) => {
                return Err(VmmError::Launch(format!(
                    "QEMU exited while starting:\n{}",
                    proc.log_tail()
                )))
            }
            Err(e) => return Err(e),
        };
        if !sb.vm.pin.is_empty() {
            let threads = qmp.vcpu_threads()?;
            if threads.len() != sb.vm.pin.len() {
                return Err(VmmError::Api(format!(
                    "QMP reports {} vCPU threads for {} vCPUs",
                    threads.len(),
                    sb.vm.pin.len()
                )));
            }
            for (i, (&tid, &cpu)) in threads.iter().zip(&sb.vm.pin).enumerate() {
                pin_thread(tid, cpu).map_err(io_err(format!("pinning vCPU {i} to CPU {cpu}")))?;
            }
        }
        // Not kept open: QMP events the guest can cause would pile up in QEMU unread.
        drop(qmp);
        Ok(Box::new(QemuVm {
            proc,
            paths,
            console,
        }))
    }
}

impl Vm for QemuVm {
    fn pid(&self) -> u32 {
        self.proc.pid()
    }

    fn agent_stream(&mut self, timeout: Duration) -> Result<UnixStream, VmmError> {
        self.proc.wait_socket(&self.paths.agent, timeout)?;
        connect_unix(&self.paths.agent, timeout)
            .map_err(io_err(format!("agent {}", self.paths.agent.display())))
    }

    fn stop(&mut self, timeout: Duration) -> Result<(), VmmError> {
        if self.proc.exited() {
            return Ok(());
        }
        let r =
            Qmp::connect(&self.paths.qmp, timeout).and_then(|mut q| q.execute("quit", Value::Null));
        if !self.proc.wait_exit(timeout) {
            self.proc.kill();
        }
        // QEMU may close QMP before answering `quit`: that is a stop too; and one that cannot
        // be asked was killed.
        match r {
            Err(VmmError::Api(_)) | Err(VmmError::Io { .. }) => Ok(()),
            r => r.map(|_| ()),
        }
    }

    fn wait_exit(&mut self, timeout: Duration) -> bool {
        self.proc.wait_exit(timeout)
    }

    fn console_tail(&mut self) -> String {
        self.console.tail(20)
    }

    fn add_disk(&mut self, d: &Disk) -> Result<(), VmmError> {
        let (chardev, device) = disk_ids(d);
        let mut qmp = Qmp::connect(&self.paths.qmp, QMP_TIMEOUT)?;
        // A chardev without its device is what an interrupted removal left: this slot's.
        if !qmp.has_device(&device)? && qmp.has_chardev(&chardev)? {
            qmp.execute("chardev-remove", json!({ "id": chardev }))?;
        }
        // As at launch: a backend that restarts is reconnected to.
        qmp.execute(
            "chardev-add",
            json!({
                "id": chardev,
                "backend": { "type": "socket", "data": {
                    "addr": { "type": "unix", "data": { "path": d.socket } },
                    "server": false,
                    "reconnect-ms": 1000,
                }},
            }),
        )?;
        // On `-machine pc` the device goes on pci.0, whose slots are ACPI hotplug slots: the
        // guest is told through a GPE and scans the slot.
        let r = qmp.execute(
            "device_add",
            json!({
                "driver": "vhost-user-blk-pci",
                "id": device,
                "chardev": chardev,
                "num-queues": d.queues,
                "addr": format!("{:#04x}", d.slot),
            }),
        );
        match r {
            Ok(_) => Ok(()),
            // QEMU refused it (not a connection that failed or timed out, when QEMU may still
            // be adding it): nothing of it is left.
            Err(e @ VmmError::Api(_)) => {
                if let Err(c) = qmp.execute("chardev-remove", json!({ "id": chardev })) {
                    return Err(VmmError::Api(format!("{e}; and removing its chardev: {c}")));
                }
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    fn remove_disk(&mut self, d: &Disk) -> Result<(), VmmError> {
        let (chardev, device) = disk_ids(d);
        let mut qmp = Qmp::connect(&self.paths.qmp, QMP_TIMEOUT)?;
        if qmp.has_device(&device)? {
            // Sent again by a retry after a timeout: the guest is asked again.
            qmp.execute("device_del", json!({ "id": device }))?;
            let end = Instant::now() + UNPLUG_TIMEOUT;
            let deleted = json!({ "device": device });
            loop {
                if qmp.wait_event("DEVICE_DELETED", &deleted, Duration::from_millis(500))? {
                    break;
                }
                // Its event may have gone to no one (an earlier attempt's).
                if !qmp.has_device(&device)? {
                    break;
                }
                if Instant::now() >= end {
                    return Err(VmmError::Api(format!(
                        "QMP device_del {device}: the guest did not let go of the disk in slot \
                         {:#04x} within {UNPLUG_TIMEOUT:?} (it acknowledges the ACPI eject once \
                         its kernel has released the device)",
                        d.slot
                    )));
                }
            }
        }
        // The device's last reference may go a little after it left the tree: the chardev is
        // busy until then.
        let end = Instant::now() + Duration::from_secs(2);
        while qmp.has_chardev(&chardev)? {
            match qmp.execute("chardev-remove", json!({ "id": chardev })) {
                Ok(_) => break,
                Err(e) if Instant::now() >= end => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::SandboxSpec;
    use torii_vfio::fake::FakeTree;

    #[test]
    fn every_device_kind_is_on_the_command_line_in_its_slot() {
        let t = FakeTree::new();
        t.pf("0000:03:00.0", "ens1f0", 7, 1, 10);
        let vf = "0000:03:10.0".parse().unwrap();
        t.to_vfio(vf);
        let d = t.root().join("img");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("k"), b"k").unwrap();
        std::fs::write(d.join("i"), b"i").unwrap();
        let text = format!(
            "name = \"p\"\n[vm]\nvcpus = 2\nmemory_mib = 512\nhugepages = true\naccel = \"tcg\"\n\
             kernel = \"{0}/k\"\ninitramfs = \"{0}/i\"\ncmdline = \"loglevel=4\"\n\
             [[interface]]\ntype = \"vhost-user\"\nsocket = \"/run/a,b.sock\"\nmac = \"02:00:00:00:00:01\"\nqueues = 2\n\
             [[interface]]\ntype = \"tap\"\ntap = \"tap0\"\n\
             [[interface]]\ntype = \"vfio\"\npci = \"0000:03:10.0\"\n\
             [[disk]]\nsocket = \"/run/d.sock\"\nqueues = 4\n",
            d.display()
        );
        std::fs::write(d.join("s.toml"), text).unwrap();
        let sb = SandboxSpec::load(&d.join("s.toml"))
            .unwrap()
            .resolve(&t.sysfs())
            .unwrap();
        let a = args(&sb, &Paths::new(Path::new("/run/torii/vms/p"))).join(" ");
        for want in [
            "-machine pc,accel=tcg -cpu max -smp 2 -m 512M",
            "memory-backend-memfd,id=mem,size=512M,share=on,hugetlb=on,hugetlbsize=2M",
            "torii.agent=serial:agent.0 loglevel=4",
            // A comma in a path is doubled for QEMU's option parser.
            "socket,id=nc0,path=/run/a,,b.sock,reconnect-ms=1000",
            "vhost-user,id=net0,chardev=nc0,queues=2",
            "virtio-net-pci,netdev=net0,mac=02:00:00:00:00:01,mq=on,vectors=6,addr=0x04",
            "tap,id=net1,ifname=tap0,script=no,downscript=no,vhost=off,queues=1",
            // No MAC given: one derived from the pod's name and the slot's index.
            &format!(
                "virtio-net-pci,netdev=net1,mac={},addr=0x05",
                crate::spec::derived_mac("p", 1)
            ),
            "vfio-pci,host=0000:03:10.0,addr=0x06",
            "-chardev socket,id=dc10,path=/run/d.sock,reconnect-ms=1000",
            "vhost-user-blk-pci,id=disk10,chardev=dc10,num-queues=4,addr=0x10",
            "virtio-serial-pci,id=vser0,addr=0x03",
            "virtserialport,bus=vser0.0,chardev=agent,name=agent.0",
            "-qmp unix:/run/torii/vms/p/qmp.sock,server=on,wait=off",
            "-chardev pipe,id=console,path=/run/torii/vms/p/console -serial chardev:console",
        ] {
            assert!(a.contains(want), "no {want:?} in {a}");
        }
        // A VF still on its netdev driver cannot be passed through.
        t.bind(vf, "igbvf");
        let e = SandboxSpec::load(&d.join("s.toml"))
            .unwrap()
            .resolve(&t.sysfs())
            .unwrap_err()
            .to_string();
        assert!(e.contains("interface[2]") && e.contains("igbvf"), "{e}");
    }

    #[test]
    fn qmp_matches_answers_by_id_and_keeps_events_for_later() {
        use std::io::{BufRead, Write};
        use std::os::unix::net::UnixListener;
        let dir = std::env::temp_dir().join(format!("torii-qmp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("qmp.sock");
        let l = UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut w = s.try_clone().unwrap();
            let mut r = std::io::BufReader::new(s);
            let mut cmd = || {
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                serde_json::from_str::<Value>(&line).unwrap()
            };
            w.write_all(b"{\"QMP\": {\"version\": {}}}\n").unwrap();
            let c = cmd();
            assert_eq!(c["execute"], "qmp_capabilities");
            writeln!(w, "{}", json!({ "return": {}, "id": c["id"] })).unwrap();
            let c = cmd();
            assert_eq!(c["arguments"]["id"], "disk10");
            // The event before the answer, and a late answer to another command.
            w.write_all(
                b"{\"event\": \"DEVICE_DELETED\", \"data\": {\"device\": \"disk10\"}}\n\
                  {\"return\": {\"late\": true}, \"id\": 99}\n",
            )
            .unwrap();
            writeln!(w, "{}", json!({ "return": {}, "id": c["id"] })).unwrap();
            let c = cmd();
            let err = json!({ "error": { "class": "GenericError", "desc": "Chardev 'x' is busy" },
                              "id": c["id"] });
            writeln!(w, "{err}").unwrap();
            // An event in two writes, a read timeout between them.
            w.write_all(b"{\"event\": \"DEVICE_DELETED\", ").unwrap();
            std::thread::sleep(Duration::from_millis(400));
            w.write_all(b"\"data\": {\"device\": \"disk11\"}}\n")
                .unwrap();
            std::thread::sleep(Duration::from_millis(200));
        });
        let mut qmp = Qmp::connect(&sock, Duration::from_secs(5)).unwrap();
        let r = qmp
            .execute("device_del", json!({ "id": "disk10" }))
            .unwrap();
        assert_eq!(r, json!({}));
        let e = qmp
            .execute("chardev-remove", json!({ "id": "x" }))
            .unwrap_err()
            .to_string();
        assert_eq!(e, "QMP chardev-remove: Chardev 'x' is busy");
        // Read before its command was answered: taken from what was kept.
        let d10 = json!({ "device": "disk10" });
        assert!(qmp
            .wait_event("DEVICE_DELETED", &d10, Duration::ZERO)
            .unwrap());
        assert!(!qmp
            .wait_event("DEVICE_DELETED", &d10, Duration::from_millis(100))
            .unwrap());
        let d11 = json!({ "device": "disk11" });
        assert!(qmp
            .wait_event("DEVICE_DELETED", &d11, Duration::from_secs(5))
            .unwrap());
        server.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
