#!/usr/bin/env bash
# Ours against PyTorch + PEFT on this CPU, back to back (docs/benchmarks.md, issue 16's table):
# each row runs phi-bench, then benches/torch_baseline.py on the same shape and mode, the rows
# in turn, for ROUNDS rounds, so that the machine's drift moves both sides alike.
#
#   scripts/cpu-vs-torch.sh [ROW ...]      ROW = shape:mode:dtype[:batch:seq]
#
# dtype f32 races torch's f32; bf16 races its best bf16 mode: LoRA `--bf16` (frozen base held
# in bf16) against autocast with the frozen weights cast to bf16 (`--amp bf16-base`, as
# LLaMA-Factory's --bf16), full fine-tuning against autocast (`--amp bf16`).
# Default rows: issue 16's eight (smollm2-135m and phi3-small; lora and full; f32 and bf16;
# 4 × 256). PYTHON names an interpreter with torch 2.15, transformers 5.23 and PEFT 0.21
# (pip install torch==2.15.0 transformers==5.23.0 peft==0.21.2); ROUNDS (default 2), STEPS
# (3) and WARMUP (2) as phi-bench's. Prints one JSON line a row and round, then a markdown
# table of tokens/s and ratios naming the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
rounds="${ROUNDS:-2}"
steps="${STEPS:-3}"
warmup="${WARMUP:-2}"
rows=("$@")
if [ ${#rows[@]} -eq 0 ]; then
    for shape in smollm2-135m phi3-small; do
        for mode in lora full; do
            for dtype in f32 bf16; do rows+=("$shape:$mode:$dtype"); done
        done
    done
fi
if ! "$python" -c 'import torch, transformers, peft' 2>/dev/null; then
    echo "cpu-vs-torch: $python lacks torch, transformers or peft (set PYTHON; see the header)" >&2
    exit 2
fi
cargo build --release -p phi-bench >/dev/null
cpu=$(lscpu | sed -n 's/^Model name: *//p' | head -1)
threads=$(nproc)
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for round in $(seq "$rounds"); do
    for row in "${rows[@]}"; do
        IFS=: read -r shape mode dtype batch seq <<<"$row"
        batch="${batch:-4}" seq="${seq:-256}"
        case "$mode:$dtype" in
            *:f32) ours_args=() amp=none ;;
            lora:bf16 | norm-only:bf16) ours_args=(--dtype bf16 --base bf16) amp=bf16-base ;;
            *:bf16) ours_args=(--dtype bf16) amp=bf16 ;;
            *) echo "cpu-vs-torch: row $row: dtype $dtype, expected f32 or bf16" >&2; exit 2 ;;
        esac
        common=(--shape "$shape" --mode "$mode" --batch "$batch" --seq "$seq" --steps "$steps" --warmup "$warmup")
        ours=$(./target/release/phi-bench "${common[@]}" "${ours_args[@]}" 2>/dev/null | tail -1 || true)
        theirs=$("$python" benches/torch_baseline.py "${common[@]}" --amp "$amp" --threads "$threads" 2>/dev/null | tail -1 || true)
        for side in ours theirs; do
            if [[ "${!side}" != "{"* ]]; then
                what=$([ "$side" = ours ] && echo "phi-bench" || echo "benches/torch_baseline.py")
                echo "cpu-vs-torch: row $row: $what gave no JSON line (run it alone with these flags to see why)" >&2
                exit 1
            fi
        done
        line=$("$python" - "$round" "$row" "$cpu" "$amp" "$ours" "$theirs" <<'EOF'
import json, sys
rnd, row, cpu, amp, ours, theirs = sys.argv[1:]
o, t = json.loads(ours), json.loads(theirs)
print(json.dumps({
    "round": int(rnd), "row": row, "cpu": cpu, "torch_amp": amp, "gemm": o.get("gemm"),
    "ours_tokens_per_s": round(o["tokens_per_s"], 1), "torch_tokens_per_s": round(t["tokens_per_s"], 1),
    "ratio": round(o["tokens_per_s"] / t["tokens_per_s"], 3),
    "ours_steps_peak_rss_mb": round(o["steps_peak_rss_mb"]), "torch_steps_peak_rss_mb": round(t["steps_peak_rss_mb"]),
    "ours_last_loss": o["losses"][-1], "torch_last_loss": t["losses"][-1]}))
EOF
)
        echo "$line" | tee -a "$out"
    done
done
"$python" - "$out" "$cpu" "$threads" <<'EOF'
import json, sys
from collections import defaultdict
lines = [json.loads(l) for l in open(sys.argv[1])]
rows = defaultdict(list)
for l in lines:
    rows[l["row"]].append(l)
print(f"\n{sys.argv[2]}, {sys.argv[3]} threads; tokens/s of each round")
print("| row | ours | torch | torch mode | ratio |\n|---|---|---|---|---|")
for row, ls in rows.items():
    cell = lambda k: ", ".join(str(l[k]) for l in ls)
    ratios = ", ".join(f"{l['ratio']:.2f}×" for l in ls)
    print(f"| {row} | {cell('ours_tokens_per_s')} | {cell('torch_tokens_per_s')} | {ls[0]['torch_amp']} | {ratios} |")
EOF
