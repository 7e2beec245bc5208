// SPDX-License-Identifier: Apache-2.0
//! libFuzzer entry of the `egd` target; the input handling is
//! [`vhost_rng_fuzz::egd`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vhost_rng_fuzz::egd::run(data));
