// SPDX-License-Identifier: Apache-2.0
//! Where guests' randomness comes from, stage by stage: raw bytes from the
//! [`source`]s, checked by the [`health`] tests, condensed to full-entropy
//! blocks by the [`conditioner`], kept in the [`pool`], and stretched for
//! each guest by its [`drbg`]. Fails closed: with no healthy source, the
//! pool has nothing to give and requests wait.

pub mod conditioner;
pub mod drbg;
pub mod fairness;
pub mod health;
pub mod pool;
pub mod source;
