//! The guest's network side, through rtnetlink: list the interfaces and routes, configure an
//! interface found by its MAC (name, MTU, addresses, up), replace the routes of interfaces,
//! add permanent neighbour entries. What the host sends is checked whole before anything
//! changes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
    RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use serde::Deserialize;
use serde_json::{json, Value};
use torii_netlink::netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST,
};
use torii_netlink::netlink_packet_route;
use torii_netlink::Netlink;

use crate::protocol::{quote, RpcError};

fn bad(msg: impl Into<String>) -> RpcError {
    RpcError::new("bad_params", msg)
}

fn failed(what: &str, e: std::io::Error) -> RpcError {
    RpcError::new("failed", format!("{what}: {e}"))
}

fn open() -> Result<Netlink, RpcError> {
    Netlink::open().map_err(|e| failed("netlink", e))
}

/// `a.b.c.d/len` or `x::y/len`.
pub fn parse_cidr(s: &str) -> Result<(IpAddr, u8), RpcError> {
    let err = || {
        bad(format!(
            "{} is not an address with a prefix length (10.0.0.2/24)",
            quote(s)
        ))
    };
    let (a, p) = s.split_once('/').ok_or_else(err)?;
    let ip: IpAddr = a.parse().map_err(|_| err())?;
    let p: u8 = p.parse().map_err(|_| err())?;
    if p > if ip.is_ipv4() { 32 } else { 128 } {
        return Err(err());
    }
    Ok((ip, p))
}

pub fn parse_mac(s: &str) -> Result<[u8; 6], RpcError> {
    let b: Vec<u8> = s
        .split(':')
        .map(|x| {
            (x.len() == 2)
                .then(|| u8::from_str_radix(x, 16).ok())
                .flatten()
        })
        .collect::<Option<_>>()
        .ok_or_else(|| bad(format!("{} is not a MAC address", quote(s))))?;
    b.try_into()
        .map_err(|_| bad(format!("{} is not a MAC address", quote(s))))
}

fn mac_text(m: &[u8]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn link_name(l: &LinkMessage) -> String {
    l.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

fn link_mac(l: &LinkMessage) -> Option<&[u8]> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(m) => Some(&m[..]),
        _ => None,
    })
}

fn address_of(a: &AddressMessage) -> Option<IpAddr> {
    // IPv4: Local is the interface's own address (Address the peer's on point-to-point).
    a.attributes
        .iter()
        .find_map(|x| match x {
            AddressAttribute::Local(ip) => Some(*ip),
            _ => None,
        })
        .or_else(|| {
            a.attributes.iter().find_map(|x| match x {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            })
        })
}

fn interfaces(nl: &mut Netlink) -> Result<Vec<Value>, RpcError> {
    let links = nl.links().map_err(|e| failed("listing links", e))?;
    let addrs = nl.addresses().map_err(|e| failed("listing addresses", e))?;
    Ok(links
        .iter()
        .map(|l| {
            let i = l.header.index;
            let mine: Vec<String> = addrs
                .iter()
                .filter(|a| a.header.index == i)
                .filter_map(|a| Some(format!("{}/{}", address_of(a)?, a.header.prefix_len)))
                .collect();
            json!({
                "name": link_name(l),
                "index": i,
                "mac": link_mac(l).map(mac_text),
                "mtu": l.attributes.iter().find_map(|a| match a { LinkAttribute::Mtu(m) => Some(*m), _ => None }),
                "up": l.header.flags.contains(LinkFlags::Up),
                "addresses": mine,
            })
        })
        .collect())
}

/// `list_interfaces`.
pub fn list_interfaces() -> Result<Value, RpcError> {
    Ok(json!(interfaces(&mut open()?)?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateInterface {
    /// Which interface: the one with this MAC.
    pub mac: String,
    pub name: Option<String>,
    pub mtu: Option<u32>,
    /// The interface's addresses, all of them (others are removed).
    pub addresses: Option<Vec<String>>,
    #[serde(default = "yes")]
    pub up: bool,
}

fn yes() -> bool {
    true
}

/// The longest interface name (`IFNAMSIZ` less its NUL).
pub const MAX_IFNAME: usize = 15;

/// An interface name `update_interface` gives: 1 to [`MAX_IFNAME`] bytes, no `/`, `:`, space
/// or NUL.
fn check_ifname(n: &str) -> Result<(), RpcError> {
    if n.is_empty() || n.len() > MAX_IFNAME || n.contains(['/', ':', ' ', '\0']) {
        return Err(bad(format!("name {} is not an interface name", quote(n))));
    }
    Ok(())
}

/// The MTUs `update_interface` sets.
pub const MTU: std::ops::RangeInclusive<u32> = 68..=65535;

/// `update_interface`, checked: the MAC and addresses parsed, the name and MTU in range. Made
/// only by its `TryFrom<UpdateInterface>`, in [`crate::server::Call::decode`]; whether the
/// interface is there is for [`update_interface`] to find out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckedInterface {
    mac: [u8; 6],
    name: Option<String>,
    mtu: Option<u32>,
    addresses: Option<Vec<(IpAddr, u8)>>,
    up: bool,
}

impl TryFrom<UpdateInterface> for CheckedInterface {
    type Error = RpcError;

    fn try_from(u: UpdateInterface) -> Result<CheckedInterface, RpcError> {
        let mac = parse_mac(&u.mac)?;
        let addresses = u
            .addresses
            .map(|a| a.iter().map(|a| parse_cidr(a)).collect::<Result<_, _>>())
            .transpose()?;
        if let Some(n) = &u.name {
            check_ifname(n)?;
        }
        if u.mtu.is_some_and(|m| !MTU.contains(&m)) {
            return Err(bad("mtu: 68..65535"));
        }
        Ok(CheckedInterface {
            mac,
            name: u.name,
            mtu: u.mtu,
            addresses,
            up: u.up,
        })
    }
}

impl CheckedInterface {
    /// Which interface: the one with this MAC.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Its new name: 1 to [`MAX_IFNAME`] bytes, no `/`, `:`, space or NUL.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// Its new MTU, in [`MTU`].
    pub fn mtu(&self) -> Option<u32> {
        self.mtu
    }

    /// All its addresses, with prefix lengths of their family.
    pub fn addresses(&self) -> Option<&[(IpAddr, u8)]> {
        self.addresses.as_deref()
    }

    pub fn up(&self) -> bool {
        self.up
    }
}

/// `update_interface`: returns the interface as it is afterwards.
pub fn update_interface(u: CheckedInterface) -> Result<Value, RpcError> {
    let mac = u.mac;
    let addrs: &[(IpAddr, u8)] = u.addresses.as_deref().unwrap_or_default();
    let mut nl = open()?;
    let links = nl.links().map_err(|e| failed("listing links", e))?;
    let l = links
        .iter()
        .find(|l| link_mac(l) == Some(&mac[..]))
        .ok_or_else(|| {
            RpcError::new(
                "not_found",
                format!("no interface with MAC {}", mac_text(&mac)),
            )
        })?;
    let (index, current) = (l.header.index, link_name(l));
    let mut attrs = Vec::new();
    if let Some(n) = u.name.as_ref().filter(|n| **n != current) {
        attrs.push(LinkAttribute::IfName(n.clone()));
    }
    attrs.extend(u.mtu.map(LinkAttribute::Mtu));
    if !attrs.is_empty() {
        // A rename needs the link down; an MTU change alone does not (and a link taken down
        // loses its routes).
        if u.name.as_ref().is_some_and(|n| *n != current) {
            nl.set_up(index, false)
                .map_err(|e| failed(&format!("{current} down"), e))?;
        }
        nl.set_link(index, attrs)
            .map_err(|e| failed(&format!("configuring {current}"), e))?;
    }
    if u.addresses.is_some() {
        let have = nl.addresses().map_err(|e| failed("listing addresses", e))?;
        for a in have.into_iter().filter(|a| a.header.index == index) {
            let keep = address_of(&a).is_some_and(|ip| addrs.contains(&(ip, a.header.prefix_len)));
            // IPv6 link-local addresses are the kernel's.
            let link_local = matches!(address_of(&a), Some(IpAddr::V6(v6)) if v6.segments()[0] & 0xffc0 == 0xfe80);
            if !keep && !link_local {
                // Deleting an IPv4 primary address deletes its secondaries too: one of those
                // is gone already (EADDRNOTAVAIL), and one that is wanted is added back below.
                match nl.del_address(a) {
                    Err(e) if e.raw_os_error() != Some(libc::EADDRNOTAVAIL) => {
                        return Err(failed("removing an address", e))
                    }
                    _ => {}
                }
            }
        }
        let have = nl.addresses().map_err(|e| failed("listing addresses", e))?;
        for (ip, p) in addrs {
            let present = have.iter().any(|a| {
                a.header.index == index && address_of(a) == Some(*ip) && a.header.prefix_len == *p
            });
            if !present {
                nl.add_address(index, *ip, *p)
                    .map_err(|e| failed(&format!("adding {ip}/{p}"), e))?;
            }
        }
    }
    nl.set_up(index, u.up)
        .map_err(|e| failed("setting the link state", e))?;
    interfaces(&mut nl)?
        .into_iter()
        .find(|i| i["index"] == index)
        .ok_or_else(|| RpcError::new("failed", "the interface went away"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// `10.0.0.0/8`, `fd00::/64`, or `default`: `0.0.0.0/0`, or `::/0` if the gateway is
    /// IPv6.
    pub dest: String,
    pub gateway: Option<String>,
    pub device: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateRoutes {
    pub routes: Vec<Route>,
    /// More devices whose routes are replaced by those of `routes` for them (none, if `routes`
    /// has none): how a device's last routes are removed.
    #[serde(default)]
    pub devices: Vec<String>,
}

fn route_dest(r: &RouteMessage) -> Option<IpAddr> {
    r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(v4)) => Some(IpAddr::V4(*v4)),
        RouteAttribute::Destination(RouteAddress::Inet6(v6)) => Some(IpAddr::V6(*v6)),
        _ => None,
    })
}

fn route_gateway(r: &RouteMessage) -> Option<IpAddr> {
    r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Gateway(RouteAddress::Inet(v4)) => Some(IpAddr::V4(*v4)),
        RouteAttribute::Gateway(RouteAddress::Inet6(v6)) => Some(IpAddr::V6(*v6)),
        _ => None,
    })
}

fn route_oif(r: &RouteMessage) -> Option<u32> {
    r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    })
}

fn route_metric(r: &RouteMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Priority(p) => Some(*p),
            _ => None,
        })
        .unwrap_or(0)
}

/// `r`'s family: IPv4 (`Some(true)`), IPv6 (`Some(false)`), other (`None`).
fn route_v4(r: &RouteMessage) -> Option<bool> {
    match r.header.address_family {
        AddressFamily::Inet => Some(true),
        AddressFamily::Inet6 => Some(false),
        _ => None,
    }
}

fn unspecified(v4: bool) -> IpAddr {
    if v4 {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        Ipv6Addr::UNSPECIFIED.into()
    }
}

/// `ip` with the host bits of `/prefix` cleared.
fn network(ip: IpAddr, prefix: u8) -> IpAddr {
    let p = u32::from(prefix);
    match ip {
        IpAddr::V4(a) => {
            let m = u32::MAX.checked_shl(32 - p.min(32)).unwrap_or(0);
            Ipv4Addr::from(u32::from(a) & m).into()
        }
        IpAddr::V6(a) => {
            let m = u128::MAX.checked_shl(128 - p.min(128)).unwrap_or(0);
            Ipv6Addr::from(u128::from(a) & m).into()
        }
    }
}

fn ifindex(name: &str) -> Result<u32, RpcError> {
    torii_netlink::ifindex(name)
        .map_err(|_| RpcError::new("not_found", format!("no network interface {}", quote(name))))
}

/// A plain route of the main table, as `update_routes` handles them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Spec {
    dst: IpAddr,
    prefix: u8,
    gw: Option<IpAddr>,
    oif: u32,
}

impl Spec {
    /// What `r` is, if it goes through one device.
    fn of(r: &RouteMessage) -> Option<Spec> {
        Some(Spec {
            dst: route_dest(r).unwrap_or(unspecified(route_v4(r)?)),
            prefix: r.header.destination_prefix_length,
            gw: route_gateway(r),
            oif: route_oif(r)?,
        })
    }

    /// The metric the kernel gives a route added without one.
    fn metric(&self) -> u32 {
        if self.dst.is_ipv4() {
            0
        } else {
            1024
        }
    }

    /// Whether `r` is in this route's place (destination, metric, TOS): the kernel takes one
    /// route there, to be replaced rather than added beside.
    fn same_place(&self, r: &RouteMessage) -> bool {
        route_v4(r) == Some(self.dst.is_ipv4())
            && route_dest(r).unwrap_or(unspecified(self.dst.is_ipv4())) == self.dst
            && r.header.destination_prefix_length == self.prefix
            && route_metric(r) == self.metric()
            && r.header.tos == 0
    }

    fn message(&self) -> RouteMessage {
        let mut m = RouteMessage::default();
        m.header.address_family = torii_netlink::family(self.dst);
        m.header.destination_prefix_length = self.prefix;
        m.header.table = RouteHeader::RT_TABLE_MAIN;
        m.header.protocol = RouteProtocol::Boot;
        m.header.scope = if self.gw.is_some() {
            RouteScope::Universe
        } else {
            RouteScope::Link
        };
        m.header.kind = RouteType::Unicast;
        if self.prefix > 0 {
            m.attributes
                .push(RouteAttribute::Destination(self.dst.into()));
        }
        if let Some(g) = self.gw {
            m.attributes.push(RouteAttribute::Gateway(g.into()));
        }
        m.attributes.push(RouteAttribute::Oif(self.oif));
        m
    }
}

fn link_names(nl: &mut Netlink) -> Result<Vec<(u32, String)>, RpcError> {
    Ok(nl
        .links()
        .map_err(|e| failed("listing links", e))?
        .iter()
        .map(|l| (l.header.index, link_name(l)))
        .collect())
}

/// A route for a message: `10.0.0.0/8 via 10.1.0.1 dev eth0`.
fn route_text(r: &RouteMessage, names: &[(u32, String)]) -> String {
    let dst = match (route_dest(r), route_v4(r)) {
        (Some(d), _) => format!("{d}/{}", r.header.destination_prefix_length),
        (None, Some(false)) => "default (IPv6)".into(),
        (None, _) => "default".into(),
    };
    let via = route_gateway(r)
        .map(|g| format!(" via {g}"))
        .unwrap_or_default();
    let dev = route_oif(r)
        .map(|i| match names.iter().find(|(x, _)| *x == i) {
            Some((_, n)) => format!(" dev {n}"),
            None => format!(" dev #{i}"),
        })
        .unwrap_or_default();
    format!("{dst}{via}{dev}")
}

fn routes(nl: &mut Netlink) -> Result<Vec<Value>, RpcError> {
    let names = link_names(nl)?;
    let name = |i: Option<u32>| {
        i.and_then(|i| names.iter().find(|(x, _)| *x == i).map(|(_, n)| n.clone()))
    };
    Ok(nl
        .routes()
        .map_err(|e| failed("listing routes", e))?
        .iter()
        .map(|r| {
            let p = r.header.destination_prefix_length;
            let dest = match route_dest(r) {
                Some(d) => format!("{d}/{p}"),
                None => "default".into(),
            };
            json!({
                "family": if route_v4(r) == Some(false) { "ipv6" } else { "ipv4" },
                "dest": dest,
                "gateway": route_gateway(r).map(|g| g.to_string()),
                "device": name(route_oif(r)),
                "kernel": r.header.protocol == RouteProtocol::Kernel,
            })
        })
        .collect())
}

/// `list_routes`: the main table.
pub fn list_routes() -> Result<Value, RpcError> {
    Ok(json!(routes(&mut open()?)?))
}

/// A route of `update_routes`, checked: the destination has no host bits set, the gateway
/// is of its family and can be one. Made only by [`CheckedRoutes`]'s `TryFrom<UpdateRoutes>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckedRoute {
    dst: IpAddr,
    prefix: u8,
    gw: Option<IpAddr>,
    device: String,
}

impl CheckedRoute {
    /// The destination network (`0.0.0.0` or `::` for a default route).
    pub fn dst(&self) -> IpAddr {
        self.dst
    }

    /// The destination's prefix length: up to 32 (IPv4) or 128 (IPv6); 0 for a default.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// The gateway: of the destination's family, neither unspecified nor multicast.
    pub fn gateway(&self) -> Option<IpAddr> {
        self.gw
    }

    /// The device, by name (looked up when the call runs).
    pub fn device(&self) -> &str {
        &self.device
    }
}

/// Checks a route: the destination has no host bits set, the gateway is of its family.
fn parse_route(r: Route) -> Result<CheckedRoute, RpcError> {
    let gw: Option<IpAddr> = r
        .gateway
        .as_deref()
        .map(|g| {
            g.parse()
                .map_err(|_| bad(format!("gateway {} is not an address", quote(g))))
        })
        .transpose()?;
    let (dst, prefix) = match r.dest.as_str() {
        "default" => (unspecified(!matches!(gw, Some(IpAddr::V6(_)))), 0),
        d => parse_cidr(d)?,
    };
    if let Some(g) = gw {
        if g.is_ipv4() != dst.is_ipv4() {
            return Err(bad(format!(
                "route {}: gateway {g} is of the other family",
                quote(&r.dest)
            )));
        }
        if g.is_unspecified() || g.is_multicast() {
            return Err(bad(format!("route {}: {g} is no gateway", quote(&r.dest))));
        }
    }
    let net = network(dst, prefix);
    if net != dst {
        return Err(bad(format!(
            "route {}: host bits are set (the network is {net}/{prefix})",
            quote(&r.dest)
        )));
    }
    Ok(CheckedRoute {
        dst,
        prefix,
        gw,
        device: r.device,
    })
}

/// `update_routes`, checked: each route as [`CheckedRoute`] says, no two to one destination.
/// Made only by its `TryFrom<UpdateRoutes>`, in [`crate::server::Call::decode`]; whether the
/// devices are there is for [`update_routes`] to find out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckedRoutes {
    routes: Vec<CheckedRoute>,
    devices: Vec<String>,
}

impl TryFrom<UpdateRoutes> for CheckedRoutes {
    type Error = RpcError;

    fn try_from(u: UpdateRoutes) -> Result<CheckedRoutes, RpcError> {
        let mut routes: Vec<CheckedRoute> = Vec::with_capacity(u.routes.len());
        // A frame holds up to some 100000 routes: their destinations are looked up, not
        // compared pairwise.
        let mut seen = std::collections::HashSet::with_capacity(u.routes.len());
        for r in u.routes {
            let r = parse_route(r)?;
            if !seen.insert((r.dst, r.prefix)) {
                return Err(bad(format!("two routes to {}/{}", r.dst, r.prefix)));
            }
            routes.push(r);
        }
        Ok(CheckedRoutes {
            routes,
            devices: u.devices,
        })
    }
}

impl CheckedRoutes {
    /// The routes, in the order given; no two to one destination.
    pub fn routes(&self) -> &[CheckedRoute] {
        &self.routes
    }

    /// The other devices named.
    pub fn devices(&self) -> &[String] {
        &self.devices
    }
}

/// The route message that puts `old` back, as a dump gave it.
fn restorable(old: &RouteMessage) -> RouteMessage {
    let mut m = old.clone();
    // Status flags (linkdown, offload, …) are the kernel's to set.
    m.header.flags = RouteFlags::empty();
    m.attributes.retain(|a| {
        matches!(
            a,
            RouteAttribute::Destination(_)
                | RouteAttribute::Source(_)
                | RouteAttribute::Gateway(_)
                | RouteAttribute::PrefSource(_)
                | RouteAttribute::Oif(_)
                | RouteAttribute::Priority(_)
                | RouteAttribute::Table(_)
                | RouteAttribute::Metrics(_)
                | RouteAttribute::Preference(_)
        )
    });
    m
}

/// `update_routes`: the routes of each device named (in `routes` or `devices`) become
/// exactly those given, besides the kernel's own. Everything is checked first (the routes
/// themselves in [`CheckedRoutes`], then the devices, then the table); the new routes
/// go in before the old ones go (a route in the place of an old one replaces it in one step),
/// and if the kernel refuses one, what was done is undone. Returns the main table afterwards.
pub fn update_routes(u: CheckedRoutes) -> Result<Value, RpcError> {
    let mut want = Vec::new();
    for r in &u.routes {
        want.push(Spec {
            dst: r.dst,
            prefix: r.prefix,
            gw: r.gw,
            oif: ifindex(&r.device)?,
        });
    }
    let mut devices: Vec<u32> = want.iter().map(|w| w.oif).collect();
    for d in &u.devices {
        devices.push(ifindex(d)?);
    }
    // On-link routes first: a gateway must be reachable when a route through it is added.
    want.sort_by_key(|w| w.gw.is_some());

    let mut nl = open()?;
    let names = link_names(&mut nl)?;
    let table = nl.routes().map_err(|e| failed("listing routes", e))?;
    let ours = |r: &RouteMessage| {
        r.header.protocol != RouteProtocol::Kernel
            && route_oif(r).is_some_and(|i| devices.contains(&i))
    };
    // Each route wanted is there already, takes the place of one of ours, or is added.
    let mut kept = vec![false; table.len()];
    let mut plan: Vec<(Spec, Option<usize>)> = Vec::new();
    for w in &want {
        match table.iter().position(|r| w.same_place(r)) {
            Some(i) if Spec::of(&table[i]) == Some(*w) => kept[i] = true,
            Some(i) if ours(&table[i]) => {
                kept[i] = true;
                plan.push((*w, Some(i)));
            }
            Some(i) => {
                return Err(RpcError::new(
                    "failed",
                    format!(
                        "{} is in the way: name its device too",
                        route_text(&table[i], &names)
                    ),
                ))
            }
            None => plan.push((*w, None)),
        }
    }
    let mut done: Vec<(Spec, Option<usize>)> = Vec::new();
    for (w, old) in plan {
        let how = if old.is_some() {
            NLM_F_REPLACE
        } else {
            NLM_F_EXCL
        };
        let r = nl.call(
            RouteNetlinkMessage::NewRoute(w.message()),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | how,
        );
        if let Err(e) = r {
            // Undo, newest first: a route replaced is put back, one added removed.
            let mut undo = Vec::new();
            for (w, old) in done.iter().rev() {
                let (msg, flags) = match old {
                    Some(i) => (
                        RouteNetlinkMessage::NewRoute(restorable(&table[*i])),
                        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
                    ),
                    None => (
                        RouteNetlinkMessage::DelRoute(w.message()),
                        NLM_F_REQUEST | NLM_F_ACK,
                    ),
                };
                if let Err(e) = nl.call(msg, flags) {
                    undo.push(format!("{}: {e}", route_text(&w.message(), &names)));
                }
            }
            let undo = if undo.is_empty() {
                "nothing was changed".to_string()
            } else {
                format!("undoing failed for {}", undo.join(", "))
            };
            return Err(RpcError::new(
                "failed",
                format!("adding {}: {e}; {undo}", route_text(&w.message(), &names)),
            ));
        }
        done.push((w, old));
    }
    // Then the old routes go, those through a gateway first.
    let mut gone: Vec<&RouteMessage> = table
        .iter()
        .zip(&kept)
        .filter(|(r, k)| !**k && ours(r))
        .map(|(r, _)| r)
        .collect();
    gone.sort_by_key(|r| route_gateway(r).is_none());
    let mut left = Vec::new();
    for r in gone {
        match nl.del_route(r.clone()) {
            Err(e) if !matches!(e.raw_os_error(), Some(libc::ESRCH | libc::ENOENT)) => {
                left.push(format!("{}: {e}", route_text(r, &names)))
            }
            _ => {}
        }
    }
    if !left.is_empty() {
        return Err(RpcError::new(
            "failed",
            format!(
                "the new routes are in place, but old ones could not be removed: {}",
                left.join(", ")
            ),
        ));
    }
    Ok(json!(routes(&mut nl)?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Neighbor {
    pub ip: String,
    pub mac: String,
    pub device: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddNeighbors {
    pub neighbors: Vec<Neighbor>,
}

/// A neighbour entry of `add_arp_neighbors`, checked: its address and MAC parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckedNeighbor {
    ip: IpAddr,
    mac: [u8; 6],
    device: String,
}

impl CheckedNeighbor {
    pub fn ip(&self) -> IpAddr {
        self.ip
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The device, by name (looked up when the call runs).
    pub fn device(&self) -> &str {
        &self.device
    }
}

/// `add_arp_neighbors`, checked: every entry parsed. Made only by its
/// `TryFrom<AddNeighbors>`, in [`crate::server::Call::decode`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckedNeighbors(Vec<CheckedNeighbor>);

impl TryFrom<AddNeighbors> for CheckedNeighbors {
    type Error = RpcError;

    fn try_from(a: AddNeighbors) -> Result<CheckedNeighbors, RpcError> {
        a.neighbors
            .into_iter()
            .map(|n| {
                let ip: IpAddr =
                    n.ip.parse()
                        .map_err(|_| bad(format!("{} is not an address", quote(&n.ip))))?;
                Ok(CheckedNeighbor {
                    ip,
                    mac: parse_mac(&n.mac)?,
                    device: n.device,
                })
            })
            .collect::<Result<_, _>>()
            .map(CheckedNeighbors)
    }
}

impl CheckedNeighbors {
    pub fn neighbors(&self) -> &[CheckedNeighbor] {
        &self.0
    }
}

/// `add_arp_neighbors`: permanent entries, replacing what is there.
pub fn add_arp_neighbors(a: CheckedNeighbors) -> Result<Value, RpcError> {
    let mut nl = open()?;
    for n in &a.0 {
        let i = ifindex(&n.device)?;
        nl.set_neighbour(i, n.ip, n.mac)
            .map_err(|e| failed(&format!("neighbour {} on {}", n.ip, n.device), e))?;
    }
    Ok(json!({}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_and_macs_are_checked() {
        assert_eq!(parse_cidr("10.0.0.2/24").unwrap().1, 24);
        assert!(parse_cidr("fd00::1/64").is_ok());
        for bad in [
            "10.0.0.2",
            "10.0.0.2/33",
            "fd00::1/129",
            "x/1",
            "10.0.0.2/-1",
        ] {
            assert!(parse_cidr(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_mac("02:00:00:AA:bb:01").unwrap(),
            [2, 0, 0, 0xaa, 0xbb, 1]
        );
        for bad in [
            "02:00:00:aa:bb",
            "02:00:00:aa:bb:01:02",
            "2:0:0:aa:bb:1",
            "zz:00:00:00:00:00",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
    }

    /// What `update_interface`, `update_routes` and `add_arp_neighbors` refuse without looking
    /// at the system is refused by [`Call::decode`], with the words the calls used to answer
    /// with when run (the first thing wrong, in the order they looked).
    #[test]
    fn decode_refuses_bad_addresses_macs_names_mtus_and_routes() {
        use crate::server::Call;
        let iface = |extra: Value| {
            let mut p = json!({"mac": "02:00:00:00:50:02"});
            if let (Some(p), Some(e)) = (p.as_object_mut(), extra.as_object()) {
                p.extend(e.clone());
            }
            p
        };
        let routes = |r: Value| json!({"routes": r});
        let cidr = |s: &str| format!("{s:?} is not an address with a prefix length (10.0.0.2/24)");
        for (method, params, message) in [
            (
                "update_interface",
                json!({"mac": "02:00:00:aa:bb"}),
                "\"02:00:00:aa:bb\" is not a MAC address".to_string(),
            ),
            (
                "update_interface",
                json!({"mac": "2:0:0:aa:bb:1", "name": "a/b"}),
                "\"2:0:0:aa:bb:1\" is not a MAC address".into(),
            ),
            (
                "update_interface",
                iface(json!({"addresses": ["10.50.0.4/24", "10.50.0.5/99"], "mtu": 1})),
                cidr("10.50.0.5/99"),
            ),
            (
                "update_interface",
                iface(json!({"addresses": ["fd00::1"]})),
                cidr("fd00::1"),
            ),
            (
                "update_interface",
                iface(json!({"name": "a/b", "mtu": 1})),
                "name \"a/b\" is not an interface name".into(),
            ),
            (
                "update_interface",
                iface(json!({"name": ""})),
                "name \"\" is not an interface name".into(),
            ),
            (
                "update_interface",
                iface(json!({"name": "abcdefghijklmnop"})),
                "name \"abcdefghijklmnop\" is not an interface name".into(),
            ),
            (
                "update_interface",
                iface(json!({"name": "eth 0"})),
                "name \"eth 0\" is not an interface name".into(),
            ),
            (
                "update_interface",
                iface(json!({"name": "eth0:1"})),
                "name \"eth0:1\" is not an interface name".into(),
            ),
            (
                "update_interface",
                iface(json!({"mtu": 67})),
                "mtu: 68..65535".into(),
            ),
            (
                "update_interface",
                iface(json!({"mtu": 65536})),
                "mtu: 68..65535".into(),
            ),
            (
                "update_routes",
                routes(json!([{"dest": "default", "gateway": "x", "device": "eth7"}])),
                "gateway \"x\" is not an address".into(),
            ),
            (
                "update_routes",
                routes(json!([{"dest": "10.80.0.0", "device": "eth7"}])),
                cidr("10.80.0.0"),
            ),
            (
                "update_routes",
                routes(json!([{"dest": "10.80.0.0/16", "gateway": "fd00::1", "device": "eth7"}])),
                "route \"10.80.0.0/16\": gateway fd00::1 is of the other family".into(),
            ),
            (
                "update_routes",
                routes(json!([{"dest": "default", "gateway": "0.0.0.0", "device": "eth7"}])),
                "route \"default\": 0.0.0.0 is no gateway".into(),
            ),
            (
                "update_routes",
                routes(json!([{"dest": "default", "gateway": "ff02::1", "device": "eth7"}])),
                "route \"default\": ff02::1 is no gateway".into(),
            ),
            (
                "update_routes",
                routes(json!([{"dest": "10.80.0.1/16", "device": "eth7"}])),
                "route \"10.80.0.1/16\": host bits are set (the network is 10.80.0.0/16)".into(),
            ),
            (
                "update_routes",
                routes(json!([{"dest": "fd00:1::1/64", "device": "eth7"}])),
                "route \"fd00:1::1/64\": host bits are set (the network is fd00:1::/64)".into(),
            ),
            (
                "update_routes",
                routes(json!([
                    {"dest": "10.80.0.0/16", "device": "eth7"},
                    {"dest": "10.80.0.0/16", "gateway": "10.50.0.1", "device": "eth8"}])),
                "two routes to 10.80.0.0/16".into(),
            ),
            (
                "update_routes",
                routes(json!([
                    {"dest": "default", "gateway": "10.50.0.1", "device": "eth7"},
                    {"dest": "0.0.0.0/0", "device": "eth8"}])),
                "two routes to 0.0.0.0/0".into(),
            ),
            (
                "add_arp_neighbors",
                json!({"neighbors": [
                    {"ip": "10.50.0.9", "mac": "02:00:00:00:00:09", "device": "eth7"},
                    {"ip": "10.50.0.300", "mac": "02:00:00:00:00:0a", "device": "eth7"}]}),
                "\"10.50.0.300\" is not an address".into(),
            ),
            (
                "add_arp_neighbors",
                json!({"neighbors": [{"ip": "10.50.0.9", "mac": "zz:00:00:00:00:00", "device": "eth7"}]}),
                "\"zz:00:00:00:00:00\" is not a MAC address".into(),
            ),
        ] {
            let e = Call::decode(method, params.clone()).unwrap_err();
            assert_eq!(
                (e.code.as_str(), e.message.as_str()),
                ("bad_params", message.as_str()),
                "{method} {params}"
            );
        }
        // Decoded: parsed; IPv6 defaults; the devices are for the run to look up.
        let Ok(Call::UpdateInterface(i)) = Call::decode(
            "update_interface",
            iface(json!({"name": "eth7", "mtu": 68, "addresses": ["fd00::2/64"], "up": false})),
        ) else {
            panic!("not decoded");
        };
        assert_eq!(i.mac(), [2, 0, 0, 0, 0x50, 2]);
        assert_eq!((i.name(), i.mtu(), i.up()), (Some("eth7"), Some(68), false));
        assert_eq!(i.addresses(), Some(&[("fd00::2".parse().unwrap(), 64)][..]));
        let Ok(Call::UpdateRoutes(r)) = Call::decode(
            "update_routes",
            json!({"routes": [{"dest": "default", "gateway": "fd00::1", "device": "nosuch0"}],
                "devices": ["nosuch1"]}),
        ) else {
            panic!("not decoded");
        };
        let d = &r.routes()[0];
        assert_eq!(
            (d.dst(), d.prefix(), d.gateway(), d.device()),
            (
                Ipv6Addr::UNSPECIFIED.into(),
                0,
                Some("fd00::1".parse().unwrap()),
                "nosuch0"
            )
        );
        assert_eq!(r.devices(), ["nosuch1"]);
    }
}
