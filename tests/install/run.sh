#!/usr/bin/env bash
# Install moegen from BUILD_DIR into a temporary prefix and build two programs
# against the install: one with CMake (find_package(moegen), moegen_compile)
# that links model.so, and one with pkg-config that links `--emit obj` with
# the runtime archive. Both run a forward. SANITIZE=ON: the install came from
# a sanitizer build, so the programs link the sanitizer runtime too.
set -euo pipefail
build=$(cd "$1" && pwd)
san=${2:-}
src=$(cd "$(dirname "$0")/../.." && pwd)
tmp=$(mktemp -d /tmp/moegen-install.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
flags=""
case "$san" in ON|on|1|TRUE|true) flags="-fsanitize=address,undefined" ;; esac

cmake --install "$build" --prefix "$tmp/prefix" >/dev/null
test -x "$tmp/prefix/bin/moegen"
test -f "$tmp/prefix/include/moegen/moe.h"
"$tmp/prefix/bin/moegen" --version | head -1

# CMake: find_package + moegen_compile, model.so linked by name
cmake -S "$src/tests/install/cmake" -B "$tmp/cmake" -DCMAKE_PREFIX_PATH="$tmp/prefix" \
	-DMOE_SPEC="$src/specs/mixtral-mini.yaml" -DCMAKE_C_FLAGS="$flags" >/dev/null
cmake --build "$tmp/cmake" >/dev/null
out=$("$tmp/cmake/app")
echo "cmake consumer: $out"
grep -q "hidden 48 " <<<"$out"

# pkg-config: an object from --emit obj plus the installed runtime archive
export PKG_CONFIG_PATH="$(dirname "$(find "$tmp/prefix" -name moegen.pc)")"
"$tmp/prefix/bin/moegen" "$src/specs/mixtral-mini.yaml" --emit obj -o "$tmp/model.o"
"$tmp/prefix/bin/moegen" "$src/specs/mixtral-mini.yaml" --emit header -o "$tmp/model.h"
# shellcheck disable=SC2046
cc -std=c11 -Wall -Wextra -Werror $flags -DMODEL_HEADER='"model.h"' -I"$tmp" \
	$(pkg-config --cflags moegen) -o "$tmp/app" "$src/tests/install/main.c" "$tmp/model.o" \
	$(pkg-config --libs moegen)
out=$("$tmp/app")
echo "pkg-config consumer: $out"
grep -q "hidden 64 " <<<"$out"
echo "install_consumers: ok"
