#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Runs every test of vhost-rng, on a fresh Debian machine too: installs the
# host packages, builds the test guests, then runs the unit, integration and
# real-QEMU-guest tests. The real-guest tests fail (never skip) when QEMU, the
# guests, vhost-device-vsock or the static agent are missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

qemu/setup-host.sh
qemu/build-guest.sh

# The user the real-guest and sandbox tests pass to `serve --user` when run
# as root (tests/common: test_user), so that guests are served by an
# unprivileged serving process as in production.
if [ "$(id -u)" = 0 ] && ! id vhost-rng-test >/dev/null 2>&1; then
	useradd --system --no-create-home --shell /usr/sbin/nologin vhost-rng-test
fi

# The vsock test (tests/qemu_vsock.rs) needs a vhost-user vsock backend...
if ! command -v vhost-device-vsock >/dev/null &&
	[ ! -x "$HOME/.cargo/bin/vhost-device-vsock" ]; then
	cargo install --locked vhost-device-vsock
fi
# ...and the agent, linked statically to run in the busybox guest.
agent=target/x86_64-unknown-linux-gnu/release/vhost-rng-agent
RUSTFLAGS='-C target-feature=+crt-static' \
	cargo build --locked --release --target x86_64-unknown-linux-gnu -p vhost-rng-agent
qemu/build-guest.sh --out target/qemu-guest-agent --agent "$agent"

# The jitter source reads the kernel's jitterentropy_rng over AF_ALG: load
# the modules where the kernel has them as modules, and say what this
# kernel offers (the tests read real bytes where it has the interface and
# check the operator's error where its config says it has not).
if command -v modprobe >/dev/null; then
	modprobe -q algif_rng 2>/dev/null || true
	modprobe -q jitterentropy_rng 2>/dev/null || true
fi
if zcat /proc/config.gz 2>/dev/null | grep -qx '# CONFIG_CRYPTO_USER_API_RNG is not set'; then
	echo "note: this kernel has no AF_ALG rng interface: the jitter tests check its error only"
fi

# libvirt for tests/libvirt.rs (domains booted from libvirt's own XML).
qemu/setup-libvirt.sh

unset VHOST_RNG_SKIP_QEMU VHOST_RNG_QEMU
cargo test --locked --workspace "$@"

# The Debian packages (cargo-deb), installed, upgraded under a running
# daemon, removed and purged on this machine: as root only (CI's machine).
if [ $# -eq 0 ] && [ "$(id -u)" = 0 ]; then
	if ! cargo deb --version >/dev/null 2>&1; then
		cargo install --locked cargo-deb
	fi
	tests/package.sh
fi

# The real-guest basics and in-place upgrades again on QEMU 10 (Debian
# bookworm-backports, unpacked under target/, the system QEMU untouched).
if [ $# -eq 0 ]; then
	qemu/fetch-qemu10.sh
	VHOST_RNG_QEMU=$PWD/target/qemu-10/root \
		cargo test --locked -p vhost-rng --test qemu_guest --test qemu_upgrade --test qemu_fifo
fi

# Every fuzz target for 30 s, two at a time (fuzz/run.sh builds them with
# cargo-fuzz, installed if missing, on the stable toolchain with
# RUSTC_BOOTSTRAP=1; where they cannot be built it replays the corpus as
# cargo test instead). About 2 minutes of build and 2 of fuzzing.
if [ $# -eq 0 ]; then
	FUZZ_JOBS="${FUZZ_JOBS:-$(nproc)}" fuzz/run.sh 30
fi
