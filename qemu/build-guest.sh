#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Build the vhost-rng test guest: Debian's cloud kernel plus a busybox
# initramfs whose /init (guest-init.sh) reads /dev/hwrng and reports.
# Needs: apt-get (after apt-get update), dpkg-deb, busybox-static, cpio, gzip.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
self=$here/$(basename "${BASH_SOURCE[0]}")
init_src=$here/guest-init.sh
meta_pkg=linux-image-cloud-amd64

# Wanted in the guest; their dependencies are added automatically (listed
# here in dependency order all the same).  virtio_net (with net_failover and
# failover, which it needs) is the NIC of vrng.mode=agent-tcp.
modules=(
	virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
	virtio-rng virtio_blk
	vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport
	failover net_failover virtio_net
)
# Enough for guest-init.sh; its debug shell installs the rest itself.
applets=(sh mount mkdir cat echo sleep insmod uname awk dd timeout wc sed
	sha256sum cut head od tr sync poweroff setsid cttyhack ip dmesg grep)

usage() {
	cat <<EOF
Usage: $0 [--out DIR] [--agent PATH] [--force]

Builds DIR/bzImage, DIR/initramfs.cpio.gz, DIR/VERSION and DIR/MODULES.
Does nothing if they are newer than this script, guest-init.sh and the
--agent binary.

  --out DIR     output directory (default: \$VHOST_RNG_GUEST_DIR, else
                <repo>/target/qemu-guest)
  --agent PATH  also install PATH, a statically linked vhost-rng-agent, as
                /bin/vhost-rng-agent (for vrng.mode=agent and agent-tcp; default:
                \$VHOST_RNG_AGENT, else none)
  --force       rebuild even if up to date
EOF
}

die() {
	echo "build-guest: error: $*" >&2
	exit 1
}
warn() { echo "build-guest: warning: $*" >&2; }

out=${VHOST_RNG_GUEST_DIR:-$here/../target/qemu-guest}
agent=${VHOST_RNG_AGENT:-}
force=0
while [ $# -gt 0 ]; do
	case "$1" in
	--out)
		[ $# -ge 2 ] || die "--out needs a directory"
		out=$2
		shift 2
		;;
	--agent)
		[ $# -ge 2 ] || die "--agent needs a file"
		agent=$2
		shift 2
		;;
	--force) force=1 && shift ;;
	-h | --help) usage && exit 0 ;;
	*) usage >&2 && exit 2 ;;
	esac
done

if [ -n "$agent" ]; then
	[ -f "$agent" ] || die "no agent binary at $agent"
	# The initramfs has no libc: a dynamically linked binary cannot start.
	# (ldd succeeds on static-pie binaries too, but lists no libraries.)
	if ldd "$agent" 2>/dev/null | grep -q '=>'; then
		die "$agent is dynamically linked: build it with" \
			"RUSTFLAGS='-C target-feature=+crt-static' --target x86_64-unknown-linux-gnu"
	fi
	agent=$(cd "$(dirname "$agent")" && pwd)/$(basename "$agent")
fi

mkdir -p "$out"
out=$(cd "$out" && pwd)
# Tests may build from several processes at once.
exec 9>"$out/.lock"
flock 9

fresh() {
	local f
	for f in bzImage initramfs.cpio.gz; do
		[ -f "$out/$f" ] && [ "$out/$f" -nt "$self" ] && [ "$out/$f" -nt "$init_src" ] || return 1
	done
	# The image must hold this agent, or none if none was asked for.
	[ "$(cat "$out/AGENT" 2>/dev/null)" = "$agent" ] || return 1
	[ -z "$agent" ] || [ "$out/initramfs.cpio.gz" -nt "$agent" ]
}
if [ "$force" = 0 ] && fresh; then
	echo "build-guest: up to date: $out"
	exit 0
fi
# A half-finished build must not look fresh next time.
rm -f "$out/bzImage" "$out/initramfs.cpio.gz"

bb=$(command -v busybox) || die "busybox not found: apt-get install busybox-static"
if ldd "$bb" >/dev/null 2>&1; then
	die "$bb is dynamically linked: apt-get install busybox-static"
fi
command -v cpio >/dev/null || die "cpio not found: apt-get install cpio"

pkg=$(apt-cache depends "$meta_pkg" 2>/dev/null |
	awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }') || true
[ -n "$pkg" ] || die "apt-cache knows no $meta_pkg: run 'apt-get update' first"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

apt_opts=()
# As root, apt drops to _apt, which cannot write to our private temp dir.
[ "$(id -u)" = 0 ] && apt_opts=(-o APT::Sandbox::User=root)
(cd "$tmp" && apt-get download -q "${apt_opts[@]}" "$pkg") ||
	die "apt-get download $pkg failed"
deb=$(echo "$tmp"/*.deb)
echo "build-guest: kernel package $pkg $(dpkg-deb -f "$deb" Version)"
dpkg-deb -x "$deb" "$tmp/pkg"

moddir=$(echo "$tmp"/pkg/lib/modules/*)
kver=$(basename "$moddir")
[ -d "$moddir/kernel" ] || die "no modules found in $pkg"

root=$tmp/root
mkdir -p "$root"/{bin,dev,proc,sys,tmp,etc,lib/modules}
cp "$bb" "$root/bin/busybox"
for a in "${applets[@]}"; do
	ln -s busybox "$root/bin/$a"
done
install -m 0755 "$init_src" "$root/init"
[ -z "$agent" ] || install -m 0755 "$agent" "$root/bin/vhost-rng-agent"
# Without it the kernel starts /init with no stdin/stdout (mknod needs root;
# the init script reopens the console from devtmpfs as well).
[ "$(id -u)" = 0 ] && mknod "$root/dev/console" c 5 1

# Module names use '_' and '-' interchangeably; file names may have either.
find_module() {
	find "$moddir/kernel" -name "${1//[-_]/[-_]}.ko*" -print -quit
}
is_builtin() {
	grep -qE "/${1//[-_]/[-_]}\.ko$" "$moddir/modules.builtin" 2>/dev/null
}
module_deps() {
	if command -v modinfo >/dev/null; then
		modinfo -F depends "$1"
	else # kmod is not always installed: read the .modinfo strings directly
		tr '\0' '\n' <"$1" | sed -n 's/^depends=//p' | head -n 1
	fi | tr ',' ' '
}

declare -A seen=()
order=()
# Depth-first so that every module is copied after its dependencies.
add_module() {
	local name=$1 file dest dep
	[ -z "${seen[${name//-/_}]:-}" ] || return 0
	seen[${name//-/_}]=1
	if is_builtin "$name"; then
		warn "$name is built into the kernel; skipped"
		return 0
	fi
	file=$(find_module "$name")
	if [ -z "$file" ]; then
		warn "module $name not found in $pkg; skipped"
		return 0
	fi
	name=$(basename "$file")
	name=${name%%.ko*}
	dest=$root/lib/modules/$name.ko
	# busybox insmod cannot decompress.
	case "$file" in
	*.ko.xz) xz -dc "$file" >"$dest" ;;
	*.ko.zst) zstd -qdc "$file" >"$dest" ;;
	*.ko.gz) gzip -dc "$file" >"$dest" ;;
	*) cp "$file" "$dest" ;;
	esac
	for dep in $(module_deps "$dest"); do
		add_module "$dep"
	done
	order+=("$name")
}
for m in "${modules[@]}"; do
	add_module "$m"
done
printf '%s\n' "${order[@]}" >"$root/etc/vrng-modules"

echo "$kver" >"$out/VERSION"
cp "$root/etc/vrng-modules" "$out/MODULES"
echo "$agent" >"$out/AGENT"
cp "$tmp"/pkg/boot/vmlinuz-* "$out/bzImage"
# Sorted file list and root ownership keep the image independent of who built it.
(cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) |
	gzip -6n >"$out/initramfs.cpio.gz.tmp"
mv "$out/initramfs.cpio.gz.tmp" "$out/initramfs.cpio.gz"
echo "build-guest: built $out (kernel $kver; modules: ${order[*]}${agent:+; agent: $agent})"
