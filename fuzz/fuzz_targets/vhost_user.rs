// SPDX-License-Identifier: Apache-2.0
//! libFuzzer entry of the `vhost_user` target; the input handling is
//! [`vhost_rng_fuzz::vhost_user`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vhost_rng_fuzz::vhost_user::run(data));
