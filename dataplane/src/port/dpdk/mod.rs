//! `dpdk` ports: any DPDK poll-mode driver — virtual devices (`net_memif`, `net_af_packet`,
//! `net_af_xdp`, `net_tap`, …) made for the port, or PCI NICs and VFs bound to vfio-pci — as
//! a data-plane port, the way OVS-DPDK uses them.
//!
//! A port owns its DPDK device ([`DpdkDevice`]: ethdev configured with one receive and one
//! transmit queue per queue pair, RSS across them, its own mbuf mempool), and is split like
//! the other multiqueue ports so that each PMD polls its own queues: DPDK's burst functions
//! need one thread per queue, nothing more.
//!
//! Frames are not copied between mbufs and Torii's packets where that can be avoided: a
//! received single-segment mbuf is lent to a packet (its buffer becomes the packet's frame,
//! and it is freed when the packet is), so a frame from a DPDK port is copied once, into a
//! guest's buffers, as DPDK's own vhost library does; a frame sent to a DPDK port is handed
//! over in its mbuf if it came from one. Other frames are copied into fresh mbufs — or, with
//! `lend_tx`, for virtual devices that copy frames out at transmit (memif, af_packet, tap, …),
//! attached to an mbuf as an external buffer (measured no faster, so off by default; PCI
//! devices, which need DMA addresses, always get copies). mbufs are allocated and freed in
//! bulk (per-thread mempool caches: PMD threads register with DPDK).

pub mod eal;
pub mod offload;
pub mod shm_guard;

use std::cell::RefCell;
use std::ffi::{c_void, CStr, CString};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use torii_dpdk_sys as sys;
use torii_vhost_user_net::{BufPool, NetBuf, Offloads};

use super::{Port, PortStats, BURST};
use crate::config::{dpdk_device_name, DpdkConfig, DpdkPortConfig};
use crate::packet::{ExtBuf, Packet, PacketPool};

/// Largest frame a DPDK port passes (a jumbo frame with two VLAN tags).
const MAX_DPDK_FRAME: usize = 9000 + 14 + 8;
/// Per-thread cache of a port's mempool.
const MEMPOOL_CACHE: u32 = 256;
/// The tag of packets whose frame is in a received mbuf.
const MBUF_TAG: u32 = 0x6d62_7566;
/// Most mbufs one transmit call allocates: a burst of single-mbuf frames, or a few copied
/// super-frames (a 64 KiB frame in 2 KiB mbufs takes 33).
const FRESH: usize = 4 * BURST;
/// Longest frame lent to a device in one external buffer (an mbuf's lengths are 16 bits).
const LEND_MAX: usize = u16::MAX as usize - 64;
/// Shortest frame lent rather than copied (`lend_tx`): below it the loan (attach, DPDK's
/// callback, the return to the pool) costs more than the copy it saves (`torii-dpdk-bench`,
/// docs/perf.md).
const LEND_MIN: usize = 1024;
/// Headroom a lent mbuf must have in front of its frame: a virtio-net header and two VLAN
/// tags are written there.
const MIN_HEADROOM: usize = 32;
/// Drivers known to be done with a frame when their transmit burst returns (they copy it into
/// a ring, a socket or shared memory and free the mbuf), so that a packet's own buffer can be
/// lent to them for the call.
const COPYING_DRIVERS: [&str; 7] = [
    "net_memif",
    "net_af_packet",
    "net_af_xdp",
    "net_tap",
    "net_vhost",
    "net_virtio_user",
    "net_null",
];

/// Drivers that map a peer's memory and read or write it in their bursts: the peer can
/// take it away in the middle of one ([`shm_guard`]).
const PEER_MEMORY_DRIVERS: [&str; 1] = ["net_memif"];

/// A configured and started DPDK ethdev, shared by the parts of its port and the control
/// path. Dropping the last reference stops and closes it and removes the device from DPDK,
/// then frees its mempool.
pub struct DpdkDevice {
    /// The ethdev's name (a vdev's name or a PCI address).
    name: String,
    port_id: u16,
    device: *mut sys::rte_device,
    pool: *mut sys::rte_mempool,
    driver: String,
    mac: [u8; 6],
    queues: u16,
    /// Transmit offloads enabled on the device (RTE_ETH_TX_OFFLOAD_*).
    tx_capa: u64,
    /// Bytes of frame one mbuf holds.
    seg_room: usize,
    /// The device takes chained mbufs (frames longer than one mbuf).
    multi_seg: bool,
    /// Packets' own buffers are lent to the device at transmit instead of being copied.
    lend_tx: bool,
    /// The driver maps a peer's memory, which the peer can take away mid-burst: bursts go
    /// through the guarded calls ([`shm_guard`]).
    peer_memory: bool,
    /// Guarded bursts abandoned because the peer's memory went away under them.
    bursts_abandoned: std::sync::atomic::AtomicU64,
}

// SAFETY: the raw pointers are DPDK objects (device, mempool) that stay valid until Drop, which
// runs once, when the last part and the control path let go. DPDK allows its burst functions
// on different queues from different threads at once (each queue is polled by one PMD only),
// and statistics and link reads from the control thread while they run.
unsafe impl Send for DpdkDevice {}
// SAFETY: as above; shared access only reads the immutable fields or calls thread-safe
// DPDK queries (stats, link).
unsafe impl Sync for DpdkDevice {}

/// Mempool names must be unique in the process.
static POOL_SEQ: AtomicU32 = AtomicU32::new(0);

/// Mempools of removed devices that still had mbufs out (lent to packets other PMDs hold):
/// freed once all their mbufs are back.
struct Graveyard(Vec<NonNull<sys::rte_mempool>>);
// SAFETY: the pools are only touched under the mutex, by DPDK calls that any thread may make.
unsafe impl Send for Graveyard {}
static GRAVEYARD: Mutex<Graveyard> = Mutex::new(Graveyard(Vec::new()));

/// Frees `pool` now if every mbuf is back, or later (see [`sweep_pools`]).
fn retire_pool(pool: *mut sys::rte_mempool) {
    if let Some(p) = NonNull::new(pool) {
        GRAVEYARD
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .push(p);
    }
    sweep_pools();
}

/// Frees the retired mempools whose mbufs are all back (checked when devices come and go).
fn sweep_pools() {
    let mut g = GRAVEYARD.lock().unwrap_or_else(|e| e.into_inner());
    g.0.retain(|p| {
        let p = p.as_ptr();
        // SAFETY: a retired pool stays valid until freed here; its counters are readable.
        unsafe {
            if sys::rte_mempool_avail_count(p) >= (*p).size {
                sys::rte_mempool_free(p);
                false
            } else {
                true
            }
        }
    });
}

/// The cleanup of a device that was only partly set up.
struct SetupGuard {
    port_id: u16,
    device: *mut sys::rte_device,
    pool: *mut sys::rte_mempool,
    started: bool,
}

impl Drop for SetupGuard {
    fn drop(&mut self) {
        teardown(self.port_id, self.device, self.pool, self.started);
    }
}

fn teardown(
    port_id: u16,
    device: *mut sys::rte_device,
    pool: *mut sys::rte_mempool,
    started: bool,
) {
    // SAFETY: port_id names the ethdev this port configured; device is its rte_device (or
    // null); pool is its mempool (or null), no longer used by any queue once the device is
    // closed. Each is released once.
    unsafe {
        if started {
            sys::rte_eth_dev_stop(port_id);
        }
        sys::rte_eth_dev_close(port_id);
        if !device.is_null() {
            let rc = sys::rte_dev_remove(device);
            if rc < 0 {
                tracing::warn!(port_id, "rte_dev_remove: {}", eal::strerror(rc));
            }
        }
    }
    retire_pool(pool);
}

fn check(rc: i32, what: &str) -> Result<(), String> {
    if rc < 0 {
        Err(format!("{what}: {}", eal::strerror(rc)))
    } else {
        Ok(())
    }
}

/// What a driver needs beyond what every DPDK port needs and the daemon lacks, for the error of
/// a failed probe or start (the driver's own error says only that a call failed).
/// net_af_packet opens a packet socket when it is probed, and sets the interface's flags
/// (promiscuous mode) when it starts.
fn privilege_note(device_name: &str, starting: bool) -> &'static str {
    use torii_vhost_user::daemon::{lacks, CAP_NET_ADMIN, CAP_NET_RAW};
    if !device_name.starts_with("net_af_packet") {
        ""
    } else if !starting && lacks(CAP_NET_RAW) {
        " (net_af_packet opens a packet socket on the interface: that needs CAP_NET_RAW, which the daemon lacks)"
    } else if starting && lacks(CAP_NET_ADMIN) {
        " (net_af_packet sets the interface's flags (promiscuous mode) as it starts: that needs CAP_NET_ADMIN, which the daemon lacks)"
    } else {
        ""
    }
}

fn find_port(name: &CStr) -> Option<u16> {
    let mut id = 0u16;
    // SAFETY: name is a valid C string; id is written on success only.
    (unsafe { sys::rte_eth_dev_get_port_by_name(name.as_ptr(), &mut id) } == 0).then_some(id)
}

impl DpdkDevice {
    /// Initialises DPDK (with `eal`, unless it already is), makes or finds the device and
    /// starts it with `cfg`'s queues. Nothing is left behind on error.
    pub fn open(eal: &DpdkConfig, cfg: &DpdkPortConfig) -> Result<Arc<DpdkDevice>, String> {
        // DPDK's initialisation reads its drivers' shared objects and much of sysfs, outside
        // the Landlock sandbox: the daemon initialises it at start, between a wider layer
        // and its own, when the configuration uses DPDK.
        if !eal::initialized() && torii_vhost_user::landlock::enforced() {
            return Err("DPDK is not initialised and cannot be once the Landlock sandbox is in place: add a [dpdk] section to the configuration (DPDK is then initialised at start)".into());
        }
        eal::init(eal)?;
        sweep_pools();
        let name = dpdk_device_name(&cfg.device).to_string();
        let cname = CString::new(name.as_str()).map_err(|_| "device name has a NUL byte")?;
        let port_id = match find_port(&cname) {
            Some(id) => id,
            None => {
                let args =
                    CString::new(cfg.device.as_str()).map_err(|_| "device has a NUL byte")?;
                // SAFETY: args is a valid C string; DPDK copies it.
                let rc = unsafe { sys::rte_dev_probe(args.as_ptr()) };
                // A probe refused by the sandbox fails with DPDK's own error: say that the
                // sandbox may be why.
                check(rc, &format!("probing {:?}", cfg.device)).map_err(|e| {
                    format!(
                        "{e}{}{}",
                        privilege_note(&name, false),
                        torii_vhost_user::landlock::note()
                    )
                })?;
                find_port(&cname).ok_or_else(|| {
                    format!("DPDK made no network device named {name:?} (is it a net_* driver, or a NIC bound to vfio-pci?)")
                })?
            }
        };
        let mut guard = SetupGuard {
            port_id,
            device: std::ptr::null_mut(),
            pool: std::ptr::null_mut(),
            started: false,
        };
        let mut info = sys::rte_eth_dev_info::default();
        // SAFETY: port_id is a valid ethdev; info is written by the call.
        check(
            unsafe { sys::rte_eth_dev_info_get(port_id, &mut info) },
            "rte_eth_dev_info_get",
        )?;
        guard.device = info.device;
        let driver = if info.driver_name.is_null() {
            String::new()
        } else {
            // SAFETY: the driver's name is a static C string.
            unsafe { CStr::from_ptr(info.driver_name) }
                .to_string_lossy()
                .into_owned()
        };
        let nq = cfg.queues;
        if nq > info.max_rx_queues || nq > info.max_tx_queues {
            return Err(format!(
                "{name}: {nq} queues asked, the device ({driver}) has {} receive and {} transmit queues",
                info.max_rx_queues, info.max_tx_queues
            ));
        }
        let mut conf = sys::rte_eth_conf::default();
        if nq > 1 {
            conf.rxmode.mq_mode = sys::RTE_ETH_MQ_RX_RSS;
            conf.rx_adv_conf.rss_conf.rss_hf = (sys::TORII_RTE_ETH_RSS_IP
                | sys::TORII_RTE_ETH_RSS_TCP
                | sys::TORII_RTE_ETH_RSS_UDP)
                & info.flow_type_rss_offloads;
        }
        if cfg.mtu != 1500 {
            conf.rxmode.mtu = cfg.mtu as u32;
        }
        let want_tx = sys::TORII_RTE_ETH_TX_OFFLOAD_TCP_CKSUM
            | sys::TORII_RTE_ETH_TX_OFFLOAD_UDP_CKSUM
            | sys::TORII_RTE_ETH_TX_OFFLOAD_IPV4_CKSUM
            | sys::TORII_RTE_ETH_TX_OFFLOAD_MULTI_SEGS
            | sys::TORII_RTE_ETH_TX_OFFLOAD_TCP_TSO;
        conf.txmode.offloads = info.tx_offload_capa & want_tx;
        let want_rx =
            sys::TORII_RTE_ETH_RX_OFFLOAD_TCP_CKSUM | sys::TORII_RTE_ETH_RX_OFFLOAD_UDP_CKSUM;
        conf.rxmode.offloads = info.rx_offload_capa & want_rx;
        // SAFETY: conf is a valid configuration for this port.
        check(
            unsafe { sys::rte_eth_dev_configure(port_id, nq, nq, &conf) },
            &format!(
                "configuring {name} ({driver}) with {nq} queues, MTU {}",
                cfg.mtu
            ),
        )?;
        let (mut rxd, mut txd) = (cfg.rxq_size, cfg.txq_size);
        // SAFETY: valid port; the sizes are adjusted in place to the device's limits.
        check(
            unsafe { sys::rte_eth_dev_adjust_nb_rx_tx_desc(port_id, &mut rxd, &mut txd) },
            "adjusting ring sizes",
        )?;
        // SAFETY: valid port.
        let socket = unsafe { sys::rte_eth_dev_socket_id(port_id) };
        // A frame (up to the MTU, with Ethernet header and two tags) fits one mbuf.
        let seg_room = (cfg.mtu as usize + 22).max(2048).next_multiple_of(64);
        let n = cfg.mbufs.unwrap_or_else(|| {
            (u32::from(nq) * (u32::from(rxd) + u32::from(txd))
                + 4 * MEMPOOL_CACHE
                + 2 * BURST as u32)
                .max(4096)
        });
        let pool_name = CString::new(format!(
            "torii{}_{}",
            port_id,
            POOL_SEQ.fetch_add(1, Ordering::Relaxed)
        ))
        .expect("no NUL");
        // SAFETY: valid name and sizes; DPDK allocates the pool in its own memory.
        let pool = unsafe {
            sys::rte_pktmbuf_pool_create(
                pool_name.as_ptr(),
                n,
                MEMPOOL_CACHE,
                0,
                (seg_room + sys::TORII_RTE_PKTMBUF_HEADROOM as usize) as u16,
                socket,
            )
        };
        if pool.is_null() {
            return Err(format!(
                "{name}: cannot make a mempool of {n} mbufs: {} (DPDK memory: [dpdk] memory_mib, hugepages)",
                eal::last_error()
            ));
        }
        guard.pool = pool;
        for q in 0..nq {
            // SAFETY: valid port and queue; default queue configuration (null); pool is ours.
            check(
                unsafe {
                    sys::rte_eth_rx_queue_setup(
                        port_id,
                        q,
                        rxd,
                        socket as u32,
                        std::ptr::null(),
                        pool,
                    )
                },
                &format!("receive queue {q}"),
            )?;
            // SAFETY: as above.
            check(
                unsafe {
                    sys::rte_eth_tx_queue_setup(port_id, q, txd, socket as u32, std::ptr::null())
                },
                &format!("transmit queue {q}"),
            )?;
        }
        // A switch port sees every destination MAC. Drivers without the setting (memif) pass
        // everything anyway.
        // SAFETY: valid port.
        let rc = unsafe { sys::rte_eth_promiscuous_enable(port_id) };
        if rc < 0 {
            tracing::debug!(port = %name, "promiscuous mode: {}", eal::strerror(rc));
        }
        // SAFETY: valid, configured port.
        let rc = unsafe { sys::rte_eth_dev_start(port_id) };
        check(rc, &format!("starting {name}")).map_err(|e| {
            let note = if rc == -libc::EPERM {
                privilege_note(&name, true)
            } else {
                ""
            };
            format!("{e}{note}")
        })?;
        guard.started = true;
        let mut mac = sys::rte_ether_addr::default();
        // SAFETY: valid port; mac is written.
        unsafe { sys::rte_eth_macaddr_get(port_id, &mut mac) };
        let dev = DpdkDevice {
            name,
            port_id,
            device: guard.device,
            pool,
            mac: mac.addr_bytes,
            queues: nq,
            tx_capa: conf.txmode.offloads,
            seg_room,
            multi_seg: conf.txmode.offloads & sys::TORII_RTE_ETH_TX_OFFLOAD_MULTI_SEGS != 0,
            lend_tx: cfg.lend_tx
                && COPYING_DRIVERS.contains(&driver.as_str())
                // memif in zero-copy mode transmits from its own shared-memory mbufs only.
                && !cfg.device.contains("zero-copy=yes"),
            peer_memory: PEER_MEMORY_DRIVERS.contains(&driver.as_str()),
            bursts_abandoned: Default::default(),
            driver,
        };
        std::mem::forget(guard);
        tracing::info!(port = %dev.name, port_id, driver = %dev.driver, queues = nq, rxd, txd, mbufs = n, lend_tx = dev.lend_tx, "DPDK device started");
        Ok(Arc::new(dev))
    }

    /// The device's state and DPDK's own counters, for the control API.
    pub fn report(&self) -> DpdkReport {
        let mut link = sys::rte_eth_link::default();
        // SAFETY: valid port; link is written.
        let link_ok = unsafe { sys::rte_eth_link_get_nowait(self.port_id, &mut link) } == 0;
        let mut s = sys::rte_eth_stats::default();
        // SAFETY: valid port; s is written.
        let stats_ok = unsafe { sys::rte_eth_stats_get(self.port_id, &mut s) } == 0;
        let m = self.mac;
        let nq = (self.queues as usize).min(s.q_ipackets.len());
        DpdkReport {
            device: self.name.clone(),
            driver: self.driver.clone(),
            port_id: self.port_id,
            mac: format!(
                "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                m[0], m[1], m[2], m[3], m[4], m[5]
            ),
            link_up: link_ok && link.link_status() != 0,
            link_speed_mbps: if link_ok { link.link_speed } else { 0 },
            rx_packets: s.ipackets,
            tx_packets: s.opackets,
            rx_missed: s.imissed,
            rx_errors: s.ierrors,
            rx_no_mbuf: s.rx_nombuf,
            tx_errors: s.oerrors,
            bursts_abandoned: self
                .bursts_abandoned
                .load(std::sync::atomic::Ordering::Relaxed),
            rxq_packets: if stats_ok {
                s.q_ipackets[..nq].to_vec()
            } else {
                Vec::new()
            },
            txq_packets: if stats_ok {
                s.q_opackets[..nq].to_vec()
            } else {
                Vec::new()
            },
        }
    }

    pub fn port_id(&self) -> u16 {
        self.port_id
    }
}

impl Drop for DpdkDevice {
    fn drop(&mut self) {
        teardown(self.port_id, self.device, self.pool, true);
        tracing::info!(port = %self.name, "DPDK device removed");
    }
}

/// A DPDK device as the control API shows it: DPDK's view, beside the port's own counters.
#[derive(Clone, Debug, Serialize)]
pub struct DpdkReport {
    pub device: String,
    pub driver: String,
    pub port_id: u16,
    pub mac: String,
    pub link_up: bool,
    pub link_speed_mbps: u32,
    /// The device's counters (what the driver saw, including what never reached Torii).
    pub rx_packets: u64,
    pub tx_packets: u64,
    /// Frames the device dropped because a receive ring was full (the PMD fell behind).
    pub rx_missed: u64,
    pub rx_errors: u64,
    /// Frames dropped for want of an mbuf.
    pub rx_no_mbuf: u64,
    pub tx_errors: u64,
    /// Bursts abandoned because a memif peer's memory went away during them (`shm_guard`);
    /// each may have kept up to a burst's worth of mbufs.
    pub bursts_abandoned: u64,
    pub rxq_packets: Vec<u64>,
    pub txq_packets: Vec<u64>,
}

/// The data-path face of a DPDK device (or of some of its queues, after a split).
pub struct DpdkPort {
    name: String,
    dev: Arc<DpdkDevice>,
    /// The device's queue numbers this part polls and sends on.
    qids: Vec<u16>,
    stats: Arc<PortStats>,
    /// What received packets may carry (the peer's transmit offloads).
    rx_offloads: Offloads,
    tx_offloads: Offloads,
    mbufs: Box<[*mut sys::rte_mbuf; BURST]>,
}

// SAFETY: the mbuf pointers in `mbufs` are scratch space, only valid during one burst call;
// the device is Send (above). A part is used by one PMD thread at a time.
unsafe impl Send for DpdkPort {}

impl DpdkPort {
    /// The port of a started device, with all its queues.
    pub fn new(name: &str, dev: Arc<DpdkDevice>) -> Self {
        let nq = dev.queues;
        DpdkPort {
            name: name.to_string(),
            tx_offloads: offload::tx_offloads(dev.tx_capa),
            dev,
            qids: (0..nq).collect(),
            stats: Arc::new(PortStats::with_queues(nq)),
            rx_offloads: Offloads::empty(),
            mbufs: Box::new([std::ptr::null_mut(); BURST]),
        }
    }

    pub fn device(&self) -> &Arc<DpdkDevice> {
        &self.dev
    }

    /// Copies mbuf chain `m` (`len` bytes in all) into `dst` (of `len` bytes). False if the
    /// chain does not hold exactly `len` bytes.
    ///
    /// # Safety
    /// `m` is a valid mbuf chain owned by the caller.
    unsafe fn copy_chain(mut m: *const sys::rte_mbuf, dst: &mut [u8]) -> bool {
        let mut at = 0;
        // A chain never has more segments than bytes; the bound keeps a corrupt one finite.
        for _ in 0..=dst.len() {
            if m.is_null() {
                break;
            }
            // SAFETY: m is a valid mbuf of the chain (caller).
            let (buf, off, seg) = unsafe {
                (
                    (*m).buf_addr as *const u8,
                    (*m).data_off as usize,
                    (*m).data_len as usize,
                )
            };
            if seg > dst.len() - at {
                return false;
            }
            // SAFETY: the segment's data_len bytes at buf_addr + data_off are its frame data.
            let src = unsafe { std::slice::from_raw_parts(buf.add(off), seg) };
            dst[at..at + seg].copy_from_slice(src);
            at += seg;
            // SAFETY: as above.
            m = unsafe { (*m).next };
        }
        m.is_null() && at == dst.len()
    }

    /// Copies `data` into the mbufs from `*next` on (one if it fits, a chain if the device
    /// takes chains) and returns the chain's head; None if it does not fit.
    ///
    /// # Safety
    /// `pool[*next..]` are freshly allocated mbufs of the device's mempool.
    unsafe fn fill_chain(
        &self,
        data: &[u8],
        pool: &[*mut sys::rte_mbuf],
        next: &mut usize,
    ) -> Option<*mut sys::rte_mbuf> {
        let room = self.dev.seg_room;
        let segs = data.len().div_ceil(room).max(1);
        if (segs > 1 && !self.dev.multi_seg) || *next + segs > pool.len() {
            return None;
        }
        let head = pool[*next];
        let mut prev: *mut sys::rte_mbuf = std::ptr::null_mut();
        for (i, chunk) in data
            .chunks(room)
            .chain(std::iter::once(&[][..]))
            .take(segs)
            .enumerate()
        {
            let m = pool[*next + i];
            // SAFETY: m is a fresh mbuf (data_off at its headroom, room bytes of data room after
            // it); chunk.len() <= room.
            unsafe {
                let dst = ((*m).buf_addr as *mut u8).add((*m).data_off as usize);
                std::ptr::copy_nonoverlapping(chunk.as_ptr(), dst, chunk.len());
                (*m).data_len = chunk.len() as u16;
                if !prev.is_null() {
                    (*prev).next = m;
                }
            }
            prev = m;
        }
        // SAFETY: head is a fresh mbuf.
        unsafe {
            (*head).pkt_len = data.len() as u32;
            (*head).nb_segs = segs as u16;
        }
        *next += segs;
        Some(head)
    }
}

/// Frees a received mbuf lent to a packet (`ExtBuf::release`).
///
/// # Safety
/// `h` is an mbuf this process owns and no longer uses.
unsafe fn release_mbuf(h: NonNull<c_void>) {
    // SAFETY: the caller's contract.
    unsafe { sys::torii_pktmbuf_free(h.as_ptr().cast()) };
}

thread_local! {
    /// Packets whose buffers a device gave back during this thread's current transmit call
    /// (the external-buffer callback runs inside DPDK); the caller puts them back in its pool.
    static RETURNED: RefCell<Vec<Packet>> = RefCell::new(Vec::with_capacity(4 * BURST));
}

/// DPDK's callback when the last reference to an mbuf holding a lent packet buffer goes.
unsafe extern "C" fn lent_buffer_freed(_addr: *mut c_void, opaque: *mut c_void) {
    let Some(raw) = NonNull::new(opaque) else {
        return;
    };
    // SAFETY: opaque is the packet given out by into_raw when its buffer was lent, and DPDK
    // calls this once per loan.
    let p = unsafe { Packet::from_raw(raw) };
    // No unwinding out of a C callback: if the list is unreachable (thread ending) the packet
    // is dropped instead.
    let _ = RETURNED.try_with(|r| {
        if let Ok(mut v) = r.try_borrow_mut() {
            v.push(p);
        }
    });
}

/// Puts the packets the device gave back during a transmit call into `pool`.
fn take_returned(pool: &mut PacketPool) {
    let _ = RETURNED.try_with(|r| {
        if let Ok(mut v) = r.try_borrow_mut() {
            for p in v.drain(..) {
                pool.free(p);
            }
        }
    });
}

impl DpdkPort {
    /// Whether a frame of `len` bytes is lent to the device rather than copied.
    #[inline]
    fn lends(&self, len: usize) -> bool {
        self.dev.lend_tx && (LEND_MIN..=LEND_MAX).contains(&len)
    }

    /// How a packet goes out: in its own mbuf, lent, or copied into `n` fresh mbufs.
    #[inline]
    fn fresh_mbufs(&self, p: &Packet) -> usize {
        if p.is_external() {
            0
        } else if self.lends(p.len()) {
            1
        } else {
            p.len().div_ceil(self.dev.seg_room).max(1)
        }
    }

    /// Sends packets from the front of `pkts`: up to a burst, and no more than [`FRESH`] new
    /// mbufs' worth (copies of super-frames take many).
    fn tx_some(&mut self, qid: u16, pool: &mut PacketPool, pkts: &mut Vec<Packet>) {
        let (mut take, mut need) = (0, 0);
        for p in pkts.iter().take(BURST) {
            let k = self.fresh_mbufs(p);
            if take > 0 && need + k > FRESH {
                break;
            }
            take += 1;
            need += k;
        }
        let mut fresh = [std::ptr::null_mut::<sys::rte_mbuf>(); FRESH];
        // SAFETY: the pool is the device's; `fresh` has room for `need` (≤ FRESH or refused).
        if need > FRESH
            || (need > 0
                && unsafe {
                    sys::torii_pktmbuf_alloc_bulk(self.dev.pool, fresh.as_mut_ptr(), need as u32)
                } != 0)
        {
            PortStats::add(&self.stats.tx_dropped_no_room, take);
            for p in pkts.drain(..take) {
                pool.free(p);
            }
            return;
        }
        let (mut next, mut n, mut failed, mut bytes, mut gso) = (0, 0, 0, 0, 0);
        for mut p in pkts.drain(..take) {
            let hdr = p.hdr();
            let meta = offload::tx_meta(&hdr, p.data_mut());
            if meta.is_none() && hdr.is_gso() {
                // A super-frame DPDK cannot be asked to segment (the PMD hands over only
                // what the port accepts, so this one is malformed).
                PortStats::add(&self.stats.tx_dropped_offload, 1);
                pool.free(p);
                continue;
            }
            if meta.is_none() && hdr.needs_csum() {
                // Not something DPDK can be asked for: completed here.
                crate::offload::fixup(&mut p, Offloads::empty());
                PortStats::add(&self.stats.sw_csum, 1);
            }
            let len = p.len();
            let m = if let Some((ext, off, len)) = p.take_external(MBUF_TAG) {
                // A received mbuf: it goes out itself, with the frame where it is now.
                let m = ext.handle.as_ptr().cast::<sys::rte_mbuf>();
                // SAFETY: the packet handed the mbuf back to us unreleased; single segment.
                unsafe {
                    (*m).data_off = off as u16;
                    (*m).data_len = len as u16;
                    (*m).pkt_len = len as u32;
                    (*m).ol_flags &=
                        sys::TORII_RTE_MBUF_F_EXTERNAL | sys::TORII_RTE_MBUF_F_INDIRECT;
                }
                pool.free(p);
                Some(m)
            } else if self.lends(len) {
                let m = fresh[next];
                next += 1;
                match p.lend(std::mem::size_of::<sys::rte_mbuf_ext_shared_info>()) {
                    Some((frame, scratch)) => {
                        let shinfo = scratch.as_ptr().cast::<sys::rte_mbuf_ext_shared_info>();
                        let raw = p.into_raw();
                        // SAFETY: scratch is 8-aligned room for the shared info inside the
                        // packet's buffer, which lives (leaked in `raw`) until the callback
                        // takes it back; frame is the packet's `len` bytes; m is fresh.
                        unsafe {
                            shinfo.write(sys::rte_mbuf_ext_shared_info {
                                free_cb: Some(lent_buffer_freed),
                                fcb_opaque: raw.as_ptr(),
                                refcnt: 1,
                            });
                            sys::torii_mbuf_attach_extbuf(
                                m,
                                frame.as_ptr().cast(),
                                len as u16,
                                shinfo,
                            );
                        }
                        Some(m)
                    }
                    _ => {
                        // No room to lend it: a copy in the fresh mbuf if it fits one.
                        // SAFETY: m is a fresh mbuf of the device's pool.
                        let r = unsafe { self.fill_chain(p.data(), &[m], &mut 0) };
                        if r.is_none() {
                            // SAFETY: m was not used.
                            unsafe { sys::torii_pktmbuf_free(m) };
                        }
                        pool.free(p);
                        r
                    }
                }
            } else {
                // SAFETY: fresh[next..need] are fresh mbufs of the device's pool.
                let r = unsafe { self.fill_chain(p.data(), &fresh[..need], &mut next) };
                pool.free(p);
                r
            };
            let Some(m) = m else {
                failed += 1;
                continue;
            };
            if let Some(t) = meta {
                if t.tso_segsz != 0 {
                    gso += 1;
                }
                // SAFETY: m is the head of the frame's mbuf chain.
                unsafe {
                    (*m).ol_flags |= t.ol_flags;
                    sys::torii_mbuf_set_tx_offload(m, t.l2_len, t.l3_len, t.l4_len, t.tso_segsz);
                }
            }
            bytes += len;
            self.mbufs[n] = m;
            n += 1;
        }
        if next < need {
            // SAFETY: the mbufs past `next` were not used.
            unsafe { sys::rte_pktmbuf_free_bulk(fresh[next..].as_mut_ptr(), (need - next) as u32) };
        }
        let (port, mbufs) = (self.dev.port_id, self.mbufs.as_mut_ptr());
        // SAFETY: valid port and queue, sent on by this thread only; the n mbufs are ours,
        // DPDK takes the ones it sends; a guarded call that faulted leaves them all where the
        // driver had them (not ours to free: it may have freed some).
        let sent = unsafe {
            if self.dev.peer_memory {
                let mut fault = 0;
                let sent = sys::torii_tx_burst_guarded(port, qid, mbufs, n as u16, &mut fault);
                if fault != 0 {
                    shm_guard::abandoned(&self.dev.bursts_abandoned, &self.name, "transmit", n);
                    take_returned(pool);
                    PortStats::add(&self.stats.tx_dropped_no_room, n);
                    return;
                }
                sent
            } else {
                sys::torii_tx_burst(port, qid, mbufs, n as u16)
            }
        } as usize;
        if sent < n {
            // SAFETY: DPDK left the unsent ones to us.
            unsafe {
                sys::rte_pktmbuf_free_bulk(self.mbufs[sent..].as_mut_ptr(), (n - sent) as u32)
            };
            // Bytes of the unsent ones are not known any more: count by average.
            bytes = bytes * sent / n.max(1);
        }
        take_returned(pool);
        self.stats.tx(qid, sent, bytes);
        PortStats::add(&self.stats.tx_dropped_no_room, n - sent);
        PortStats::add(&self.stats.tx_errors, failed);
        PortStats::add(&self.stats.tx_gso_packets, gso);
    }
}

impl Port for DpdkPort {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        "dpdk"
    }

    fn num_queues(&self) -> u16 {
        self.qids.len() as u16
    }

    fn queue_id(&self, q: u16) -> u16 {
        self.qids.get(q as usize).copied().unwrap_or(q)
    }

    #[inline]
    fn poll_start(&mut self) {
        eal::register_thread();
    }

    fn rx_burst(&mut self, q: u16, pool: &mut PacketPool, out: &mut Vec<Packet>, max: usize) {
        let Some(&qid) = self.qids.get(q as usize) else {
            return;
        };
        let n = max.min(BURST);
        let (port, mbufs) = (self.dev.port_id, self.mbufs.as_mut_ptr());
        // SAFETY: valid port and queue, polled by this thread only; `mbufs` has room for n.
        let got = unsafe {
            if self.dev.peer_memory {
                let mut fault = 0;
                let got = sys::torii_rx_burst_guarded(port, qid, mbufs, n as u16, &mut fault);
                if fault != 0 {
                    shm_guard::abandoned(&self.dev.bursts_abandoned, &self.name, "receive", n);
                }
                got
            } else {
                sys::torii_rx_burst(port, qid, mbufs, n as u16)
            }
        } as usize;
        if got == 0 {
            return;
        }
        let (mut ok, mut bytes, mut bad, mut no_buf, mut copied) = (0, 0, 0, 0, 0);
        for i in 0..got {
            let m = self.mbufs[i];
            // SAFETY: DPDK handed us `got` valid mbufs, ours until freed or lent.
            let (len, flags, segs, off) = unsafe {
                (
                    (*m).pkt_len as usize,
                    (*m).ol_flags,
                    (*m).nb_segs,
                    (*m).data_off as usize,
                )
            };
            let Some(mut p) = pool.alloc() else {
                no_buf += 1;
                self.mbufs[copied] = m;
                copied += 1;
                continue;
            };
            let hdr = offload::rx_hdr(flags, self.rx_offloads);
            if segs == 1 && off >= MIN_HEADROOM && len <= MAX_DPDK_FRAME {
                // SAFETY: a single-segment mbuf: buf_len bytes at buf_addr, the frame at
                // data_off; ours alone until release_mbuf frees it.
                unsafe {
                    let cap = (*m).buf_len as usize;
                    if off + len <= cap {
                        if let (Some(base), Some(handle)) = (
                            NonNull::new((*m).buf_addr as *mut u8),
                            NonNull::new(m as *mut c_void),
                        ) {
                            let ext = ExtBuf {
                                base,
                                cap,
                                handle,
                                release: release_mbuf,
                                tag: MBUF_TAG,
                            };
                            p.attach_external(ext, off, len, hdr);
                            ok += 1;
                            bytes += len;
                            out.push(p);
                            continue;
                        }
                    }
                }
            }
            // A chain (or an odd mbuf): copied into the packet's own buffer.
            // SAFETY: m is a valid chain (above).
            let done = len <= MAX_DPDK_FRAME
                && p.frame_area(len, hdr)
                    .is_some_and(|area| unsafe { Self::copy_chain(m, area) });
            if done {
                ok += 1;
                bytes += len;
                out.push(p);
            } else {
                bad += 1;
                pool.free(p);
            }
            self.mbufs[copied] = m;
            copied += 1;
        }
        if copied > 0 {
            // SAFETY: the first `copied` entries are mbufs we no longer reference.
            unsafe { sys::rte_pktmbuf_free_bulk(self.mbufs.as_mut_ptr(), copied as u32) };
        }
        self.stats.rx(qid, ok, bytes);
        PortStats::add(&self.stats.rx_dropped_invalid, bad);
        PortStats::add(&self.stats.rx_dropped_no_buffer, no_buf);
    }

    fn tx_burst(&mut self, q: u16, pool: &mut PacketPool, pkts: &mut Vec<Packet>) {
        let Some(&qid) = self.qids.get(q as usize) else {
            for p in pkts.drain(..) {
                pool.free(p);
            }
            return;
        };
        while !pkts.is_empty() {
            self.tx_some(qid, pool, pkts);
        }
    }

    fn tx_offloads(&self) -> Offloads {
        self.tx_offloads
    }

    fn set_rx_offloads(&mut self, accepted: Offloads) {
        self.rx_offloads = accepted;
    }

    fn stats(&self) -> &Arc<PortStats> {
        &self.stats
    }

    /// DPDK devices here have no receive interrupts wired to the PMD's epoll: a PMD that polls
    /// one does not sleep (as OVS-DPDK's PMDs do not).
    fn arm_wakeup(&mut self) -> bool {
        true
    }

    fn split(&mut self, groups: &[Vec<u16>]) -> Option<Vec<Box<dyn Port>>> {
        let mut all: Vec<u16> = groups.iter().flatten().copied().collect();
        all.sort_unstable();
        if all != self.qids || groups.iter().any(|g| g.is_empty()) {
            return None;
        }
        let parts = groups
            .iter()
            .map(|g| {
                Box::new(DpdkPort {
                    name: self.name.clone(),
                    dev: self.dev.clone(),
                    qids: g.clone(),
                    stats: self.stats.clone(),
                    rx_offloads: self.rx_offloads,
                    tx_offloads: self.tx_offloads,
                    mbufs: Box::new([std::ptr::null_mut(); BURST]),
                }) as Box<dyn Port>
            })
            .collect();
        self.qids.clear();
        Some(parts)
    }
}
