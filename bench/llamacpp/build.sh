#!/usr/bin/env bash
# Builds llama.cpp's llama-server and llama-bench (CPU, Release) from the source vendored in the
# PyPI sdist of llama-cpp-python, offline (pip reads the local index). Idempotent: skips the
# build when both binaries exist.
#
#   bench/llamacpp/build.sh            # -> ~/.cache/edgelora/llama.cpp/bin/{llama-server,llama-bench}
#   EDGELORA_LLAMACPP_DIR=DIR JOBS=1 bench/llamacpp/build.sh
#
# Prints the bin directory on its last line.
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
ROOT="${EDGELORA_LLAMACPP_DIR:-$HOME/.cache/edgelora/llama.cpp}"
JOBS="${JOBS:-2}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PIP="${PIP:-$REPO/.venv/bin/pip}"
SRC="$ROOT/src/llama_cpp_python-$VERSION"
BUILD="$ROOT/build"
BIN="$ROOT/bin"

if [[ -x "$BIN/llama-server" && -x "$BIN/llama-bench" ]]; then
    echo "already built: $BIN" >&2
    echo "$BIN"
    exit 0
fi

mkdir -p "$ROOT/sdist" "$ROOT/src" "$BIN"
SDIST="$ROOT/sdist/llama_cpp_python-$VERSION.tar.gz"
if [[ ! -f "$SDIST" ]]; then
    "$PIP" download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$ROOT/sdist" >&2
fi
if [[ ! -d "$SRC/vendor/llama.cpp" ]]; then
    tar -xzf "$SDIST" -C "$ROOT/src"
fi

# The instruction sets of this CPU, as -march=native would pick them, except AMX: on these VMs
# (Firecracker) the CPU flags list amx_tile/amx_int8 but ggml's AMX matmul segfaults on the first
# Q4_1 multiplication (llama-bench and llama-server alike). LLAMACPP_NATIVE=1 keeps -march=native.
isa_flags() {
    local flags
    flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
    local pairs="sse4_2:SSE42 f16c:F16C fma:FMA bmi2:BMI2 avx:AVX avx2:AVX2 avx_vnni:AVX_VNNI
        avx512f:AVX512 avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16"
    local pair
    for pair in $pairs; do
        if [[ "$flags" == *" ${pair%%:*} "* ]]; then echo "-DGGML_${pair##*:}=ON"; else
            echo "-DGGML_${pair##*:}=OFF"; fi
    done
    echo "-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
}
if [[ "${LLAMACPP_NATIVE:-0}" == 1 ]]; then
    ARCH=(-DGGML_NATIVE=ON)
else
    read -r -a ARCH <<< "-DGGML_NATIVE=OFF $(isa_flags | tr '\n' ' ')"
fi

# Offline CPU build: no HTTPS (model download), no prebuilt web UI fetch, no tests/examples
# we do not run.
cmake -S "$SRC/vendor/llama.cpp" -B "$BUILD" -G Ninja \
    -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF \
    "${ARCH[@]}" -DBUILD_SHARED_LIBS=OFF >&2
cmake --build "$BUILD" -j "$JOBS" --target llama-server llama-bench >&2
cp "$BUILD/bin/llama-server" "$BUILD/bin/llama-bench" "$BIN/"
echo "built: $BIN" >&2
echo "$BIN"
