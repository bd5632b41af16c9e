//! Raw bindings to the system's DPDK (EAL, ethdev, mbuf, mempool), generated at build time by
//! bindgen from the headers pkg-config's `libdpdk` points at, plus `torii_*` functions: a C
//! shim that gives DPDK's static inline fast-path functions (rx/tx burst, mbuf bulk
//! allocation and free, per-thread `rte_errno`, mbuf bit fields) a symbol Rust can call.
//!
//! The published `dpdk-sys` crate bundles DPDK 18.05; these bindings follow whatever DPDK the
//! host has (22.11 on Debian 12), and the layout tests check the structures against it.
//! Everything here is `unsafe` C; `torii-dataplane`'s `dpdk` module is the safe layer.

#![allow(
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    dead_code
)]
#![allow(clippy::all)]
#![allow(improper_ctypes)]

include!(concat!(env!("OUT_DIR"), "/bindings.rs"));
