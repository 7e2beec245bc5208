#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Boot the vhost-rng test guest once under QEMU (TCG) in the foreground.
# The guest prints "VRNG ..." lines on stdout and powers off; this script
# exits with QEMU's status (124 if --timeout expired).  Note that QEMU exits
# 0 even when the guest reports "VRNG done status=error": parse the output.
# shellcheck disable=SC2054 # commas inside QEMU option values are intended
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

usage() {
	cat <<EOF
Usage: $0 [RNG SOURCE] [OPTIONS]

RNG source (at most one; with none the guest has no virtio-rng and reports
"VRNG done status=error reason=no_virtio_rng"):
  --socket PATH    vhost-user-rng-pci; QEMU connects to a daemon on PATH
  --server PATH    vhost-user-rng-pci; QEMU listens on PATH and waits for
                   the daemon to connect before starting the guest
  --builtin        QEMU's own virtio-rng-pci fed from /dev/urandom
  --egd PATH       QEMU's virtio-rng-pci fed by an EGD server on PATH
  --fifo PATH      QEMU's virtio-rng-pci fed from a file it reads (rng-random),
                   such as a vhost-rng fifo= guest's named pipe

vsock (may be combined with a source):
  --vsock PATH     vhost-user-vsock-pci; QEMU connects to a vsock device
                   backend (vhost-device-vsock --socket PATH) on PATH
  --agent          run the in-guest agent (vrng.mode=agent; the guest must
                   be built with build-guest.sh --agent) instead of reading
                   /dev/hwrng: it fetches --bytes bytes over vsock from the
                   daemon and injects them

TCP (a guest with only an IP network, as on Xen):
  --tcp-agent PORT NAME KEYFILE
                   give the guest a virtio-net NIC on QEMU user networking
                   and run the agent (vrng.mode=agent-tcp; the guest must be
                   built with build-guest.sh --agent) over encrypted TCP to
                   the daemon listening on the host's 127.0.0.1:PORT (the
                   guest reaches it as 10.0.2.2:PORT), as guest NAME with
                   the key in KEYFILE (vhost-rng psk new). Test only: the
                   key goes in on the kernel command line

Options:
  --bytes N        bytes the guest reads from /dev/hwrng (default 1048576)
  --out FILE       create FILE (N bytes rounded up to 512) as a virtio-blk
                   disk; the guest writes the bytes it read to its start
  --guest-dir DIR  built guest (default: \$VHOST_RNG_GUEST_DIR, else
                   <repo>/target/qemu-guest); see qemu/build-guest.sh
  --timeout SECS   kill QEMU after SECS seconds (default 120)
  --append STR     extra kernel command line arguments
  --log FILE       also write the guest console to FILE
  --shell          start a shell in the guest instead of the test
EOF
}

die() {
	echo "run-guest: error: $*" >&2
	exit 1
}

guest_dir=${VHOST_RNG_GUEST_DIR:-$here/../target/qemu-guest}
bytes=1048576
timeout=120
source_args=()
sources=0
vsock_args=()
net_args=()
tcp_args=
mode=
out=
append=
log=
shell=0
need() { [ "$2" -ge "${3:-2}" ] || die "$1 needs ${4:-a value}"; }
while [ $# -gt 0 ]; do
	case "$1" in
	--socket | --server | --egd | --fifo | --vsock | --bytes | --out | --guest-dir | --timeout | --append | --log)
		need "$1" $#
		;;
	--tcp-agent) need "$1" $# 4 "PORT NAME KEYFILE" ;;
	esac
	case "$1" in
	--socket)
		source_args=(-chardev "socket,id=vrng0,path=$2"
			-device vhost-user-rng-pci,chardev=vrng0)
		sources=$((sources + 1))
		;;
	--server)
		source_args=(-chardev "socket,id=vrng0,path=$2,server=on,wait=on"
			-device vhost-user-rng-pci,chardev=vrng0)
		sources=$((sources + 1))
		;;
	--builtin)
		source_args=(-object rng-random,filename=/dev/urandom,id=r0
			-device virtio-rng-pci,rng=r0)
		sources=$((sources + 1))
		;;
	--egd)
		source_args=(-chardev "socket,id=egd0,path=$2"
			-object rng-egd,id=r0,chardev=egd0 -device virtio-rng-pci,rng=r0)
		sources=$((sources + 1))
		;;
	--fifo)
		source_args=(-object "rng-random,filename=$2,id=r0"
			-device virtio-rng-pci,rng=r0)
		sources=$((sources + 1))
		;;
	--vsock)
		vsock_args=(-chardev "socket,id=vs0,path=$2"
			-device vhost-user-vsock-pci,chardev=vs0)
		;;
	--agent)
		[ "${mode:-agent}" = agent ] || die "give --agent or --tcp-agent, not both"
		mode=agent
		;;
	--tcp-agent)
		[ "${mode:-agent-tcp}" = agent-tcp ] || die "give --agent or --tcp-agent, not both"
		[[ "$2" =~ ^[0-9]+$ ]] || die "--tcp-agent wants a port number, not '$2'"
		[[ "$3" =~ ^[A-Za-z0-9._-]+$ ]] || die "--tcp-agent wants a guest name, not '$3'"
		psk=$(tr -d '[:space:]' <"$4") || die "cannot read the key file $4"
		[[ "$psk" =~ ^[0-9a-fA-F]{64}$ ]] || die "$4 is not a key file (64 hex digits)"
		# user networking: the guest is 10.0.2.15 and reaches the host's
		# 127.0.0.1 as 10.0.2.2. Not restrict=on: that drops the guest's
		# connections to the host as well. romfile= skips the PXE ROM.
		net_args=(-netdev user,id=n0
			-device virtio-net-pci,netdev=n0,romfile=)
		tcp_args="vrng.port=$2 vrng.name=$3 vrng.psk=$psk"
		mode=agent-tcp
		;;
	--bytes) bytes=$2 ;;
	--out) out=$2 ;;
	--guest-dir) guest_dir=$2 ;;
	--timeout) timeout=$2 ;;
	--append) append=$2 ;;
	--log) log=$2 ;;
	--shell) shell=1 ;;
	-h | --help) usage && exit 0 ;;
	*) usage >&2 && exit 2 ;;
	esac
	case "$1" in
	--builtin | --shell | --agent) shift ;;
	--tcp-agent) shift 4 ;;
	*) shift 2 ;;
	esac
done
[ "$sources" -le 1 ] || die "give at most one of --socket, --server, --builtin, --egd"
[[ "$bytes" =~ ^[0-9]+$ ]] || die "--bytes wants a number, not '$bytes'"

kernel=$guest_dir/bzImage
initrd=$guest_dir/initramfs.cpio.gz
if [ ! -f "$kernel" ] || [ ! -f "$initrd" ]; then
	die "no test guest in $guest_dir: run qemu/build-guest.sh first"
fi

cmdline="console=ttyS0 quiet loglevel=3 panic=-1 vrng.bytes=$bytes"
args=()
if [ -n "$out" ]; then
	# Start from zeros so stale bytes from an earlier run cannot pass a check.
	: >"$out"
	truncate -s $(((bytes + 511) / 512 * 512)) "$out"
	args+=(-drive "file=$out,format=raw,if=virtio")
	cmdline+=" vrng.out=/dev/vda"
fi
[ "$shell" = 0 ] || mode=shell
[ -z "$mode" ] || cmdline+=" vrng.mode=$mode"
[ -z "$tcp_args" ] || cmdline+=" $tcp_args"
[ -z "$append" ] || cmdline+=" $append"

serial=stdio,id=ser0,signal=off
[ -z "$log" ] || serial+=",logfile=$log"
if [ "$shell" = 1 ]; then
	serial=${serial/signal=off/signal=on}
else
	# Unattended runs (CI has no stdin) must not read from, or wait on, a TTY.
	exec </dev/null
fi

# VHOST_RNG_QEMU=DIR runs the QEMU unpacked under DIR (qemu/fetch-qemu10.sh)
# instead of the system's, with its own firmware and data files.
qemu=qemu-system-x86_64
datadir=/usr/share/qemu
firmware=()
if [ -n "${VHOST_RNG_QEMU:-}" ]; then
	qemu=$VHOST_RNG_QEMU/usr/bin/qemu-system-x86_64
	datadir=$VHOST_RNG_QEMU/usr/share/qemu
	firmware=(-L "$datadir" -L /usr/share/seabios)
fi
# qboot boots straight into the kernel, without SeaBIOS's terminal escape
# codes on the console; Debian ships it in qemu-system-data.
[ ! -e "$datadir/qboot.rom" ] || firmware+=(-bios qboot.rom)

# vhost-user needs guest RAM shared with the backend: hence the memfd.
# --foreground keeps QEMU in our process group so callers can signal it.
exec timeout --foreground -k 5 "$timeout" "$qemu" \
	"${firmware[@]}" -accel tcg -m 256M \
	-object memory-backend-memfd,id=mem,size=256M,share=on -numa node,memdev=mem \
	-nographic -nodefaults -no-reboot -monitor none \
	-chardev "$serial" -serial chardev:ser0 \
	-kernel "$kernel" -initrd "$initrd" -append "$cmdline" \
	"${source_args[@]}" "${vsock_args[@]}" "${net_args[@]}" "${args[@]}"
