//! Request headers, segments and inflight regions from the fuzzer, through every check (see
//! `torii_vhost_user_blk::fuzz_requests` for the input layout and the properties checked).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    torii_vhost_user_blk::fuzz_requests(data);
});
