#!/usr/bin/env bash
# Fetch the peer implementations bench/moe_layer.py compares against (SonicMoE and what it
# needs beyond the GPU machine's packages) into .whl/, for a device call to carry.
#
#   bash bench/peer_wheels.sh [DEST]      # default .whl (ignored by git); ~55 MiB
#
# The GPU machine has Python 3.12, torch 2.11 (cu130) and no network. Versions are pinned
# together: sonic-moe 0.1.2.post1 pins nvidia-cutlass-dsl 4.4.2, and quack-kernels after 0.3.11
# needs a newer one. The CUTLASS DSL's libraries are a 78 MB wheel, over the 64 MiB a device
# call carries, so they travel as an xz tarball of the wheel's contents, which
# bench/gpu_session.sh unpacks into its site folder beside the wheels.
set -eu
dest=${1:-.whl}
mkdir -p "$dest"
platforms=""
for n in 17 24 27 28; do platforms="$platforms --platform manylinux_2_${n}_x86_64"; done
download() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    $platforms --platform manylinux2014_x86_64 -d "$1" "${@:2}"
}
download "$dest" sonic-moe==0.1.2.post1 quack-kernels==0.3.11 nvidia-cutlass-dsl==4.4.2 \
  apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
download "$tmp" nvidia-cutlass-dsl-libs-cu13==4.4.2
mkdir "$tmp/unpacked"
python3 -m zipfile -e "$tmp"/nvidia_cutlass_dsl_libs_cu13-*.whl "$tmp/unpacked"
XZ_OPT=-9e tar -C "$tmp/unpacked" -cJf "$dest/nvidia_cutlass_dsl_libs_cu13-4.4.2.tar.xz" .
du -sh "$dest"
