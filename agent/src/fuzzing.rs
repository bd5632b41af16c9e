//! The body of the `agent_frames` fuzz target (fuzz/fuzz_targets/agent_frames.rs) and its
//! seeds: a byte stream from the host, read as [`crate::server::serve`] reads it and every
//! request decoded ([`Call::decode`]) — never run: nothing here starts a process, mounts,
//! touches an interface or spawns a thread.

use std::io::Cursor;
use std::net::IpAddr;
use std::path::{Component, Path};

use serde_json::{json, Value};

use crate::protocol::{
    answer, encode, read_frame, write_frame, FrameError, RpcError, MAX_FRAME, MAX_MESSAGE,
};
use crate::server::{next_incoming, Call, Incoming};
use crate::{block, filesystems, net, process};

/// The error codes of docs/agent-protocol.md.
const CODES: [&str; 7] = [
    "bad_frame",
    "bad_request",
    "unknown_method",
    "bad_params",
    "not_found",
    "busy",
    "failed",
];

/// Reads `data` as the host's stream, frame after frame until its end or a frame that ends
/// the connection, as [`crate::server::serve`] does, and decodes each request. Checks that no
/// frame is taken over [`MAX_FRAME`], that every answer (the decoded calls get a stand-in
/// result) goes out as a frame `write_frame` accepts and the host reads back, with the id it
/// must have and a bounded error; that a request refused is refused for its parameters; and
/// that every call decoded keeps the promises of its checked type — routes with no host bits
/// and a gateway of their family, no two to one destination; MACs, addresses, interface names
/// and MTUs in range; argv, env, cwd and root that can be C strings, a program name, a PATH;
/// a signal in 1..64; absolute paths without NUL (without `..` for a mount's target); a disk's
/// serial, PCI address (sysfs's form) or path; mount flags, propagation and file system
/// options that fit the file system type (a bind: `MS_BIND` alone, its flags remounted) —
/// and, sent back as the host would, decodes to the same call. Returns how many requests were
/// decoded.
pub fn fuzz_frames(data: &[u8]) -> usize {
    let mut r = Cursor::new(data);
    let mut decoded = 0;
    loop {
        let at = r.position();
        let step = next_incoming(&mut r);
        let took = (r.position() - at) as usize;
        assert!(took <= 4 + MAX_FRAME, "a frame of {took} bytes was read");
        match step {
            Incoming::End => {
                assert_eq!(took, 0, "the end of the stream inside a frame");
                return decoded;
            }
            Incoming::Refused(a) => send(&a, None),
            Incoming::Broken(a, e) => {
                if let FrameError::TooLarge(n) = e {
                    assert!(n > MAX_FRAME);
                    // Refused on its length alone: nothing read (or allocated) for it.
                    assert_eq!(took, 4);
                }
                send(&a, Some(None));
                return decoded;
            }
            Incoming::Request(req) => {
                assert!(took > 4, "a request from an empty frame");
                let (id, method) = (req.id, req.method);
                let r = match Call::decode(&method, req.params) {
                    Ok(call) => {
                        decoded += 1;
                        assert_eq!(call.method(), method);
                        check_call(&call);
                        // A stand-in for the result: the call is not run.
                        Ok(json!({ "method": call.method() }))
                    }
                    Err(e) => {
                        // Refused for its parameters (an empty program name as resolving it
                        // always answered that).
                        assert!(
                            matches!(e.code.as_str(), "unknown_method" | "bad_params")
                                || (method == "start_process"
                                    && e.code == "failed"
                                    && e.message.ends_with("the program name is empty")),
                            "{e}"
                        );
                        Err(e)
                    }
                };
                send(&answer(Some(id), r), Some(Some(id)));
            }
        }
    }
}

/// Sends answer `a` as the connection's writer would, and reads it as the host would.
/// `id`: the id it must carry (`Some(None)`: null), if known.
fn send(a: &Value, id: Option<Option<u64>>) {
    // Answers always have an id (null for a frame whose id could not be read): never dropped.
    let payload = encode(a).expect("an answer is never dropped");
    let mut wire = Vec::new();
    write_frame(&mut wire, &payload).expect("an encoded answer fits a frame");
    let back = read_frame(&mut &wire[..]).expect("the host reads the answer's frame");
    assert_eq!(back, payload);
    let v: Value = serde_json::from_slice(&back).expect("an answer is JSON");
    assert!(v["id"].is_null() || v["id"].is_u64(), "{v}");
    if let Some(id) = id {
        assert_eq!(v["id"], json!(id), "{v}");
    }
    match (v.get("result"), v.get("error")) {
        (Some(_), None) => {}
        (None, Some(e)) => {
            let e: RpcError = serde_json::from_value(e.clone()).expect("an error's shape");
            assert!(CODES.contains(&e.code.as_str()), "{e}");
            assert!(e.message.chars().count() <= MAX_MESSAGE + 1, "{e}");
        }
        _ => panic!("an answer has a result or an error: {v}"),
    }
}

fn mac_text(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// `parse_mac` as the network calls use it: a MAC it takes reads back the same.
fn check_mac(m: [u8; 6]) {
    assert_eq!(net::parse_mac(&mac_text(&m)).ok(), Some(m), "{m:?}");
}

/// An address with a prefix length of its family, that reads back the same.
fn check_cidr(ip: IpAddr, prefix: u8) {
    assert!(
        prefix <= if ip.is_ipv4() { 32 } else { 128 },
        "{ip}/{prefix}"
    );
    let again = net::parse_cidr(&format!("{ip}/{prefix}")).expect("a CIDR reads back");
    assert_eq!(again, (ip, prefix));
}

/// Whether `ip`'s bits after the first `prefix` are all zero (worked out apart from the
/// agent's own `network`).
fn host_bits_clear(ip: IpAddr, prefix: u8) -> bool {
    match ip {
        IpAddr::V4(a) => u64::from(u32::from(a))
            .checked_shl(u32::from(prefix))
            .is_none_or(|rest| rest & u64::from(u32::MAX) == 0),
        IpAddr::V6(a) => u128::from(a)
            .checked_shl(u32::from(prefix))
            .is_none_or(|rest| rest == 0),
    }
}

/// A string that can go to the kernel as a C string.
fn c_string(what: &str, s: &str) {
    assert!(!s.contains('\0'), "{what} {s:?}");
    assert!(std::ffi::CString::new(s).is_ok(), "{what} {s:?}");
}

/// An absolute path with no NUL.
fn check_absolute(what: &str, p: &Path) {
    let s = p.to_str().expect("a path from a str");
    assert!(s.starts_with('/'), "{what} {s:?}");
    c_string(what, s);
}

/// A call, decoded: `Call::decode` of `method` with `params` must give it again (what the
/// checks make of a request is already in the form they take).
fn decodes_again(method: &str, params: Value, call: &Call, same: impl Fn(&Call) -> bool) {
    match Call::decode(method, params.clone()) {
        Ok(again) => assert!(same(&again), "{method} {params}: {again:?} for {call:?}"),
        Err(e) => panic!("{method} {params}: {e}, sent back as decoded"),
    }
}

fn check_start(s: &process::CheckedStart) {
    let program = s.argv().first().expect("a program");
    assert!(!program.is_empty());
    assert_eq!(s.program(), program);
    s.argv().iter().for_each(|a| c_string("argv", a));
    for (k, v) in s.env() {
        assert!(!k.is_empty() && !k.contains('='), "env {k:?}");
        c_string("env", k);
        c_string("env", v);
    }
    // The program is looked for in the PATH it will have.
    let last = s.env().iter().rev().find(|(k, _)| k == "PATH");
    assert_eq!(last.map(|(_, v)| v.as_str()), Some(s.path()));
    if let Some(r) = s.root() {
        check_absolute("root", Path::new(r));
        assert!(!r.contains(':'), "root {r:?}");
    }
    if let Some(d) = s.cwd() {
        c_string("cwd", d);
    }
    let env: Vec<String> = s.env().iter().map(|(k, v)| format!("{k}={v}")).collect();
    let params = json!({"argv": s.argv(), "env": env, "cwd": s.cwd(), "stdin": s.stdin(),
        "root": s.root()});
    let call = Call::StartProcess(s.clone());
    decodes_again(
        "start_process",
        params,
        &call,
        |c| matches!(c, Call::StartProcess(again) if again == s),
    );
}

fn check_interface(u: &net::CheckedInterface) {
    check_mac(u.mac());
    if let Some(n) = u.name() {
        assert!((1..=net::MAX_IFNAME).contains(&n.len()), "name {n:?}");
        assert!(!n.contains(['/', ':', ' ', '\0']), "name {n:?}");
    }
    if let Some(m) = u.mtu() {
        assert!((68..=65535).contains(&m), "mtu {m}");
    }
    for &(ip, p) in u.addresses().into_iter().flatten() {
        check_cidr(ip, p);
    }
    let addresses = u.addresses().map(|a| {
        a.iter()
            .map(|(ip, p)| format!("{ip}/{p}"))
            .collect::<Vec<_>>()
    });
    let params = json!({"mac": mac_text(&u.mac()), "name": u.name(), "mtu": u.mtu(),
        "addresses": addresses, "up": u.up()});
    let call = Call::UpdateInterface(u.clone());
    decodes_again(
        "update_interface",
        params,
        &call,
        |c| matches!(c, Call::UpdateInterface(again) if again == u),
    );
}

fn check_routes(u: &net::CheckedRoutes) {
    let mut seen = std::collections::HashSet::new();
    for r in u.routes() {
        let (dst, prefix) = (r.dst(), r.prefix());
        check_cidr(dst, prefix);
        assert!(host_bits_clear(dst, prefix), "{dst}/{prefix}");
        assert!(seen.insert((dst, prefix)), "two routes to {dst}/{prefix}");
        if let Some(g) = r.gateway() {
            assert_eq!(g.is_ipv4(), dst.is_ipv4(), "{dst}/{prefix} via {g}");
            assert!(!g.is_unspecified() && !g.is_multicast(), "via {g}");
        }
    }
    let routes: Vec<Value> = u
        .routes()
        .iter()
        .map(|r| {
            json!({"dest": format!("{}/{}", r.dst(), r.prefix()), "gateway": r.gateway(),
                "device": r.device()})
        })
        .collect();
    let params = json!({"routes": routes, "devices": u.devices()});
    let call = Call::UpdateRoutes(u.clone());
    decodes_again(
        "update_routes",
        params,
        &call,
        |c| matches!(c, Call::UpdateRoutes(again) if again == u),
    );
}

fn check_neighbors(a: &net::CheckedNeighbors) {
    a.neighbors().iter().for_each(|n| check_mac(n.mac()));
    let neighbors: Vec<Value> = a
        .neighbors()
        .iter()
        .map(|n| json!({"ip": n.ip(), "mac": mac_text(&n.mac()), "device": n.device()}))
        .collect();
    let call = Call::AddArpNeighbors(a.clone());
    decodes_again(
        "add_arp_neighbors",
        json!({ "neighbors": neighbors }),
        &call,
        |c| matches!(c, Call::AddArpNeighbors(again) if again == a),
    );
}

/// Mount flags and propagation as parsed: each known one a flag or a propagation, the atime
/// options exclusive; the file system's options without empty ones, and no NUL.
fn check_options(flags: libc::c_ulong, propagation: &[libc::c_ulong], data: &str) {
    use libc::*;
    let atime = flags & (MS_NOATIME | MS_RELATIME | MS_STRICTATIME);
    assert!(atime.count_ones() <= 1, "{flags:#x}");
    let known = MS_RDONLY
        | MS_NOSUID
        | MS_NODEV
        | MS_NOEXEC
        | MS_SYNCHRONOUS
        | MS_DIRSYNC
        | MS_NOATIME
        | MS_RELATIME
        | MS_STRICTATIME
        | MS_NODIRATIME
        | MS_LAZYTIME
        | MS_NOSYMFOLLOW
        | MS_BIND
        | MS_REC;
    assert_eq!(flags & !known, 0, "{flags:#x}");
    let kinds = MS_PRIVATE | MS_SHARED | MS_SLAVE | MS_UNBINDABLE;
    for p in propagation {
        assert_eq!(p & !(kinds | MS_REC), 0, "{p:#x}");
        assert_eq!((p & kinds).count_ones(), 1, "{p:#x}");
    }
    assert!(
        data.is_empty() || data.split(',').all(|d| !d.is_empty()),
        "{data:?}"
    );
    c_string("options", data);
}

fn check_mount_block(m: &block::CheckedMountBlock) {
    match m.disk().source() {
        block::Source::Serial(s) => assert!((1..=block::MAX_SERIAL).contains(&s.len()), "{s:?}"),
        block::Source::Pci(a) => {
            // In sysfs's form: a name in /sys/bus/pci/devices, never a way out of it.
            assert_eq!(a.len(), 12, "{a:?}");
            assert_eq!(block::pci_address(a).as_ref(), Some(a), "{a:?}");
            assert!(
                a.bytes().all(|b| b.is_ascii_digit()
                    || (b'a'..=b'f').contains(&b)
                    || b":.".contains(&b)),
                "{a:?}"
            );
            assert!(!a.contains(".."), "{a:?}");
        }
        block::Source::Path(p) => check_absolute("source", Path::new(p)),
    }
    check_absolute("target", m.target());
    let f = m.fstype();
    assert!((1..=block::MAX_FSTYPE).contains(&f.len()), "{f:?}");
    assert!(
        f.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)),
        "{f:?}"
    );
    // Not a bind: those are `mount`'s.
    assert_eq!(
        m.flags() & (libc::MS_BIND | libc::MS_REC),
        0,
        "{:#x}",
        m.flags()
    );
    check_options(m.flags(), &[], m.data());
}

fn check_mount(m: &filesystems::CheckedMount) {
    use libc::{MS_BIND, MS_REC};
    check_absolute("root", m.root());
    check_absolute("target", m.target());
    assert!(
        m.target().components().all(|c| c != Component::ParentDir),
        "{:?}",
        m.target()
    );
    c_string("source", m.source());
    check_options(m.flags() | m.remount(), m.propagation(), m.data());
    if m.bind() {
        // A bind: of an absolute path, MS_BIND (and MS_REC) alone, its flags set by a remount,
        // no file system options.
        check_absolute("bind source", Path::new(m.source()));
        assert_eq!(m.fstype(), "");
        assert_eq!(m.flags() & !MS_REC, MS_BIND, "{:#x}", m.flags());
        assert_eq!(m.remount() & (MS_BIND | MS_REC), 0, "{:#x}", m.remount());
        assert_eq!(m.data(), "");
    } else {
        assert!(
            filesystems::FSTYPES.contains(&m.fstype()) && !matches!(m.fstype(), "bind" | "none"),
            "{:?}",
            m.fstype()
        );
        assert_eq!(m.flags() & MS_BIND, 0, "{:#x}", m.flags());
        assert_eq!(m.remount(), 0);
    }
}

/// What the checks promise of what they let through, on what was decoded.
fn check_call(call: &Call) {
    match call {
        Call::WriteStdin { data, .. } => assert!(data.len() <= MAX_FRAME),
        Call::StartProcess(s) => check_start(s),
        Call::KillProcess { signal, .. } => assert!((1..=64).contains(&signal.number())),
        Call::UpdateInterface(u) => check_interface(u),
        Call::UpdateRoutes(u) => check_routes(u),
        Call::AddArpNeighbors(a) => check_neighbors(a),
        Call::MountBlock(m) => check_mount_block(m),
        Call::Mount(m) => check_mount(m),
        Call::Unmount(u) => check_absolute("target", u.target()),
        Call::SetupHugepages(h) => check_absolute("mount", h.mount()),
        Call::Version
        | Call::Health
        | Call::WaitProcess { .. }
        | Call::CloseStdin { .. }
        | Call::Metrics
        | Call::ListInterfaces
        | Call::ListRoutes
        | Call::Shutdown => {}
    }
}

/// One frame of request `id`.
fn frame(id: u64, method: &str, params: Value) -> Vec<u8> {
    let mut req = json!({ "id": id, "method": method });
    if !params.is_null() {
        req["params"] = params;
    }
    let payload = serde_json::to_vec(&req).expect("JSON");
    let mut f = Vec::new();
    write_frame(&mut f, &payload).expect("a small frame");
    f
}

/// Well-formed requests: every method, with the parameters the host sends.
fn requests() -> Vec<(&'static str, Value)> {
    vec![
        ("version", json!({})),
        ("health", Value::Null),
        (
            "start_process",
            json!({"argv": ["sh", "-c", "echo $GREETING; pwd"], "env": ["GREETING=hi",
                "PATH=/usr/bin:/bin"], "cwd": "/tmp", "stdin": true}),
        ),
        (
            "start_process",
            json!({"argv": ["/usr/bin/nginx", "-g", "daemon off;"],
                "root": "/run/torii/containers/web/rootfs", "cwd": "/"}),
        ),
        ("wait_process", json!({"process": "p1"})),
        ("kill_process", json!({"process": "p1", "signal": 9})),
        ("kill_process", json!({"process": "p2"})),
        (
            "write_stdin",
            json!({"process": "p1", "data": "aGVsbG8gZnJvbSB0aGUgaG9zdAo="}),
        ),
        ("close_stdin", json!({"process": "p1"})),
        ("metrics", json!({})),
        ("list_interfaces", json!({})),
        (
            "update_interface",
            json!({"mac": "02:00:00:00:50:02", "name": "eth7", "mtu": 1400,
                "addresses": ["10.50.0.3/24", "fd00:50::2/64"], "up": true}),
        ),
        (
            "update_interface",
            json!({"mac": "02:00:00:00:50:03", "up": false}),
        ),
        ("list_routes", Value::Null),
        (
            "update_routes",
            json!({"routes": [
                {"dest": "default", "gateway": "10.50.0.1", "device": "eth7"},
                {"dest": "10.70.0.0/16", "gateway": "10.50.0.1", "device": "eth7"},
                {"dest": "fd00:70::/64", "device": "eth7"}], "devices": ["eth8"]}),
        ),
        (
            "add_arp_neighbors",
            json!({"neighbors": [
                {"ip": "10.50.0.9", "mac": "02:00:00:00:00:09", "device": "eth7"},
                {"ip": "fd00:50::9", "mac": "02:00:00:00:00:0a", "device": "eth7"}]}),
        ),
        (
            "mount_block",
            json!({"source": {"serial": "torii-vol-1"}, "target": "/mnt/vol1",
                "fstype": "ext4", "options": "noatime,errors=remount-ro"}),
        ),
        (
            "mount_block",
            json!({"source": {"pci": "0000:00:05.0"}, "target": "/mnt/data",
                "read_only": true}),
        ),
        (
            "mount_block",
            json!({"source": {"path": "/dev/vdb"}, "target": "/mnt/scratch",
                "fstype": "xfs"}),
        ),
        (
            "mount",
            json!({"source": "proc", "target": "/proc", "fstype": "proc",
                "options": ["nosuid", "noexec", "nodev"],
                "root": "/run/torii/containers/web/rootfs"}),
        ),
        (
            "mount",
            json!({"source": "/mnt/vol1/www", "target": "/usr/share/nginx/html",
                "fstype": "bind", "options": ["rbind", "ro", "rprivate"],
                "root": "/run/torii/containers/web/rootfs", "mkdir": true}),
        ),
        (
            "mount",
            json!({"source": "shm", "target": "/dev/shm", "fstype": "tmpfs",
                "options": ["nosuid,nodev,mode=1777,size=65536k"]}),
        ),
        (
            "unmount",
            json!({"target": "/mnt/vol1", "recursive": true, "detach": false}),
        ),
        ("unmount", json!({"target": "/mnt/scratch"})),
        (
            "setup_hugepages",
            json!({"size_kb": 2048, "count": 512, "mount": "/dev/hugepages"}),
        ),
        ("setup_hugepages", json!({"count": 64})),
        ("shutdown", json!({})),
    ]
}

/// Well-formed streams for the fuzzer to start from: one per request of every method, and
/// sessions of several frames as the host sends them.
pub fn fuzz_seeds() -> Vec<Vec<u8>> {
    let reqs = requests();
    let mut seeds: Vec<Vec<u8>> = reqs
        .iter()
        .enumerate()
        .map(|(i, (m, p))| frame(i as u64 + 1, m, p.clone()))
        .collect();
    let session = |methods: &[&str]| -> Vec<u8> {
        let mut s = Vec::new();
        for (i, m) in methods.iter().enumerate() {
            let (_, p) = reqs.iter().find(|(n, _)| n == m).expect("a seed request");
            s.extend(frame(100 + i as u64, m, p.clone()));
        }
        s
    };
    seeds.push(session(&[
        "version",
        "health",
        "start_process",
        "write_stdin",
        "close_stdin",
        "wait_process",
        "kill_process",
    ]));
    seeds.push(session(&[
        "list_interfaces",
        "update_interface",
        "update_routes",
        "add_arp_neighbors",
        "list_routes",
        "metrics",
    ]));
    seeds.push(session(&[
        "setup_hugepages",
        "mount_block",
        "mount",
        "start_process",
        "wait_process",
        "unmount",
        "shutdown",
    ]));
    // Everything, one after the other.
    seeds.push(
        reqs.iter()
            .enumerate()
            .flat_map(|(i, (m, p))| frame(1000 + i as u64, m, p.clone()))
            .collect(),
    );
    seeds
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every request of a stream, each decoded.
    fn calls(stream: &[u8]) -> Vec<Result<Call, RpcError>> {
        let mut r = Cursor::new(stream);
        let mut out = Vec::new();
        loop {
            match next_incoming(&mut r) {
                Incoming::Request(req) => out.push(Call::decode(&req.method, req.params)),
                Incoming::End => return out,
                other => panic!("not a request: {other:?}"),
            }
        }
    }

    #[test]
    fn seeds_decode_to_calls_of_every_method() {
        let mut methods = std::collections::BTreeSet::new();
        for (i, s) in fuzz_seeds().iter().enumerate() {
            let cs = calls(s);
            assert!(!cs.is_empty(), "seed {i}");
            for c in &cs {
                let c = c.as_ref().unwrap_or_else(|e| panic!("seed {i}: {e}"));
                methods.insert(c.method());
            }
            assert_eq!(fuzz_frames(s), cs.len(), "seed {i}");
        }
        let all = [
            "version",
            "health",
            "start_process",
            "wait_process",
            "kill_process",
            "write_stdin",
            "close_stdin",
            "metrics",
            "list_interfaces",
            "update_interface",
            "list_routes",
            "update_routes",
            "add_arp_neighbors",
            "mount_block",
            "mount",
            "unmount",
            "setup_hugepages",
            "shutdown",
        ];
        assert_eq!(
            methods,
            all.into_iter().collect(),
            "a method without a seed"
        );
    }

    #[test]
    fn hostile_streams_are_answered() {
        let mut s = vec![0, 0, 0, 5, b'{', b'x', b'x', b'x', b'}'];
        s.extend([0, 0, 0, 0]);
        let f = br#"{"id": 77, "method": 5}"#;
        s.extend((f.len() as u32).to_be_bytes());
        s.extend(f);
        s.extend(frame(1, "format_disk", json!({})));
        s.extend(frame(2, &"\"".repeat(3 << 19), json!({})));
        s.extend(frame(
            3,
            "start_process",
            json!({"argv": ["true"], "color": 1}),
        ));
        s.extend(frame(
            4,
            "write_stdin",
            json!({"process": "p1", "data": "!!"}),
        ));
        s.extend(frame(5, "health", json!([1, 2])));
        assert_eq!(fuzz_frames(&s), 1);
        // A length over the limit ends the stream: what follows is not read.
        s.extend([0x7f, 0xff, 0xff, 0xff]);
        s.extend(frame(6, "version", Value::Null));
        assert_eq!(fuzz_frames(&s), 1);
        // Cut inside a length, inside a frame.
        assert_eq!(fuzz_frames(&[0, 0]), 0);
        assert_eq!(fuzz_frames(&frame(1, "version", Value::Null)[..10]), 0);
    }

    /// Requests that the checks moved into [`Call::decode`] refuse: answered (one
    /// `failed`, for the empty program name, as it always was), nothing decoded.
    #[test]
    fn requests_refused_by_the_checks_are_answered() {
        let refused = [
            ("start_process", json!({"argv": [""]})),
            ("start_process", json!({"argv": ["sh"], "env": ["=x"]})),
            ("start_process", json!({"argv": ["sh"], "root": "rel"})),
            ("kill_process", json!({"process": "p1", "signal": 0})),
            (
                "update_interface",
                json!({"mac": "02:00:00:00:50:02", "mtu": 9}),
            ),
            (
                "update_routes",
                json!({"routes": [{"dest": "10.0.0.1/8", "device": "eth0"}]}),
            ),
            (
                "add_arp_neighbors",
                json!({"neighbors": [{"ip": "x", "mac": "02:00:00:00:00:09", "device": "eth0"}]}),
            ),
            (
                "mount_block",
                json!({"source": {"pci": "../x"}, "target": "/mnt"}),
            ),
            (
                "mount",
                json!({"source": "proc", "target": "/a/../b", "fstype": "proc"}),
            ),
            ("unmount", json!({"target": "a"})),
            ("setup_hugepages", json!({"count": 1, "mount": "h"})),
        ];
        let mut s = Vec::new();
        for (i, (m, p)) in refused.iter().enumerate() {
            let e = Call::decode(m, p.clone()).unwrap_err();
            let want = if i == 0 { "failed" } else { "bad_params" };
            assert_eq!(e.code, want, "{m} {p}: {e}");
            s.extend(frame(i as u64, m, p.clone()));
        }
        assert_eq!(fuzz_frames(&s), 0);
    }

    #[test]
    fn fuzz_body_on_mutated_seeds() {
        let seeds = fuzz_seeds();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let tokens: [&[u8]; 12] = [
            b"null",
            b"{}",
            b"[]",
            b"\"\"",
            b"-1",
            b"1e999",
            b"18446744073709551616",
            b"\"\\u0000\"",
            b"\"\\ud800\"",
            b"true",
            b"\"../..\"",
            b"[[[[[[[[",
        ];
        let (mut decoded, mut inputs) = (0, 0);
        for _ in 0..5000 {
            let mut d = seeds[next() as usize % seeds.len()].clone();
            for _ in 0..1 + next() % 4 {
                let at = next() as usize % (d.len() + 1);
                match next() % 7 {
                    0 if at < d.len() => d[at] ^= 1 << (next() % 8),
                    1 if at < d.len() => d[at] = next() as u8,
                    2 => d.insert(at, next() as u8),
                    3 => d.truncate(at),
                    4 => {
                        let t = tokens[next() as usize % tokens.len()];
                        let end = (at + (next() as usize % 8)).min(d.len());
                        d.splice(at..end, t.iter().copied());
                    }
                    5 if at + 4 <= d.len() => {
                        // A length (or anything) as a big-endian number.
                        let n = (next() % (MAX_FRAME as u64 + 16)) as u32;
                        d[at..at + 4].copy_from_slice(&n.to_be_bytes());
                    }
                    _ => {
                        let end = (at + next() as usize % 64).min(d.len());
                        let piece = d[at..end].to_vec();
                        d.splice(at..at, piece);
                    }
                }
            }
            decoded += fuzz_frames(&d);
            inputs += 1;
        }
        assert!(
            decoded > inputs / 2,
            "only {decoded} requests decoded from {inputs} inputs"
        );
    }

    #[test]
    fn fuzz_body_on_pseudo_random_inputs() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for len in 0..3000usize {
            let mut d = Vec::with_capacity(len % 200 + 4);
            // A plausible length first, often.
            if len % 2 == 0 {
                d.extend(((len % 200) as u32).to_be_bytes());
            }
            for _ in 0..len % 200 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                d.push(x as u8);
            }
            fuzz_frames(&d);
        }
    }
}
