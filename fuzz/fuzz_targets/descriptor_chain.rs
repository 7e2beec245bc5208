// SPDX-License-Identifier: Apache-2.0
//! libFuzzer entry of the `descriptor_chain` target; the input handling is
//! [`vhost_rng_fuzz::descriptor_chain`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vhost_rng_fuzz::descriptor_chain::run(data));
