"""``flopwise demo``: dense vs MoE vs MoD vs MoD+MoE byte-level LMs at matched training FLOPs.

On the corpus (:func:`flopwise.models.data.load_corpus`: the fetched KJV + Jargon File
corpus when present, else the embedded Python documentation) it trains a small dense
model, then the variants, each for the same training FLOPs as the dense run (steps x
tokens per step x ``cfg.flops_per_token(seq_len)``): a variant that is cheaper per token
(MoD) takes proportionally more steps. It prints one table: parameters, active parameters
per token, FLOPs per token, steps, tokens/s, MFU (GPU), validation bits per byte and the
MoD routing-prediction accuracy, then a greedy sample from each model (KV-cache
generation; MoD layers route causally).

Then the other two results of the project, on the dense model it just trained: sparse
upcycling (the checkpoint, Adam moments included, becomes an MoE of 4 copied experts,
top-2, on every other layer; it and the dense model train on for the same steps) and
training data over compressed text (GZip, StaticAC, ArithmeticCoding and EqualInfoAC[b=16]
on a slice of validation text cut into 32 streams, with the dense model as M1, each decoded
back and compared). These stages come after the deadline below (about 60 s more on the CPU
preset); their two continued runs share what time is left before it, at least 5 s each, so
on a loaded machine the upcycled MoE may train fewer steps than dense (the table shows steps).

Time: the wall-clock budget (``--budget-s``) is split by measurement, not guessed: a few
steps of every variant are timed first, and the dense step count is the largest that fits
the budget once every variant's matched steps are paid for, within the preset's floor and
cap. Runs are cut at a deadline of 1.5 x the budget: each run may use its share of the
time left, so a machine that slows down mid-run still finishes, and a run cut short is
marked in the table. The one exception is the dense run's floor, trained whatever the
time: it is what the CPU preset's dense model needs to reach < 2.5 bits per byte (on the
embedded text: 250 steps 2.60, 300 steps 2.46, 340 steps 2.32). On a slow machine the
variants give way, and a budget too small for the floor is exceeded by the floor's time.

Example::

    from flopwise.models.demo import run_demo
    result = run_demo()                  # CPU: ~5 minutes on 2 cores; GPU: larger preset
    print(result.table)
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .data import ByteData, TextCorpus, decode, load_corpus
from .train import TrainConfig, Trainer, active_params, peak_flops, resolve_device, resolve_preset
from .transformer import ModelConfig

__all__ = ["DemoPreset", "DemoRow", "DemoResult", "run_demo", "format_table", "format_upcycle", "format_coding"]


@dataclass
class DemoPreset:
    """A demo size. ``base``: the dense ModelConfig fields; ``variants``: name -> overrides
    of ``base`` (the first one is the FLOPs reference); ``budget_s``: default wall-clock
    budget for all training; ``max_dense_steps`` / ``min_dense_steps`` bound the dense run
    (``fixed_dense_steps`` skips the timing and uses exactly that many)."""

    name: str
    base: dict
    variants: dict[str, dict]
    seq_len: int
    batch_size: int
    lr: float
    budget_s: float
    max_dense_steps: int
    min_dense_steps: int = 20
    fixed_dense_steps: int | None = None
    warmup_frac: float = 0.1
    eval_tokens: int = 65536
    sample_bytes: int = 64
    upcycle_steps: int = 100
    coding_bytes: int = 16384

    @classmethod
    def preset(cls, name: str) -> "DemoPreset":
        """``"cpu"`` (d=128, 4 layers, S=256, 8 sequences a step: dense reaches 2.32 bpb on
        the embedded text after 340 steps, about 75 s of one CPU core; batch 8 beats
        batch 16 at equal tokens here, 2.24 vs 2.54 bpb at 655k bytes), ``"gpu"`` (d=512, 8 layers, S=512),
        ``"smoke"`` (a few seconds; tests)."""
        if name not in _PRESETS:
            raise ValueError(f"unknown demo preset {name!r}; choose from {sorted(_PRESETS)}")
        return _PRESETS[name]()


def _variants(d_ff: int, experts: int = 4, top_k: int = 2) -> dict[str, dict]:
    # MoE: experts of d_ff / top_k, so top_k active experts cost what the dense MLP costs
    # (matched FLOPs per token, top_k x ... more parameters). MoD: the paper's best
    # setting, every other block at capacity 0.125.
    moe = dict(mlp="moe", moe_n_experts=experts, moe_top_k=top_k, moe_d_ff=d_ff // top_k)
    mod = dict(routing="every_other", mod_capacity=0.125)
    return {"dense": {}, "moe": moe, "mod": mod, "mod+moe": {**moe, **mod}}


_PRESETS: dict[str, Callable[[], DemoPreset]] = {
    "cpu": lambda: DemoPreset("cpu", dict(d_model=128, n_layers=4, n_heads=4, d_ff=344, max_seq_len=256),
                              _variants(344), seq_len=256, batch_size=8, lr=3e-3, budget_s=360.0,
                              max_dense_steps=400, min_dense_steps=340),
    "gpu": lambda: DemoPreset("gpu", dict(d_model=512, n_layers=8, n_heads=8, d_ff=1408, max_seq_len=512,
                                          pad_to_multiple_of=64),
                              _variants(1408, experts=8), seq_len=512, batch_size=64, lr=2e-3, budget_s=480.0,
                              max_dense_steps=2000, min_dense_steps=200, upcycle_steps=300, coding_bytes=65536),
    "smoke": lambda: DemoPreset("smoke", dict(d_model=32, n_layers=2, n_heads=2, d_ff=96, max_seq_len=64),
                                _variants(96), seq_len=64, batch_size=4, lr=1e-2, budget_s=30.0,
                                max_dense_steps=12, min_dense_steps=12, fixed_dense_steps=12, eval_tokens=1024,
                                sample_bytes=16, upcycle_steps=3, coding_bytes=600),
}


@dataclass
class DemoRow:
    """One trained model of the demo."""

    name: str
    params: int
    active_params: float
    flops_per_token: float
    steps: int
    planned_steps: int
    tokens: int
    flops: float
    tokens_per_s: float
    mfu: float | None
    val_bpb: float
    val_bpb_topk: float | None
    mod_predictor_acc: float | None
    first_loss: float
    last_loss: float
    seconds: float
    sample: str = ""

    @property
    def cut(self) -> bool:
        return self.steps < self.planned_steps


@dataclass
class DemoResult:
    """``upcycle``: dense continued vs upcycled MoE after the same steps (dicts: name, params,
    val_bpb_start, val_bpb, steps, tokens_per_s); ``coding``: the compression table of a
    validation slice (dicts: method, bits_per_byte, compression_ratio, bytes_per_token,
    encode_kbps, decode_kbps), every stream decoded back exactly."""

    rows: list[DemoRow]
    corpus: str
    device: str
    preset: str
    seconds: float
    table: str = ""
    notes: list[str] = field(default_factory=list)
    upcycle: list[dict] = field(default_factory=list)
    upcycle_max_abs_diff: float | None = None
    coding: list[dict] = field(default_factory=list)


def _fmt_n(x: float) -> str:
    for unit, s in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= s:
            return f"{x / s:.2f}{unit}"
    return f"{x:.0f}"


def format_table(rows: list[DemoRow]) -> str:
    """The demo table (fixed-width text)."""
    head = ("model", "params", "active", "FLOPs/tok", "steps", "train FLOPs", "tok/s", "MFU", "val bpb",
            "bpb top-k", "MoD acc")
    lines = []
    for r in rows:
        lines.append((
            r.name, _fmt_n(r.params), _fmt_n(r.active_params), _fmt_n(r.flops_per_token),
            f"{r.steps}" + ("*" if r.cut else ""), f"{r.flops:.3g}", _fmt_n(r.tokens_per_s),
            "n/a" if r.mfu is None else f"{100 * r.mfu:.1f}%", f"{r.val_bpb:.3f}",
            "-" if r.val_bpb_topk is None else f"{r.val_bpb_topk:.3f}",
            "-" if r.mod_predictor_acc is None else f"{100 * r.mod_predictor_acc:.1f}%"))
    return _text_table(head, lines)


def _model_cfg(p: DemoPreset, name: str) -> ModelConfig:
    return ModelConfig(**{**p.base, **p.variants[name]})


def _train_cfg(p: DemoPreset, steps: int, device: str, time_limit: float | None, min_steps: int = 0) -> TrainConfig:
    return TrainConfig(seq_len=p.seq_len, batch_size=p.batch_size, max_steps=steps, lr=p.lr,
                       warmup_steps=max(1, int(p.warmup_frac * steps)), eval_tokens=p.eval_tokens,
                       log_every=max(1, steps // 10), device=device, time_budget_s=time_limit, min_steps=min_steps)


def _prompt(text: TextCorpus, n: int = 24) -> str:
    """The first ``n`` characters of the first validation line that starts with a letter
    and is long enough (a sentence start, not indentation)."""
    for line in text.val.decode("utf-8", errors="replace").splitlines():
        if len(line) >= n + 8 and line[0].isalpha():
            return line[:n]
    return text.val[:n].decode("utf-8", errors="replace")


def _time_steps(p: DemoPreset, name: str, data: ByteData, device: str) -> float:
    """Seconds per optimizer step of variant ``name`` (the faster of 2 after one warm-up step)."""
    t = Trainer(_model_cfg(p, name), _train_cfg(p, 100, device, None), data, progress=False)
    t.train_step()
    times = []
    for _ in range(2):
        if t.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        t.train_step()
        if t.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


def run_demo(corpus: str | TextCorpus | None = None, *, preset: str | DemoPreset | None = None,
             budget_s: float | None = None, dense_steps: int | None = None, out_dir: str | None = None,
             device: str = "auto", threads: int | None = None, progress: bool = True,
             log: Callable[[str], None] | None = None, force: bool = False) -> DemoResult:
    """Train the preset's variants at matched FLOPs and return the table.

    Args:
        corpus: a path for :func:`load_corpus`, a :class:`TextCorpus`, ``"embedded"`` or
            None (the fetched corpus if present, else the embedded text).
        preset: ``"cpu"``, ``"gpu"``, ``"smoke"`` or a :class:`DemoPreset`; None picks by device.
        budget_s: wall-clock seconds for all training (default: the preset's).
        dense_steps: fix the dense step count (skips the timing; runs are then reproducible).
        out_dir: save each model's checkpoint to ``out_dir/<variant>`` (``mod+moe`` ->
            ``mod_moe``), ready for ``flopwise generate``. Checked before any training: an
            existing ``out_dir/<variant>`` is a FileExistsError unless ``force=True``, and
            even then only an earlier checkpoint is replaced, never a folder of other files.
        force: replace earlier checkpoints in ``out_dir`` (``flopwise demo --force``).
        threads: CPU threads for torch; None times a dense step with all threads and with
            one and keeps the faster (on a loaded machine one thread can be several times
            faster than two that wait for each other). Restored on return.
        progress: progress lines on stderr; log: where the table and notes go (print).
    """
    log = log or (lambda s: print(s, flush=True))
    t_start = time.perf_counter()
    dev = resolve_device(device)
    p = resolve_preset(preset, DemoPreset, dev, device)
    if budget_s is not None and not budget_s > 0:
        raise ValueError(f"budget_s must be > 0, got {budget_s}")
    if dense_steps is not None and (isinstance(dense_steps, bool) or not isinstance(dense_steps, int) or dense_steps < 1):
        raise ValueError(f"dense_steps must be an int >= 1, got {dense_steps!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be None or an int >= 1, got {threads!r}")
    if out_dir:
        _check_out_dir(out_dir, p, force)
    budget = budget_s if budget_s is not None else p.budget_s
    old_threads = torch.get_num_threads()
    try:
        return _run(p, corpus, budget, budget_s, dense_steps, out_dir, dev, threads, progress, log, t_start)
    finally:
        _set_threads(old_threads)


def _ckpt_name(variant: str) -> str:
    return variant.replace("+", "_")


def _check_out_dir(out_dir, p: DemoPreset, force: bool) -> None:
    """Before minutes of training, not at the first save: out_dir must be (or can become) a
    folder, and its checkpoints may be written (see :func:`run_demo`)."""
    from .checkpoint import check_replaceable
    from .train import _usable_out_dir

    out = _usable_out_dir(out_dir)
    for name in p.variants:
        dst = out / _ckpt_name(name)
        if not os.path.lexists(dst):
            continue
        if not force:
            raise FileExistsError(f"{dst} already exists; the demo would replace it: choose another --out, or pass "
                                  "force=True (--force) to replace earlier demo checkpoints")
        check_replaceable(dst)


def _set_threads(n: int) -> None:
    # only on a change: resizing the intra-op pool is not free, and never needed to stay put
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def _pick_threads(p: DemoPreset, data: ByteData, dev: torch.device) -> tuple[int, str]:
    n_all = torch.get_num_threads()
    if dev.type != "cpu" or n_all == 1:
        return n_all, ""
    times = {}
    for n in (n_all, 1):
        _set_threads(n)
        times[n] = _time_steps(p, next(iter(p.variants)), data, str(dev))
    best = min(times, key=times.get)
    return best, (f"threads: {best} ({', '.join(f'{n}: {1000 * t:.0f} ms/step' for n, t in times.items())})")


def _run(p, corpus, budget, budget_s, dense_steps, out_dir, dev, threads, progress, log, t_start) -> DemoResult:
    text = corpus if isinstance(corpus, TextCorpus) else load_corpus(corpus)
    data = ByteData(text, seed=0)
    log(f"corpus: {text.description}: train {len(text.train):,} B, val {len(text.val):,} B, "
        f"sha256 {text.sha256[:16]}")
    if corpus is None and text.name == "python-docs":
        log("  (the embedded default; `flopwise data fetch` caches the 5.6 MB KJV + Jargon File corpus)")
    names = list(p.variants)
    ref = names[0]
    fpt = {n: _model_cfg(p, n).flops_per_token(p.seq_len) for n in names}
    ratio = {n: fpt[ref] / fpt[n] for n in names}  # steps per dense step at equal FLOPs
    notes = []
    if threads is not None:
        _set_threads(threads)
    elif dev.type == "cpu":
        n, note = _pick_threads(p, data, dev)
        _set_threads(n)
        if note:
            notes.append(note)
    timed = dense_steps is None and p.fixed_dense_steps is None
    weight = dict(ratio)  # relative wall time of each run (refined by timing below)
    if timed:
        t_cal = time.perf_counter()
        sec = {n: _time_steps(p, n, data, str(dev)) for n in names}
        weight = {n: ratio[n] * sec[n] for n in names}
        cost_per_dense_step = sum(weight.values())
        remaining = budget - (time.perf_counter() - t_cal)
        # ~90% of what remains trains; evaluation and sampling take the rest.
        fit = int(0.9 * remaining / cost_per_dense_step)
        dense_steps = max(p.min_dense_steps, min(p.max_dense_steps, fit))
        notes.append("timing: " + ", ".join(f"{n} {1000 * sec[n]:.0f} ms/step" for n in names)
                     + f" -> {dense_steps} dense steps fit {budget:.0f} s")
    elif dense_steps is None:
        dense_steps = p.fixed_dense_steps
    plan = {n: max(1, round(dense_steps * ratio[n])) for n in names}
    log(f"device {dev}, preset {p.name}: dense {dense_steps} steps x {p.batch_size} x {p.seq_len} bytes; "
        "variants at the same training FLOPs: " + ", ".join(f"{n} {plan[n]}" for n in names[1:]))
    # A hard time limit applies unless the step count was fixed without a budget.
    hard_limit = timed or budget_s is not None
    rows = []
    prompt = _prompt(text)
    deadline = 1.5 * budget  # from the start; only the dense floor may run past it
    for i, n in enumerate(names):
        # Hard limit: this run's share of the time left before the deadline (a slowed-down
        # machine still finishes; the row is then marked as cut). The reference run is
        # never cut below the preset's floor: its quality is the demo's promise (the CPU
        # preset's floor is what the dense model needs for < 2.5 bpb on the embedded
        # text), so on a slow machine the variants give way instead.
        left = max(1.0, deadline - (time.perf_counter() - t_start))
        limit = left * weight[n] / sum(weight[m] for m in names[i:]) if hard_limit else None
        floor = min(p.min_dense_steps, plan[n]) if i == 0 else 1  # every row has a loss
        trainer = Trainer(_model_cfg(p, n), _train_cfg(p, plan[n], str(dev), limit, floor), data,
                          progress=progress, label=f"{n:8s} ")
        res = trainer.fit()
        if i == 0 and res.steps < plan[n]:
            # the reference was cut: match the variants to the FLOPs it actually trained
            plan.update({m: max(1, round(res.steps * ratio[m])) for m in names[1:]})
            notes.append(f"{n} stopped at {res.steps} of {plan[n]} steps: the variants were matched to that")
        topk = trainer.evaluate(causal=False)["val_bpb"] if trainer.model_cfg.n_mod_layers else None
        acc = res.metrics.get("mod_predictor_acc")
        sample = ""
        if p.sample_bytes:
            ids = torch.tensor([list(prompt.encode("utf-8"))], device=trainer.device)
            out = trainer.model.generate(ids, p.sample_bytes, temperature=0.7, top_k=10, seed=0)
            sample = decode(out[0, ids.shape[1]:].cpu())
        if out_dir:
            trainer.save(os.path.join(out_dir, _ckpt_name(n)))
        if i == 0:
            dense_trainer = trainer
        rows.append(DemoRow(
            name=n, params=trainer.model.num_parameters(), active_params=active_params(trainer.model),
            flops_per_token=fpt[n], steps=res.steps, planned_steps=plan[n], tokens=res.tokens, flops=res.flops,
            tokens_per_s=res.tokens_per_s, mfu=res.mfu, val_bpb=res.val_bpb, val_bpb_topk=topk,
            mod_predictor_acc=acc, first_loss=res.losses[0], last_loss=res.losses[-1], seconds=res.seconds,
            sample=sample))
    left = max(10.0, deadline - (time.perf_counter() - t_start))
    upcycled, max_diff = _upcycle_stage(dense_trainer, data, p, left if hard_limit else None, progress)
    coding = _coding_stage(dense_trainer.model, text, p, dev)
    del dense_trainer
    seconds = time.perf_counter() - t_start
    table = format_table(rows)
    dense_flops = rows[0].flops
    notes += [
        f"matched FLOPs: every model trains for the dense run's {dense_flops:.3g} FLOPs "
        f"(steps x {p.batch_size * p.seq_len} bytes x FLOPs/token at S={p.seq_len}, forward + backward); "
        "cheaper models take more steps",
        "active = parameters a byte uses on average (MoE: top-k of the experts; MoD: capacity x the routed "
        "blocks); val bpb: held-out bytes, MoD routing causal as in generation; bpb top-k: MoD with "
        "training-time top-k routing (sees the whole window); MoD acc: causal routing decision vs top-k",
    ]
    if peak_flops(dev) is None:
        notes.append(f"MFU: n/a on {dev.type} (no bf16 tensor-core peak to compare against)")
    if any(r.cut for r in rows):
        notes.append("*: stopped by the time limit before its planned step count (fewer training FLOPs than planned)")
    log("")
    log(table)
    for note in notes:
        log(f"  {note}")
    log(f"samples (temperature 0.7, top-10, seed 0; prompt {prompt!r}):")
    for r in rows:
        log(f"  {r.name:8s} {r.sample!r}")
    log("")
    log(f"sparse upcycling: the dense model above upcycled to {_UPCYCLE_EXPERTS} experts, top-{_UPCYCLE_TOP_K}, "
        f"on every other layer (copied MLPs, fresh router; logits right after: max |diff| {max_diff:.1e}), "
        "then both trained on with the same data and schedule:")
    log(format_upcycle(upcycled))
    log("")
    n_code = len(text.val[:p.coding_bytes])
    chunk = _coding_chunk(n_code)
    streams = -(-n_code // chunk)
    log(f"compressed text: {n_code:,} validation bytes (GZip in 4,096-byte chunks, the coders in {streams} "
        f"stream{'s' * (streams != 1)} of up to {chunk:,} bytes), M1 = the dense model above; every stream decoded "
        "back exactly:")
    log(format_coding(coding))
    log(f"corpus: {text.name}; total {seconds:.0f} s")
    return DemoResult(rows, text.name, str(dev), p.name, seconds, table, notes, upcycled, max_diff, coding)


_UPCYCLE_EXPERTS, _UPCYCLE_TOP_K = 4, 2


def _upcycle_stage(dense: Trainer, data: ByteData, p: DemoPreset, time_left: float | None,
                   progress: bool) -> tuple[list[dict], float]:
    """Upcycle the dense run's checkpoint (weights, AdamW moments, step) and continue it and
    the dense model for ``p.upcycle_steps`` steps each (the cosine schedule stretched to the
    new end, the same for both): equal steps, not equal compute (top-2 of full-width copies
    costs more per token)."""
    import tempfile

    from .upcycle import UpcycleOptions, upcycle

    rows = []
    with tempfile.TemporaryDirectory(prefix="flopwise-demo-") as root:
        dense_ck = os.path.join(root, "dense")
        dense.save(dense_ck)
        moe_ck = os.path.join(root, "upcycled")
        report = upcycle(dense_ck, moe_ck, UpcycleOptions(n_experts=_UPCYCLE_EXPERTS, top_k=_UPCYCLE_TOP_K,
                                                          layers="every_other", format="flopwise"),
                         verify=True, force=True, fsync=False)
        end = dense.step + p.upcycle_steps
        for i, (name, path) in enumerate((("dense (continued)", dense_ck), ("upcycled MoE", moe_ck))):
            limit = None if time_left is None else max(5.0, time_left / 2)
            t = Trainer.resume(path, data, progress=progress, label=f"{name:8s} ", max_steps=end,
                               time_budget_s=limit, min_steps=dense.step + 1, out_dir=None, save_every=0)
            start = t.evaluate()["val_bpb"]
            res = t.fit()
            rows.append({"name": name, "params": t.model.num_parameters(), "val_bpb_start": start,
                         "val_bpb": res.val_bpb, "steps": res.steps, "tokens_per_s": res.tokens_per_s})
    return rows, report.verify.max_abs_diff


def format_upcycle(rows: list[dict]) -> str:
    head = ("model", "params", "steps", "val bpb before", "val bpb after", "tok/s")
    lines = [(r["name"], _fmt_n(r["params"]), str(r["steps"]), f"{r['val_bpb_start']:.3f}", f"{r['val_bpb']:.3f}",
              _fmt_n(r["tokens_per_s"])) for r in rows]
    return _text_table(head, lines)


def _coding_chunk(n: int) -> int:
    """Bytes per coder stream: the text cut into (at most) 32 streams of at least 256 bytes."""
    return max(256, -(-n // 32))


def _coding_stage(model, text: TextCorpus, p: DemoPreset, dev: torch.device) -> list[dict]:
    """Lester et al.'s methods on a validation slice with ``model`` as M1: GZip, StaticAC
    (unigram of the training text), ArithmeticCoding and EqualInfoAC[b=16], 8-bit tokens.
    Each result is decoded and compared with the input (a mismatch raises)."""
    from flopwise.coding import ArithmeticCoding, CachedLM, EqualInfoAC, GZip, StaticAC, StaticModel
    from flopwise.coding.dataset import compression_stats
    from flopwise.coding.rangecoder import CorruptStreamError

    data = text.val[: p.coding_bytes]
    model = model.eval()
    S = model.cfg.max_seq_len
    # 32 streams coded side by side (one model call advances all of them): the coder's time
    # goes with the steps of the longest stream, not with the bytes
    chunk = _coding_chunk(len(data))
    coders = [
        ("GZip", "gzip", lambda: GZip(8, 4096)),  # no model steps; smaller chunks would only hurt it
        ("StaticAC", "static", lambda: StaticAC(StaticModel.fit(text.train[: 1 << 22]), 8, chunk, device=dev)),
        ("AC", "ac", lambda: ArithmeticCoding(CachedLM(model, context_len=S), 8, chunk, device=dev)),
        ("EqualInfoAC[b=16]", "equalinfo", lambda: EqualInfoAC(
            CachedLM(model, context_len=min(S, EqualInfoAC.context_len(64))), 16, 8, chunk, device=dev)),
    ]
    rows = []
    for name, method, make in coders:
        coder = make()
        t0 = time.perf_counter()
        comp = coder.compress(data)
        t1 = time.perf_counter()
        back = coder.decompress(comp)
        t2 = time.perf_counter()
        if back != data:
            raise CorruptStreamError(f"{name} did not decode back to its input")
        st = compression_stats(comp, len(data), 8, method, 16 if method == "equalinfo" else None)
        rows.append({"method": name, "bits_per_byte": st["bits_per_byte"], "compression_ratio":
                     st["compression_ratio"], "bytes_per_token": st["bytes_per_token"],
                     "encode_kbps": len(data) / max(t1 - t0, 1e-9) / 1e3,
                     "decode_kbps": len(data) / max(t2 - t1, 1e-9) / 1e3})
    rows.sort(key=lambda r: r["bits_per_byte"])
    return rows


def format_coding(rows: list[dict]) -> str:
    head = ("method", "bits/byte", "ratio", "bytes/token", "encode kB/s", "decode kB/s")
    lines = [(r["method"], f"{r['bits_per_byte']:.3f}", f"{r['compression_ratio']:.2f}", f"{r['bytes_per_token']:.2f}",
              f"{r['encode_kbps']:,.1f}", f"{r['decode_kbps']:,.1f}") for r in rows]
    return _text_table(head, lines)


def _text_table(head: tuple[str, ...], lines: list[tuple[str, ...]]) -> str:
    widths = [max([len(h)] + [len(line[i]) for line in lines]) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(head), fmt(tuple("-" * w for w in widths)), *map(fmt, lines)])
