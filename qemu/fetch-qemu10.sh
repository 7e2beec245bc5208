#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Fetches QEMU 10 from Debian's bookworm-backports and unpacks it under
# target/qemu-10/root, for the real-guest tests to run on a second QEMU
# version (VHOST_RNG_QEMU=target/qemu-10/root). The system's QEMU is left
# alone: the packages are downloaded with a private apt configuration that
# adds bookworm-backports on the mirror the system already uses, and
# unpacked with dpkg-deb, never installed. Safe to run again.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

dest=target/qemu-10
root=$dest/root
if [ -x "$root/usr/bin/qemu-system-x86_64" ]; then
	exit 0
fi

# The mirror of the system's bookworm source (deb822 or one-line format).
mirror=$(awk '
	/^URIs:/ { uri = $2 }
	/^Suites:/ && uri != "" { for (i = 2; i <= NF; i++) if ($i == "bookworm") { print uri; exit } }
	/^deb / && $3 == "bookworm" { print $2; exit }
' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null | head -n 1)
[ -n "$mirror" ] || {
	echo "fetch-qemu10: no bookworm source in /etc/apt to take the mirror from" >&2
	exit 1
}

work=$dest/apt
rm -rf "$work"
mkdir -p "$work/sources.d" "$work/lists/partial" "$work/archives/partial" "$work/debs"
cat >"$work/sources.d/backports.sources" <<SOURCES
Types: deb
URIs: $mirror
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
apt_opts=(
	-o "Dir::Etc::SourceList=/dev/null"
	-o "Dir::Etc::SourceParts=$PWD/$work/sources.d"
	-o "Dir::State::Lists=$PWD/$work/lists"
	-o "Dir::Cache::Archives=$PWD/$work/archives"
	-o "Dir::State::status=/var/lib/dpkg/status"
)
echo "fetch-qemu10: apt-get update (bookworm-backports only, private lists)"
apt-get -q "${apt_opts[@]}" update >/dev/null
packages=(qemu-system-x86 qemu-system-common qemu-system-data qemu-system-modules-spice)
(cd "$work/debs" && apt-get -q "${apt_opts[@]}" download "${packages[@]/%//bookworm-backports}")
mkdir -p "$root"
for deb in "$work"/debs/*.deb; do
	dpkg-deb -x "$deb" "$root"
done
"$root/usr/bin/qemu-system-x86_64" --version | head -n 1
