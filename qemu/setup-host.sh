#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Installs the host packages that the demo and the real-guest tests need
# (QEMU, busybox for the guest's initramfs, rng-tools5 for rngtest) and
# refreshes the package lists that qemu/build-guest.sh downloads the guest
# kernel with. Safe to run again: it does nothing that is already done.
set -euo pipefail

usage() {
	echo "Usage: $0   (run as root, or with sudo available)"
}
case "${1:-}" in
-h | --help) usage && exit 0 ;;
"") ;;
*) usage >&2 && exit 2 ;;
esac

packages=(qemu-system-x86 busybox-static cpio rng-tools5 systemd)
missing=()
for package in "${packages[@]}"; do
	dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" ||
		missing+=("$package")
done
# build-guest.sh asks apt which kernel linux-image-cloud-amd64 points at.
lists_ready=0
apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1 && lists_ready=1

if [ ${#missing[@]} -eq 0 ] && [ $lists_ready = 1 ]; then
	exit 0
fi

sudo=()
if [ "$(id -u)" != 0 ]; then
	command -v sudo >/dev/null || {
		echo "setup-host: need root to install: ${missing[*]}" >&2
		exit 1
	}
	sudo=(sudo)
fi
echo "setup-host: apt-get update${missing[*]:+; installing ${missing[*]}}"
"${sudo[@]}" apt-get update -q
if [ ${#missing[@]} -gt 0 ]; then
	DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q --no-install-recommends \
		"${missing[@]}"
fi
