#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# The Debian packages, built and installed on this machine (CI's throwaway
# machine, as root): every file where it belongs, the man pages render, the
# units pass systemd-analyze verify, the installed config passes
# --check-config, an upgrade of a running daemon keeps its guest served
# (tests/package_upgrade.rs), and remove / purge leave what they should.
# Cleans up after itself (purges both packages, stops its daemon).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ "$(id -u)" != 0 ]; then
	echo "tests/package.sh installs packages: run it as root" >&2
	exit 1
fi
for pkg in vhost-rng vhost-rng-agent; do
	if dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed'; then
		echo "$pkg is already installed on this machine; not touching it" >&2
		exit 1
	fi
done

target=${CARGO_TARGET_DIR:-$PWD/target}
version=$(cargo metadata --locked --no-deps --format-version 1 |
	sed -n 's/.*"name":"vhost-rng","version":"\([^"]*\)".*/\1/p')
[ -n "$version" ] || { echo "cannot read vhost-rng's version" >&2; exit 1; }
next="$version+pkgtest1"
work=$(mktemp -d)

failures=0
passed=0
fail() {
	echo "FAIL: $*" >&2
	failures=$((failures + 1))
}
ok() {
	echo "ok: $*"
	passed=$((passed + 1))
}

cleanup() {
	set +e
	dpkg -P vhost-rng vhost-rng-agent >/dev/null 2>&1
	rm -rf "$work"
}
trap cleanup EXIT

echo "== building the packages"
cargo deb --locked -p vhost-rng
[ -f "$target/debian/vhost-rng_${version}_amd64.deb" ] ||
	{ echo "cargo deb made no $target/debian/vhost-rng_${version}_amd64.deb" >&2; exit 1; }
deb="$work/vhost-rng_${version}_amd64.deb"
cp "$target/debian/vhost-rng_${version}_amd64.deb" "$deb"
# N+1: the same build, a higher version.
cargo deb --locked -p vhost-rng --no-build --deb-version "$next" -o "$work/vhost-rng_${next}_amd64.deb"
RUSTFLAGS='-C target-feature=+crt-static' \
	cargo deb --locked -p vhost-rng-agent --target x86_64-unknown-linux-gnu
agent_deb="$target/x86_64-unknown-linux-gnu/debian/vhost-rng-agent_${version}_amd64.deb"
[ -f "$agent_deb" ] || { echo "cargo deb made no $agent_deb" >&2; exit 1; }
# The upgrade test's binary, built before anything is installed.
cargo test --locked -p vhost-rng --test package_upgrade --no-run

command -v man >/dev/null || apt-get install -y --no-install-recommends man-db

echo "== installing $deb and $agent_deb"
dpkg -i "$deb" "$agent_deb"

echo "== files"
expect=(
	/usr/bin/vhost-rng
	/usr/lib/systemd/system/vhost-rng.service
	/etc/vhost-rng/config.toml
	/usr/lib/udev/rules.d/60-vhost-rng.rules
	/usr/share/man/man5/vhost-rng.toml.5.gz
	/usr/share/man/man8/vhost-rng.8.gz
	/usr/share/man/man8/vhost-rng-serve.8.gz
	/usr/share/man/man8/vhost-rng-check.8.gz
	/usr/share/man/man8/vhost-rng-guest.8.gz
	/usr/share/man/man8/vhost-rng-status.8.gz
	/usr/share/man/man8/vhost-rng-agent.8.gz
	/usr/share/man/man8/vhost-rng-psk.8.gz
	/usr/share/man/man8/vhost-rng-upgrade.8.gz
	/usr/share/bash-completion/completions/vhost-rng
	/usr/share/zsh/vendor-completions/_vhost-rng
	/usr/share/fish/vendor_completions.d/vhost-rng.fish
	/usr/share/doc/vhost-rng/README.md
	/usr/bin/vhost-rng-agent
	/usr/lib/systemd/system/vhost-rng-agent.service
	/etc/default/vhost-rng-agent
)
# What contrib/ has (some come with other work) is installed too.
for unit in contrib/systemd/*.service contrib/systemd/*.socket; do
	if [ -e "$unit" ]; then expect+=("/usr/lib/systemd/system/$(basename "$unit")"); fi
done
if [ -e contrib/qemu/50-vhost-rng.json ]; then
	expect+=(/usr/share/qemu/vhost-user/50-vhost-rng.json)
fi
for hook in contrib/libvirt/qemu.d/*; do
	if [ -f "$hook" ] && [ -x "$hook" ]; then
		expect+=("/etc/libvirt/hooks/qemu.d/$(basename "$hook")")
	fi
done
for path in "${expect[@]}"; do
	if [ -f "$path" ]; then ok "$path"; else fail "$path is missing"; fi
done
# Every file of either package is one of those, a doc or a man page.
for pkg in vhost-rng vhost-rng-agent; do
	while read -r path; do
		[ -f "$path" ] || continue
		case "$path" in
		/usr/share/doc/* | /usr/share/man/*) continue ;;
		esac
		if ! printf '%s\n' "${expect[@]}" | grep -qx "$path"; then
			fail "$pkg installs $path, which no test expects"
		fi
	done < <(dpkg -L "$pkg")
done
conffiles=$(dpkg-query -W -f='${Conffiles}\n' vhost-rng vhost-rng-agent)
for conffile in /etc/vhost-rng/config.toml /etc/default/vhost-rng-agent; do
	if grep -q " $conffile " <<<"$conffiles"; then ok "$conffile is a conffile"; else fail "$conffile is not a conffile"; fi
done
if file -L /usr/bin/vhost-rng-agent | grep -Eq 'statically linked|static-pie linked'; then
	ok "the agent is static"
else
	fail "the agent is not static: $(file -L /usr/bin/vhost-rng-agent)"
fi
if /usr/bin/vhost-rng --version | grep -Eq "^vhost-rng $version \(commit [0-9a-f]+\)$"; then
	ok "--version: $(/usr/bin/vhost-rng --version)"
else
	fail "--version: $(/usr/bin/vhost-rng --version)"
fi

echo "== user and group"
if getent passwd vhost-rng >/dev/null && getent group vhost-rng >/dev/null; then
	ok "the vhost-rng user and group exist"
else
	fail "no vhost-rng user or group"
fi
if [ "$(getent passwd vhost-rng | cut -d: -f7)" = /usr/sbin/nologin ]; then ok "no login shell"; else fail "vhost-rng has a shell"; fi

echo "== man pages"
for page in $(dpkg -L vhost-rng | grep '^/usr/share/man/man[0-9]/.'); do
	errors=$(MANWIDTH=80 man -l "$page" 2>&1 >"$work/page.txt") || true
	if [ -n "$errors" ] || [ ! -s "$work/page.txt" ]; then
		fail "man -l $page: ${errors:-empty}"
	else
		ok "man -l $page ($(wc -l <"$work/page.txt") lines)"
	fi
done
man -l /usr/share/man/man8/vhost-rng-serve.8.gz 2>/dev/null | grep -q -- '--check-config' ||
	fail "vhost-rng-serve(8) does not describe --check-config"

echo "== units"
units=$(dpkg -L vhost-rng vhost-rng-agent | grep '^/usr/lib/systemd/system/.*\.\(service\|socket\)$' | grep -v '@')
# shellcheck disable=SC2086
if out=$(systemd-analyze verify $units 2>&1) && [ -z "$out" ]; then
	ok "systemd-analyze verify $(echo $units)"
else
	fail "systemd-analyze verify: $out"
fi
for template in $(dpkg -L vhost-rng | grep '^/usr/lib/systemd/system/.*@\.\(service\|socket\)$'); do
	instance=$(basename "$template" | sed 's/@\./@pkgtest./')
	if out=$(systemd-analyze verify "$template:$instance" 2>&1) && [ -z "$out" ]; then
		ok "systemd-analyze verify $template ($instance)"
	else
		fail "systemd-analyze verify $template: $out"
	fi
done

echo "== the installed config"
if out=$(/usr/bin/vhost-rng serve --config /etc/vhost-rng/config.toml --check-config 2>&1); then
	ok "$out"
else
	fail "--check-config refuses the installed config: $out"
fi
echo 'no-such-key = 1' >"$work/bad.toml"
if /usr/bin/vhost-rng serve --config "$work/bad.toml" --check-config >/dev/null 2>&1; then
	fail "--check-config accepts a bad file"
else
	ok "--check-config refuses a bad file"
fi

echo "== upgrade of a running daemon to $next"
if VHOST_RNG_NEXT_DEB="$work/vhost-rng_${next}_amd64.deb" \
	cargo test --locked -p vhost-rng --test package_upgrade -- --ignored --nocapture; then
	ok "the guest was served throughout the package upgrade"
else
	fail "package upgrade"
fi
# The test stopped its daemon; what systemd would remove at stop goes too.
rm -rf /run/vhost-rng

echo "== remove keeps the user and config"
listed=$(dpkg -L vhost-rng vhost-rng-agent | grep -v '^/\.$' || true)
dpkg -r vhost-rng vhost-rng-agent
for path in /usr/bin/vhost-rng /usr/bin/vhost-rng-agent /usr/lib/systemd/system/vhost-rng.service \
	/usr/share/man/man8/vhost-rng.8.gz /usr/lib/udev/rules.d/60-vhost-rng.rules; do
	if [ -e "$path" ]; then fail "$path left after remove"; else ok "$path removed"; fi
done
for path in /etc/vhost-rng/config.toml /etc/default/vhost-rng-agent; do
	if [ -f "$path" ]; then ok "$path kept by remove"; else fail "remove removed $path"; fi
done
if getent passwd vhost-rng >/dev/null; then ok "user kept by remove"; else fail "remove removed the user"; fi

echo "== purge removes everything"
dpkg -P vhost-rng vhost-rng-agent
while read -r path; do
	# Directories shared with other packages stay; ours must go.
	if [ -d "$path" ] && [ ! -L "$path" ] && [[ "$path" != *vhost-rng* ]]; then
		continue
	fi
	if [ -e "$path" ] || [ -L "$path" ]; then fail "$path left after purge"; fi
done <<<"$listed"
for path in /etc/vhost-rng /etc/default/vhost-rng-agent \
	/etc/systemd/system/multi-user.target.wants/vhost-rng.service \
	/etc/systemd/system/sysinit.target.wants/vhost-rng-agent.service \
	/etc/systemd/system/vhost-rng.service /etc/systemd/system/vhost-rng-agent.service; do
	if [ -e "$path" ] || [ -L "$path" ]; then fail "$path left after purge"; else ok "$path gone"; fi
done
for state in /var/lib/systemd/deb-systemd-helper-enabled /var/lib/systemd/deb-systemd-helper-masked; do
	if [ -d "$state" ] && find "$state" -name '*vhost-rng*' | grep -q .; then
		fail "$state still names vhost-rng units"
	fi
done
if getent passwd vhost-rng >/dev/null || getent group vhost-rng >/dev/null; then
	fail "the vhost-rng user or group is left after purge"
else
	ok "user and group removed by purge"
fi
if dpkg-query -W vhost-rng >/dev/null 2>&1 || dpkg-query -W vhost-rng-agent >/dev/null 2>&1; then
	fail "dpkg still knows the packages"
else
	ok "dpkg knows neither package"
fi

echo "package: $passed passed, $failures failed"
[ "$failures" = 0 ]
