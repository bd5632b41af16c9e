//! Helpers shared by the end-to-end tests (each tests/*.rs that wants them says `mod common;`).
// A test crate uses only some of the helpers: the others are not dead code.
#![allow(dead_code)]

pub mod containerd;
pub mod oci_image;
