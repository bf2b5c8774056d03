#!/usr/bin/env bash
# Install the Debian packages moegen needs, only those missing (run as root).
set -euo pipefail
pkgs=(build-essential cmake pkg-config llvm-19-dev libyaml-dev libcmocka-dev
      libcjson-dev libxxhash-dev libopenblas-dev clang-format python3 python3-venv
      clang libclang-rt-14-dev # clang + libclang-rt: libFuzzer for tests/fuzz/run.sh
      # the aarch64 runtime archive and its tests under emulation
      gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user libcjson-dev:arm64
      openmpi-bin libopenmpi-dev) # expert parallelism over MPI (ep/, tests/ep)
missing=()
for p in "${pkgs[@]}"; do
	if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
		missing+=("$p")
	fi
done
if [ ${#missing[@]} -gt 0 ]; then
	echo "moegen: installing ${missing[*]}"
	if [ "$(id -u)" -ne 0 ]; then
		echo "moegen: run as root to install: ${missing[*]}" >&2
		exit 1
	fi
	export DEBIAN_FRONTEND=noninteractive
	# libcjson-dev:arm64 comes from Debian's arm64 archive (multiarch)
	if ! dpkg --print-foreign-architectures | grep -qx arm64; then
		dpkg --add-architecture arm64
	fi
	apt-get update -q
	apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
