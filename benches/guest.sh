#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# What a guest sees, in one run: real QEMU guests (TCG) read from /dev/hwrng
# through each backend, interleaved round by round, and boot to the kernel's
# "crng init done" with no RNG device, QEMU's builtin one and vhost-rng.
#
#   benches/guest.sh [--bytes N] [--rounds R] [--crng-timeout S]
#                    [--peer PATH] [--qemu DIR]
#
# Backends read through (each a fresh VM per round, same guest image):
#   builtin     QEMU's virtio-rng-pci fed from /dev/urandom (rng-random)
#   peer        vhost-device-rng (rust-vmm) over vhost-user-rng-pci
#   vhost-user  vhost-rng over vhost-user-rng-pci
#   fifo        vhost-rng fifo= guest read by QEMU's virtio-rng-pci
#               (rng-random on the daemon's named pipe)
# The time is the guest's own (dd of N bytes from /dev/hwrng, /proc/uptime
# before and after), so boot time is left out. Both vhost-rng guests run
# unlimited (no rate) in DRBG mode, from the machine's default sources.
#
# --peer PATH: the vhost-device-rng binary (default
#   $HOME/.cargo/bin/vhost-device-rng; `cargo install --locked
#   vhost-device-rng`); without one that row is left out and said so.
# --qemu DIR: a QEMU unpacked by qemu/fetch-qemu10.sh (its root), instead of
#   the system's.
# Output: a Markdown table per measurement, medians and every round.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bytes=$((4 * 1024 * 1024))
rounds=2
crng_timeout=30
peer=${HOME:-/root}/.cargo/bin/vhost-device-rng
while [ $# -gt 0 ]; do
	case "$1" in
	--bytes) bytes=$2 ;;
	--rounds) rounds=$2 ;;
	--crng-timeout) crng_timeout=$2 ;;
	--peer) peer=$2 ;;
	--qemu) export VHOST_RNG_QEMU=$2 ;;
	-h | --help)
		sed -n '3,27p' "$0" | sed 's/^# \{0,1\}//'
		exit 0
		;;
	*)
		echo "guest.sh: unknown argument $1 (--help)" >&2
		exit 2
		;;
	esac
	shift 2
done
for n in "$bytes" "$rounds" "$crng_timeout"; do
	[[ "$n" =~ ^[0-9]+$ ]] || {
		echo "guest.sh: not a number: $n" >&2
		exit 2
	}
done

[ -f target/qemu-guest/bzImage ] || qemu/build-guest.sh >&2
cargo build --release --locked -q -p vhost-rng
daemon=target/release/vhost-rng

work=$(mktemp -d /tmp/vhost-rng-guest-bench.XXXXXX)
pids=()
cleanup() {
	for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
	wait 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT

wait_for() {
	local i=0
	while [ ! -e "$1" ] && [ $i -lt 100 ]; do
		sleep 0.1
		i=$((i + 1))
	done
	[ -e "$1" ] || {
		echo "guest.sh: $2 did not create $1" >&2
		exit 1
	}
}

# One daemon serves both vhost-rng guests for the whole run, as on a host.
"$daemon" serve --guest "name=vu,socket=$work/vu.sock" \
	--guest "name=ff,fifo=$work/ff.fifo" \
	--control "$work/control.sock" 2>"$work/daemon.log" &
pids+=($!)
wait_for "$work/vu.sock" vhost-rng
wait_for "$work/ff.fifo" vhost-rng

backends=(builtin)
if [ -x "$peer" ]; then
	# vhost-device-rng listens on PATH0 for `--socket-path PATH -c 1`.
	"$peer" --socket-path "$work/peer.sock" -c 1 2>"$work/peer.log" &
	pids+=($!)
	wait_for "$work/peer.sock0" vhost-device-rng
	backends+=(peer)
else
	echo "note: no vhost-device-rng at $peer: the peer row is left out" >&2
fi
backends+=(vhost-user fifo)

source_of() {
	case "$1" in
	none) ;;
	builtin) echo --builtin ;;
	# vhost-device-rng takes one VMM connection and exits when it ends:
	# start a new one for every VM.
	peer) echo "--socket $work/peer.sock0" ;;
	vhost-user) echo "--socket $work/vu.sock" ;;
	fifo) echo "--fifo $work/ff.fifo" ;;
	esac
}

restart_peer() {
	if [ -e "$work/peer.sock0" ]; then return; fi
	"$peer" --socket-path "$work/peer.sock" -c 1 2>>"$work/peer.log" &
	pids+=($!)
	wait_for "$work/peer.sock0" vhost-device-rng
}

# Field KEY=VALUE of a VRNG line in FILE.
field() { grep -o "VRNG .*\b$2=[^ ]*" "$1" | sed "s/.*\b$2=//" | head -1; }

median() { sort -n | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

declare -A read_s
echo "== in-guest read of $bytes bytes from /dev/hwrng, $rounds round(s), interleaved" >&2
for round in $(seq 1 "$rounds"); do
	for backend in "${backends[@]}"; do
		[ "$backend" != peer ] || restart_peer
		log=$work/$backend.$round.log
		# shellcheck disable=SC2046 # source_of gives whole options
		if ! qemu/run-guest.sh $(source_of "$backend") --bytes "$bytes" \
			--timeout 600 --append "vrng.timeout=540" >"$log" 2>&1; then
			echo "guest.sh: the $backend guest failed: $(tail -3 "$log")" >&2
			exit 1
		fi
		grep -q 'VRNG done status=ok' "$log" || {
			echo "guest.sh: the $backend guest failed: $(grep VRNG "$log" | tail -3)" >&2
			exit 1
		}
		ms=$(field "$log" elapsed_ms)
		s=$(awk -v ms="$ms" 'BEGIN { printf "%.2f", ms / 1000 }')
		echo "   round $round $backend: $s s" >&2
		read_s[$backend]="${read_s[$backend]:-} $s"
	done
done

declare -A crng_s
crng_backends=(none builtin vhost-user)
echo "== boot to \"crng init done\" (timeout ${crng_timeout} s), $rounds round(s)" >&2
for round in $(seq 1 "$rounds"); do
	for backend in "${crng_backends[@]}"; do
		log=$work/crng-$backend.$round.log
		# shellcheck disable=SC2046
		qemu/run-guest.sh $(source_of "$backend") --timeout $((crng_timeout + 60)) \
			--append "vrng.mode=crng vrng.timeout=$crng_timeout" >"$log" 2>&1 || true
		at=$(field "$log" crng_init_s)
		[ -n "$at" ] || {
			echo "guest.sh: the $backend guest said nothing: $(tail -3 "$log")" >&2
			exit 1
		}
		echo "   round $round $backend: $at" >&2
		crng_s[$backend]="${crng_s[$backend]:-} $at"
	done
done

qemu_version=$("${VHOST_RNG_QEMU:+$VHOST_RNG_QEMU/usr/bin/}qemu-system-x86_64" --version | head -1)
echo
echo "$qemu_version, TCG; load before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "| backend | in-guest read of $bytes B, median (s) | rounds (s) | MB/s |"
echo "| --- | --- | --- | --- |"
for backend in "${backends[@]}"; do
	# shellcheck disable=SC2086
	m=$(printf '%s\n' ${read_s[$backend]} | median)
	rate=$(awk -v b="$bytes" -v s="$m" 'BEGIN { printf "%.2f", b / s / 1e6 }')
	echo "| $backend | $m |${read_s[$backend]} | $rate |"
done
echo
echo "| RNG device | boot to crng init done, median (s) | rounds (s) |"
echo "| --- | --- | --- |"
for backend in "${crng_backends[@]}"; do
	# shellcheck disable=SC2086
	if printf '%s\n' ${crng_s[$backend]} | grep -qx none; then
		m="not within ${crng_timeout} s"
	else
		m=$(printf '%s\n' ${crng_s[$backend]} | median)
	fi
	echo "| $backend | $m |${crng_s[$backend]} |"
done
