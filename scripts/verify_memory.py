"""Peak memory of verifying an upcycled model: whole models against layer by layer.

Writes a random Llama-shaped bf16 checkpoint (safetensors, straight from tensors: nothing
larger than one tensor is ever held), upcycles it to Mixtral with copy init, then runs
``verify_upcycle(..., layerwise=False)`` and ``layerwise=True`` each in a fresh process and
reports its peak anonymous memory (``RssAnon``, sampled every 5 ms: what the system must
find room for) and peak resident memory (``ru_maxrss``, which also counts the pages of the
memory-mapped safetensors files it read, which the kernel can drop), its time, the estimate
the refusal check uses, and the result. An idle process that imports the same modules is the
baseline.

    python scripts/verify_memory.py [--layers 8] [--d-model 1024] [--d-ff 4096] [--experts 8]
                                    [--vocab 32000] [--dir /tmp/verify-memory]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

_CHILD = r"""
import json, sys, threading, time
import torch
import transformers
from flopwise.models.upcycle import verify_upcycle
transformers.logging.set_verbosity_error()

peak = [0]
stop = threading.Event()

def anon():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0

def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], anon())
        time.sleep(0.005)

src, out, mode = sys.argv[1:4]
thread = threading.Thread(target=sample, daemon=True)
thread.start()
result = {}
if mode != "idle":
    t = time.perf_counter()
    v = verify_upcycle(src, out, layerwise=mode == "layerwise", check_memory=False)
    result = {"seconds": time.perf_counter() - t, "passed": v.passed, "max_abs_diff": v.max_abs_diff}
stop.set()
thread.join()
result["anon_peak"] = max(peak[0], anon())
print(json.dumps(result))
"""


def _write_source(folder: str, a: argparse.Namespace) -> None:
    import torch
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    D, F, L, V, H, KV = a.d_model, a.d_ff, a.layers, a.vocab, a.heads, a.kv_heads
    hd = D // H
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,), "lm_head.weight": (V, D)}
    for i in range(L):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
                       p + "self_attn.q_proj.weight": (H * hd, D), p + "self_attn.k_proj.weight": (KV * hd, D),
                       p + "self_attn.v_proj.weight": (KV * hd, D), p + "self_attn.o_proj.weight": (D, H * hd),
                       p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D),
                       p + "mlp.down_proj.weight": (D, F)})
    # one shard per layer keeps the writer's memory to one layer
    weight_map, total = {}, 0
    groups = [[n for n in shapes if not n.startswith("model.layers.")]]
    groups += [[n for n in shapes if n.startswith(f"model.layers.{i}.")] for i in range(L)]
    for k, names in enumerate(groups):
        file = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        sd = {n: (torch.ones(shapes[n], dtype=torch.bfloat16) if n.endswith("norm.weight") else rnd(*shapes[n]))
              for n in names}
        save_file(sd, os.path.join(folder, file), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in sd.values())
        weight_map.update({n: file for n in names})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": V, "hidden_size": D,
              "intermediate_size": F, "num_hidden_layers": L, "num_attention_heads": H, "num_key_value_heads": KV,
              "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "tie_word_embeddings": False, "hidden_act": "silu", "torch_dtype": "bfloat16"}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def _child(src: str, out: str, mode: str) -> tuple[dict, float]:
    """Run one verification in a fresh process; returns its result and peak RSS in bytes."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run([sys.executable, "-c", _CHILD, src, out, mode], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} verification failed:\n{proc.stderr[-3000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak <= before:
        raise SystemExit("ru_maxrss of the children did not grow: run the modes in increasing memory order")
    return json.loads(proc.stdout.strip().splitlines()[-1]), peak * 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--d-ff", type=int, default=4096)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--dir", default="/tmp/verify-memory")
    a = p.parse_args()

    from flopwise.models.upcycle import UpcycleOptions, plan_upcycle, upcycle

    src, out = os.path.join(a.dir, "dense"), os.path.join(a.dir, "moe")
    if not os.path.isfile(os.path.join(src, "config.json")):
        _write_source(src, a)
    opts = UpcycleOptions(n_experts=a.experts, top_k=2, format="mixtral")
    plan = plan_upcycle(src, opts)
    if not os.path.isfile(os.path.join(out, "upcycle.json")):
        t = time.perf_counter()
        upcycle(src, out, opts, force=True, fsync=False)
        print(f"upcycled in {time.perf_counter() - t:.1f} s: {plan.total_params / 1e6:.0f}M parameters "
              f"({plan.output_bytes / 1e9:.2f} GB bf16)")
    from flopwise.models.upcycle import _available_memory

    have = _available_memory()
    rows = []
    # ru_maxrss of children is the maximum over all of them: run in increasing memory order
    for mode, estimate in (("idle", None), ("layerwise", plan.verify_layerwise_bytes_estimate),
                           ("whole", plan.verify_bytes_estimate)):
        if estimate is not None and have is not None and estimate > have:
            rows.append((mode, estimate, None, None))
            continue
        result, peak = _child(src, out, mode)
        rows.append((mode, estimate, peak, result))
    print("| verification | estimate | peak anonymous | peak RSS | time | max |logit diff| | passed |")
    print("|---|---|---|---|---|---|---|")
    for mode, estimate, peak, r in rows:
        if peak is None:
            print(f"| {mode} | {estimate / 1e9:.2f} GB | not run: {have / 1e9:.1f} GB available | | | | |")
            continue
        if mode == "idle":
            print(f"| idle process (imports only) | | {r['anon_peak'] / 1e9:.2f} GB | {peak / 1e9:.2f} GB | | | |")
            continue
        print(f"| {mode} | {estimate / 1e9:.2f} GB | {r['anon_peak'] / 1e9:.2f} GB | {peak / 1e9:.2f} GB | "
              f"{r['seconds']:.1f} s | {r['max_abs_diff']:.3g} | {r['passed']} |")


if __name__ == "__main__":
    main()
