// SPDX-License-Identifier: Apache-2.0
//! libFuzzer entry of the `config` target; the input handling is
//! [`vhost_rng_fuzz::config`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vhost_rng_fuzz::config::run(data));
