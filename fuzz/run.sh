#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Fuzzes the daemon: builds the fuzz targets of fuzz/ with cargo-fuzz and
# runs each for SECONDS, then prints per target the executions, the
# coverage libFuzzer reached (cov: edges, ft: features) and the crashes.
# Exits non-zero if any target crashed, hung or could not run.
#
#   fuzz/run.sh SECONDS [TARGET...]      (no TARGET: every target)
#
# Toolchain: cargo-fuzz needs rustc's unstable flags (sanitizer coverage).
# By default the machine's stable toolchain is used with RUSTC_BOOTSTRAP=1,
# which takes them and needs nothing downloaded; FUZZ_TOOLCHAIN=nightly uses
# a nightly toolchain instead (rustup installs it if it is missing and can
# be fetched; otherwise stable it is). cargo-fuzz is installed from crates.io
# if missing. If the fuzz targets cannot be built that way at all, the
# corpus is replayed as `cargo test` instead (no fuzzing), and the script
# says so.
#
# Environment:
#   FUZZ_JOBS            targets run at once (default 1; CI uses nproc)
#   FUZZ_TOOLCHAIN       stable (default) or nightly
#   FUZZ_SANITIZER       none (default) or address
#   FUZZ_CODEGEN_UNITS   codegen units of the build (default 16: a faster
#                        build for a slightly slower fuzzer)
#   CARGO_TARGET_DIR     build directory (default: target/fuzz at the root)
#
# Each target's corpus grows in $CARGO_TARGET_DIR/corpus/TARGET, from the
# committed seeds in fuzz/corpus/TARGET; crashes are kept in
# $CARGO_TARGET_DIR/artifacts/ and logs in $CARGO_TARGET_DIR/logs/.
set -euo pipefail
fuzz_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$fuzz_dir")"
cd "$root"

if [ $# -lt 1 ] || ! [[ $1 =~ ^[0-9]+$ ]]; then
	echo "usage: fuzz/run.sh SECONDS [TARGET...]" >&2
	exit 2
fi
seconds=$1
shift
if [ $# -gt 0 ]; then
	targets=("$@")
else
	targets=()
	for file in "$fuzz_dir"/fuzz_targets/*.rs; do
		targets+=("$(basename "$file" .rs)")
	done
fi
for target in "${targets[@]}"; do
	if [ ! -f "$fuzz_dir/fuzz_targets/$target.rs" ]; then
		echo "fuzz/run.sh: no target '$target' in fuzz/fuzz_targets/" >&2
		exit 2
	fi
done

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target/fuzz}"
jobs="${FUZZ_JOBS:-1}"
sanitizer="${FUZZ_SANITIZER:-none}"
codegen_units="${FUZZ_CODEGEN_UNITS:-16}"
toolchain="${FUZZ_TOOLCHAIN:-stable}"

# The corpus replayed as a test: what a machine that cannot build the
# instrumented targets still checks.
replay() {
	echo "== fuzz: $1; replaying the corpus as cargo test instead (no fuzzing)" >&2
	(cd "$fuzz_dir" && cargo test --locked --release --test corpus)
	exit 0
}

if ! cargo fuzz --version >/dev/null 2>&1; then
	echo "== fuzz: installing cargo-fuzz"
	cargo install --locked cargo-fuzz || replay "cargo-fuzz cannot be installed"
fi
cargo_fuzz=(cargo)
if [ "$toolchain" = nightly ]; then
	if rustup run nightly rustc --version >/dev/null 2>&1 ||
		timeout 300 rustup toolchain install nightly --profile minimal; then
		cargo_fuzz=(cargo +nightly)
	else
		echo "== fuzz: no nightly toolchain to be had; using stable with RUSTC_BOOTSTRAP=1"
		toolchain=stable
	fi
fi
if [ "$toolchain" != nightly ]; then
	# Lets the stable compiler take the unstable flags cargo-fuzz passes.
	export RUSTC_BOOTSTRAP=1
fi
echo "== fuzz: $(rustc "${cargo_fuzz[@]:1}" --version 2>/dev/null || rustc --version)," \
	"$(cargo fuzz --version), sanitizer $sanitizer"

build_flags=(--release --debug-assertions --sanitizer "$sanitizer" --codegen-units "$codegen_units")
started=$(date +%s)
if [ ${#targets[@]} -eq "$(ls "$fuzz_dir"/fuzz_targets/*.rs | wc -l)" ]; then
	"${cargo_fuzz[@]}" fuzz build "${build_flags[@]}" || replay "the fuzz targets do not build"
else
	for target in "${targets[@]}"; do
		"${cargo_fuzz[@]}" fuzz build "${build_flags[@]}" "$target" ||
			replay "fuzz target $target does not build"
	done
fi
echo "== fuzz: built in $(($(date +%s) - started)) s"

bin_dir="$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release"
logs="$CARGO_TARGET_DIR/logs"
artifacts="$CARGO_TARGET_DIR/artifacts"
mkdir -p "$logs" "$artifacts"

# Runs one target for $seconds; its log and exit code go to $logs.
fuzz_one() {
	local target=$1
	local corpus="$CARGO_TARGET_DIR/corpus/$target"
	mkdir -p "$corpus"
	rm -f "$artifacts/$target"-*
	local status=0
	# -timeout: an input running over 10 s is a hang, reported as a crash.
	"$bin_dir/$target" "$corpus" "$fuzz_dir/corpus/$target" \
		-max_total_time="$seconds" -timeout=10 -print_final_stats=1 \
		-artifact_prefix="$artifacts/$target-" >"$logs/$target.log" 2>&1 || status=$?
	echo "$status" >"$logs/$target.status"
}

running=0
for target in "${targets[@]}"; do
	if [ "$running" -ge "$jobs" ]; then
		wait -n || true
		running=$((running - 1))
	fi
	echo "== fuzz: $target for $seconds s"
	fuzz_one "$target" &
	running=$((running + 1))
done
wait

failed=0
passed=0
printf '%-18s %8s %12s %9s %7s %8s %8s\n' target seconds execs exec/s cov ft crashes
for target in "${targets[@]}"; do
	log="$logs/$target.log"
	status=$(cat "$logs/$target.status")
	execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
	rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
	last=$(grep -E '^#[0-9]+.* cov: ' "$log" | tail -1 || true)
	cov=$(sed -nE 's/.* cov: ([0-9]+).*/\1/p' <<<"$last")
	ft=$(sed -nE 's/.* ft: ([0-9]+).*/\1/p' <<<"$last")
	crashes=$(find "$artifacts" -name "$target-*" | wc -l)
	if [ "$status" != 0 ] && [ "$crashes" -eq 0 ]; then
		crashes="exit $status"
	fi
	printf '%-18s %8s %12s %9s %7s %8s %8s\n' "$target" "$seconds" "${execs:-?}" \
		"${rate:-?}" "${cov:-?}" "${ft:-?}" "$crashes"
	if [ "$status" != 0 ] || [ "$crashes" != 0 ]; then
		failed=$((failed + 1))
		echo "-- $target: exit $status; the end of $log:" >&2
		grep -v -E '^#[0-9]+' "$log" | tail -25 >&2
		find "$artifacts" -name "$target-*" -printf '   kept: %p\n' >&2
	else
		passed=$((passed + 1))
	fi
done
# A closing line test summaries are read for: targets without a finding.
echo "fuzz: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
