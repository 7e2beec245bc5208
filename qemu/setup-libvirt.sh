#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Sets up libvirt for tests/libvirt.rs: installs libvirt-daemon-system and
# libvirt-clients, installs the tests' qemu hook (it runs `vhost-rng
# libvirt-hook` from this checkout for domains named hooked-* only, against
# the control socket the hook test's daemon uses), and starts virtlogd and
# libvirtd: with systemctl where systemd runs, by hand where it does not
# (libvirtd reads its hooks when it starts, so it is restarted when the hook
# changed). Run as root; safe to run again.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

missing=()
for package in libvirt-daemon-system libvirt-clients; do
	dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" ||
		missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
	echo "setup-libvirt: installing ${missing[*]}"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
fi

binary=${CARGO_TARGET_DIR:-$PWD/target}/debug/vhost-rng
hook=/etc/libvirt/hooks/qemu.d/vhost-rng-test
wanted=$(
	cat <<HOOK
#!/bin/sh
# vhost-rng's tests (qemu/setup-libvirt.sh): domains named hooked-* only.
case "\$1" in hooked-*) exec $binary libvirt-hook --control /run/vhost-rng-test/control.sock "\$@" ;; esac
HOOK
)
restart=0
if [ "$(cat "$hook" 2>/dev/null)" != "$wanted" ]; then
	mkdir -p "$(dirname "$hook")"
	printf '%s\n' "$wanted" >"$hook"
	chmod 755 "$hook"
	restart=1
fi

if [ -d /run/systemd/system ]; then
	systemctl start virtlogd
	if [ $restart = 1 ]; then systemctl restart libvirtd; else systemctl start libvirtd; fi
else
	pgrep -x virtlogd >/dev/null || virtlogd -d
	if [ $restart = 1 ] || ! pgrep -x libvirtd >/dev/null; then
		pkill -x libvirtd && sleep 1 || true
		libvirtd -d
	fi
fi
for _ in $(seq 60); do
	virsh -c qemu:///system version >/dev/null 2>&1 && exit 0
	sleep 0.5
done
echo "setup-libvirt: libvirtd does not answer" >&2
exit 1
