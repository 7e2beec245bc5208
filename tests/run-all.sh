#!/usr/bin/env bash
# Runs every test of vhost-rng, on a fresh Debian machine too: installs the
# host packages, builds the test guest, then runs the unit, integration and
# real-QEMU-guest tests. The real-guest tests fail (never skip) when QEMU or
# the guest is missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

qemu/setup-host.sh
qemu/build-guest.sh
unset VHOST_RNG_SKIP_QEMU
cargo test --locked "$@"
