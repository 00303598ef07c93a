"""Training loop for :class:`~flopwise.models.Transformer` language models on bytes
(:class:`~flopwise.models.data.ByteData`) or any other token ids
(:class:`~flopwise.models.data.TokenData`, e.g. compressed text).

AdamW (no weight decay on vectors: norms, biases), linear warmup then cosine decay to
``min_lr_ratio * lr``, global gradient-norm clipping, gradient accumulation, bf16 autocast
on CUDA (fp32 master weights), periodic validation in bits per (original) byte, checkpoints
(:mod:`flopwise.models.checkpoint`) with exact resume.

Exact resume: batches are a pure function of ``(seed, step, micro-step)``
(:meth:`~flopwise.models.data.ByteData.batch`, :meth:`~flopwise.models.data.TokenData.batch`), the learning rate a pure function of the
step, and a checkpoint holds the fp32 weights, the AdamW moments and step, and the global
RNG states. So on a deterministic device a run stopped at step k and resumed computes
bit-for-bit the losses an uninterrupted run computes from step k on.

Example::

    from flopwise.models import ModelConfig
    from flopwise.models.train import TrainConfig, Trainer
    from flopwise.models.data import load_corpus

    trainer = Trainer(ModelConfig.preset("m1"), TrainConfig(max_steps=500, out_dir="runs/m1"),
                      load_corpus())
    result = trainer.fit()             # progress bar: loss, tokens/s, MFU; evals; checkpoints
    result.val_bpb
    trainer = Trainer.resume("runs/m1/last", load_corpus())

On other tokens (here 16-bit ids of compressed text; ``val_bytes``: the original bytes
``val`` encodes, so validation is reported in bits per original byte)::

    data = TokenData(train_ids, val_ids, vocab_size=65536, val_bytes=n_val_bytes, name="zip16")
    trainer = Trainer(ModelConfig.preset("m1", vocab_size=65536), TrainConfig(), data)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from flopwise._files import check_writable

from .checkpoint import (check_replaceable, check_trainer_state, load_checkpoint, load_optimizer_tensors, rng_state,
                         save_checkpoint, set_rng_state)
from .data import ByteData, TextCorpus, TokenData, load_corpus
from .mod import MoDBlock
from .transformer import ModelConfig, Transformer

__all__ = ["TrainConfig", "TrainResult", "Trainer", "lr_at", "peak_flops", "active_params", "compile_blocks",
           "load_run_config", "resolve_device", "resolve_preset", "Progress"]


# ----------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------

_DTYPES = ("auto", "fp32", "bf16")


@dataclass
class TrainConfig:
    """Attributes:
    seq_len: tokens (bytes, for byte data) per training sequence; batch_size: sequences per micro-batch;
        grad_accum: micro-batches per optimizer step (tokens per step =
        ``seq_len * batch_size * grad_accum``).
    max_steps: optimizer steps (the cosine schedule ends here).
    lr, min_lr_ratio, warmup_steps: peak learning rate, the floor as a fraction of it, and
        linear warmup steps (see :func:`lr_at`).
    weight_decay, beta1, beta2, eps: AdamW; decay applies to matrices only.
    grad_clip: global L2 norm to clip to (0: no clipping; the norm is still reported).
    eval_every: validation every this many steps (0: only at the end); eval_tokens:
        validation tokens (bytes, for byte data) predicted per evaluation (None: all of it).
    log_every: progress-line interval in steps (on a terminal the bar redraws every step).
    save_every: checkpoint to ``out_dir/last`` every this many steps (0: only at the end);
        out_dir: None writes no checkpoints.
    seed: model initialisation and data order.
    device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``, ...
    dtype: ``"auto"`` (bf16 autocast on CUDA, fp32 elsewhere), ``"fp32"`` or ``"bf16"``.
    compile: ``torch.compile`` each block for training steps (regional compilation: blocks
        of one kind share one compiled graph, so compile time does not grow with depth;
        evaluation stays eager); ``True`` uses the default backend (inductor), a string
        names another backend (e.g. ``"aot_eager"``).
    time_budget_s: stop training after this many seconds (checked between steps), but not
        before step ``min_steps``. Both apply to the run that sets them: :meth:`Trainer.resume`
        drops them unless passed again.
    """

    seq_len: int = 256
    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    eval_every: int = 0
    eval_tokens: int | None = 65536
    log_every: int = 10
    save_every: int = 0
    out_dir: str | None = None
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    compile: bool | str = False
    time_budget_s: float | None = None
    min_steps: int = 0

    def __post_init__(self):
        # Types first, by name: a "0.1" from a config file would otherwise fail in a comparison
        # that names no field, or (a bool) pass as a number.
        for name in ("lr", "min_lr_ratio", "weight_decay", "beta1", "beta2", "eps", "grad_clip", "time_budget_s"):
            v = getattr(self, name)
            if v is None and name == "time_budget_s":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"TrainConfig.{name} must be a number, got {v!r}")
            if math.isnan(v):
                raise ValueError(f"TrainConfig.{name} must be a number, got NaN")
        if self.eval_tokens is not None and (isinstance(self.eval_tokens, bool) or not isinstance(self.eval_tokens, int)):
            raise TypeError(f"TrainConfig.eval_tokens must be None or an int >= 1, got {self.eval_tokens!r}")
        if self.out_dir is not None:
            if not isinstance(self.out_dir, (str, os.PathLike)) or not os.fspath(self.out_dir):
                raise TypeError(f"TrainConfig.out_dir must be None or a folder path, got {self.out_dir!r}")
            self.out_dir = os.fspath(self.out_dir)  # JSON-able in trainer_state.json
        if not isinstance(self.device, str):
            raise TypeError(f"TrainConfig.device must be a str ('auto', 'cpu', 'cuda', ...), got {self.device!r}")
        for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "log_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"TrainConfig.{name} must be an int >= 1, got {v!r}")
        for name in ("warmup_steps", "eval_every", "save_every", "seed", "min_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"TrainConfig.{name} must be an int >= 0, got {v!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"TrainConfig.lr must be a finite number > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"TrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("weight_decay", "grad_clip", "eps"):
            v = getattr(self, name)
            if not (math.isfinite(v) and (v > 0 if name == "eps" else v >= 0)):
                raise ValueError(f"TrainConfig.{name} must be a finite number {'> 0' if name == 'eps' else '>= 0'}, "
                                 f"got {v}")
        # The data seeds one generator per (seed, step, micro-step) with
        # (seed * 1_000_003 + step) * 1_009 + micro, which must fit the 64 bits torch takes.
        top_seed = ((2**64 - 1 - (self.grad_accum - 1)) // 1_009 - (self.max_steps - 1)) // 1_000_003
        if self.seed > top_seed:
            raise ValueError(f"TrainConfig.seed must be at most {top_seed:,} (with max_steps {self.max_steps}), "
                             f"got {self.seed}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"TrainConfig betas must be in [0, 1), got {self.beta1}, {self.beta2}")
        if self.eval_tokens is not None and (isinstance(self.eval_tokens, bool) or self.eval_tokens < 1):
            raise ValueError(f"TrainConfig.eval_tokens must be None or >= 1, got {self.eval_tokens!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"TrainConfig.dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if not isinstance(self.compile, (bool, str)) or self.compile == "":
            raise ValueError(f"TrainConfig.compile must be a bool or a torch.compile backend name, got {self.compile!r}")
        if isinstance(self.compile, str):
            # Checked now: an unknown backend ("false" from a config file) would otherwise
            # fail at the first training step, with a traceback.
            from torch._dynamo import list_backends

            known = list_backends(exclude_tags=())
            if self.compile not in known:
                raise ValueError(f"TrainConfig.compile must be true/false or a torch.compile backend name such as "
                                 f"'inductor' or 'aot_eager' (torch._dynamo.list_backends(exclude_tags=()) lists "
                                 f"them), got {self.compile!r}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ValueError(f"TrainConfig.time_budget_s must be None or > 0, got {self.time_budget_s}")

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch_size * self.grad_accum

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Unknown keys raise ValueError naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}; known: {sorted(names)}")
        return cls(**d)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): ``lr * (step + 1) / warmup`` for
    the first ``warmup_steps`` steps, then a cosine from ``lr`` down to
    ``min_lr_ratio * lr`` at ``max_steps``, flat after that."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    span = cfg.max_steps - cfg.warmup_steps
    if span <= 0 or step >= cfg.max_steps:
        return floor if step >= cfg.max_steps else cfg.lr
    progress = (step - cfg.warmup_steps) / span
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def load_run_config(spec: str | os.PathLike) -> tuple[ModelConfig, TrainConfig]:
    """``(ModelConfig, TrainConfig)`` from a preset name or a JSON/TOML file.

    A preset name (``tiny``, ``m1``, ``small``, ...) gives that model with the default
    TrainConfig (``seq_len`` capped at the model's ``max_seq_len``). A file holds::

        {"model": "m1"  |  {"preset": "m1", "mod": "every_other", ...ModelConfig fields},
         "train": {...TrainConfig fields}}
    """
    spec = str(spec)
    p = Path(spec)
    if not p.exists() and p.suffix not in (".json", ".toml"):
        mc = ModelConfig.preset(spec)
        return mc, TrainConfig(seq_len=min(TrainConfig.seq_len, mc.max_seq_len))
    if p.is_dir() and (p / "config.json").is_file():
        raise ValueError(f"{p} is a checkpoint folder, not a config: continue it with --resume {p} "
                         "(Trainer.resume), or pass a preset or a JSON/TOML config")
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    if p.suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            raise ValueError("TOML configs need Python >= 3.11 (tomllib); use JSON") from None
        raw = tomllib.loads(p.read_text())
    else:
        try:
            raw = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"corrupt config {p}: {exc}") from None
    if not isinstance(raw, dict) or "model" not in raw:
        raise ValueError(f"config {p} must be an object with a 'model' entry (and optionally 'train')")
    unknown = sorted(set(raw) - {"model", "train"})
    if unknown:
        raise ValueError(f"config {p}: unknown top-level keys {unknown} (expected 'model', 'train')")
    m = raw["model"]
    if isinstance(m, str):
        mc = ModelConfig.preset(m)
    elif isinstance(m, dict):
        m = dict(m)
        if "preset" in m and not isinstance(m["preset"], str):
            raise TypeError(f"config {p}: model 'preset' must be a preset name, got {m['preset']!r}")
        preset = m.pop("preset", None)
        mod = m.pop("mod", None)
        mc = ModelConfig.preset(preset, mod=mod, **m) if preset else ModelConfig.from_dict(
            {**m, **({"routing": mod} if mod is not None else {})})
    else:
        raise TypeError(f"config {p}: 'model' must be a preset name or an object")
    train = raw.get("train", {})
    if not isinstance(train, dict):
        raise TypeError(f"config {p}: 'train' must be an object of TrainConfig fields, got {train!r}")
    tc = TrainConfig.from_dict(train)
    return mc, tc


# ----------------------------------------------------------------------------------------
# Throughput accounting
# ----------------------------------------------------------------------------------------

# Dense bf16 tensor-core peaks (spec sheets, FLOP/s) by the exact name torch reports. Used
# for MFU; BASELINES.md's measured H100 GEMM rate (774e12) is a tighter ceiling, the spec is
# the convention MFU uses. Exact names, not substrings: "H100" is also the PCIe card (756e12)
# and "A10" a prefix of the A10G; a card not listed gets MFU n/a rather than another's peak.
_PEAK_BF16 = {
    "NVIDIA H200": 989e12,
    "NVIDIA GH200 480GB": 989e12,
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA L40S": 362e12,
    "NVIDIA A10": 125e12,
    "NVIDIA GeForce RTX 4090": 165e12,
}


def peak_flops(device: torch.device | str) -> float | None:
    """Peak dense bf16 FLOP/s of ``device`` from a table of GPUs (exact device names), or
    None (CPUs, GPUs not in the table: MFU is then reported as n/a rather than against a
    guess)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return _PEAK_BF16.get(torch.cuda.get_device_name(device).strip())


def active_params(model: Transformer) -> float:
    """Parameters a token uses on average in the forward pass: an MoE layer counts
    ``top_k`` of its ``n_experts`` experts (expert choice: ``capacity_factor``), a MoD
    block counts ``mod_capacity`` of its block parameters (its router and predictor in
    full). The embedding counts once (the lookup is not a matmul; the tied head uses it)."""
    cfg = model.cfg
    total = 0.0
    for name, p in model.named_parameters():
        parts = name.split(".")
        frac = 1.0
        if parts[0] == "layers":
            i = int(parts[1])
            if cfg.routing[i] == "mod" and parts[2] == "block":
                frac *= cfg.mod_capacity
            if cfg.mlp[i] == "moe" and "mlp" in parts and parts[-1] in ("w_gate", "w_up", "w_down"):
                frac *= cfg.moe_experts_per_token / cfg.moe_n_experts
        total += frac * p.numel()
    return total


# ----------------------------------------------------------------------------------------
# Progress display
# ----------------------------------------------------------------------------------------


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


def _hms(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """One status line per update: a bar, step, loss, tokens/s, MFU, lr, last val bpb and
    ETA. On a terminal it redraws in place; otherwise it prints every ``log_every`` steps
    (logs stay readable)."""

    def __init__(self, total: int, *, label: str = "", stream=None, log_every: int = 10, enabled: bool = True):
        self.total, self.label, self.log_every, self.enabled = total, label, log_every, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self.val_bpb: float | None = None

    def update(self, step: int, m: dict, *, start_step: int = 0) -> None:
        if not self.enabled:
            return
        last = step >= self.total
        if not self.tty and not last and step % self.log_every:
            return
        mfu = m.get("mfu")
        frac = step / max(self.total, 1)
        width = 20
        bar = "#" * int(width * frac) + "." * (width - int(width * frac))
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(step - start_step, 1) * (self.total - step)
        line = (f"{self.label}[{bar}] {step}/{self.total} loss {m['loss']:.4f} "
                f"| {_si(m['tokens_per_s'])} tok/s | MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'} "
                f"| lr {m['lr']:.2e}")
        if self.val_bpb is not None:
            line += f" | val bpb {self.val_bpb:.3f}"
        line += f" | {_hms(elapsed)}<{_hms(eta)}"
        if self.tty:
            self.stream.write("\r" + line + ("\n" if last else "\x1b[K"))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        if self.enabled:
            self.stream.write(("\r\x1b[K" if self.tty else "") + f"{self.label}{text}\n")
            self.stream.flush()


# ----------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """Summary of a :meth:`Trainer.fit` call. ``losses``: the LM loss (nats/token; a token
    is a byte for byte data) of every step run in this call; ``evals``: ``(step, val_bpb)``
    pairs (bits per original byte); ``tokens_per_s``: training
    throughput (evaluation excluded); ``flops``: training FLOPs of the steps run
    (``cfg.flops_per_token(seq_len)`` per token)."""

    steps: int
    tokens: int
    seconds: float
    tokens_per_s: float
    flops: float
    mfu: float | None
    losses: list[float] = field(default_factory=list)
    evals: list[tuple[int, float]] = field(default_factory=list)
    val_bpb: float | None = None
    metrics: dict = field(default_factory=dict)
    stopped_early: bool = False


def compile_blocks(model: Transformer, backend: str | None = None) -> Transformer:
    """Regional compilation, in place: ``torch.compile`` every layer of ``model`` rather than
    the whole model. Layers of one class run the same code on different parameters, which
    the compiled code takes as inputs, so a 24-layer model compiles one graph per layer
    kind (dense, MoD, MoE), not one unrolled 24-layer graph. The embedding, final norm,
    head and loss stay eager; they are a small share of the step. ``backend``: a
    ``torch.compile`` backend name (None: the default, inductor)."""
    for layer in model.layers:
        layer.compile(**({} if backend is None else {"backend": backend}))
    return model


def resolve_preset(preset, cls: type, device: torch.device, requested: str = "auto"):
    """``preset`` as an instance of ``cls`` (a preset dataclass with a ``preset(name)``
    classmethod): a name, an instance, or None (``"gpu"`` on CUDA, else ``"cpu"``). A GPU
    preset named on a machine without CUDA is refused unless the device was asked for
    (``requested`` is not ``"auto"``): it would train for hours on the CPU."""
    if preset is None:
        preset = "gpu" if device.type == "cuda" else "cpu"
    p = cls.preset(preset) if isinstance(preset, str) else preset
    if not isinstance(p, cls):
        raise TypeError(f"preset must be a preset name or a {cls.__name__} instance, got {type(preset).__name__}")
    if isinstance(preset, str) and preset.startswith("gpu") and device.type != "cuda" and requested == "auto":
        raise ValueError(f"preset {preset!r} is sized for a GPU and torch sees no CUDA device: on this CPU it would "
                         "train for hours; choose preset 'cpu', or ask for the CPU explicitly (device 'cpu', "
                         "--device cpu) to run it anyway")
    return p


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when present, else CPU; any other name as ``torch.device``
    (ValueError for a name torch does not know, or CUDA on a machine without it)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA device")
    return dev


class Trainer:
    """Owns the model, the optimizer, the data and the step counter.

    Args:
        model_cfg: the model to build (initialised from ``cfg.seed``).
        cfg: the :class:`TrainConfig`.
        data: a :class:`~flopwise.models.data.ByteData`, a
            :class:`~flopwise.models.data.TokenData`, a
            :class:`~flopwise.models.data.TextCorpus` (trained on as bytes, seeded with
            ``cfg.seed``) or None (:func:`load_corpus`'s default). The model's
            ``vocab_size`` must be at least the data's.
        progress: show the progress line (stderr).
        force: a new run whose ``cfg.out_dir`` already holds a checkpoint (``out_dir/last``)
            replaces it only with ``force=True`` (the CLI's ``--force``); without it that is
            a FileExistsError, raised before any training. Even with it, ``out_dir/last``
            must be a checkpoint folder: a folder of other files is never replaced.

    Everything a run needs is checked here, before the first step: the data holds a whole
    training and validation window, ``out_dir`` is (or can become) a folder, and its
    ``last`` checkpoint may be written. ``out_dir`` is stored as an absolute path.
    """

    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig | None = None,
                 data: ByteData | TokenData | TextCorpus | None = None,
                 *, progress: bool = True, label: str = "", force: bool = False):
        if not isinstance(model_cfg, ModelConfig):
            raise TypeError(f"model_cfg must be a ModelConfig, got {type(model_cfg).__name__}")
        cfg = cfg or TrainConfig()
        if not isinstance(cfg, TrainConfig):
            raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
        if not isinstance(force, bool):
            raise TypeError(f"force must be a bool, got {force!r}")
        if cfg.seq_len > model_cfg.max_seq_len:
            raise ValueError(f"seq_len {cfg.seq_len} exceeds the model's max_seq_len {model_cfg.max_seq_len}")
        if data is None:
            data = load_corpus()
        data = data if isinstance(data, (ByteData, TokenData)) else ByteData(data, seed=cfg.seed)
        if model_cfg.vocab_size < data.vocab_size:
            raise ValueError(f"the model's vocab_size ({model_cfg.vocab_size}) is smaller than the data's "
                             f"vocab_size ({data.vocab_size}): token ids up to {data.vocab_size - 1} occur")
        # Before training, not after it: the final evaluation needs a validation window.
        data.check_lengths(cfg.seq_len)
        if cfg.out_dir:
            out = _usable_out_dir(cfg.out_dir)
            cfg = dataclasses.replace(cfg, out_dir=str(out))
            _check_new_run_out_dir(out, force)
        if cfg.warmup_steps > cfg.max_steps:
            warnings.warn(f"warmup_steps ({cfg.warmup_steps}) exceeds max_steps ({cfg.max_steps}): the learning "
                          f"rate never reaches its peak {cfg.lr:g} (pass fewer warmup steps, --warmup-steps)",
                          stacklevel=2)
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.data = data
        # flopwise's own data classes check their ids when built, so the steps skip the model's
        # per-call range check (on a GPU, a few small kernels per micro-batch); a subclass,
        # which may produce its own batches, keeps it.
        self._ids_checked = type(data) in (ByteData, TokenData)
        self.show_progress, self.label = progress, label
        torch.manual_seed(cfg.seed)
        self.model = Transformer(model_cfg).to(self.device)
        if cfg.compile:
            compile_blocks(self.model, None if cfg.compile is True else cfg.compile)
        self.optimizer = self._make_optimizer()
        self.step = 0
        self.tokens_seen = 0
        self.amp = self.device.type == "cuda" and cfg.dtype in ("auto", "bf16") or cfg.dtype == "bf16"
        self.flops_per_token = model_cfg.flops_per_token(cfg.seq_len)
        self.peak = peak_flops(self.device)

    # ------------------------------------------------------------------ set-up
    def _make_optimizer(self) -> torch.optim.AdamW:
        # Matrices (and the embedding) decay; vectors (norm gains, biases) do not: decaying a
        # gain towards 0 only fights the normalisation it scales.
        decay, no_decay = [], []
        for _, p in self.model.named_parameters():
            (decay if p.dim() >= 2 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": self.cfg.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        kwargs = dict(lr=self.cfg.lr, betas=(self.cfg.beta1, self.cfg.beta2), eps=self.cfg.eps)
        if self.device.type == "cuda":
            kwargs["fused"] = True
        return torch.optim.AdamW(groups, **kwargs)

    @property
    def model_cfg(self) -> ModelConfig:
        return self.model.cfg

    def _autocast(self):
        if self.amp:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return torch.autocast(device_type=self.device.type, enabled=False)

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict:
        """One optimizer step over ``grad_accum`` micro-batches. Returns the metrics:
        ``loss`` (LM loss, nats/token, mean over micro-batches), ``total_loss`` (with the
        auxiliary losses), ``grad_norm`` (before clipping), ``lr`` and the model's aux
        means (e.g. ``mod_predictor_acc``)."""
        cfg = self.cfg
        self.model.train()
        lr = lr_at(self.step, cfg)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        # Metrics stay on the device until the step is done: one host sync per step, not
        # one per micro-batch, keeps the GPU queue full.
        sums: dict[str, torch.Tensor] = {}
        for micro in range(cfg.grad_accum):
            x, y = self.data.batch(self.step, micro, cfg.batch_size, cfg.seq_len)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with self._autocast():
                out = self.model(x, y, check_ids=not self._ids_checked)
            # Equal micro-batches: the mean of their means is the big batch's mean.
            (out.loss / cfg.grad_accum).backward()
            parts = {"loss": out.aux["lm_loss"], "total_loss": out.loss.detach()}
            parts.update((k, v) for k, v in out.aux.items() if "." not in k and k not in ("lm_loss", "aux_loss"))
            for k, v in parts.items():
                v = v.float() / cfg.grad_accum
                sums[k] = sums[k] + v if k in sums else v
        params = [p for p in self.model.parameters() if p.grad is not None]
        if cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        else:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        # Checked before the update: a non-finite loss or gradient would write NaN into the
        # weights and moments, and the next checkpoint would keep them.
        metrics = {k: float(v) for k, v in sums.items()}
        grad_norm = float(norm)
        if not (math.isfinite(metrics["total_loss"]) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            for m in self.model.moe_bias_layers():  # nor do this step's expert loads count towards the next update
                m.expert_load.zero_()
            what = (f"the loss is {metrics['loss']}" if not math.isfinite(metrics["loss"]) else
                    f"the total loss is {metrics['total_loss']}" if not math.isfinite(metrics["total_loss"]) else
                    f"the gradient norm is {grad_norm}")
            raise FloatingPointError(f"training diverged: {what} at step {self.step + 1} (learning rate {lr:.3g}; "
                                     "a lower lr, --lr, usually helps); the weights were not updated")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.update_moe_biases()  # auxiliary-loss-free balancing, from this step's loads
        self.step += 1
        self.tokens_seen += cfg.tokens_per_step
        return {"step": self.step, "grad_norm": grad_norm, "lr": lr, **metrics}

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, max_tokens: int | None = -1, *, causal: bool = True) -> dict:
        """Validation loss over the fixed validation windows, in bits per original byte.

        Runs in ``eval()`` mode (no dropout, no draws from the global RNG). ``causal=True``:
        MoD layers route causally (the way generation runs); ``causal=False``: they use
        their training-time top-k routing, which looks at the whole window. Expert-choice
        MoE layers route over the whole window in either mode (expert choice has no causal
        form), so their score sees the future. ``max_tokens``: -1 (default) for
        ``cfg.eval_tokens``, None for all validation tokens, or an int >= 1.

        Returns ``{"val_loss", "val_bits_per_token", "val_bpb", "val_tokens"}`` plus
        ``mod_predictor_acc`` for MoD models: ``val_loss`` in nats per token,
        ``val_bits_per_token = val_loss / ln 2``, ``val_bpb = val_bits_per_token /
        data.bytes_per_token`` (bits per byte of the original text; the same number for
        byte data), ``val_tokens`` the tokens predicted. For :class:`TokenData`,
        ``bytes_per_token`` is the average over the whole validation array, so ``val_bpb``
        assumes the tokens evaluated compress like the whole array: with
        ``max_tokens=None`` every window is evaluated, leaving out the first token and the
        last partial window (at most ``seq_len`` tokens).
        """
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                       or not (max_tokens == -1 or max_tokens >= 1)):
            raise ValueError(f"max_tokens must be None (all), -1 (cfg.eval_tokens) or an int >= 1, got {max_tokens!r}")
        if max_tokens == -1:
            max_tokens = self.cfg.eval_tokens
        # Compiled blocks (TrainConfig.compile) serve training only: evaluation runs eager
        # instead of compiling eval-mode graphs (causal MoD routing breaks graphs anyway).
        with torch.compiler.set_stance("force_eager"):
            return self._evaluate(max_tokens, causal)

    def _evaluate(self, max_tokens: int | None, causal: bool) -> dict:
        was = self.model.training
        # Eval mode (no dropout) either way; causal=False switches only the MoD routers back
        # to their training-time top-k routing (MoDBlock.routes_causally reads their own flag).
        self.model.eval()
        if not causal:
            for mod in self.model.modules():
                if isinstance(mod, MoDBlock):
                    mod.training = True
        nats, n, acc, acc_n = 0.0, 0, 0.0, 0
        try:
            for x, y in self.data.eval_windows(self.cfg.seq_len, self.cfg.batch_size, max_tokens):
                x, y = x.to(self.device), y.to(self.device)
                with self._autocast():
                    out = self.model(x, y, check_ids=not self._ids_checked)
                nats += float(out.aux["lm_loss"]) * y.numel()
                n += y.numel()
                if "mod_predictor_acc" in out.aux:
                    acc += float(out.aux["mod_predictor_acc"]) * y.numel()
                    acc_n += y.numel()
        finally:
            self.model.train(was)
        bits_per_token = nats / n / math.log(2)
        res = {"val_loss": nats / n, "val_bits_per_token": bits_per_token,
               "val_bpb": bits_per_token / self.data.bytes_per_token, "val_tokens": n}
        if acc_n:
            res["mod_predictor_acc"] = acc / acc_n
        return res

    @property
    def eval_routing(self) -> str:
        """How :meth:`evaluate` (``causal=True``) routes: ``""`` for a model without routed
        layers, ``"causal routing"``, or ``"non-causal routing"`` when a MoD layer has
        ``mod_causal="none"`` or an MoE layer routes by expert choice: those look at the
        whole window, so the validation score sees the future and flatters the model."""
        c = self.model_cfg
        moe_ec = "moe" in c.mlp and c.moe_router == "expert_choice"
        if moe_ec or (c.n_mod_layers and c.mod_causal == "none"):
            return "non-causal routing: sees the whole window"
        return "causal routing" if c.n_mod_layers or "moe" in c.mlp else ""

    # ------------------------------------------------------------------ loop
    def fit(self, steps: int | None = None, *, callback: Callable[[dict], None] | None = None) -> TrainResult:
        """Train until ``cfg.max_steps`` (or ``steps`` more steps, or ``cfg.time_budget_s``),
        evaluating every ``eval_every`` steps and at the end, checkpointing to
        ``out_dir/last`` every ``save_every`` steps and at the end (when ``out_dir`` is set).
        ``callback`` gets each step's metrics."""
        cfg = self.cfg
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
            raise ValueError(f"steps must be None (train to max_steps) or an int >= 0, got {steps!r}")
        end = cfg.max_steps if steps is None else min(cfg.max_steps, self.step + steps)
        start_step = self.step
        if end <= self.step and steps != 0:
            warnings.warn(f"nothing to train: the run is at step {self.step} and max_steps is {cfg.max_steps} "
                          "(raise max_steps, --steps, to continue it)", stacklevel=2)
        bar = Progress(cfg.max_steps, label=self.label, log_every=cfg.log_every, enabled=self.show_progress)
        losses, evals, train_s = [], [], 0.0
        last: dict = {}
        t_start = time.perf_counter()
        stopped = False
        while self.step < end:
            if (cfg.time_budget_s is not None and self.step >= cfg.min_steps
                    and time.perf_counter() - t_start > cfg.time_budget_s):
                stopped = True
                bar.note(f"time budget {cfg.time_budget_s:g} s reached at step {self.step}")
                break
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            m = self.train_step()
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            # The first step of a call pays for warm-up (allocator, compilation); keep it
            # out of the throughput when there is more than one step.
            if self.step - start_step > 1 or end - start_step == 1:
                train_s += dt
            counted = max(1, self.step - start_step - (1 if end - start_step > 1 else 0))
            tps = counted * cfg.tokens_per_step / train_s if train_s > 0 else cfg.tokens_per_step / dt
            m["tokens_per_s"] = tps
            m["mfu"] = tps * self.flops_per_token / self.peak if self.peak else None
            losses.append(m["loss"])
            last = m
            if callback is not None:
                callback(m)
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < end:
                ev = self.evaluate()
                evals.append((self.step, ev["val_bpb"]))
                bar.val_bpb = ev["val_bpb"]
            bar.update(self.step, m, start_step=start_step)
            if cfg.out_dir and cfg.save_every and self.step % cfg.save_every == 0 and self.step < end:
                self.save(Path(cfg.out_dir) / "last")
        # The checkpoint first: the steps just trained are kept even if evaluation fails.
        if cfg.out_dir:
            self.save(Path(cfg.out_dir) / "last")
        final = self.evaluate() if self.step > start_step or not evals else {}
        if final:
            evals.append((self.step, final["val_bpb"]))
            bar.val_bpb = final["val_bpb"]
            routing = self.eval_routing
            bar.note(f"step {self.step}: val bpb {final['val_bpb']:.4f} "
                     f"({final['val_tokens']:,} {'bytes' if isinstance(self.data, ByteData) else 'tokens'}"
                     + (f", {routing}" if routing else "") + ")")
        n = self.step - start_step
        tps = last.get("tokens_per_s", 0.0)
        return TrainResult(
            steps=n, tokens=n * cfg.tokens_per_step, seconds=time.perf_counter() - t_start, tokens_per_s=tps,
            flops=n * cfg.tokens_per_step * self.flops_per_token, mfu=last.get("mfu"), losses=losses, evals=evals,
            val_bpb=evals[-1][1] if evals else None, metrics={**last, **final}, stopped_early=stopped)

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict:
        """``trainer_state.json``: step, tokens seen, RNG states, the data position, the
        TrainConfig (the data order is a function of seed and step, so those two are the
        position) and the ModelConfig trained (so that a resume notices an edited
        ``config.json``)."""
        return {"step": self.step, "tokens_seen": self.tokens_seen, "rng": rng_state(),
                "data": {"corpus": self.data.corpus.name, "sha256": self.data.corpus.sha256,
                         "seed": self.data.seed, "bos": self.data.bos, "next_step": self.step, "next_micro": 0},
                "train_config": self.cfg.to_dict(), "model_config": self.model.cfg.to_dict()}

    def save(self, path: str | os.PathLike) -> Path:
        """Checkpoint to the folder ``path`` (atomic; see :mod:`flopwise.models.checkpoint`).
        Weights that are not all finite are refused (FloatingPointError): a checkpoint is
        never a diverged state."""
        params = dict(self.model.named_parameters())
        ok = torch.stack([torch.isfinite(p).all() for p in params.values()])
        if not bool(ok.all()):  # one host sync
            bad = [name for name, good in zip(params, ok.tolist()) if not good]
            raise FloatingPointError(f"training diverged: parameter(s) {bad[:3]} hold inf/NaN at step {self.step}; "
                                     f"not saving them to {path} (a lower lr, --lr, usually helps)")
        return save_checkpoint(path, self.model, self.optimizer, trainer_state=self.state())

    @classmethod
    def resume(cls, path: str | os.PathLike, data: ByteData | TokenData | TextCorpus | None = None, *,
               progress: bool = True, label: str = "", force: bool = False, allow_config_change: bool = False,
               **overrides) -> "Trainer":
        """A trainer continuing the checkpoint at ``path``: weights, AdamW state, step, RNG
        states and TrainConfig (``overrides`` change TrainConfig fields, e.g. ``max_steps``
        or ``out_dir``). ``data``: as in :class:`Trainer` (pass the run's
        :class:`~flopwise.models.data.TokenData` for a token run). A different corpus than
        the run's is refused (its checksum is in the checkpoint); so is data with another seed
        (the data order), and a bare corpus gets the run's seed.

        Where it writes: ``out_dir/last`` as in the original run. A run's ``last`` found
        elsewhere than that (its run folder moved or copied) continues where it is:
        ``path`` itself, in ``path``'s parent folder. A checkpoint without an
        ``out_dir`` (saved with :meth:`save`, by ``flopwise demo --out``, or upcycled by
        :func:`flopwise.models.upcycle.upcycle`, which clears it) continues in its own
        folder, ``path/last``, so the steps trained are never lost; pass ``out_dir`` to
        write elsewhere, or ``out_dir=None`` explicitly to write nothing.

        ``out_dir/last`` is replaced only when it is this run's: ``path`` itself, or an
        earlier checkpoint of the same model on the same data (corpus and seed). A
        checkpoint of another model or other data, one further along than ``path``, or a
        folder that is no checkpoint is refused (ValueError / FileExistsError) unless
        ``force=True``; a folder that is no checkpoint is never replaced.

        A ``config.json`` edited since the save (another top-k, capacity, routing pattern:
        weights of the same shapes, a different model) is refused, naming the fields that
        differ from the ModelConfig the run trained (recorded in ``trainer_state.json``),
        unless ``allow_config_change=True``: the run then goes on with the edited model, no
        longer the original run continued."""
        ck = load_checkpoint(path)
        st = ck.trainer_state
        if st is None or ck.optimizer is None:
            raise ValueError(f"{path} is not a resumable checkpoint (needs trainer_state.json and optimizer.safetensors)")
        check_trainer_state(st, Path(path) / "trainer_state.json")
        if not isinstance(allow_config_change, bool):
            raise TypeError(f"allow_config_change must be a bool, got {allow_config_change!r}")
        changed = _config_changes(st, ck.config, Path(path))
        if changed and not allow_config_change:
            raise ValueError(f"{path}/config.json differs from the model this run trained: {'; '.join(changed)}. "
                             "Resuming would continue another model than the run's; restore config.json, or pass "
                             "allow_config_change=True (--allow-config-change) to train the edited model on")
        saved_cfg = dict(st["train_config"])
        # A time budget belongs to the call that trained under it (a timed demo run stores a
        # few seconds): a resumed run is not capped by it unless it is passed again. It
        # decides only where training stops, never what a step computes.
        saved_cfg.pop("time_budget_s", None)
        saved_cfg.pop("min_steps", None)
        cfg = TrainConfig.from_dict({**saved_cfg, **overrides})
        if cfg.out_dir is None and "out_dir" not in overrides:
            # The run named no folder (a demo checkpoint, an upcycled one whose out_dir was
            # cleared so that it never writes over the dense run): training on without one
            # would save nothing. It continues in its own folder: path/last.
            cfg = dataclasses.replace(cfg, out_dir=str(path))
        elif "out_dir" not in overrides and cfg.out_dir is not None:
            # A run's own `last` that is no longer where the run saved it (the run folder was
            # moved or copied, or comes from another machine) continues where it now is, never
            # in the folder recorded at save time, which may be another run's or gone.
            here = Path(os.path.abspath(os.fspath(path)))
            saved = Path(cfg.out_dir) / "last"
            if here.name == "last" and not (saved.is_dir() and here.is_dir() and os.path.samefile(saved, here)):
                cfg = dataclasses.replace(cfg, out_dir=str(here.parent))
        if cfg.out_dir:
            _check_resume_out_dir(_usable_out_dir(cfg.out_dir), ck.config, st, path, force)
        if data is None:
            data = load_corpus()
        corpus = data.corpus if isinstance(data, (ByteData, TokenData)) else data
        if corpus.sha256 != st["data"]["sha256"]:
            raise ValueError(f"checkpoint {path} was trained on corpus {st['data']['corpus']!r} "
                             f"(sha256 {st['data']['sha256'][:12]}...), not {corpus.name!r} ({corpus.sha256[:12]}...)")
        bos = st["data"].get("bos")
        seed = int(st["data"].get("seed", cfg.seed))
        if "seed" in overrides and overrides["seed"] != seed:
            raise ValueError(f"seed={overrides['seed']!r}: checkpoint {path} continues its run's data order "
                             f"(seed {seed}); a resumed run cannot change it (start a new run instead)")
        if isinstance(data, TextCorpus):
            data = ByteData(data, seed=seed, bos=bos)  # the run's data order, whatever cfg.seed says
        elif data.bos != bos:
            raise ValueError(f"checkpoint {path} was trained with bos={bos}, the data given has bos={data.bos}")
        elif data.seed != seed:
            raise ValueError(f"checkpoint {path} was trained on data seed {seed}, the data given has seed "
                             f"{data.seed}: its batches would differ from the run's (pass seed={seed}, or the corpus)")
        # force=True: out_dir/last was checked above as this run's (or the caller forced it).
        with warnings.catch_warnings():
            # warmup vs max_steps was the original run's choice; other warnings still show
            warnings.filterwarnings("ignore", message=r"warmup_steps \(")
            t = cls(ck.config, cfg, data, progress=progress, label=label, force=True)
        t.model.load_state_dict(ck.model.state_dict())
        load_optimizer_tensors(t.model, t.optimizer, ck.optimizer)
        t.step, t.tokens_seen = int(st["step"]), int(st["tokens_seen"])
        set_rng_state(st["rng"])
        return t


def _config_changes(state: dict, config: ModelConfig, path: Path) -> list[str]:
    """``"field: trained value -> config.json value"`` for every ModelConfig field where the
    checkpoint's config differs from the one recorded in its trainer state (none recorded,
    as by checkpoints older than the record: nothing to compare)."""
    if "model_config" not in state:
        return []
    try:
        trained = ModelConfig.from_dict(state["model_config"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"corrupt {path / 'trainer_state.json'}: its model_config is no ModelConfig ({exc})") from None
    a, b = trained.to_dict(), config.to_dict()
    return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in a if a[k] != b[k]]


def _usable_out_dir(out_dir) -> Path:
    """``out_dir`` as an absolute path, if it is a folder or can be made one (its nearest
    existing ancestor is a writable folder); else ValueError naming it. Checked before a
    run trains, not when it first saves."""
    out = Path(os.path.abspath(os.path.expanduser(os.fspath(out_dir))))
    for p in (out, *out.parents):
        if os.path.lexists(p):
            if not p.is_dir():
                what = "is a file" if p == out else f"lies under {p}, a file"
                raise ValueError(f"out_dir {out_dir} {what}, not a folder: pass a folder for checkpoints (--out)")
            if not os.access(p, os.W_OK | os.X_OK):
                raise ValueError(f"out_dir {out_dir}: {p} is not writable: pass another folder (--out)")
            check_writable(out, f"out_dir {out_dir}", "pass another folder (--out)")
            return out
    return out  # pragma: no cover  (the root exists)


def _describe(last: Path) -> str:
    try:
        st = json.loads((last / "trainer_state.json").read_text())
        return f"a checkpoint at step {int(st['step'])}"
    except (OSError, ValueError, TypeError, KeyError):
        return "a checkpoint"


def _check_new_run_out_dir(out: Path, force: bool) -> None:
    """A new run refuses an ``out/last`` it would replace (an earlier run's checkpoint, or
    anything else) unless ``force``; even then only a checkpoint folder is replaced."""
    last = out / "last"
    if not os.path.lexists(last):
        return
    check_replaceable(last)  # a folder of other files: never, forced or not
    if not force and os.listdir(last):
        raise FileExistsError(f"out_dir {out} already holds {_describe(last)} in {last}; a new run would replace "
                              f"it: resume it (--resume {last}), choose another out_dir (--out), or pass force=True "
                              "(--force) to replace it")


def _check_resume_out_dir(out: Path, model_cfg: ModelConfig, state: dict, path, force: bool) -> None:
    """Refuse to resume into a run folder whose checkpoint is not this run's: fit() would
    replace it (e.g. an upcycled MoE resumed with the dense run's out_dir)."""
    last = out / "last"
    if not os.path.lexists(last):
        return
    if os.path.isdir(path) and os.path.isdir(last) and os.path.samefile(last, path):
        return
    check_replaceable(last)  # a folder of other files is never replaced, forced or not
    if force:
        return
    hint = "pass another out_dir (--out), or force=True (--force) to replace it"
    f = last / "config.json"
    try:
        other = ModelConfig.from_dict(json.loads(f.read_text()))
    except FileNotFoundError:
        return  # an empty folder
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"out_dir {out} holds an unreadable checkpoint ({f}: {exc}); resuming {path} "
                         f"would replace it: {hint}") from None
    if other != model_cfg:
        diff = [k for k, v in model_cfg.to_dict().items() if other.to_dict().get(k) != v]
        raise ValueError(f"out_dir {out} holds a checkpoint of another model (config differs in {diff[:3]}); "
                         f"resuming {path} would replace it: {hint}")
    try:
        theirs = json.loads((last / "trainer_state.json").read_text())
        their_data, their_step = theirs["data"], int(theirs["step"])
    except (OSError, ValueError, TypeError, KeyError):
        raise ValueError(f"out_dir {out} holds a checkpoint without a readable trainer_state.json ({last}); "
                         f"resuming {path} would replace it: {hint}") from None
    ours = state["data"]
    if (their_data.get("sha256"), their_data.get("seed")) != (ours.get("sha256"), ours.get("seed")):
        raise ValueError(f"out_dir {out} holds a checkpoint of another run (trained on other data: corpus "
                         f"{their_data.get('corpus')!r}, seed {their_data.get('seed')}); resuming {path} would "
                         f"replace it: {hint}")
    if their_step > int(state["step"]):
        raise ValueError(f"out_dir {out} holds a checkpoint at step {their_step}, further than {path} (step "
                         f"{int(state['step'])}); resuming would replace it: resume {last} instead, or {hint}")
