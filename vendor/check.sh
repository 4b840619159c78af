#!/usr/bin/env bash
# vendor/burn-flex is burn-flex 0.22.1 from crates.io with vendor/burn-flex.patch applied, and
# nothing else. This script proves it: it fetches the published crate (cargo, from crates.io),
# applies the patch to a copy, and compares the result with vendor/burn-flex.
#   bash vendor/check.sh           check (exit 1 on any difference)
#   bash vendor/check.sh --write   rebuild vendor/burn-flex from the crate and the patch
# Cargo's [patch] needs a whole crate at a path, and a fresh clone must build offline with the
# README's command, so the patched copy itself stays in the repository.
set -euo pipefail
cd "$(dirname "$0")"
version=0.22.1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/fetch/src"
cat > "$work/fetch/Cargo.toml" <<TOML
[package]
name = "fetch-burn-flex"
version = "0.0.0"
edition = "2021"
[dependencies]
burn-flex = "=$version"
TOML
: > "$work/fetch/src/lib.rs"
(cd "$work/fetch" && cargo fetch --quiet)
upstream=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/burn-flex-$version | head -1)
mkdir -p "$work/patched"
cp -r "$upstream/src" "$upstream/Cargo.toml" "$upstream/README.md" "$work/patched/"
(cd "$work/patched" && patch --quiet -p1 < "$OLDPWD/burn-flex.patch")
if [ "${1:-}" = --write ]; then
    rm -rf burn-flex
    cp -r "$work/patched" burn-flex
    echo "vendor/burn-flex rebuilt from burn-flex $version + burn-flex.patch"
elif diff -r "$work/patched" burn-flex; then
    echo "vendor/burn-flex = burn-flex $version from crates.io + burn-flex.patch ($(grep -c '^[-+][^-+]' burn-flex.patch) changed lines)"
else
    echo "vendor/burn-flex differs from burn-flex $version + burn-flex.patch" >&2
    exit 1
fi
