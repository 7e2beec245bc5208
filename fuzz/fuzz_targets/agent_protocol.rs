// SPDX-License-Identifier: Apache-2.0
//! libFuzzer entry of the `agent_protocol` target; the input handling is
//! [`vhost_rng_fuzz::agent_protocol`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vhost_rng_fuzz::agent_protocol::run(data));
