//! A blocking NETLINK_ROUTE client (netlink-packet-route) for Torii's control paths: links,
//! addresses, routes, neighbours, traffic control, and moves between network namespaces.
//! Used by torii-vfio (VF settings on a PF), torii-cni (pod links) and torii-agent (the
//! guest's interfaces). These are control-path calls: one socket, one request at a time.

use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd};

pub use netlink_packet_core;
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_MULTIPART, NLM_F_REQUEST,
};
pub use netlink_packet_route;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkExtentMask, LinkMessage};
use netlink_packet_route::neighbour::{NeighbourAttribute, NeighbourMessage, NeighbourState};
use netlink_packet_route::route::{
    RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::AddressFamily;
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

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

    /// Every message a dump request for `msg`'s kind returns.
    pub fn dump(&mut self, msg: RouteNetlinkMessage) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.call(msg, NLM_F_REQUEST | NLM_F_DUMP)
    }

    /// Every link of the namespace.
    pub fn links(&mut self) -> io::Result<Vec<LinkMessage>> {
        Ok(self
            .dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))?
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(l),
                _ => None,
            })
            .collect())
    }

    /// Every address of the namespace (IPv4 and IPv6).
    pub fn addresses(&mut self) -> io::Result<Vec<AddressMessage>> {
        Ok(self
            .dump(RouteNetlinkMessage::GetAddress(AddressMessage::default()))?
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) => Some(a),
                _ => None,
            })
            .collect())
    }

    /// Every route of the main table (IPv4 and IPv6).
    pub fn routes(&mut self) -> io::Result<Vec<RouteMessage>> {
        let mut out = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut m = RouteMessage::default();
            m.header.address_family = family;
            out.extend(
                self.dump(RouteNetlinkMessage::GetRoute(m))?
                    .into_iter()
                    .filter_map(|m| match m {
                        RouteNetlinkMessage::NewRoute(r)
                            if r.header.table == RouteHeader::RT_TABLE_MAIN =>
                        {
                            Some(r)
                        }
                        _ => None,
                    }),
            );
        }
        Ok(out)
    }

    /// Deletes the address `m` describes (as a dump returned it).
    pub fn del_address(&mut self, m: AddressMessage) -> io::Result<()> {
        self.call(
            RouteNetlinkMessage::DelAddress(m),
            NLM_F_REQUEST | NLM_F_ACK,
        )
        .map(|_| ())
    }

    /// Deletes the route `m` describes (as a dump returned it).
    pub fn del_route(&mut self, m: RouteMessage) -> io::Result<()> {
        self.call(RouteNetlinkMessage::DelRoute(m), NLM_F_REQUEST | NLM_F_ACK)
            .map(|_| ())
    }

    /// A permanent neighbour entry (`ip neigh replace IP lladdr MAC dev INDEX nud permanent`).
    pub fn set_neighbour(&mut self, index: u32, ip: IpAddr, mac: [u8; 6]) -> io::Result<()> {
        let mut m = NeighbourMessage::default();
        m.header.family = family(ip);
        m.header.ifindex = index;
        m.header.state = NeighbourState::Permanent;
        m.attributes
            .push(NeighbourAttribute::Destination(ip.into()));
        m.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        // Replace: create, or overwrite what is there.
        self.call(
            RouteNetlinkMessage::NewNeighbour(m),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | netlink_packet_core::NLM_F_REPLACE,
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

pub fn family(a: IpAddr) -> AddressFamily {
    if a.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
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
