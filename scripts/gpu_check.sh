#!/usr/bin/env bash
# The GPU check of nnsight-rs (issue 18), prepared to run on a machine with an NVIDIA GPU and
# driver. It has NOT been run on a GPU yet: nothing in the repository was ever tested on CUDA.
#
#   scripts/gpu_check.sh            # set-up with --cuda, build, device tests on CUDA, timing
#
# Steps (each prints a `== ` heading; the script stops at the first failure):
#   1. nvidia-smi (informational);
#   2. `cargo xtask setup --cuda`: the CUDA libtorch (several GB; needs the package index, or a
#      cache folder `$NNSIGHT_CACHE` already holding the wheels, which setup reuses offline);
#   3. `cargo build --release --tests`, then a check that the device test binary records
#      libtorch_cuda.so as NEEDED (the --no-as-needed link of build.rs);
#   4. tests/device.rs with NNSIGHT_TEST_DEVICE=cuda: tch::Cuda::is_available() and the device
#      count, every loader on Cuda(0) in f32 / f16 / bf16 against the CPU, inputs on the model's
#      device, and the error for a CUDA index beyond the device count;
#   5. tests/device_map.rs with NNSIGHT_TEST_DEVICE=cuda: a device map splitting the fixtures
#      over Cuda(0) and Cuda(1) against the CPU (needs 2 GPUs; prints a skip with fewer);
#   6. the generation timing (tests/device.rs `generation_timing`) on CUDA, then on the CPU.
#
# Variables: SKIP_SETUP=1 skips step 2 (the CUDA libtorch is already linked as .nnsight/libtorch);
# NNSIGHT_TEST_DEVICE (default `cuda`, e.g. `cuda:1`); CARGO_FLAGS (e.g. `--offline`).
set -euo pipefail
cd "$(dirname "$0")/.."

device="${NNSIGHT_TEST_DEVICE:-cuda}"
flags=(--release ${CARGO_FLAGS:-})
start=$(date +%s)
step() { echo; echo "== $* ($(( $(date +%s) - start )) s)"; }

step "nvidia-smi"
nvidia-smi || echo "warning: nvidia-smi failed or is missing: CUDA will not be available"

if [[ "${SKIP_SETUP:-0}" != 1 ]]; then
    step "cargo xtask setup --cuda"
    cargo xtask setup --cuda
fi
cargo xtask doctor
lib="$(readlink -f .nnsight/libtorch)/lib"
if [[ ! -f "$lib/libtorch_cuda.so" ]]; then
    echo "error: $lib has no libtorch_cuda.so: .nnsight/libtorch is not the CUDA libtorch" >&2
    exit 1
fi

step "build (release, tests)"
cargo build "${flags[@]}" --tests
bin="$(ls -t target/release/deps/device-* | grep -v '\.d$' | head -1)"
if ! readelf -d "$bin" | grep -q 'NEEDED.*libtorch_cuda\.so'; then
    echo "error: $bin does not link libtorch_cuda.so (the --no-as-needed link of build.rs is missing)" >&2
    exit 1
fi
echo "$bin links libtorch_cuda.so"

step "device tests on $device"
NNSIGHT_TEST_DEVICE="$device" cargo test "${flags[@]}" --test device -- --nocapture --test-threads 1

step "device map tests on $device (two GPUs)"
NNSIGHT_TEST_DEVICE="$device" cargo test "${flags[@]}" --test device_map -- --nocapture --test-threads 1

step "generation timing on $device"
NNSIGHT_TEST_DEVICE="$device" cargo test "${flags[@]}" --test device -- --ignored generation_timing --nocapture

step "generation timing on the CPU (for comparison)"
NNSIGHT_TEST_DEVICE=cpu cargo test "${flags[@]}" --test device -- --ignored generation_timing --nocapture

step "done: all GPU checks passed"
