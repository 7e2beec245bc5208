#!/bin/sh
# SPDX-License-Identifier: Apache-2.0
# /init of the vhost-rng test guest (busybox ash; build-guest.sh copies it in).
#
# Reads vrng.bytes bytes from /dev/hwrng, reports on the console in lines
# prefixed "VRNG " for the host to parse, then powers off.  Parameters come
# from the kernel command line:
#   vrng.bytes=N      bytes to read (default 1048576)
#   vrng.out=DEV      also write the bytes to DEV (a virtio-blk disk, /dev/vda)
#   vrng.timeout=S    give up reading after S seconds (default 60)
#   vrng.mode=agent   instead of reading /dev/hwrng, run the in-guest agent
#                     (/bin/vhost-rng, see build-guest.sh --agent) once
#                     against the host daemon over vsock and report its line
#                     (asking for vrng.bytes bytes)
#   vrng.mode=agent-tcp  the same over encrypted TCP, as a guest with only an
#                     IP network (Xen-like) would: bring up eth0 (virtio-net)
#                     with QEMU user networking's fixed addresses (guest
#                     10.0.2.15/24, host 10.0.2.2) and connect the agent to
#                     tcp:10.0.2.2:PORT as guest NAME with key HEX:
#   vrng.port=PORT    the daemon's TCP port (agent-tcp)
#   vrng.name=NAME    the guest's name on the host (agent-tcp)
#   vrng.psk=HEX      the guest's pre-shared key, 64 hex digits (agent-tcp;
#                     test only: the kernel command line is no place for a
#                     secret, see below)
#   vrng.mode=crng    instead of reading /dev/hwrng, wait (up to
#                     vrng.timeout seconds) for the kernel's "crng init done"
#                     and report when, in seconds since boot (benches/guest.sh)
#   vrng.mode=shell   skip the test and start a shell (debugging)
#
# No "set -e": PID 1 exiting panics the kernel and hides the reason, so every
# failure goes through fail(), which still prints a "VRNG done" line.

export PATH=/bin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# The kernel may have found no /dev/console in the initramfs to give us.
exec </dev/console >/dev/console 2>&1

say() { echo "VRNG $*"; }

finish() {
	sync
	poweroff -f
	# poweroff -f does not return; if it somehow does, let the kernel panic
	# (panic=-1 plus QEMU's -no-reboot ends the VM either way).
	exit 1
}

fail() {
	say "done status=error reason=$1"
	finish
}

bytes=1048576
out=
timeout=60
mode="test"
port=
name=
psk=
read -r cmdline </proc/cmdline
# shellcheck disable=SC2086 # split into words on purpose
for arg in $cmdline; do
	case "$arg" in
	vrng.bytes=*) bytes=${arg#*=} ;;
	vrng.out=*) out=${arg#*=} ;;
	vrng.timeout=*) timeout=${arg#*=} ;;
	vrng.mode=*) mode=${arg#*=} ;;
	vrng.port=*) port=${arg#*=} ;;
	vrng.name=*) name=${arg#*=} ;;
	vrng.psk=*) psk=${arg#*=} ;;
	esac
done

say "kernel=$(uname -r)"

# Dependency order was worked out on the host; a missing module is reported
# but not fatal, since the rng checks below catch what actually matters.
while read -r mod; do
	insmod "/lib/modules/$mod.ko" || say "warning=insmod_failed module=$mod"
done </etc/vrng-modules

if [ "$mode" = shell ]; then
	/bin/busybox --install -s /bin
	echo "vrng: debug shell; 'poweroff -f' to leave"
	setsid cttyhack sh
	finish
fi

case "$bytes" in
'' | *[!0-9]*) fail "bad_vrng.bytes" ;;
esac

if [ "$mode" = crng ]; then
	# The kernel's own timestamp of the line, so polling adds no error.
	waited=0
	while [ "$waited" -lt $((timeout * 10)) ]; do
		line=$(dmesg | grep -m1 'crng init done')
		if [ -n "$line" ]; then
			at=${line#\[}
			at=${at%%]*}
			say "crng_init_s=$(echo $at)"
			say "done status=ok"
			finish
		fi
		sleep 0.1
		waited=$((waited + 1))
	done
	say "crng_init_s=none uptime_s=$(cut -d' ' -f1 /proc/uptime)"
	say "done status=ok"
	finish
fi

# Runs the agent once with "$@" (--connect and what goes with it), reports
# its line and powers off.
run_agent() {
	[ -x /bin/vhost-rng-agent ] || fail "no_agent_in_initramfs"
	mkdir -p /tmp
	# Whether the kernel CRNG was seeded before the agent started: over TCP
	# the agent needs random bytes for its Noise handshake.
	crng=not_ready
	dmesg | grep -q 'crng init done' && crng=ready
	say "crng_before_agent=$crng"
	# The agent prints one "VRNG-AGENT ok|error ..." line on stdout and
	# explains failures on stderr.
	timeout "$timeout" /bin/vhost-rng-agent "$@" --once \
		--bytes "$bytes" --credit-bits-per-byte 4 >/tmp/agent.out 2>/tmp/agent.err
	rc=$?
	sed 's/^/VRNG agent-log: /' /tmp/agent.err
	cat /tmp/agent.out
	line=$(head -n 1 /tmp/agent.out)
	say "agent_rc=$rc"
	# Keyed "agent", e.g. "VRNG agent=ok bytes=256 credited_bits=1024".
	say "agent=${line#VRNG-AGENT }"
	case "$line" in
	"VRNG-AGENT ok "*) [ "$rc" -eq 0 ] || fail "agent_exit_$rc" ;;
	*)
		# busybox timeout passes on the status of the TERM it sent.
		case "$rc" in
		124 | 143) fail "agent_timeout" ;;
		esac
		fail "agent_failed"
		;;
	esac
	say "done status=ok"
	finish
}

if [ "$mode" = agent ]; then
	# Every module is in /etc/vrng-modules; say whether vsock made it in.
	[ -d /sys/module/vmw_vsock_virtio_transport ] || fail "no_vsock_transport"
	run_agent --connect vsock:2:5564
fi

if [ "$mode" = agent-tcp ]; then
	case "$port" in
	'' | *[!0-9]*) fail "bad_vrng.port" ;;
	esac
	[ -n "$name" ] || fail "no_vrng.name"
	[ -n "$psk" ] || fail "no_vrng.psk"
	[ -d /sys/module/virtio_net ] || fail "no_virtio_net"
	# QEMU user networking (slirp): the guest is 10.0.2.15, and 10.0.2.2 is
	# the host, where slirp turns connections into ones to the host's
	# 127.0.0.1.  The NIC may show up just after insmod returns.
	i=0
	while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 50 ]; do
		sleep 0.1
		i=$((i + 1))
	done
	[ -e /sys/class/net/eth0 ] || fail "no_eth0"
	ip link set lo up
	ip link set eth0 up || fail "eth0_up_failed"
	ip addr add 10.0.2.15/24 dev eth0 || fail "eth0_address_failed"
	ip route add default via 10.0.2.2 dev eth0 || fail "default_route_failed"
	# Test only: the key comes on the kernel command line, which any process
	# in the guest can read (/proc/cmdline).  A real deployment copies the
	# key file into the guest (mode 0600) instead, see docs/fallbacks.md.
	# umask 077 makes the file 0600: the agent refuses a key file that
	# group or others can read.
	mkdir -p /tmp
	(umask 077 && echo "$psk" >/tmp/host.psk) || fail "psk_write_failed"
	run_agent --connect "tcp:10.0.2.2:$port" --psk-file /tmp/host.psk \
		--name "$name"
fi

# virtio-rng registers with hw_random asynchronously after probe; give it a
# moment rather than racing it.
hw=/sys/class/misc/hw_random
i=0
while [ "$(cat $hw/rng_current 2>/dev/null)" != virtio_rng.0 ] && [ $i -lt 50 ]; do
	sleep 0.1
	i=$((i + 1))
done
# sysfs separates names with spaces (and ends with one): make it one token.
avail=$(tr -s ' \n' ',,' <$hw/rng_available 2>/dev/null)
say "rng_available=${avail%,}"
current=$(cat $hw/rng_current 2>/dev/null)
say "rng_current=$current"
[ "$current" = virtio_rng.0 ] || fail "no_virtio_rng"

# Bytes go to RAM first so the timing covers /dev/hwrng alone.  fullblock
# makes dd retry the short reads virtio-rng returns; count_bytes makes the
# count exact for sizes that are not a multiple of bs.
data=/tmp/rng.bin
mkdir -p /tmp
ms() { awk '{ printf "%d", $1 * 1000 }' /proc/uptime; }
start=$(ms)
timeout "$timeout" dd if=/dev/hwrng of="$data" bs=4096 count="$bytes" \
	iflag=fullblock,count_bytes 2>/tmp/dd.err
rc=$?
end=$(ms)
got=$(wc -c <"$data")
say "read_bytes=$got elapsed_ms=$((end - start))"
if [ "$rc" -ne 0 ]; then
	sed 's/^/VRNG dd: /' /tmp/dd.err
	[ "$got" -lt "$bytes" ] && fail "read_timeout_or_error"
fi
[ "$got" -eq "$bytes" ] || fail "short_read"

say "sha256=$(sha256sum "$data" | cut -d' ' -f1)"
say "first16=$(head -c 16 "$data" | od -An -tx1 | tr -d ' \n')"

if [ -n "$out" ]; then
	[ -b "$out" ] || fail "out_not_a_block_device"
	dd if="$data" of="$out" bs=4096 conv=notrunc,fsync 2>/tmp/dd.err ||
		fail "write_out_failed"
fi

say "done status=ok"
finish
