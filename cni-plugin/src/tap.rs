//! The tap mode: a VM on the kernel's network path, wired as Kata Containers wires it (its
//! "tcfilter" model). In the pod's namespace: a tap named CNI_IFNAME (multiqueue when more
//! than one queue is asked for), which the VM launcher's QEMU opens, and one end of a veth
//! pair; tc redirects every frame that arrives on either to the other (an ingress qdisc and a
//! match-all u32 filter with a mirred egress redirect on each). The veth's other end is a port of a
//! Linux bridge in the host's namespace (made if missing), where the other pods and the host
//! are. This is the baseline the vhost-user mode is measured against.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::tc::{
    TcAction, TcActionAttribute, TcActionGeneric, TcActionMirrorOption, TcActionOption,
    TcActionType, TcAttribute, TcFilterU32Option, TcHandle, TcMessage, TcMirror,
    TcMirrorActionType, TcOption, TcU32Key, TcU32Selector, TcU32SelectorFlags,
};
use netlink_packet_route::RouteNetlinkMessage;
use torii_vfio::netlink::{self, ifindex, Netlink};

/// The names an attachment's links take.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    /// The host's bridge.
    pub bridge: String,
    /// The veth's end on the bridge, in the host's namespace.
    pub host_veth: String,
    /// The veth's end in the pod's namespace.
    pub pod_veth: String,
    /// The tap, in the pod's namespace.
    pub tap: String,
    /// Set as the alias of every link the attachment makes (`torii-cni:<net>/<cid>/<ifname>`):
    /// a link is removed only if it carries it, so another plugin's link of the same name,
    /// or one left by another attachment, is never taken for ours.
    pub owner: String,
}

/// What a tap attachment is made with.
pub struct Spec<'a> {
    pub names: &'a Names,
    pub queues: u16,
    pub mtu: Option<u32>,
}

const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_MULTI_QUEUE: i16 = 0x0100;
const IFF_VNET_HDR: i16 = 0x4000;
/// Fail, rather than attach, if a tap of that name exists.
const IFF_TUN_EXCL: i16 = -0x8000;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
/// `IFLA_TUN_MULTI_QUEUE` in the tun link's info data.
const IFLA_TUN_MULTI_QUEUE: u16 = 7;
/// `ETH_P_ALL` in network byte order, as `tcm_info`'s low 16 bits take a filter's protocol.
const ETH_P_ALL_BE: u32 = (libc::ETH_P_ALL as u16).to_be() as u32;

/// `struct ifreq` as TUNSETIFF reads it: the name and the flags.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: i16,
    _pad: [u8; 22],
}

fn other(what: String) -> io::Error {
    io::Error::other(what)
}

/// The kind of link `l` (`bridge`, `veth`, `tun`), if it says.
fn kind(l: &LinkMessage) -> Option<InfoKind> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Kind(k) => Some(k.clone()),
            _ => None,
        }),
        _ => None,
    })
}

/// Link `name` of the calling thread's namespace, if there is one (one that goes between
/// the lookup and the read, as links of a namespace being torn down do, is none).
fn find(nl: &mut Netlink, name: &str) -> io::Result<Option<(u32, LinkMessage)>> {
    let i = match ifindex(name) {
        Ok(i) => i,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    match nl.link(i) {
        Ok(l) => Ok(Some((i, l))),
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Link `l`'s alias, if it has one.
fn alias(l: &LinkMessage) -> Option<&str> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfAlias(s) => Some(s.as_str()),
        _ => None,
    })
}

/// Makes a persistent tap `name` in the calling thread's namespace; multiqueue when `queues`
/// is above 1 (QEMU asks for IFF_MULTI_QUEUE exactly then, and the kernel wants the two to
/// agree).
fn make_tap(name: &str, queues: u16) -> io::Result<()> {
    let f: OwnedFd = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| other(format!("/dev/net/tun: {e}")))?
        .into();
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_TUN_EXCL,
        _pad: [0; 22],
    };
    if queues > 1 {
        req.flags |= IFF_MULTI_QUEUE;
    }
    let n = CString::new(name).map_err(|_| other("interface name with NUL".into()))?;
    let bytes = n.as_bytes();
    if bytes.len() >= libc::IFNAMSIZ {
        return Err(other(format!("{name}: name too long for an interface")));
    }
    req.name[..bytes.len()].copy_from_slice(bytes);
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `req` lays out (name, flags,
    // padding to the union's size) and which lives across the call; the fd is ours.
    if unsafe { libc::ioctl(f.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: TUNSETPERSIST takes an integer argument; the fd is ours and attached.
    if unsafe { libc::ioctl(f.as_raw_fd(), TUNSETPERSIST, 1 as libc::c_ulong) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// An ingress qdisc on link `index` (`tc qdisc add dev X ingress`).
fn add_ingress(nl: &mut Netlink, index: u32) -> io::Result<()> {
    let mut m = TcMessage::default();
    m.header.index = index as i32;
    m.header.handle = TcHandle {
        major: 0xffff,
        minor: 0,
    };
    m.header.parent = TcHandle::INGRESS;
    m.attributes.push(TcAttribute::Kind("ingress".into()));
    nl.create(RouteNetlinkMessage::NewQueueDiscipline(m))
}

/// Every frame arriving on link `from` sent out of link `to` (`tc filter add dev FROM parent
/// ffff: protocol all u32 match u8 0 0 action mirred egress redirect dev TO`, as Kata does;
/// u32 rather than matchall, which not every kernel has).
fn add_redirect(nl: &mut Netlink, from: u32, to: u32) -> io::Result<()> {
    let mut mirror = TcMirror::default();
    mirror.generic = {
        let mut g = TcActionGeneric::default();
        g.action = TcActionType::Stolen;
        g
    };
    mirror.eaction = TcMirrorActionType::EgressRedir;
    mirror.ifindex = to;
    let mut action = TcAction::default();
    action.attributes = vec![
        TcActionAttribute::Kind("mirred".into()),
        TcActionAttribute::Options(vec![TcActionOption::Mirror(TcActionMirrorOption::Parms(
            mirror,
        ))]),
    ];
    let mut m = TcMessage::default();
    m.header.index = from as i32;
    m.header.parent = TcHandle {
        major: 0xffff,
        minor: 0,
    };
    m.header.info = ETH_P_ALL_BE;
    // One key that matches every frame: mask 0 at offset 0.
    let mut sel = TcU32Selector::default();
    sel.flags = TcU32SelectorFlags::Terminal;
    sel.nkeys = 1;
    sel.keys = vec![TcU32Key::default()];
    m.attributes.push(TcAttribute::Kind("u32".into()));
    m.attributes.push(TcAttribute::Options(vec![
        TcOption::U32(TcFilterU32Option::Selector(sel)),
        TcOption::U32(TcFilterU32Option::Action(vec![action])),
    ]));
    nl.create(RouteNetlinkMessage::NewTrafficFilter(m))
}

/// The host's bridge `name`: made and set up if missing; an interface of that name that is
/// not a bridge is refused.
fn ensure_bridge(nl: &mut Netlink, name: &str) -> io::Result<u32> {
    if find(nl, name)?.is_none() {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.into()));
        m.attributes
            .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(
                InfoKind::Bridge,
            )]));
        match nl.new_link(m) {
            // Another ADD made it meanwhile.
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            r => r.map_err(|e| other(format!("creating bridge {name}: {e}")))?,
        }
    }
    let (i, l) = find(nl, name)?.ok_or_else(|| other(format!("bridge {name} vanished")))?;
    if kind(&l) != Some(InfoKind::Bridge) {
        return Err(other(format!("{name} exists and is not a bridge")));
    }
    if !l.header.flags.contains(LinkFlags::Up) {
        nl.set_up(i, true)?;
    }
    Ok(i)
}

/// Checks, before anything is made, that the pod has no interface named like the tap (it
/// would be another plugin's) and the host no bridge port name clash.
pub fn precheck(netns: &Path, names: &Names) -> io::Result<()> {
    let ns = File::open(netns).map_err(|e| other(format!("{}: {e}", netns.display())))?;
    for (name, in_pod) in [
        (names.tap.clone(), true),
        (names.pod_veth.clone(), true),
        (names.host_veth.clone(), false),
    ] {
        let exists = if in_pod {
            let n = name.clone();
            netlink::in_netns(&ns, move || Ok(ifindex(&n).is_ok()))?
        } else {
            ifindex(&name).is_ok()
        };
        if exists {
            return Err(other(format!(
                "{} already has an interface {name}",
                if in_pod { "the pod" } else { "the host" }
            )));
        }
    }
    Ok(())
}

/// Makes the attachment's links: the bridge (if missing), the veth pair with one end in the
/// pod, the tap, and the redirects between tap and veth.
pub fn plug(netns: &Path, spec: &Spec) -> io::Result<()> {
    let n = spec.names;
    let ns = File::open(netns).map_err(|e| other(format!("{}: {e}", netns.display())))?;
    let mut nl = Netlink::open()?;
    let bridge = ensure_bridge(&mut nl, &n.bridge)?;
    // The pair, its pod end made straight in the pod's namespace.
    let mut peer = LinkMessage::default();
    peer.attributes
        .push(LinkAttribute::IfName(n.pod_veth.clone()));
    peer.attributes.push(LinkAttribute::NetNsFd(ns.as_raw_fd()));
    let mut m = LinkMessage::default();
    m.attributes
        .push(LinkAttribute::IfName(n.host_veth.clone()));
    if let Some(t) = spec.mtu {
        m.attributes.push(LinkAttribute::Mtu(t));
        peer.attributes.push(LinkAttribute::Mtu(t));
    }
    m.attributes.push(LinkAttribute::LinkInfo(vec![
        LinkInfo::Kind(InfoKind::Veth),
        LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer))),
    ]));
    nl.new_link(m)
        .map_err(|e| other(format!("creating veth {}: {e}", n.host_veth)))?;
    let host = ifindex(&n.host_veth)?;
    nl.set_link(
        host,
        vec![
            LinkAttribute::IfAlias(n.owner.clone()),
            LinkAttribute::Controller(bridge),
        ],
    )
    .map_err(|e| other(format!("{} to bridge {}: {e}", n.host_veth, n.bridge)))?;
    nl.set_up(host, true)?;
    let (tap, pod_veth, queues, mtu) = (n.tap.clone(), n.pod_veth.clone(), spec.queues, spec.mtu);
    let owner = n.owner.clone();
    netlink::in_netns(&ns, move || {
        let mut nl = Netlink::open()?;
        let v = ifindex(&pod_veth)?;
        nl.set_link(v, vec![LinkAttribute::IfAlias(owner.clone())])?;
        make_tap(&tap, queues).map_err(|e| other(format!("creating tap {tap}: {e}")))?;
        let t = ifindex(&tap)?;
        let mut attrs = vec![LinkAttribute::IfAlias(owner)];
        attrs.extend(mtu.map(LinkAttribute::Mtu));
        nl.set_link(t, attrs)
            .map_err(|e| other(format!("configuring {tap}: {e}")))?;
        for (i, name) in [(t, &tap), (v, &pod_veth)] {
            add_ingress(&mut nl, i).map_err(|e| other(format!("ingress qdisc on {name}: {e}")))?;
        }
        add_redirect(&mut nl, t, v)
            .map_err(|e| other(format!("redirect {tap} -> {pod_veth}: {e}")))?;
        add_redirect(&mut nl, v, t)
            .map_err(|e| other(format!("redirect {pod_veth} -> {tap}: {e}")))?;
        nl.set_up(v, true)?;
        nl.set_up(t, true)
    })
}

/// Deletes `name` if it is there, of kind `want` and carries `owner` as its alias.
fn remove_if(nl: &mut Netlink, name: &str, want: InfoKind, owner: &str) -> io::Result<()> {
    match find(nl, name)? {
        Some((i, l)) if kind(&l) == Some(want) && alias(&l) == Some(owner) => {
            match nl.del_link(i) {
                Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(()),
                r => r,
            }
        }
        _ => Ok(()),
    }
}

/// Removes whatever of the attachment's links exists: the tap and the veth (in the pod, if
/// its namespace is still there, and in the host). The bridge stays: other pods use it.
/// Every step runs; the first error is returned.
pub fn unplug(netns: Option<&Path>, names: &Names) -> io::Result<()> {
    let mut first: Option<io::Error> = None;
    match netns.map(File::open) {
        // No namespace, or gone: the kernel took the pod's links with it.
        None => {}
        Some(Err(e)) if e.kind() == io::ErrorKind::NotFound => {}
        Some(Err(e)) => {
            first = Some(other(format!(
                "{}: {e}",
                netns.unwrap_or(Path::new("")).display()
            )))
        }
        Some(Ok(ns)) => {
            let (tap, pod_veth, owner) = (
                names.tap.clone(),
                names.pod_veth.clone(),
                names.owner.clone(),
            );
            let r = netlink::in_netns(&ns, move || {
                let mut nl = Netlink::open()?;
                let t = remove_if(&mut nl, &tap, InfoKind::Tun, &owner);
                let v = remove_if(&mut nl, &pod_veth, InfoKind::Veth, &owner);
                t.and(v)
            });
            if let Err(e) = r {
                first = Some(e);
            }
        }
    }
    // Gone with its peer if the pod's end went; else it goes now.
    let host = Netlink::open()
        .and_then(|mut nl| remove_if(&mut nl, &names.host_veth, InfoKind::Veth, &names.owner));
    match (first, host) {
        (Some(e), _) | (None, Err(e)) => Err(e),
        (None, Ok(())) => Ok(()),
    }
}

/// The device link `index`'s ingress u32 filter redirects to, if it has one.
fn redirect_target(nl: &mut Netlink, index: u32) -> io::Result<Option<u32>> {
    let mut m = TcMessage::default();
    m.header.index = index as i32;
    m.header.parent = TcHandle {
        major: 0xffff,
        minor: 0,
    };
    let msgs = nl.call(
        RouteNetlinkMessage::GetTrafficFilter(m),
        netlink_packet_core::NLM_F_REQUEST | netlink_packet_core::NLM_F_DUMP,
    )?;
    Ok(msgs.iter().find_map(|msg| {
        let RouteNetlinkMessage::NewTrafficFilter(f) = msg else {
            return None;
        };
        f.attributes.iter().find_map(|a| match a {
            TcAttribute::Options(opts) => opts.iter().find_map(|o| match o {
                TcOption::U32(TcFilterU32Option::Action(acts)) => acts.iter().find_map(|act| {
                    act.attributes.iter().find_map(|aa| match aa {
                        TcActionAttribute::Options(ao) => ao.iter().find_map(|x| match x {
                            TcActionOption::Mirror(TcActionMirrorOption::Parms(p))
                                if p.eaction == TcMirrorActionType::EgressRedir =>
                            {
                                Some(p.ifindex)
                            }
                            _ => None,
                        }),
                        _ => None,
                    })
                }),
                _ => None,
            }),
            _ => None,
        })
    }))
}

/// Link `l`'s MTU.
fn mtu_of(l: &LinkMessage) -> Option<u32> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(m) => Some(*m),
        _ => None,
    })
}

/// CHECK: the tap and the pod's veth end in the pod, ours, the tap multiqueue as asked, the
/// MTU as asked, each redirecting to the other; the host's end on the bridge, which is one.
pub fn check(netns: &Path, spec: &Spec) -> io::Result<()> {
    let n = spec.names;
    let ns = File::open(netns).map_err(|e| other(format!("{}: {e}", netns.display())))?;
    let (tap, pod_veth, queues, mtu, owner) = (
        n.tap.clone(),
        n.pod_veth.clone(),
        spec.queues,
        spec.mtu,
        n.owner.clone(),
    );
    netlink::in_netns(&ns, move || {
        let mut nl = Netlink::open()?;
        let mut ours = |name: &str, want: InfoKind| -> io::Result<(u32, LinkMessage)> {
            let (i, l) = find(&mut nl, name)?
                .ok_or_else(|| other(format!("the pod has no interface {name}")))?;
            if kind(&l) != Some(want.clone()) || alias(&l) != Some(owner.as_str()) {
                return Err(other(format!("{name} is not this attachment's {want:?}")));
            }
            Ok((i, l))
        };
        let (t, tl) = ours(&tap, InfoKind::Tun)?;
        let (v, _) = ours(&pod_veth, InfoKind::Veth)?;
        if (queues > 1) != tun_multi_queue(&tl) {
            return Err(other(format!(
                "{tap} is {}multiqueue, {queues} queues asked",
                if queues > 1 { "not " } else { "" }
            )));
        }
        if let Some(m) = mtu.filter(|m| mtu_of(&tl) != Some(*m)) {
            return Err(other(format!("{tap} has MTU {:?}, {m} asked", mtu_of(&tl))));
        }
        for (from, to, what) in [(t, v, &tap), (v, t, &pod_veth)] {
            if redirect_target(&mut nl, from)? != Some(to) {
                return Err(other(format!(
                    "{what}: its frames are not redirected (the ingress filter is missing)"
                )));
            }
        }
        Ok(())
    })?;
    let mut nl = Netlink::open()?;
    let (_, l) = find(&mut nl, &n.host_veth)?
        .ok_or_else(|| other(format!("the host has no interface {}", n.host_veth)))?;
    let (bridge, bl) = find(&mut nl, &n.bridge)?
        .ok_or_else(|| other(format!("the host has no bridge {}", n.bridge)))?;
    if kind(&bl) != Some(InfoKind::Bridge) {
        return Err(other(format!("{} is not a bridge", n.bridge)));
    }
    let on = l
        .attributes
        .iter()
        .any(|a| matches!(a, LinkAttribute::Controller(b) if *b == bridge));
    if !on {
        return Err(other(format!(
            "{} is not on bridge {}",
            n.host_veth, n.bridge
        )));
    }
    Ok(())
}

/// Whether tun link `l` says it is multiqueue.
fn tun_multi_queue(l: &LinkMessage) -> bool {
    use netlink_packet_core::Nla;
    l.attributes.iter().any(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().any(|i| match i {
            LinkInfo::Data(InfoData::Tun(opts)) => opts.iter().any(|o| {
                let mut v = [0u8; 1];
                o.kind() == IFLA_TUN_MULTI_QUEUE && o.value_len() == 1 && {
                    o.emit_value(&mut v);
                    v[0] == 1
                }
            }),
            _ => false,
        }),
        _ => false,
    })
}
