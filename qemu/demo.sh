#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# The vhost-rng demo: builds the daemon and a small Linux guest, serves the
# guest's /dev/hwrng over vhost-user, lets it read some entropy, and shows
# what each side saw. Works on a fresh Debian machine (installs what it needs).
set -euo pipefail

usage() {
	cat <<EOF2
Usage: $0 [--bytes N]

  --bytes N   bytes the guest reads from /dev/hwrng (default 1048576)
EOF2
}

bytes=1048576
while [ $# -gt 0 ]; do
	case "$1" in
	--bytes)
		[ $# -ge 2 ] || { usage >&2; exit 2; }
		bytes=$2
		shift 2
		;;
	-h | --help) usage && exit 0 ;;
	*) usage >&2 && exit 2 ;;
	esac
done
[[ "$bytes" =~ ^[1-9][0-9]*$ ]] || { echo "demo: --bytes wants a positive number" >&2; exit 2; }

cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -t 1 ]; then bold=$'\033[1m' plain=$'\033[0m'; else bold='' plain=''; fi
step() { printf '\n%s== %s%s\n' "$bold" "$*" "$plain"; }

step "Preparing the host (packages, daemon build, test guest)"
qemu/setup-host.sh
cargo build --release --locked --quiet
qemu/build-guest.sh
daemon=target/release/vhost-rng

work=$(mktemp -d)
socket=$work/demo-vm.sock
received=$work/received.bin
daemon_pid=
cleanup() {
	[ -z "$daemon_pid" ] || kill "$daemon_pid" 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT

step "Starting: $daemon serve --socket $socket"
# A control socket of its own, so a daemon already running here is not disturbed.
RUST_LOG=info "$daemon" serve --socket "$socket" --control "$work/control.sock" 2>"$work/daemon.log" &
daemon_pid=$!
for _ in $(seq 100); do
	grep -q "serving on" "$work/daemon.log" && break
	sleep 0.05
done
sed 's/^/  daemon | /' "$work/daemon.log"

step "Booting the guest (QEMU, vhost-user-rng-pci); it reads $bytes bytes from /dev/hwrng"
qemu/run-guest.sh --socket "$socket" --bytes "$bytes" --out "$received" >"$work/console.log"
tr -d '\r' <"$work/console.log" | grep '^VRNG ' | sed 's/^VRNG /  guest  | /'

step "What the host received back from the guest"
value() { tr -d '\r' <"$work/console.log" | sed -n "s/^VRNG .*\<$1=\([^ ]*\).*/\1/p" | tail -n 1; }
host_sha=$(head -c "$bytes" "$received" | sha256sum | cut -d' ' -f1)
ms=$(value elapsed_ms)
echo "  the guest's hardware RNG is: $(value rng_current)"
echo "  bytes read in the guest:     $(value read_bytes) in ${ms} ms" \
	"($((bytes * 1000 / (ms > 0 ? ms : 1) / 1024)) KiB/s under TCG emulation)"
if [ "$host_sha" = "$(value sha256)" ]; then
	echo "  sha256 on host and guest:    match ($host_sha)"
else
	echo "  sha256 on host and guest:    MISMATCH (host $host_sha, guest $(value sha256))"
fi
echo "  first bytes:"
head -c 64 "$received" | od -An -tx1 | sed 's/^/   /'

step "Stopping the daemon (SIGTERM)"
kill -TERM "$daemon_pid"
wait "$daemon_pid" || true
daemon_pid=
sed 's/^/  daemon | /' "$work/daemon.log" | tail -n +4
[ ! -e "$socket" ] && echo "  socket file removed"

if tr -d '\r' <"$work/console.log" | grep -q '^VRNG done status=ok'; then
	step "Result: the guest was served entropy by vhost-rng"
else
	step "Result: FAILED (see the guest lines above)"
	exit 1
fi
