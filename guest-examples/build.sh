#!/usr/bin/env bash
# Builds every example guest: guest-examples/<name>/*.c -> OUT_DIR/<name>.wasm,
# through bin/upstare-cc (the one supported way to build C for UpStare).
#
# usage: guest-examples/build.sh [OUT_DIR [SRC_DIR]]
#        (default: <repo>/target/guests, and the guests of guest-examples/;
#        the tests build their own version chains from another SRC_DIR)
#
# A guest folder may hold a `build.flags' file: extra upstare-cc flags,
# whitespace-separated, `#' starting a comment line. It may also hold a
# `versions' file: one line per further build of the same sources,
# `<output-name> <extra flags...>' (for example `kv-server-v2 -DKV_VERSION=2'
# -> OUT_DIR/kv-server-v2.wasm), after the build.flags; `#' starts a comment
# line there too.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
out=${1:-$root/target/guests}
src=${2:-$here}

"$root/scripts/install-toolchain"
mkdir -p "$out"

shopt -s nullglob
built=0
for d in "$src"/*/; do
    d=${d%/}
    name=$(basename "$d")
    [ "$name" = include ] && continue
    srcs=("$d"/*.c)
    [ ${#srcs[@]} -gt 0 ] || continue
    flags=()
    if [ -f "$d/build.flags" ]; then
        read -r -a flags <<<"$(grep -v '^[[:space:]]*#' "$d/build.flags" | tr '\n' ' ')"
    fi
    "$root/bin/upstare-cc" -Wall -Wextra "${flags[@]}" "${srcs[@]}" -o "$out/$name.wasm"
    echo "built $out/$name.wasm"
    built=$((built + 1))
    [ -f "$d/versions" ] || continue
    while read -r -a version; do
        [ ${#version[@]} -gt 0 ] || continue
        case ${version[0]} in
        '#'*) continue ;;
        */* | .*) echo "build.sh: $d/versions: bad output name '${version[0]}'" >&2; exit 1 ;;
        esac
        "$root/bin/upstare-cc" -Wall -Wextra "${flags[@]}" "${version[@]:1}" "${srcs[@]}" \
            -o "$out/${version[0]}.wasm"
        echo "built $out/${version[0]}.wasm"
    done <"$d/versions"
done
[ "$built" -gt 0 ] || { echo "build.sh: no guests found under $src" >&2; exit 1; }
