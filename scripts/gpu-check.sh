#!/usr/bin/env bash
# GPU checks for a machine with a real GPU (our CI has none: it runs the same suite on
# lavapipe). Usage: scripts/gpu-check.sh [vulkan|cuda] [device, e.g. vulkan:0 or cuda:0]
# Prints one JSON line per row: the oracle suite's result, then phi-bench rows (smollm2-135m,
# phi3-small, phi3-mini; lora, full, forward; f32 and bf16). `cuda` needs network for its
# first build (its LLVM download, docs/architecture.md).
set -uo pipefail
cd "$(dirname "$0")/.."
feature="${1:-vulkan}"
device="${2:-$feature}"
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
cargo build --release --features "$feature" -p phi-bench >/dev/null || exit 1
start=$(date +%s)
# The oracle suite, half-precision autocast against PEFT, and our GPU ops against the composed
# ones (tests/gpu_ops.rs).
if PHI_TEST_DEVICE="$device" cargo test --release -p phi-model -p phi-adapters -p phi-regularizers \
    -p phi-kernels --features "phi-model/$feature" --test oracle --test gpu_ops -- \
    every_oracle_case_matches_transformers lora_and_rslora_match_peft \
    autocast_stays_within_half_precision_of_peft norm_only_trains_only_norms \
    regularizers_match_oracle gpu_ >/tmp/gpu-check-oracle.log 2>&1; then ok=true; else ok=false; fi
echo "{\"check\":\"oracle\",\"device\":\"$device\",\"passed\":$ok,\"seconds\":$(( $(date +%s) - start )),\"log\":\"/tmp/gpu-check-oracle.log\"}"
for shape in smollm2-135m phi3-small phi3-mini; do
    for mode in lora full forward; do
        for dtype in f32 bf16; do
            [ "$shape" = phi3-mini ] && [ "$mode" = full ] && continue   # 3.8 B full: optimizer state past most GPUs
            ./target/release/phi-bench --device "$device" --shape "$shape" --mode "$mode" \
                --dtype "$dtype" --batch 4 --seq 256 --steps 3 --warmup 2 2>/dev/null \
                || echo "{\"shape\":\"$shape\",\"mode\":\"$mode\",\"dtype\":\"$dtype\",\"device\":\"$device\",\"failed\":true}"
        done
    done
done
