#!/usr/bin/env bash
# Each vendored crate (vendor/NAME) is the published crate from crates.io with vendor/NAME.patch
# applied, and nothing else. This script proves it: it fetches the published crates (cargo,
# from crates.io), applies each patch to a copy, and compares the result with vendor/NAME.
#   bash vendor/check.sh           check (exit 1 on any difference)
#   bash vendor/check.sh --write   rebuild every vendor/NAME from its crate and its patch
# Cargo's [patch] needs a whole crate at a path, and a fresh clone must build offline with the
# README's command, so the patched copies themselves stay in the repository.
set -euo pipefail
cd "$(dirname "$0")"
# name version files-kept (the crates' tests, benchmarks and examples are left out)
crates=(
    "burn-flex 0.22.1 src Cargo.toml README.md"
    "cubecl-cuda 0.11.3 src Cargo.toml build.rs README.md LICENSE-MIT LICENSE-APACHE"
)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/fetch/src"
{
    echo '[package]'
    echo 'name = "fetch-vendored"'
    echo 'version = "0.0.0"'
    echo 'edition = "2021"'
    echo '[dependencies]'
    for c in "${crates[@]}"; do
        read -r name version _ <<<"$c"
        echo "$name = { version = \"=$version\", default-features = false }"
    done
} >"$work/fetch/Cargo.toml"
: >"$work/fetch/src/lib.rs"
(cd "$work/fetch" && cargo fetch --quiet)
status=0
for c in "${crates[@]}"; do
    read -r name version files <<<"$c"
    upstream=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"$name-$version" | head -1)
    mkdir -p "$work/$name"
    for f in $files; do cp -r "$upstream/$f" "$work/$name/"; done
    (cd "$work/$name" && patch --quiet -p1 <"$OLDPWD/$name.patch")
    if [ "${1:-}" = --write ]; then
        rm -rf "$name"
        cp -r "$work/$name" "$name"
        echo "vendor/$name rebuilt from $name $version + $name.patch"
    elif diff -r "$work/$name" "$name"; then
        echo "vendor/$name = $name $version from crates.io + $name.patch ($(grep -c '^[-+][^-+]' "$name.patch") changed lines)"
    else
        echo "vendor/$name differs from $name $version + $name.patch" >&2
        status=1
    fi
done
exit $status
