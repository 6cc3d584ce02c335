#!/usr/bin/env bash
# Tarballs for tools/gpu_ab.sh from this checkout: .snap/a.tar = HEAD, .snap/b.tar = HEAD with
# the given patches applied in order (e.g. the unvalidated kernels kept under bench/patches/).
#
#   bash tools/make_ab.sh bench/patches/decode-fuse-combine.patch bench/patches/decode-select-regs.patch
#   # then on the GPU (carry [".whl", ".snap"]):
#   bash tools/gpu_ab.sh .snap/a.tar .snap/b.tar "decode and cuda" bench/bench_decode.py
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
mkdir -p .snap
git archive HEAD -o .snap/a.tar
tmp=$(mktemp -d)
trap 'git -C "$root" worktree remove --force "$tmp" >/dev/null 2>&1 || rm -rf "$tmp"' EXIT
git worktree add --detach "$tmp" HEAD >/dev/null
for patch in "$@"; do git -C "$tmp" apply "$root/$patch"; done
tar cf .snap/b.tar -C "$tmp" --exclude=.git .
echo "a.tar = HEAD ($(git rev-parse --short HEAD)); b.tar = HEAD + $*"
