//! Torii's virtio-blk device over vhost-user (virtio 1.2 §5.2). `config` is the device model
//! (features, config space, and the limits derived from them); `request` parses and checks
//! what a (hostile) driver asks for — header, data length, sector range, discard and
//! write-zeroes segments — and decides the status, before any I/O is issued; `inflight` keeps
//! the inflight-I/O region that lets a restarted backend resubmit what a crash interrupted;
//! `engine` issues the checked requests on an io_uring per queue worker.

pub mod config;
pub mod engine;
pub mod inflight;
pub mod request;
