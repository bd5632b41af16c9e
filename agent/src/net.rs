//! The guest's network side, through rtnetlink: list the interfaces and routes, configure an
//! interface found by its MAC (name, MTU, addresses, up), replace the routes of interfaces,
//! add permanent neighbour entries. What the host sends is checked whole before anything
//! changes.

use std::net::IpAddr;

use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol};
use serde::Deserialize;
use serde_json::{json, Value};
use torii_netlink::netlink_packet_route;
use torii_netlink::Netlink;

use crate::protocol::RpcError;

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
            "{s:?} is not an address with a prefix length (10.0.0.2/24)"
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
        .ok_or_else(|| bad(format!("{s:?} is not a MAC address")))?;
    b.try_into()
        .map_err(|_| bad(format!("{s:?} is not a MAC address")))
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
            return Err(bad(format!("name {n:?} is not an interface name")));
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
        .ok_or_else(|| RpcError::new("not_found", format!("no interface with MAC {}", u.mac)))?;
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
                nl.del_address(a)
                    .map_err(|e| failed("removing an address", e))?;
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
    /// `10.0.0.0/8`, or `default` (`0.0.0.0/0`).
    pub dest: String,
    pub gateway: Option<String>,
    pub device: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateRoutes {
    pub routes: Vec<Route>,
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

fn routes(nl: &mut Netlink) -> Result<Vec<Value>, RpcError> {
    let names: Vec<(u32, String)> = nl
        .links()
        .map_err(|e| failed("listing links", e))?
        .iter()
        .map(|l| (l.header.index, link_name(l)))
        .collect();
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

/// `update_routes`: the routes of each device named become exactly those given (the kernel's
/// own, for the devices' subnets, stay). Returns the main table afterwards.
pub fn update_routes(u: UpdateRoutes) -> Result<Value, RpcError> {
    let mut parsed = Vec::new();
    for r in &u.routes {
        let (dst, p) = match r.dest.as_str() {
            "default" => (None, 0),
            d => {
                let (ip, p) = parse_cidr(d)?;
                (Some(ip), p)
            }
        };
        let gw: Option<IpAddr> = r
            .gateway
            .as_deref()
            .map(|g| {
                g.parse()
                    .map_err(|_| bad(format!("gateway {g:?} is not an address")))
            })
            .transpose()?;
        if let (Some(d), Some(g)) = (dst, gw) {
            if d.is_ipv4() != g.is_ipv4() {
                return Err(bad(format!(
                    "route {}: gateway of the other family",
                    r.dest
                )));
            }
        }
        parsed.push((dst, p, gw, r.device.clone()));
    }
    let mut nl = open()?;
    let mut devices = Vec::new();
    for (_, _, _, d) in &parsed {
        let i = torii_netlink::ifindex(d).map_err(|e| RpcError::new("not_found", e.to_string()))?;
        if !devices.contains(&i) {
            devices.push(i);
        }
    }
    let old = nl.routes().map_err(|e| failed("listing routes", e))?;
    for r in old {
        if r.header.protocol != RouteProtocol::Kernel
            && route_oif(&r).is_some_and(|i| devices.contains(&i))
        {
            nl.del_route(r).map_err(|e| failed("removing a route", e))?;
        }
    }
    for (dst, p, gw, dev) in &parsed {
        let i =
            torii_netlink::ifindex(dev).map_err(|e| RpcError::new("not_found", e.to_string()))?;
        let family_of = dst.or(*gw).unwrap_or(IpAddr::from([0, 0, 0, 0]));
        let dst = dst.unwrap_or(if family_of.is_ipv4() {
            IpAddr::from([0, 0, 0, 0])
        } else {
            IpAddr::from([0u16; 8])
        });
        nl.add_route(dst, *p, *gw, i)
            .map_err(|e| failed(&format!("adding the route to {dst}/{p} via {dev}"), e))?;
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
                .map_err(|_| bad(format!("{:?} is not an address", n.ip)))?;
        parsed.push((ip, parse_mac(&n.mac)?, n.device.clone()));
    }
    let mut nl = open()?;
    for (ip, mac, dev) in parsed {
        let i =
            torii_netlink::ifindex(&dev).map_err(|e| RpcError::new("not_found", e.to_string()))?;
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
