//! A virtio-blk export: the device model as vhost-user sees it (features, protocol features,
//! config space with its one writable field), the shared endpoint (socket and connections,
//! from `torii-vhost-user`) and the queue workers that serve it.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use torii_vhost_user::{
    DeviceModel, Endpoint, EndpointConfig, EndpointShared, ProtocolFeatures, SocketMode, StartError,
};
use vhost::vhost_user::message::VhostUserVirtioFeatures;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

pub use torii_vhost_user::BrokenQueue;

use crate::config::BlkDevice;
use crate::engine::{Engine, OpenFlags};
use crate::request::{device_id, Limits, ID_LEN, SECTOR_SIZE};
use crate::stats::{ExportReport, QueueStats};
use crate::worker::{PollMode, Worker};

/// The virtio-blk device: the export's description, the driver-switchable cache mode and
/// the serial GET_ID answers with.
pub struct BlkModel {
    dev: BlkDevice,
    writeback: AtomicBool,
    serial: [u8; ID_LEN],
    stats: Vec<QueueStats>,
}

impl BlkModel {
    pub fn new(dev: BlkDevice, serial: &str) -> Self {
        BlkModel {
            writeback: AtomicBool::new(dev.writeback),
            stats: (0..dev.num_queues).map(|_| QueueStats::default()).collect(),
            dev,
            serial: device_id(serial),
        }
    }

    /// Per-queue counters (written by the queue workers).
    pub fn stats(&self) -> &[QueueStats] {
        &self.stats
    }

    /// The device as the driver sees it now (cache mode included).
    pub fn device(&self) -> BlkDevice {
        BlkDevice {
            writeback: self.writeback.load(Ordering::Acquire),
            ..self.dev.clone()
        }
    }

    /// Write-back cache on: writes complete when the file has them, FLUSH makes them durable.
    /// Off (write-through): every write is durable when it completes.
    pub fn writeback(&self) -> bool {
        self.writeback.load(Ordering::Relaxed)
    }

    pub fn limits(&self) -> Limits {
        self.dev.limits()
    }

    pub fn serial(&self) -> &[u8; ID_LEN] {
        &self.serial
    }
}

impl DeviceModel for BlkModel {
    fn num_queues(&self) -> usize {
        self.dev.num_queues as usize
    }

    fn features(&self) -> u64 {
        self.dev.features()
            | 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> ProtocolFeatures {
        let mut p = ProtocolFeatures::REPLY_ACK
            | ProtocolFeatures::CONFIG
            | ProtocolFeatures::BACKEND_REQ
            | ProtocolFeatures::CONFIGURE_MEM_SLOTS
            | ProtocolFeatures::INFLIGHT_SHMFD;
        if self.dev.num_queues > 1 {
            p |= ProtocolFeatures::MQ;
        }
        p
    }

    fn config(&self) -> Vec<u8> {
        self.device().config_space().to_vec()
    }

    fn set_config(&self, offset: u32, data: &[u8]) -> Result<(), &'static str> {
        let mut dev = self.device();
        if !dev.write_config(offset, data) {
            return Err("only `writeback` is writable in the virtio-blk config space");
        }
        self.writeback.store(dev.writeback, Ordering::Release);
        Ok(())
    }
}

/// Endpoint state of an export.
pub type BlkShared = EndpointShared<BlkModel>;

/// Largest number of queues of an export.
pub const MAX_QUEUES: u16 = 16;
/// Largest queue size accepted (the driver picks the size up to this).
pub const MAX_QUEUE_SIZE: u16 = 1024;

/// What to export and how.
#[derive(Clone, Debug)]
pub struct ExportConfig {
    pub name: String,
    pub socket: PathBuf,
    pub mode: SocketMode,
    /// Raw image file or block device.
    pub path: PathBuf,
    pub read_only: bool,
    /// O_DIRECT (guest buffers and offsets must then suit the device's alignment).
    pub direct: bool,
    pub num_queues: u16,
    /// Queue worker threads (each with its own io_uring); queues are spread over them.
    pub workers: u16,
    /// Logical block size (512..=65536, a power of two).
    pub block_size: u32,
    /// Physical block size (a power-of-two multiple of `block_size`): the guest aligns and
    /// sizes its I/O to it (e.g. 4096 over a 512-byte logical size).
    pub physical_block_size: u32,
    pub serial: String,
    /// Initial cache mode (the driver may switch it, CONFIG_WCE).
    pub writeback: bool,
    pub poll: PollMode,
    /// Client mode: time between connection attempts.
    pub reconnect_interval: Duration,
}

impl ExportConfig {
    /// The checks that need nothing but the configuration (done again by
    /// [`BlkExport::start`]).
    pub fn validate(&self) -> Result<(), ExportError> {
        if self.num_queues == 0 || self.num_queues > MAX_QUEUES {
            return Err(ExportError::Queues(self.num_queues));
        }
        if self.workers == 0 || self.workers > self.num_queues {
            return Err(ExportError::Workers {
                got: self.workers,
                queues: self.num_queues,
            });
        }
        if !self.block_size.is_power_of_two() || !(512..=65536).contains(&self.block_size) {
            return Err(ExportError::BlockSize(self.block_size));
        }
        let p = self.physical_block_size;
        if !p.is_power_of_two() || p < self.block_size || p / self.block_size > 1 << 15 {
            return Err(ExportError::PhysicalBlockSize {
                got: p,
                logical: self.block_size,
            });
        }
        Ok(())
    }
}

/// Errors when starting an export.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("queues must be between 1 and {MAX_QUEUES}, got {0}")]
    Queues(u16),
    #[error("workers must be between 1 and queues ({queues}), got {got}")]
    Workers { got: u16, queues: u16 },
    #[error(
        "physical_block_size must be a power of two, at least block_size ({logical}) and at most 32768 times it, got {got}"
    )]
    PhysicalBlockSize { got: u32, logical: u32 },
    #[error("block_size must be a power of two between 512 and 65536, got {0}")]
    BlockSize(u32),
    /// `hint`: empty, or why the Landlock sandbox refused it and how to allow it.
    #[error("cannot open {path}: {source}{hint}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
        hint: String,
    },
    #[error("{path} is {size} bytes, not a whole number of {block} byte blocks (or empty)")]
    Size {
        path: PathBuf,
        size: u64,
        block: u32,
    },
    #[error("cannot start queue worker: {0}")]
    Worker(std::io::Error),
    #[error(transparent)]
    Start(#[from] StartError),
}

/// A running export. Dropping it stops the workers and the endpoint.
pub struct BlkExport {
    endpoint: Endpoint<BlkModel>,
    workers: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

impl BlkExport {
    /// Validates `cfg`, opens the export (one io_uring per worker), starts the workers and the
    /// endpoint. Nothing is left running or bound on error.
    pub fn start(cfg: ExportConfig) -> Result<Self, ExportError> {
        cfg.validate()?;
        let flags = OpenFlags {
            direct: cfg.direct,
            read_only: cfg.read_only,
        };
        // Every queue may have a full ring in flight.
        let per_worker = cfg.num_queues.div_ceil(cfg.workers) as u32;
        let depth = (per_worker * u32::from(MAX_QUEUE_SIZE)).min(4096);
        let engines = (0..cfg.workers)
            .map(|_| Engine::open(&cfg.path, flags, depth))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| {
                use torii_vhost_user::landlock::{explain, Rights};
                let need = if cfg.read_only {
                    Rights::READ_FILE
                } else {
                    Rights::READ_FILE | Rights::WRITE_FILE
                };
                ExportError::Open {
                    hint: explain(&source, &cfg.path, need),
                    path: cfg.path.clone(),
                    source,
                }
            })?;
        if engines[0].inline() {
            tracing::info!(
                device = %cfg.name,
                "{} is on a memory file system: requests done inline, not through io_uring",
                cfg.path.display()
            );
        }
        let size = engines[0].capacity();
        if size == 0 || !size.is_multiple_of(u64::from(cfg.block_size)) {
            return Err(ExportError::Size {
                path: cfg.path.clone(),
                size,
                block: cfg.block_size,
            });
        }
        let sectors_per_block = cfg.block_size / SECTOR_SIZE as u32;
        let dev = BlkDevice {
            capacity: size / SECTOR_SIZE,
            blk_size: cfg.block_size,
            physical_block_exp: (cfg.physical_block_size / cfg.block_size).trailing_zeros() as u8,
            // 1 MiB segments, up to a queue's worth of them (indirect descriptors).
            size_max: 1 << 20,
            seg_max: u32::from(MAX_QUEUE_SIZE) - 2,
            read_only: cfg.read_only,
            writeback: cfg.writeback,
            num_queues: cfg.num_queues,
            // One range per request, up to 2 GiB, block aligned.
            discard: Some((1 << 22, 1, sectors_per_block)),
            write_zeroes: Some((1 << 22, 1, true)),
        };
        let shared = Arc::new(BlkShared::new(
            cfg.name.clone(),
            BlkModel::new(dev, &cfg.serial),
            cfg.workers as usize,
        ));
        let stop = Arc::new(AtomicBool::new(false));
        let mut workers = Vec::new();
        for (slot, engine) in engines.into_iter().enumerate() {
            let queues: Vec<u16> = (0..cfg.num_queues)
                .filter(|q| *q as usize % cfg.workers as usize == slot)
                .collect();
            let w = Worker::new(shared.clone(), slot, queues, engine, cfg.poll, stop.clone())
                .map_err(ExportError::Worker);
            let spawned = w.and_then(|w| {
                std::thread::Builder::new()
                    .name(format!("blk-{}-{slot}", cfg.name))
                    .spawn(move || {
                        torii_vhost_user::seccomp::enter(
                            torii_vhost_user::seccomp::ThreadClass::IoWorker,
                        );
                        w.run()
                    })
                    .map_err(ExportError::Worker)
            });
            match spawned {
                Ok(h) => workers.push(h),
                Err(e) => {
                    stop_workers(&stop, &mut workers);
                    return Err(e);
                }
            }
        }
        let endpoint = Endpoint::start(
            EndpointConfig {
                name: cfg.name,
                socket: cfg.socket,
                mode: cfg.mode,
                reconnect_interval: cfg.reconnect_interval,
            },
            shared,
        );
        match endpoint {
            Ok(endpoint) => Ok(BlkExport {
                endpoint,
                workers,
                stop,
            }),
            Err(e) => {
                stop_workers(&stop, &mut workers);
                Err(e.into())
            }
        }
    }

    pub fn shared(&self) -> &Arc<BlkShared> {
        self.endpoint.shared()
    }

    pub fn is_connected(&self) -> bool {
        self.shared().is_connected()
    }

    pub fn broken_queues(&self) -> Vec<BrokenQueue> {
        self.shared().broken_queues()
    }

    /// Connection state and per-queue counters, for the metrics endpoint.
    pub fn report(&self) -> ExportReport {
        report(self.shared())
    }

    /// Stops the endpoint (closing the connection), then the workers (after their in-flight
    /// I/O has completed).
    pub fn stop(&mut self) {
        self.endpoint.stop();
        stop_workers(&self.stop, &mut self.workers);
    }
}

impl Drop for BlkExport {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Connection state and per-queue counters of the export behind `s`.
pub fn report(s: &BlkShared) -> ExportReport {
    ExportReport {
        name: s.name.clone(),
        connected: s.is_connected(),
        connections: s.connections(),
        broken_queues: s.broken_queues().len(),
        queues: s.model.stats().iter().map(|q| q.load()).collect(),
    }
}

fn stop_workers(stop: &AtomicBool, workers: &mut Vec<JoinHandle<()>>) {
    stop.store(true, Ordering::Release);
    for w in workers.drain(..) {
        let _ = w.join();
    }
}
