//! Guest memory contents and ring indices from the fuzzer, through `from_guest` and `to_guest`
//! (see `torii_vhost_user_net::testing::fuzz_descriptor_chains` for the input layout and the
//! properties checked).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    torii_vhost_user_net::testing::fuzz_descriptor_chains(data);
});
