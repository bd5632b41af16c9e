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

/// `update_interface`: returns the interface as it is afterwards.
pub fn update_interface(u: UpdateInterface) -> Result<Value, RpcError> {
    let mac = parse_mac(&u.mac)?;
    let addrs: Vec<(IpAddr, u8)> = u
        .addresses
        .iter()
        .flatten()
        .map(|a| parse_cidr(a))
        .collect::<Result<_, _>>()?;
    if let Some(n) = &u.name {
        if n.is_empty() || n.len() > 15 || n.contains(['/', ':', ' ', '\0']) {
            return Err(bad(format!("name {} is not an interface name", quote(n))));
        }
    }
    if u.mtu.is_some_and(|m| !(68..=65535).contains(&m)) {
        return Err(bad("mtu: 68..65535"));
    }
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
        for (ip, p) in &addrs {
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

/// Checks a route: the destination has no host bits set, the gateway is of its family.
fn parse_route(r: &Route) -> Result<(IpAddr, u8, Option<IpAddr>), RpcError> {
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
    Ok((dst, prefix, gw))
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
/// exactly those given, besides the kernel's own. Everything is checked first; the new routes
/// go in before the old ones go (a route in the place of an old one replaces it in one step),
/// and if the kernel refuses one, what was done is undone. Returns the main table afterwards.
pub fn update_routes(u: UpdateRoutes) -> Result<Value, RpcError> {
    let mut parsed = Vec::new();
    for r in &u.routes {
        let (dst, prefix, gw) = parse_route(r)?;
        if parsed
            .iter()
            .any(|(d, p, _, _): &(IpAddr, u8, _, _)| (*d, *p) == (dst, prefix))
        {
            return Err(bad(format!("two routes to {dst}/{prefix}")));
        }
        parsed.push((dst, prefix, gw, r.device.as_str()));
    }
    let mut want = Vec::new();
    for (dst, prefix, gw, dev) in parsed {
        want.push(Spec {
            dst,
            prefix,
            gw,
            oif: ifindex(dev)?,
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

/// `add_arp_neighbors`: permanent entries, replacing what is there.
pub fn add_arp_neighbors(a: AddNeighbors) -> Result<Value, RpcError> {
    let mut parsed = Vec::new();
    for n in &a.neighbors {
        let ip: IpAddr =
            n.ip.parse()
                .map_err(|_| bad(format!("{} is not an address", quote(&n.ip))))?;
        parsed.push((ip, parse_mac(&n.mac)?, n.device.clone()));
    }
    let mut nl = open()?;
    for (ip, mac, dev) in parsed {
        let i = ifindex(&dev)?;
        nl.set_neighbour(i, ip, mac)
            .map_err(|e| failed(&format!("neighbour {ip} on {dev}"), e))?;
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
}
