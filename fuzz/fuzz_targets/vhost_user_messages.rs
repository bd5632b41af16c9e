//! vhost-user message sequences from a buggy or hostile frontend — codes, sizes, payloads and
//! the file descriptors attached — through a real session over a socket pair (see
//! `torii_vhost_user::fuzzing::fuzz_messages` for the input layout and the properties checked).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    torii_vhost_user::fuzzing::fuzz_messages(data);
});
