"""Load balancing of token-choice MoE layers: the Switch auxiliary loss against
auxiliary-loss-free balancing (a per-expert selection bias, Wang et al. 2024 / DeepSeek-V3).

Trains the same small byte-level MoE decoder on the embedded text once per setting, with the
same data order and initial weights, and prints one table: the load imbalance MaxVio
(``max_e load_e / mean_e load_e - 1``, the mean over MoE layers) early and late in training,
the same per sequence (each sequence's own loads, averaged over the batch's sequences), and
the validation bits per byte.

    python scripts/balance_experiment.py                # CPU: about 5 minutes on 2 cores
    python scripts/balance_experiment.py --steps 50     # quicker
    python scripts/balance_experiment.py --only 5 6     # some settings only
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from flopwise.models import ModelConfig
from flopwise.models.data import embedded_corpus
from flopwise.models.train import TrainConfig, Trainer

# (name, ModelConfig overrides)
SETTINGS = [
    ("no balancing", dict(moe_load_balance_coef=0.0)),
    ("aux loss 0.01", dict(moe_load_balance_coef=0.01)),
    ("bias 1e-3", dict(moe_load_balance_coef=0.0, moe_bias_update_rate=1e-3)),
    ("bias 1e-2", dict(moe_load_balance_coef=0.0, moe_bias_update_rate=1e-2)),
    # DeepSeek-V3's pair: the bias and a tiny sequence-wise balance loss
    ("bias 1e-2 + seq loss 1e-4", dict(moe_load_balance_coef=1e-4, moe_load_balance_scope="sequence",
                                       moe_bias_update_rate=1e-2)),
    # group-limited: 4 groups of 2 experts (of 8), each token's 2 experts from its 2 best groups
    ("bias 1e-2, 2 of 4 groups", dict(moe_load_balance_coef=0.0, moe_bias_update_rate=1e-2, moe_n_group=4,
                                      moe_topk_group=2)),
    # the sequence-wise loss at a coefficient large enough to act
    ("bias 1e-2 + seq loss 1e-2", dict(moe_load_balance_coef=1e-2, moe_load_balance_scope="sequence",
                                       moe_bias_update_rate=1e-2)),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps per setting (default 200)")
    ap.add_argument("--experts", type=int, default=8, help="experts per MoE layer (default 8)")
    ap.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    ap.add_argument("--score", choices=("softmax", "sigmoid"), default="softmax", help="router score (default softmax)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="+", metavar="N", type=int,
                    help="run only these settings (their positions in the table, from 1)")
    a = ap.parse_args(argv)
    settings = SETTINGS
    if a.only:
        if any(not 1 <= i <= len(SETTINGS) for i in a.only):
            ap.error(f"--only takes positions 1..{len(SETTINGS)}")
        settings = [SETTINGS[i - 1] for i in a.only]
    if a.steps < 20:
        ap.error("--steps must be >= 20 (the table compares the first and last 10 steps)")
    data = embedded_corpus()
    base = dict(d_model=128, n_layers=4, n_heads=4, d_ff=344, max_seq_len=256, mlp="moe", moe_n_experts=a.experts,
                moe_top_k=a.top_k, moe_d_ff=344 // a.top_k, moe_score=a.score)
    tc = TrainConfig(seq_len=256, batch_size=8, max_steps=a.steps, lr=3e-3, warmup_steps=min(50, a.steps // 4),
                     eval_tokens=32768, seed=a.seed, log_every=10**9)
    print(f"MoE decoder d=128, 4 layers, {a.experts} experts top-{a.top_k} ({a.score}), {a.steps} steps of "
          f"8 x 256 bytes, torch {torch.__version__}")
    rows = []
    for name, over in settings:
        torch.manual_seed(a.seed)
        t = Trainer(ModelConfig(**base, **over), tc, data, progress=False)
        vio, seq_vio, t0 = [], [], time.perf_counter()
        for _ in range(a.steps):
            m = t.train_step()
            vio.append(m["moe_max_violation"])
            seq_vio.append(m["moe_max_violation_seq"])
        secs = time.perf_counter() - t0
        ev = t.evaluate()
        biases = [m.mlp.expert_bias for m in t.model.layers if getattr(m.mlp, "expert_bias", None) is not None]
        spread = max((float(b.max() - b.min()) for b in biases), default=0.0)
        rows.append((name, sum(vio[:10]) / 10, sum(vio[-10:]) / 10, max(vio[a.steps // 2:]),
                     sum(seq_vio[-10:]) / 10, ev["val_bpb"], spread))
        print(f"  {name}: done in {secs:.0f} s", file=sys.stderr)
    print("| setting | MaxVio, first 10 steps | MaxVio, last 10 steps | max MaxVio, second half "
          "| per-sequence MaxVio, last 10 steps | val bpb | bias spread |")
    print("|---|---|---|---|---|---|---|")
    for name, first, last, worst, seq_last, bpb, spread in rows:
        print(f"| {name} | {first:.3f} | {last:.3f} | {worst:.3f} | {seq_last:.3f} | {bpb:.3f} | {spread:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
