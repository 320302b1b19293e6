#!/usr/bin/env python3
"""PyTorch + transformers + PEFT doing phi-bench's work (issue 6's baseline).

Same shapes (phi-bench's shapes.rs), same CLI flags, same JSON line:

    python benches/torch_baseline.py --shape smollm2-135m --mode lora --batch 4 --seq 256 --steps 3

Random init, f32, 2 threads. A training step is what HF's Trainer does: forward with labels
(transformers' causal-LM loss), backward, clip_grad_norm_(1.0), AdamW (torch defaults,
lr 1e-4), zero_grad. LoRA: PEFT all-linear, r = --rank, alpha = 2·rank, no dropout.
Needs: pip install torch transformers peft
"""

import argparse
import contextlib
import gc
import json
import resource
import statistics
import time

import torch

SHAPES = {
    "smollm2-135m": dict(
        arch="llama", hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, intermediate_size=1536, vocab_size=49152,
        tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5,
        max_position_embeddings=8192, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    ),
    "phi3-small": dict(
        arch="phi3", hidden_size=1024, num_hidden_layers=8, num_attention_heads=16,
        num_key_value_heads=16, intermediate_size=2816, vocab_size=32064,
        tie_word_embeddings=False, rope_theta=10000.0, rms_norm_eps=1e-5,
        max_position_embeddings=4096, bos_token_id=1, eos_token_id=32000, pad_token_id=32000,
    ),
    "phi3-mini": dict(
        arch="phi3", hidden_size=3072, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, intermediate_size=8192, vocab_size=32064,
        tie_word_embeddings=False, rope_theta=10000.0, rms_norm_eps=1e-5,
        max_position_embeddings=4096, bos_token_id=1, eos_token_id=32000, pad_token_id=32000,
    ),
}


def build(shape):
    import transformers
    from transformers import AutoModelForCausalLM

    kw = dict(SHAPES[shape])
    arch = kw.pop("arch")
    cls = transformers.LlamaConfig if arch == "llama" else transformers.Phi3Config
    cfg = cls(**kw)
    cfg.torch_dtype = torch.float32
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    return model.float(), cfg


def step_flops(model, cfg, batch, seq, train, base_trains):
    """Same count as phi-bench (docs/benchmarks.md): linears 2·params·tokens forward, ×3 when
    the weight trains, ×2 when frozen; LoRA factors ×3; attention 4·T²·d per layer and
    sequence, ×3 when training."""
    base = lora = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            n = m.in_features * m.out_features
            if "lora_" in name:
                lora += n
            else:
                base += n
    tokens = batch * seq
    attn = 4.0 * seq * seq * cfg.hidden_size * cfg.num_hidden_layers * batch
    if not train:
        mul = (1.0, 1.0, 1.0)
    elif base_trains:
        mul = (3.0, 3.0, 3.0)
    else:
        mul = (2.0, 3.0, 3.0)
    return 2.0 * tokens * (base * mul[0] + lora * mul[1]) + attn * mul[2], base + lora


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    p.add_argument("--mode", default="lora", choices=["lora", "full", "norm-only", "forward"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rank", "--lora-r", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--verbose", "-v", action="store_true")
    # none: f32; bf16: autocast (f32 weights, bf16 matmuls); bf16-base: autocast with the
    # frozen weights cast to bf16 (LLaMA-Factory's --bf16 on a frozen base).
    p.add_argument("--amp", default="none", choices=["none", "bf16", "bf16-base"])
    a = p.parse_args()

    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    model, cfg = build(a.shape)
    train = a.mode != "forward"
    if a.mode == "lora":
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0,
                          target_modules="all-linear", task_type="CAUSAL_LM")
        model = get_peft_model(model, lcfg)
    elif a.mode == "norm-only":
        for name, prm in model.named_parameters():
            prm.requires_grad = name.rsplit(".", 1)[0].endswith("norm")
    model.to(dev)
    if a.amp == "bf16-base":
        for prm in model.parameters():
            if not prm.requires_grad:
                prm.data = prm.data.to(torch.bfloat16)
    if a.gradient_checkpointing:
        if not train:
            raise SystemExit("--gradient-checkpointing needs a training mode")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    flops, matmul_params = step_flops(model, cfg, a.batch, a.seq, train, a.mode == "full")
    params = [q for q in model.parameters() if q.requires_grad]
    trainable = sum(q.numel() for q in params)
    total = sum(q.numel() for q in model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4) if train else None

    n = a.batch * a.seq
    ids = torch.tensor([(i * 7919 + 13) % cfg.vocab_size for i in range(n)],
                       dtype=torch.long, device=dev).view(a.batch, a.seq)
    times, losses = [], []
    # The steps' own peak, apart from building the f32 model (as phi-bench's): Linux resets
    # VmHWM on writing 5 to clear_refs; PyTorch may keep freed memory cached either way.
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        phased = True
    except OSError:
        phased = False
    model.train(train)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    amp = contextlib.nullcontext
    if a.amp != "none":
        amp = lambda: torch.autocast(dev.type, dtype=torch.bfloat16)  # noqa: E731
    for step in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        if train:
            with amp():
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            with torch.inference_mode(), amp():
                loss = model(input_ids=ids, labels=ids).loss
        lv = loss.item()
        sync()
        dt = time.perf_counter() - t0
        if a.verbose:
            print(f"step {step}: {dt:.3f} s, loss {lv:.5f}", flush=True)
        losses.append(lv)
        if step >= a.warmup:
            times.append(dt)
    med = statistics.median(times)
    # ru_maxrss is in KiB on Linux.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    steps_rss = None
    if phased:
        with open("/proc/self/status") as f:
            hwm = [ln for ln in f if ln.startswith("VmHWM:")]
        steps_rss = int(hwm[0].split()[1]) / 1024.0 if hwm else None
    import transformers

    line = {
        "shape": a.shape, "mode": a.mode, "batch": a.batch, "seq": a.seq, "steps": a.steps,
        "step_s_median": med, "tokens_per_s": n / med, "peak_rss_mb": rss,
        "steps_peak_rss_mb": steps_rss,
        "gflops_per_s": flops / med / 1e9, "gflop_per_step": flops / 1e9,
        "warmup": a.warmup, "device": a.device, "rank": a.rank if a.mode == "lora" else 0,
        "gradient_checkpointing": a.gradient_checkpointing, "amp": a.amp,
        "trainable_params": trainable, "all_params": total, "matmul_params": matmul_params,
        "step_s": times, "losses": losses,
        "impl": f"torch {torch.__version__} / transformers {transformers.__version__}"
                f" ({getattr(cfg, '_attn_implementation', None)}), {a.threads} threads",
    }
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
