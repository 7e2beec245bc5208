// SPDX-License-Identifier: Apache-2.0
//! libFuzzer entry of the `entropy_link` target; the input handling is
//! [`vhost_rng_fuzz::entropy_link`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vhost_rng_fuzz::entropy_link::run(data));
