//! A byte stream from the host to the guest agent: length-prefixed frames, JSON requests and
//! every method's parameters, decoded as the agent's server decodes them, never executed (see
//! `torii_agent::fuzzing::fuzz_frames` for the properties checked).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    torii_agent::fuzzing::fuzz_frames(data);
});
