"""Continued training after sparse upcycling (Komatsuzaki et al. 2023, at CPU scale).

A dense byte-level model trains for ``dense_steps``; its checkpoint (weights, Adam moments,
step, schedule, RNG) is upcycled to an MoE (copied experts, fresh router); then the dense
model and the MoE both continue for ``continue_steps`` on the same data and schedule. The
table reports validation bits-per-byte of both at equal steps.

``python -m flopwise.models.upcycle_experiment [--dense-steps N] [--continue-steps N]``
"""

from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import dataclass

from .data import ByteData, load_corpus
from .demo import DemoPreset
from .train import Trainer, TrainConfig
from .transformer import ModelConfig
from .upcycle import UpcycleOptions, upcycle

__all__ = ["UpcycleExperiment", "run_upcycle_experiment"]


@dataclass
class UpcycleExperiment:
    """``rows``: (step, dense val bpb, MoE val bpb) from the upcycling step on;
    ``verify_max_abs_diff``: |dense - MoE| logits right after upcycling."""

    rows: list[tuple[int, float, float]]
    verify_max_abs_diff: float
    corpus: str
    dense_params: int
    moe_params: int

    def table(self) -> str:
        lines = [f"{'step':>6}  {'dense bpb':>9}  {'upcycled MoE bpb':>16}  {'MoE - dense':>11}"]
        for step, d, m in self.rows:
            lines.append(f"{step:>6}  {d:>9.4f}  {m:>16.4f}  {m - d:>+11.4f}")
        return "\n".join(lines)


def run_upcycle_experiment(corpus: str | None = None, *, dense_steps: int = 300, continue_steps: int = 300,
                           n_experts: int = 4, top_k: int = 2, layers: str = "every_other",
                           eval_every: int = 50, out_dir: str | None = None, preset: str = "cpu",
                           progress: bool = False) -> UpcycleExperiment:
    """Train dense, upcycle, continue both; see the module docstring."""
    if dense_steps < 1 or continue_steps < 1:
        raise ValueError("dense_steps and continue_steps must be >= 1")
    p = DemoPreset.preset(preset)
    model_cfg = ModelConfig(**{**p.base, **p.variants["dense"]})
    total = dense_steps + continue_steps
    data = ByteData(load_corpus(corpus))
    tmp = tempfile.TemporaryDirectory(prefix="flopwise-upcycle-") if out_dir is None else None
    root = out_dir or tmp.name
    try:
        cfg = TrainConfig(seq_len=p.seq_len, batch_size=p.batch_size, max_steps=total, lr=p.lr,
                          warmup_steps=max(1, total // 10), eval_every=eval_every, eval_tokens=p.eval_tokens,
                          log_every=max(1, total // 20))
        dense = Trainer(model_cfg, cfg, data, progress=progress, label="dense")
        dense.fit(steps=dense_steps)
        dense_ckpt = os.path.join(root, "dense")
        dense.save(dense_ckpt)
        moe_ckpt = os.path.join(root, "upcycled")
        report = upcycle(dense_ckpt, moe_ckpt, UpcycleOptions(n_experts=n_experts, top_k=top_k, layers=layers,
                                                             format="flopwise"), verify=True, force=True)
        runs = {}
        for name, path in (("dense", dense_ckpt), ("moe", moe_ckpt)):
            # out_dir=None: the continued runs are compared, not kept (the checkpoints they
            # start from stay as written, so a second run into the same --out replaces them)
            t = Trainer.resume(path, data, progress=progress, label=f"{name} (continued)", out_dir=None)
            start = t.evaluate()["val_bpb"]
            res = t.fit(steps=continue_steps)
            runs[name] = {dense_steps: start, **dict(res.evals)}
            if name == "dense":
                dense_params = sum(x.numel() for x in t.model.parameters())
            else:
                moe_params = sum(x.numel() for x in t.model.parameters())
        steps = sorted(set(runs["dense"]) & set(runs["moe"]))
        rows = [(s, runs["dense"][s], runs["moe"][s]) for s in steps]
        return UpcycleExperiment(rows=rows, verify_max_abs_diff=report.verify.max_abs_diff,
                                 corpus=data.corpus.name, dense_params=dense_params, moe_params=moe_params)
    finally:
        if tmp is not None:
            tmp.cleanup()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flopwise.models.upcycle_experiment", description=__doc__)
    ap.add_argument("--corpus", default=None, help="corpus path, 'embedded', or the fetched corpus (default)")
    ap.add_argument("--dense-steps", type=int, default=300)
    ap.add_argument("--continue-steps", type=int, default=300)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--layers", default="every_other")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--out", default=None, help="keep the checkpoints here")
    args = ap.parse_args(argv)
    exp = run_upcycle_experiment(args.corpus, dense_steps=args.dense_steps, continue_steps=args.continue_steps,
                                 n_experts=args.experts, top_k=args.top_k, layers=args.layers,
                                 eval_every=args.eval_every, out_dir=args.out, progress=True)
    print(f"corpus: {exp.corpus}; dense params {exp.dense_params:,}, upcycled MoE params {exp.moe_params:,}; "
          f"logits right after upcycling: max |diff| {exp.verify_max_abs_diff:.2e}")
    print(exp.table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
