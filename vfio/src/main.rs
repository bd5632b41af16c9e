//! `torii-vfio`: SR-IOV and VFIO for operators. Lists PFs and VFs, creates VFs, sets and
//! reads back VF settings, saves and restores a VF's state, moves VF interfaces between
//! network namespaces, binds VFs to vfio-pci and probes them through VFIO.

use std::fs::File;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context};
use clap::{Parser, Subcommand};
use torii_vfio::alloc::{self, Allocation, Allocator, Owner};
use torii_vfio::bind::{self, passthrough_spec};
use torii_vfio::netlink::{
    self, ifindex, LinkState, Netlink, VfInfoReport, VfLinks, VfSetting, VlanProto,
};
use torii_vfio::pci::{PciAddr, PciDevice, Sysfs};
use torii_vfio::select::Selectors;
use torii_vfio::state::VfState;
use torii_vfio::{device, sriov};

#[derive(Parser)]
#[command(name = "torii-vfio", version, about)]
struct Cli {
    /// Where sysfs is mounted, as `<root>/sys` (tests point this at a fake tree).
    #[arg(long, default_value = "/", global = true)]
    sysfs_root: PathBuf,
    /// JSON output.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// PFs and VFs with drivers, IOMMU groups, interfaces and (for PFs) their VFs' settings.
    List {
        /// Only devices matching these selectors (JSON, as sriov-network-device-plugin's
        /// `selectors`: vendors, devices, drivers, pfNames, pciAddresses, rootDevices).
        #[arg(long)]
        selectors: Option<String>,
    },
    /// Set a PF's number of VFs (0 removes them): `vfs ens1f0 4` or `vfs 0000:03:00.0 4`.
    Vfs {
        pf: String,
        count: u32,
        /// Where allocations are recorded (repeatable): allocated VFs are not removed. Default:
        /// torii-vfio's own and torii-cni's (its default stateDir).
        #[arg(long = "state-dir", default_values = [alloc::DEFAULT_STATE_DIR, alloc::CNI_STATE_DIR])]
        state_dirs: Vec<PathBuf>,
        /// Change the count even if VFs it removes are in use.
        #[arg(long)]
        force: bool,
    },
    /// Apply VF settings on the PF and read them back: `set ens1f0 0 mac=02:00:00:00:00:01
    /// vlan=100 qos=3 proto=802.1ad spoofchk=off trust=on min_tx_rate=0 max_tx_rate=1000
    /// state=enable`. Each setting is applied alone; one the driver rejects is reported.
    Set {
        pf: String,
        vf: u32,
        #[arg(required = true)]
        settings: Vec<String>,
    },
    /// Save a VF's whole state (JSON) to restore it later.
    Save {
        pf: String,
        vf: u32,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Restore a VF from a saved state.
    Restore { file: PathBuf },
    /// Move a network interface into a namespace (`/run/netns/NAME`, or a path), renamed.
    NetnsIn {
        ifname: String,
        netns: String,
        #[arg(long)]
        name: Option<String>,
    },
    /// Move an interface out of a namespace back into this one, under `name`.
    NetnsOut {
        netns: String,
        ifname: String,
        name: String,
    },
    /// Bind a device to vfio-pci (checks its IOMMU group) and print its passthrough spec.
    Bind { addr: PciAddr },
    /// Give a device back to a driver (default: none) and clear its driver_override.
    Unbind {
        addr: PciAddr,
        #[arg(long)]
        driver: Option<String>,
    },
    /// The passthrough spec of a device bound to vfio-pci.
    Spec { addr: PciAddr },
    /// Open a vfio-pci device through VFIO: regions, interrupts, a BAR mapped.
    Probe { addr: PciAddr },
    /// DMA through the IOMMU with QEMU's `edu` test device bound to vfio-pci (rigs).
    DmaCheck { addr: PciAddr },
    /// Take the first free device matching the selectors for the network namespace `netns`
    /// (saving its state, restored on release).
    Alloc {
        /// Selectors (JSON, as for `list`).
        #[arg(long)]
        selectors: String,
        /// The owner: a network namespace (`/run/netns/NAME`, `/proc/PID/ns/net`).
        #[arg(long)]
        netns: PathBuf,
        /// Free text kept with the allocation (a container id).
        #[arg(long, default_value = "")]
        tag: String,
        #[arg(long, default_value = alloc::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Give an allocated device back: its saved state is restored, then its record removed.
    Release {
        addr: PciAddr,
        #[arg(long, default_value = alloc::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// The allocations on record.
    Allocations {
        #[arg(long, default_value = alloc::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Release every allocation whose network namespace is gone.
    Gc {
        #[arg(long, default_value = alloc::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
}

/// Refuses a VF count change that would remove VFs in use: allocated (or with a record that
/// cannot be read), bound to vfio-pci, where a VM may hold them (the kernel would wait for the
/// VM to let go), or on a network driver with no interface here (moved into a pod). Returns
/// the removed VFs' locks in every state directory, to hold until the count is written, so no
/// allocation slips in between.
fn vfs_removable(
    sys: &Sysfs,
    pf: PciAddr,
    n: u32,
    state_dirs: &[PathBuf],
) -> anyhow::Result<Vec<alloc::Held>> {
    let removed = sriov::vfs_removed(&sys.device(pf)?, n);
    let mut held = Vec::new();
    if removed.is_empty() {
        return Ok(held);
    }
    let mut in_use = Vec::new();
    for dir in state_dirs.iter().filter(|d| d.exists()) {
        let al = Allocator::new(dir)?;
        held.push(al.hold(&removed)?);
        for a in &removed {
            match al.get(*a) {
                Ok(None) => {}
                Ok(Some(r)) => in_use.push(format!(
                    "{a} is allocated to {} ({})",
                    r.owner.netns.display(),
                    r.owner.tag
                )),
                Err(e) => in_use.push(format!("{a} has an unreadable record: {e}")),
            }
        }
    }
    for a in &removed {
        let d = sys.device(*a)?;
        if d.driver.as_deref() == Some(bind::VFIO_PCI) {
            in_use.push(format!("{a} is bound to vfio-pci"));
        } else if d.driver.is_some() && d.class >> 16 == 0x02 && d.netdevs.is_empty() {
            in_use.push(format!(
                "{a} has no network interface here (moved into a pod's namespace?)"
            ));
        }
    }
    if in_use.is_empty() {
        Ok(held)
    } else {
        bail!(
            "{pf}: changing the count to {n} removes every VF, and some are in use: {}; release them or pass --force",
            in_use.join("; ")
        )
    }
}

/// Restores an allocation's saved state.
fn restore_allocation(sys: &Sysfs, a: &Allocation) -> Result<(), String> {
    a.saved.as_ref().map_or(Ok(()), |s| {
        let mut nl = Netlink::open().map_err(|e| format!("netlink: {e}"))?;
        s.restore(sys, &mut nl).map_err(|e| e.to_string())
    })
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TORII_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("torii-vfio: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// A PF given by interface name or PCI address: (address, interface).
fn resolve_pf(sys: &Sysfs, pf: &str) -> anyhow::Result<(PciAddr, Option<String>)> {
    if let Ok(a) = pf.parse::<PciAddr>() {
        let d = sys.device(a)?;
        return Ok((a, d.netdevs.first().cloned()));
    }
    let addr = sys.netdev_device(pf).map_err(|_| {
        anyhow!("{pf:?} is neither a PCI address nor the network interface of a PCI device")
    })?;
    Ok((addr, Some(pf.to_string())))
}

fn mac_text(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn parse_mac(s: &str) -> anyhow::Result<[u8; 6]> {
    let v: Vec<u8> = s
        .split(':')
        .map(|x| u8::from_str_radix(x, 16))
        .collect::<Result<_, _>>()
        .map_err(|_| anyhow!("{s:?} is not a MAC address"))?;
    v.try_into()
        .map_err(|_| anyhow!("{s:?} is not a MAC address"))
}

fn on_off(s: &str) -> anyhow::Result<bool> {
    match s {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => bail!("{s:?} is not on or off"),
    }
}

/// `key=value` settings to what is sent: vlan, qos and proto make one VLAN setting, the two
/// rates one rate setting.
fn parse_settings(pairs: &[String], current: &VfInfoReport) -> anyhow::Result<Vec<VfSetting>> {
    let mut out = Vec::new();
    let (mut vlan, mut qos, mut proto) = (None, None, None);
    let (mut min, mut max) = (None, None);
    for p in pairs {
        let (k, v) = p
            .split_once('=')
            .ok_or_else(|| anyhow!("{p:?} is not key=value"))?;
        let num = |v: &str| {
            v.parse::<u32>()
                .map_err(|_| anyhow!("{k}: {v:?} is not a number"))
        };
        match k {
            "mac" => out.push(VfSetting::Mac(parse_mac(v)?)),
            "vlan" => {
                let id = num(v)?;
                if id > 4094 {
                    bail!("vlan {id} is outside 0..=4094");
                }
                vlan = Some(id as u16);
            }
            "qos" => {
                let q = num(v)?;
                if q > 7 {
                    bail!("qos {q} is outside 0..=7");
                }
                qos = Some(q as u8);
            }
            "proto" => {
                proto = Some(match v.to_ascii_lowercase().as_str() {
                    "802.1q" => VlanProto::Dot1Q,
                    "802.1ad" => VlanProto::Dot1Ad,
                    _ => bail!("proto {v:?} is not 802.1Q or 802.1ad"),
                })
            }
            "spoofchk" => out.push(VfSetting::SpoofChk(on_off(v)?)),
            "trust" => out.push(VfSetting::Trust(on_off(v)?)),
            "min_tx_rate" => min = Some(num(v)?),
            "max_tx_rate" => max = Some(num(v)?),
            "state" => out.push(VfSetting::LinkState(match v {
                "auto" => LinkState::Auto,
                "enable" => LinkState::Enable,
                "disable" => LinkState::Disable,
                _ => bail!("state {v:?} is not auto, enable or disable"),
            })),
            _ => bail!("unknown VF setting {k:?} (mac, vlan, qos, proto, spoofchk, trust, min_tx_rate, max_tx_rate, state)"),
        }
    }
    if vlan.is_some() || qos.is_some() || proto.is_some() {
        out.push(VfSetting::Vlan(
            vlan.unwrap_or(current.vlan),
            qos.unwrap_or(0),
            proto.unwrap_or_default(),
        ));
    }
    if min.is_some() || max.is_some() {
        out.push(VfSetting::Rate {
            min: min.unwrap_or(current.min_tx_rate),
            max: max.unwrap_or(current.max_tx_rate),
        });
    }
    Ok(out)
}

/// The namespace file of `/run/netns/NAME` or a path.
fn open_netns(ns: &str) -> anyhow::Result<File> {
    let p = if ns.contains('/') {
        PathBuf::from(ns)
    } else {
        PathBuf::from("/run/netns").join(ns)
    };
    File::open(&p).with_context(|| format!("network namespace {}", p.display()))
}

fn run(cli: Cli) -> anyhow::Result<bool> {
    let sys = Sysfs::new(&cli.sysfs_root);
    match cli.cmd {
        Cmd::List { selectors } => {
            let all = sys.devices()?;
            let shown: Vec<&PciDevice> = match selectors {
                Some(s) => {
                    let s: Selectors =
                        serde_json::from_str(&s).context("--selectors is not valid JSON")?;
                    s.compile().map_err(|e| anyhow!(e))?.select(&all)
                }
                None => all.iter().filter(|d| d.is_pf() || d.is_vf()).collect(),
            };
            let vf_info = |d: &PciDevice| -> Vec<VfInfoReport> {
                d.sriov
                    .as_ref()
                    .filter(|s| s.num_vfs > 0)
                    .and(d.netdevs.first())
                    .and_then(|n| ifindex(n).ok())
                    .and_then(|i| Netlink::open().ok()?.vfs(i).ok())
                    .unwrap_or_default()
            };
            if cli.json {
                let v: Vec<serde_json::Value> = shown
                    .iter()
                    .map(|d| {
                        let mut j = serde_json::to_value(d).unwrap_or_default();
                        j["link"] =
                            serde_json::json!(d.netdevs.first().and_then(|n| sys.operstate(n)));
                        if d.is_pf() {
                            j["vf_settings"] = serde_json::json!(vf_info(d));
                        }
                        j
                    })
                    .collect();
                print_json(&v)?;
                return Ok(true);
            }
            println!(
                "{:<13} {:<3} {:<10} {:<9} {:>5} {:>5} {:<14} {:<7} SR-IOV / PF",
                "PCI", "", "ID", "DRIVER", "NUMA", "GROUP", "NETDEV", "LINK"
            );
            for d in &shown {
                let net = d.netdevs.first().cloned().unwrap_or_else(|| "-".into());
                let extra = match (&d.sriov, d.physfn) {
                    (Some(s), _) => format!("{}/{} VFs", s.num_vfs, s.total_vfs),
                    (None, Some(pf)) => format!("VF of {pf}"),
                    _ => String::new(),
                };
                println!(
                    "{:<13} {:<3} {:<10} {:<9} {:>5} {:>5} {:<14} {:<7} {}",
                    d.addr.to_string(),
                    if d.is_pf() {
                        "PF"
                    } else if d.is_vf() {
                        "VF"
                    } else {
                        ""
                    },
                    format!("{:04x}:{:04x}", d.vendor, d.device),
                    d.driver.as_deref().unwrap_or("-"),
                    d.numa_node.map_or("-".into(), |n| n.to_string()),
                    d.iommu_group.map_or("-".into(), |n| n.to_string()),
                    net,
                    d.netdevs
                        .first()
                        .and_then(|n| sys.operstate(n))
                        .unwrap_or_else(|| "-".into()),
                    extra
                );
                for r in vf_info(d) {
                    println!(
                        "    vf {:<2} mac {} vlan {} qos {} {} spoofchk {} trust {} tx_rate {}-{} state {}",
                        r.vf,
                        mac_text(&r.mac),
                        r.vlan,
                        r.qos,
                        match r.vlan_proto {
                            VlanProto::Dot1Q => "802.1Q",
                            VlanProto::Dot1Ad => "802.1ad",
                        },
                        r.spoofchk.map_or("-", |b| if b { "on" } else { "off" }),
                        r.trust.map_or("-", |b| if b { "on" } else { "off" }),
                        r.min_tx_rate,
                        r.max_tx_rate,
                        r.link_state.map_or("-".into(), |s| format!("{s:?}").to_lowercase()),
                    );
                }
            }
            Ok(true)
        }
        Cmd::Vfs {
            pf,
            count,
            state_dirs,
            force,
        } => {
            let (addr, _) = resolve_pf(&sys, &pf)?;
            let _held = match force {
                false => vfs_removable(&sys, addr, count, &state_dirs)?,
                true => Vec::new(),
            };
            let d = sriov::set_num_vfs(&sys, addr, count)?;
            if cli.json {
                print_json(&d)?;
            } else {
                for (i, a) in d.sriov.iter().flat_map(|s| &s.vfs) {
                    println!("vf {i}: {a}");
                }
                println!("{addr}: {count} VFs");
            }
            Ok(true)
        }
        Cmd::Set { pf, vf, settings } => {
            let (_, ifname) = resolve_pf(&sys, &pf)?;
            let ifname = ifname.ok_or_else(|| anyhow!("{pf}: the PF has no network interface"))?;
            let index = ifindex(&ifname)?;
            let mut nl = Netlink::open()?;
            let find = |nl: &mut Netlink| -> anyhow::Result<VfInfoReport> {
                nl.vfs(index)?
                    .into_iter()
                    .find(|r| r.vf == vf)
                    .ok_or_else(|| anyhow!("{ifname} has no VF {vf}"))
            };
            let current = find(&mut nl)?;
            let wanted = parse_settings(&settings, &current)?;
            let mut results = Vec::new();
            for s in &wanted {
                results.push((*s, nl.set_vf(index, vf, *s).err()));
            }
            let after = find(&mut nl)?;
            let mut ok = true;
            let mut rows = Vec::new();
            for (s, err) in results {
                let (status, detail) = match err {
                    Some(e) => ("rejected", format!("the driver refused it: {e}")),
                    None if s.shown_by(&after) => ("applied", String::new()),
                    None => ("not-shown", "accepted but not read back".into()),
                };
                ok &= status == "applied";
                rows.push(serde_json::json!({
                    "setting": s.name(), "value": format!("{s:?}"), "status": status, "detail": detail,
                }));
            }
            if cli.json {
                print_json(&serde_json::json!({ "results": rows, "vf": after }))?;
            } else {
                for r in &rows {
                    println!(
                        "{:<9} {:<9} {} {}",
                        r["setting"].as_str().unwrap_or(""),
                        r["status"].as_str().unwrap_or(""),
                        r["value"].as_str().unwrap_or(""),
                        r["detail"].as_str().unwrap_or("")
                    );
                }
            }
            Ok(ok)
        }
        Cmd::Save { pf, vf, out } => {
            let (_, ifname) = resolve_pf(&sys, &pf)?;
            let ifname = ifname.ok_or_else(|| anyhow!("{pf}: the PF has no network interface"))?;
            let st = VfState::save(&sys, &mut Netlink::open()?, &ifname, vf)?;
            let text = serde_json::to_string_pretty(&st)?;
            match out {
                Some(p) => std::fs::write(&p, text).with_context(|| p.display().to_string())?,
                None => println!("{text}"),
            }
            Ok(true)
        }
        Cmd::Restore { file } => {
            let text =
                std::fs::read_to_string(&file).with_context(|| file.display().to_string())?;
            let st: VfState = serde_json::from_str(&text)
                .with_context(|| format!("{}: not a saved VF state", file.display()))?;
            st.restore(&sys, &mut Netlink::open()?)?;
            Ok(true)
        }
        Cmd::NetnsIn {
            ifname,
            netns,
            name,
        } => {
            let ns = open_netns(&netns)?;
            netlink::move_to_netns(&ifname, &ns, name.as_deref().unwrap_or(&ifname))
                .with_context(|| format!("moving {ifname} into {netns}"))?;
            Ok(true)
        }
        Cmd::NetnsOut {
            netns,
            ifname,
            name,
        } => {
            let ns = open_netns(&netns)?;
            netlink::move_from_netns(&ns, &ifname, &name)
                .with_context(|| format!("moving {ifname} out of {netns}"))?;
            Ok(true)
        }
        Cmd::Bind { addr } => {
            let was = bind::bind_vfio(&sys, addr)?;
            let spec = passthrough_spec(&sys, addr)?;
            if cli.json {
                print_json(&serde_json::json!({
                    "already_bound": was == bind::Bound::Already,
                    "previous_driver": was.previous_driver(),
                    "spec": spec,
                }))?;
            } else {
                println!(
                    "{addr}: {was}; group {} at {}{}",
                    spec.iommu_group,
                    spec.group_path.display(),
                    spec.cdev_path
                        .map(|p| format!(", cdev {}", p.display()))
                        .unwrap_or_default()
                );
            }
            Ok(true)
        }
        Cmd::Unbind { addr, driver } => {
            bind::rebind(&sys, addr, driver.as_deref())?;
            println!("{addr}: driver {}", driver.as_deref().unwrap_or("none"));
            Ok(true)
        }
        Cmd::Spec { addr } => {
            print_json(&passthrough_spec(&sys, addr)?)?;
            Ok(true)
        }
        Cmd::Probe { addr } => {
            let spec = passthrough_spec(&sys, addr)?;
            let r = device::probe(&sys.device_dir(addr), addr, spec.iommu_group)?;
            if cli.json {
                print_json(&r)?;
            } else {
                println!("{addr}: VFIO group {}", r.iommu_group);
                for g in &r.regions {
                    println!(
                        "  region {:<6} size {:>10} offset {:#014x} {}{}{}",
                        g.name,
                        g.size,
                        g.offset,
                        if g.read { "r" } else { "-" },
                        if g.write { "w" } else { "-" },
                        if g.mmap { "m" } else { "-" },
                    );
                }
                for i in &r.irqs {
                    println!(
                        "  irq    {:<6} count {} flags {:#x}",
                        i.name, i.count, i.flags
                    );
                }
                match r.mapped_bar {
                    Some((b, v)) => println!("  bar{b} mapped: first word {v:#010x}"),
                    None => println!("  no BAR could be mapped"),
                }
            }
            Ok(true)
        }
        Cmd::Alloc {
            selectors,
            netns,
            tag,
            state_dir,
        } => {
            let s: Selectors =
                serde_json::from_str(&selectors).context("--selectors is not valid JSON")?;
            let sel = s.compile().map_err(|e| anyhow!(e))?;
            let owner = Owner::of_netns(&netns, &tag)?;
            let mut nl = Netlink::open()?;
            let a = Allocator::new(state_dir)?.allocate(&sys, &sel, &owner, |d| {
                VfState::save_device(&sys, &mut nl, d).map_err(|e| e.to_string())
            })?;
            if cli.json {
                print_json(&a)?;
            } else {
                println!("{} allocated to {}", a.addr, a.owner.netns.display());
            }
            Ok(true)
        }
        Cmd::Release { addr, state_dir } => {
            Allocator::new(state_dir)?.release(addr, |a| restore_allocation(&sys, a))?;
            println!("{addr} released");
            Ok(true)
        }
        Cmd::Allocations { state_dir } => {
            let (list, bad) = Allocator::new(state_dir)?.list()?;
            for e in &bad {
                eprintln!("torii-vfio: unreadable record {e}");
            }
            if cli.json {
                print_json(&list)?;
            } else {
                for a in list {
                    println!(
                        "{} {} {} {}",
                        a.addr,
                        a.owner.netns.display(),
                        if a.owner.is_alive() { "alive" } else { "gone" },
                        a.owner.tag
                    );
                }
            }
            Ok(bad.is_empty())
        }
        Cmd::Gc { state_dir } => {
            let (freed, failed) =
                Allocator::new(state_dir)?.collect_garbage(|a| restore_allocation(&sys, a))?;
            for a in &freed {
                println!("{} released ({} is gone)", a.addr, a.owner.netns.display());
            }
            for e in &failed {
                eprintln!("torii-vfio: {e}");
            }
            Ok(failed.is_empty())
        }
        Cmd::DmaCheck { addr } => {
            passthrough_spec(&sys, addr)?;
            let r = device::edu_dma_check(&sys.device_dir(addr), addr)?;
            print_json(&r)?;
            Ok(r.round_trip_equal && r.unmapped_write_blocked)
        }
    }
}
