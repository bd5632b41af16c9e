//! What a container runtime hands the CNI plugin — the CNI_* environment and the network
//! configuration on stdin — through every check the plugin makes before it touches the host
//! (see `torii_cni::fuzzing::fuzz_input` for the input layout and the properties checked).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    torii_cni::fuzzing::fuzz_input(data);
});
