//! VF configuration through rtnetlink on the PF (the attributes `ip link set PF vf N …` sends),
//! read back through RTM_GETLINK with the VF extension mask; moving interfaces between network
//! namespaces. A plain blocking NETLINK_ROUTE socket: these are control-path calls.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};

use std::net::IpAddr;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL,
    NLM_F_MULTIPART, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    LinkAttribute, LinkExtentMask, LinkMessage, LinkVfInfo, VfInfo, VfInfoLinkState, VfInfoMac,
    VfInfoRate, VfInfoSpoofCheck, VfInfoTrust, VfLinkState, VfVlan, VfVlanInfo, VlanProtocol,
};
use netlink_packet_route::route::{
    RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::AddressFamily;
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use serde::{Deserialize, Serialize};

/// A VF's link state as the PF enforces it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkState {
    /// Follows the PF's link.
    Auto,
    Enable,
    Disable,
}

/// The VLAN tag protocol of a VF VLAN.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum VlanProto {
    #[default]
    #[serde(rename = "802.1Q")]
    Dot1Q,
    #[serde(rename = "802.1ad")]
    Dot1Ad,
}

/// What the PF reports of one VF.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VfInfoReport {
    pub vf: u32,
    /// The administrative MAC (all zeros: none set).
    pub mac: [u8; 6],
    pub vlan: u16,
    pub qos: u8,
    pub vlan_proto: VlanProto,
    /// `None`: the driver does not report it.
    pub spoofchk: Option<bool>,
    pub trust: Option<bool>,
    /// Mbit/s; 0 is no limit.
    pub min_tx_rate: u32,
    pub max_tx_rate: u32,
    pub link_state: Option<LinkState>,
}

/// One VF setting to apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VfSetting {
    Mac([u8; 6]),
    /// VLAN id (0: none), priority, protocol.
    Vlan(u16, u8, VlanProto),
    SpoofChk(bool),
    Trust(bool),
    /// Minimum and maximum TX rate, Mbit/s (0: no limit). Both go in one attribute.
    Rate {
        min: u32,
        max: u32,
    },
    LinkState(LinkState),
}

impl VfSetting {
    /// The `ip link` spelling of the setting's name.
    pub fn name(&self) -> &'static str {
        match self {
            VfSetting::Mac(_) => "mac",
            VfSetting::Vlan(..) => "vlan",
            VfSetting::SpoofChk(_) => "spoofchk",
            VfSetting::Trust(_) => "trust",
            VfSetting::Rate { .. } => "rate",
            VfSetting::LinkState(_) => "state",
        }
    }

    /// `r` as a driver that takes this setting shows it afterwards (what a fake PF does).
    pub fn apply(&self, r: &mut VfInfoReport) {
        match *self {
            VfSetting::Mac(m) => r.mac = m,
            VfSetting::Vlan(v, q, p) => {
                r.vlan = v;
                r.qos = if v == 0 { 0 } else { q };
                r.vlan_proto = if v == 0 { VlanProto::Dot1Q } else { p };
            }
            VfSetting::SpoofChk(b) => r.spoofchk = Some(b),
            VfSetting::Trust(b) => r.trust = Some(b),
            VfSetting::Rate { min, max } => {
                r.min_tx_rate = min;
                r.max_tx_rate = max;
            }
            VfSetting::LinkState(s) => r.link_state = Some(s),
        }
    }

    /// Whether `r` shows this setting applied.
    pub fn shown_by(&self, r: &VfInfoReport) -> bool {
        match *self {
            VfSetting::Mac(m) => r.mac == m,
            VfSetting::Vlan(v, q, p) => {
                r.vlan == v && (v == 0 || (r.qos == q && r.vlan_proto == p))
            }
            VfSetting::SpoofChk(b) => r.spoofchk == Some(b),
            VfSetting::Trust(b) => r.trust == Some(b),
            VfSetting::Rate { min, max } => r.min_tx_rate == min && r.max_tx_rate == max,
            VfSetting::LinkState(s) => r.link_state == Some(s),
        }
    }

    fn attribute(&self, vf: u32) -> VfInfo {
        match *self {
            VfSetting::Mac(m) => VfInfo::Mac(VfInfoMac::new(vf, &m)),
            VfSetting::Vlan(v, q, p) => VfInfo::VlanList(vec![VfVlan::Info(VfVlanInfo::new(
                vf,
                u32::from(v),
                u32::from(q),
                match p {
                    VlanProto::Dot1Q => VlanProtocol::Ieee8021Q,
                    VlanProto::Dot1Ad => VlanProtocol::Ieee8021Ad,
                },
            ))]),
            VfSetting::SpoofChk(b) => VfInfo::SpoofCheck(VfInfoSpoofCheck::new(vf, b)),
            VfSetting::Trust(b) => VfInfo::Trust(VfInfoTrust::new(vf, b)),
            VfSetting::Rate { min, max } => VfInfo::Rate(VfInfoRate::new(vf, min, max)),
            VfSetting::LinkState(s) => VfInfo::LinkState(VfInfoLinkState::new(
                vf,
                match s {
                    LinkState::Auto => VfLinkState::Auto,
                    LinkState::Enable => VfLinkState::Enable,
                    LinkState::Disable => VfLinkState::Disable,
                },
            )),
        }
    }
}

/// A NETLINK_ROUTE socket in the calling thread's network namespace.
pub struct Netlink {
    sock: Socket,
    seq: u32,
}

/// The interface index of `ifname` in the calling thread's network namespace.
pub fn ifindex(ifname: &str) -> io::Result<u32> {
    let c = std::ffi::CString::new(ifname)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "interface name with NUL"))?;
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no network interface {ifname:?}"),
        ));
    }
    Ok(i)
}

impl Netlink {
    pub fn open() -> io::Result<Netlink> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        Ok(Netlink { sock, seq: 0 })
    }

    /// Sends `msg` with `flags` and collects the messages of the reply (a dump's parts, the
    /// answer to a get), or the kernel's error. With `NLM_F_ACK` it waits for the ACK.
    pub fn call(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut nl =
            NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::InnerMessage(msg));
        nl.header.flags = flags;
        nl.header.sequence_number = seq;
        nl.finalize();
        let mut buf = vec![0; nl.buffer_len()];
        nl.serialize(&mut buf);
        self.sock.send(&buf, 0)?;
        let mut out = Vec::new();
        loop {
            let (buf, _) = self.sock.recv_from_full()?;
            let mut off = 0;
            while off < buf.len() {
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[off..])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let len = msg.header.length as usize;
                if msg.header.sequence_number == seq {
                    match msg.payload {
                        NetlinkPayload::InnerMessage(m) => {
                            out.push(m);
                            if msg.header.flags & NLM_F_MULTIPART == 0 && flags & NLM_F_ACK == 0 {
                                return Ok(out);
                            }
                        }
                        NetlinkPayload::Error(e) => {
                            return match e.code {
                                None => Ok(out),
                                Some(_) => Err(e.to_io()),
                            }
                        }
                        NetlinkPayload::Done(_) => return Ok(out),
                        _ => {}
                    }
                }
                if len == 0 {
                    break;
                }
                off += (len + 3) & !3;
            }
        }
    }

    /// [`Netlink::call`] for requests answered with links.
    fn request(&mut self, msg: RouteNetlinkMessage, flags: u16) -> io::Result<Vec<LinkMessage>> {
        Ok(self
            .call(msg, flags)?
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(l),
                _ => None,
            })
            .collect())
    }

    /// Creates what `msg` (a `New…` message) describes; one that exists already is an error
    /// (EEXIST).
    pub fn create(&mut self, msg: RouteNetlinkMessage) -> io::Result<()> {
        self.call(msg, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL)
            .map(|_| ())
    }

    /// Creates a link (`ip link add`): `m` carries its name and `LinkInfo`.
    pub fn new_link(&mut self, m: LinkMessage) -> io::Result<()> {
        self.create(RouteNetlinkMessage::NewLink(m))
    }

    /// Deletes link `index`.
    pub fn del_link(&mut self, index: u32) -> io::Result<()> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        self.call(RouteNetlinkMessage::DelLink(m), NLM_F_REQUEST | NLM_F_ACK)
            .map(|_| ())
    }

    /// The link `index` with its VF information.
    pub fn link(&mut self, index: u32) -> io::Result<LinkMessage> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.attributes
            .push(LinkAttribute::ExtMask(vec![LinkExtentMask::Vf]));
        self.request(RouteNetlinkMessage::GetLink(m), NLM_F_REQUEST)?
            .pop()
            .ok_or_else(|| io::Error::other(format!("no reply for link {index}")))
    }

    /// What PF `pf` (an interface index) reports of its VFs.
    pub fn vfs(&mut self, pf: u32) -> io::Result<Vec<VfInfoReport>> {
        let l = self.link(pf)?;
        let mut out = Vec::new();
        for a in &l.attributes {
            if let LinkAttribute::VfInfoList(list) = a {
                out.extend(list.iter().filter_map(report));
            }
        }
        out.sort_by_key(|r| r.vf);
        Ok(out)
    }

    /// Applies one setting to VF `vf` of PF `pf`; the kernel's (driver's) refusal is the error.
    pub fn set_vf(&mut self, pf: u32, vf: u32, s: VfSetting) -> io::Result<()> {
        let mut m = LinkMessage::default();
        m.header.index = pf;
        m.attributes
            .push(LinkAttribute::VfInfoList(vec![LinkVfInfo(vec![
                s.attribute(vf)
            ])]));
        self.request(RouteNetlinkMessage::SetLink(m), NLM_F_REQUEST | NLM_F_ACK)
            .map(|_| ())
    }

    /// Sets link `index`'s attributes (`IfName`, `Mtu`, `NetNsFd`, …).
    pub fn set_link(&mut self, index: u32, attrs: Vec<LinkAttribute>) -> io::Result<()> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.attributes = attrs;
        self.request(RouteNetlinkMessage::SetLink(m), NLM_F_REQUEST | NLM_F_ACK)
            .map(|_| ())
    }

    /// Adds address `addr/prefix` to link `index`.
    pub fn add_address(&mut self, index: u32, addr: IpAddr, prefix: u8) -> io::Result<()> {
        let mut m = AddressMessage::default();
        m.header.family = family(addr);
        m.header.prefix_len = prefix;
        m.header.index = index;
        if addr.is_ipv4() {
            m.attributes.push(AddressAttribute::Local(addr));
        }
        m.attributes.push(AddressAttribute::Address(addr));
        self.request(
            RouteNetlinkMessage::NewAddress(m),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        )
        .map(|_| ())
    }

    /// Adds a route to `dst/prefix` through link `oif`, via `gateway` if given (else on the
    /// link), in the main table.
    pub fn add_route(
        &mut self,
        dst: IpAddr,
        prefix: u8,
        gateway: Option<IpAddr>,
        oif: u32,
    ) -> io::Result<()> {
        let mut m = RouteMessage::default();
        m.header.address_family = family(dst);
        m.header.destination_prefix_length = prefix;
        m.header.table = RouteHeader::RT_TABLE_MAIN;
        m.header.protocol = RouteProtocol::Boot;
        m.header.scope = if gateway.is_some() {
            RouteScope::Universe
        } else {
            RouteScope::Link
        };
        m.header.kind = RouteType::Unicast;
        if prefix > 0 {
            m.attributes.push(RouteAttribute::Destination(dst.into()));
        }
        if let Some(g) = gateway {
            m.attributes.push(RouteAttribute::Gateway(g.into()));
        }
        m.attributes.push(RouteAttribute::Oif(oif));
        self.request(
            RouteNetlinkMessage::NewRoute(m),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        )
        .map(|_| ())
    }

    /// Sets link `index` up or down.
    pub fn set_up(&mut self, index: u32, up: bool) -> io::Result<()> {
        use netlink_packet_route::link::LinkFlags;
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.header.flags = if up {
            LinkFlags::Up
        } else {
            LinkFlags::empty()
        };
        m.header.change_mask = LinkFlags::Up;
        self.request(RouteNetlinkMessage::SetLink(m), NLM_F_REQUEST | NLM_F_ACK)
            .map(|_| ())
    }
}

fn family(a: IpAddr) -> AddressFamily {
    if a.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

fn report(info: &LinkVfInfo) -> Option<VfInfoReport> {
    let mut r = VfInfoReport {
        vf: u32::MAX,
        mac: [0; 6],
        vlan: 0,
        qos: 0,
        vlan_proto: VlanProto::Dot1Q,
        spoofchk: None,
        trust: None,
        min_tx_rate: 0,
        max_tx_rate: 0,
        link_state: None,
    };
    for a in &info.0 {
        match a {
            VfInfo::Mac(m) => {
                r.vf = m.vf_id;
                r.mac.copy_from_slice(&m.mac[..6]);
            }
            VfInfo::Vlan(v) => {
                r.vlan = v.vlan_id as u16;
                r.qos = v.qos as u8;
            }
            VfInfo::VlanList(list) => {
                for v in list.iter().filter_map(|v| match v {
                    VfVlan::Info(i) => Some(i),
                    _ => None,
                }) {
                    r.vlan = v.vlan_id as u16;
                    r.qos = v.qos as u8;
                    r.vlan_proto = match v.protocol {
                        VlanProtocol::Ieee8021Ad => VlanProto::Dot1Ad,
                        _ => VlanProto::Dot1Q,
                    };
                }
            }
            VfInfo::SpoofCheck(s) => r.spoofchk = Some(s.enabled),
            VfInfo::Trust(t) => r.trust = Some(t.enabled),
            VfInfo::Rate(x) => {
                r.min_tx_rate = x.min_tx_rate;
                r.max_tx_rate = x.max_tx_rate;
            }
            VfInfo::LinkState(s) => {
                r.link_state = match s.state {
                    VfLinkState::Auto => Some(LinkState::Auto),
                    VfLinkState::Enable => Some(LinkState::Enable),
                    VfLinkState::Disable => Some(LinkState::Disable),
                    _ => None,
                }
            }
            _ => {}
        }
    }
    (r.vf != u32::MAX).then_some(r)
}

/// The VF settings a PF's driver holds, reached through the PF's interface: [`Netlink`] on a
/// real kernel; in tests on fake sysfs trees, a fake PF that records what it is asked
/// (`fake::FakeVfs`).
pub trait VfControl {
    /// What the PF whose interface is `pf` reports of its VFs.
    fn pf_vfs(&mut self, pf: &str) -> io::Result<Vec<VfInfoReport>>;
    /// Applies one setting to VF `vf` of that PF; the driver's refusal is the error.
    fn set_pf_vf(&mut self, pf: &str, vf: u32, s: VfSetting) -> io::Result<()>;
}

/// Shared, so that a test can look at a fake after the code under test has used it.
impl<T: VfControl + ?Sized> VfControl for std::sync::Arc<std::sync::Mutex<T>> {
    fn pf_vfs(&mut self, pf: &str) -> io::Result<Vec<VfInfoReport>> {
        self.lock().unwrap_or_else(|e| e.into_inner()).pf_vfs(pf)
    }

    fn set_pf_vf(&mut self, pf: &str, vf: u32, s: VfSetting) -> io::Result<()> {
        self.lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_pf_vf(pf, vf, s)
    }
}

impl VfControl for Netlink {
    fn pf_vfs(&mut self, pf: &str) -> io::Result<Vec<VfInfoReport>> {
        let i = ifindex(pf)?;
        self.vfs(i)
    }

    fn set_pf_vf(&mut self, pf: &str, vf: u32, s: VfSetting) -> io::Result<()> {
        let i = ifindex(pf)?;
        self.set_vf(i, vf, s)
    }
}

/// Runs `f` on a helper thread that has entered the network namespace `ns` (an open
/// `/proc/<pid>/ns/net` or `/run/netns/<name>`), so the caller's namespace never changes.
pub fn in_netns<T: Send + 'static>(
    ns: &File,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    let fd = ns.as_fd().try_clone_to_owned()?;
    std::thread::spawn(move || {
        // SAFETY: setns on this helper thread only, with an fd it owns for the call.
        if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        f()
    })
    .join()
    .map_err(|_| io::Error::other("netns helper thread panicked"))?
}

/// Moves interface `ifname` of the calling thread's namespace into namespace `to`, renamed
/// `new_name`.
pub fn move_to_netns(ifname: &str, to: &File, new_name: &str) -> io::Result<()> {
    let i = ifindex(ifname)?;
    let mut nl = Netlink::open()?;
    nl.set_link(
        i,
        vec![
            LinkAttribute::NetNsFd(to.as_raw_fd()),
            LinkAttribute::IfName(new_name.to_string()),
        ],
    )
}

/// Moves interface `ifname` of namespace `from` back into the caller's namespace as `name`.
pub fn move_from_netns(from: &File, ifname: &str, name: &str) -> io::Result<()> {
    let here = File::open("/proc/thread-self/ns/net")?;
    let (ifname, name) = (ifname.to_string(), name.to_string());
    in_netns(from, move || {
        let i = ifindex(&ifname)?;
        Netlink::open()?.set_link(
            i,
            vec![
                LinkAttribute::NetNsFd(here.as_raw_fd()),
                LinkAttribute::IfName(name),
            ],
        )
    })
}
