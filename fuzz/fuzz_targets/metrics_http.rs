// SPDX-License-Identifier: Apache-2.0
//! libFuzzer entry of the `metrics_http` target; the input handling is
//! [`vhost_rng_fuzz::metrics_http`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vhost_rng_fuzz::metrics_http::run(data));
