"""``flopwise coding experiment``: language models trained over compressed text.

The central comparison of Lester et al. (2024) at a size this machine can run:

1. **M1**: a small byte-level LM trained on the corpus (or given as a checkpoint). It drives
   ``ArithmeticCoding`` and ``EqualInfoAC`` through :class:`~flopwise.coding.models.CachedLM`.
2. **Datasets**: the same training text (``train_bytes`` of the corpus's training split)
   and validation text (``val_bytes`` of its validation split) go through every method;
   every validation set is decoded again and compared with the text (exact round trip).
3. **M2**: one model per method, identical but for the vocabulary (2^N), trained for the
   same steps on sequences of the same number of tokens: matched training compute for
   methods of the same N. Each is evaluated on all of its validation tokens, and the loss is
   reported in **bits per original byte**: ``bits per token / bytes per token``.

A method's compressed bits/byte is what a model that learned nothing (uniform over 2^N
tokens) pays; ``learned`` in the table is the fraction of that an M2 removes. The paper
finds AC and StaticAC close to unlearnable and EqualInfoAC learnable, ahead of bytes at
equal inference compute for large enough models.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch

from flopwise._files import check_writable

from .methods import ArithmeticCoding, Compressed, EqualInfoAC, GZip, StaticAC
from .models import CachedLM
from .rangecoder import CorruptStreamError

__all__ = ["ExperimentPreset", "ExperimentResult", "RUN_KEYS", "parse_runs", "run_experiment", "format_tables"]

# M2 runs: "bytes" or "<method>:<N>" (N = token bits).
RUN_KEYS = ("bytes", "gzip:8", "gzip:16", "static:8", "static:16", "ac:8", "ac:16", "equalinfo:8", "equalinfo:16")
_LABELS = {"bytes": "Bytes", "gzip": "GZip", "static": "StaticAC", "ac": "AC", "equalinfo": "EqualInfoAC"}


def parse_runs(spec: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``"bytes,ac,equalinfo:16"`` -> ``("bytes", "ac:8", "equalinfo:16")`` (N defaults to 8)."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for item in items:
        item = item.strip()
        key = item if item == "bytes" or ":" in item else f"{item}:8"
        if key not in RUN_KEYS:
            raise ValueError(f"unknown run {item!r}; choose from bytes, gzip, static, ac, equalinfo "
                             "(optionally :8 or :16 token bits)")
        if key not in out:
            out.append(key)
    if not out:
        raise ValueError("runs must name at least one run")
    return tuple(out)


@dataclass
class ExperimentPreset:
    """Sizes of one experiment. ``m1`` / ``m2``: ModelConfig fields (M2's vocabulary is set
    per run); steps, batch and sequence length (M2's in tokens) for each; ``train_bytes`` /
    ``val_bytes``: text coded for M2's training and validation; ``m1_context``: cache slots of
    the AC model (EqualInfoAC uses ``EqualInfoAC.context_len(max_window_bytes)``)."""

    name: str
    m1: dict
    m1_steps: int
    m1_seq_len: int
    m1_batch: int
    m2: dict
    m2_steps: int
    m2_seq_len: int
    m2_batch: int
    lr: float
    train_bytes: int
    val_bytes: int
    runs: tuple[str, ...]
    m1_context: int
    chunk_bytes: int = 4096
    window_bits: int = 16
    max_window_bytes: int = 64
    streams_per_batch: int = 256
    batch_rows: int = 256
    table_token_bits: tuple[int, ...] = (8, 16)

    @classmethod
    def preset(cls, name: str) -> "ExperimentPreset":
        """``"cpu"`` (about 10 minutes on 2 cores), ``"gpu"`` (the paper's M1 shape, larger
        M2s, every run including 65k vocabularies), ``"gpu-fit"`` (the same M1 shape, fewer
        steps and a smaller M2, meant for one GPU call of a few minutes), ``"smoke"``
        (seconds; tests)."""
        if name not in _PRESETS:
            raise ValueError(f"unknown experiment preset {name!r}; choose from {sorted(_PRESETS)}")
        return _PRESETS[name]()


_CPU_RUNS = ("bytes", "gzip:8", "static:8", "ac:8", "equalinfo:8")
_PRESETS: dict[str, Callable[[], ExperimentPreset]] = {
    "cpu": lambda: ExperimentPreset(
        "cpu", m1=dict(d_model=128, n_layers=2, n_heads=4, d_ff=512, max_seq_len=128), m1_steps=600, m1_seq_len=128,
        m1_batch=16, m2=dict(d_model=128, n_layers=4, n_heads=4, d_ff=344), m2_steps=300, m2_seq_len=256,
        m2_batch=8, lr=3e-3, train_bytes=1_200_000, val_bytes=128_000, runs=_CPU_RUNS, m1_context=128,
        chunk_bytes=2048, streams_per_batch=600, batch_rows=200),
    "gpu": lambda: ExperimentPreset(
        "gpu", m1=dict(d_model=256, n_layers=3, n_heads=4, d_ff=1024, max_seq_len=1024), m1_steps=4000,
        m1_seq_len=1024, m1_batch=32, m2=dict(d_model=512, n_layers=8, n_heads=8, d_ff=1408, pad_to_multiple_of=64),
        m2_steps=3000, m2_seq_len=512, m2_batch=64, lr=2e-3, train_bytes=5_000_000, val_bytes=279_000,
        runs=("bytes", "gzip:8", "static:8", "ac:8", "equalinfo:8", "equalinfo:16", "ac:16", "gzip:16"),
        # 2,048 streams x 512 slots x 256 dims x 3 layers x (K, V) in fp32: ~6.4 GB of cache
        m1_context=512, streams_per_batch=2048, batch_rows=1024),
    # M2 sees 400 x 64 x 512 = 13M tokens: 2.6 epochs of the byte text, so a corpus of a few
    # MB is not repeated much more for the byte baseline than for the coded runs' epochs
    "gpu-fit": lambda: ExperimentPreset(
        "gpu-fit", m1=dict(d_model=256, n_layers=3, n_heads=4, d_ff=1024, max_seq_len=1024), m1_steps=1500,
        m1_seq_len=1024, m1_batch=32, m2=dict(d_model=384, n_layers=6, n_heads=6, d_ff=1024, pad_to_multiple_of=64),
        m2_steps=400, m2_seq_len=512, m2_batch=64, lr=2e-3, train_bytes=5_000_000, val_bytes=279_000,
        runs=("bytes", "gzip:8", "static:8", "ac:8", "equalinfo:8", "equalinfo:16"),
        m1_context=512, streams_per_batch=2048, batch_rows=1024),
    "smoke": lambda: ExperimentPreset(
        "smoke", m1=dict(d_model=32, n_layers=1, n_heads=2, d_ff=64, max_seq_len=32), m1_steps=30, m1_seq_len=32,
        m1_batch=8, m2=dict(d_model=32, n_layers=1, n_heads=2, d_ff=64), m2_steps=8, m2_seq_len=32, m2_batch=4,
        lr=1e-2, train_bytes=6_000, val_bytes=2_500, runs=_CPU_RUNS, m1_context=32, chunk_bytes=200,
        max_window_bytes=24, streams_per_batch=32, batch_rows=32, table_token_bits=(8,)),
}


@dataclass
class CodingRow:
    """One method at one token size, coded on the validation text."""

    method: str
    token_bits: int
    input_bytes: int
    tokens: int
    bits_per_byte: float
    compression_ratio: float
    bytes_per_token: float
    encode_bytes_per_s: float
    decode_bytes_per_s: float | None


@dataclass
class M2Row:
    run: str
    label: str
    vocab_size: int
    params: int
    steps: int
    tokens_trained: int
    train_tokens: int
    epochs: float
    train_flops: float
    compressed_bpb: float
    bytes_per_token: float
    val_bpb: float
    val_bits_per_token: float
    learned: float
    seconds: float


@dataclass
class ExperimentResult:
    preset: str
    corpus: str
    device: str
    m1: dict
    coding: list[CodingRow]
    m2: list[M2Row]
    seconds: float
    notes: list[str] = field(default_factory=list)
    complete: bool = True  # False in the results.json a run rewrites as it goes

    def to_dict(self) -> dict:
        return asdict(self)


def _write_json(path: str, obj: dict) -> None:
    """Write through a temporary file and rename: a reader never sees half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


# What an experiment writes into OUT: ``results.json`` (rewritten through ``results.json.tmp``),
# the M1 checkpoint ``m1/`` and ``data/<run>/{train,val}.npy``. --force replaces only a folder
# holding these and nothing else.
_OUT_FILES = frozenset({"results.json", "results.json.tmp"})
_OUT_FOLDERS = frozenset({"m1", "data"})
_DATA_FOLDERS = frozenset(k.replace(":", "-") for k in RUN_KEYS)
_REPLACES = ("--force replaces only an earlier `coding experiment` output (results.json, m1/ and data/, nothing "
             "else): remove or move it yourself, or choose another --out")


def _is_experiment_results(path: str) -> bool:
    """Whether ``path`` is a results.json this command wrote (complete or not)."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return False
    want = {"preset", "corpus", "device", "m1", "coding", "m2", "complete"}
    return (isinstance(obj, dict) and want <= set(obj) and isinstance(obj["coding"], list)
            and isinstance(obj["m2"], list) and isinstance(obj["complete"], bool))


def _check_out(out_dir: str, force: bool, inputs: dict[str, str | None]) -> bool:
    """Refuse an ``out_dir`` that is or contains an input, and an existing one unless it is
    empty, or an earlier experiment output (only what this command writes) and ``force``.
    Returns True when it holds an earlier run that the new one is to replace."""
    from flopwise.models.checkpoint import check_replaceable
    from flopwise.models.safetensors_io import check_replaceable_folder, path_within

    out = os.path.abspath(out_dir)
    real = os.path.realpath(out)
    for what, path in inputs.items():
        if path is not None and path_within(os.path.realpath(path), real):
            raise ValueError(f"out {out_dir} is or contains the {what} {path}; choose an output folder outside it")
    if not os.path.lexists(out):
        return False
    if os.path.isdir(out) and not os.listdir(out):
        return False  # an empty folder: written in place
    kind = "a `coding experiment` output"
    check_replaceable_folder(out, _OUT_FILES, folders=_OUT_FOLDERS, required=("results.json",), kind=kind,
                             advice=_REPLACES, name=f"out {out_dir}")
    if not _is_experiment_results(os.path.join(out, "results.json")):
        raise FileExistsError(f"out {out_dir} has a results.json that is not a `coding experiment` one's; {_REPLACES}")
    m1_dir, data_dir = os.path.join(out, "m1"), os.path.join(out, "data")
    if os.path.isdir(m1_dir):
        try:
            check_replaceable(m1_dir)
        except FileExistsError as exc:
            raise FileExistsError(f"out {out_dir}: its m1/ is not the checkpoint an experiment writes "
                                  f"({exc})") from None
    if os.path.isdir(data_dir):
        check_replaceable_folder(data_dir, (), folders=_DATA_FOLDERS, kind=kind, advice=_REPLACES,
                                 name=f"out {out_dir}: data/")
        for sub in os.listdir(data_dir):
            check_replaceable_folder(os.path.join(data_dir, sub), ("train.npy", "val.npy"), kind=kind,
                                     advice=_REPLACES, name=f"out {out_dir}: data/{sub}/")
    if not force:
        raise FileExistsError(f"out {out_dir} holds an earlier `coding experiment` run; pass force=True (--force) "
                              "to replace it, or choose another --out")
    return True


def _label(method: str, bits: int, window_bits: int) -> str:
    if method == "bytes":
        return "Bytes"
    name = _LABELS[method] + (f"[b={window_bits}]" if method == "equalinfo" else "")
    return f"{name} v={1 << bits if bits < 16 else '65k'}"


def _coder(method: str, bits: int, p: ExperimentPreset, m1_net, train_text: bytes, device):
    if method == "gzip":
        return GZip(bits, p.chunk_bytes)
    if method == "static":
        return StaticAC.fit(train_text, token_bits=bits, chunk_bytes=p.chunk_bytes, device=device)
    if method == "ac":
        lm = CachedLM(m1_net, context_len=min(p.m1_context, m1_net.cfg.max_seq_len), batch_rows=p.batch_rows)
        return ArithmeticCoding(lm, bits, p.chunk_bytes, streams_per_batch=p.streams_per_batch, device=device)
    lm = CachedLM(m1_net, context_len=min(EqualInfoAC.context_len(p.max_window_bytes), m1_net.cfg.max_seq_len),
                  batch_rows=p.batch_rows)
    return EqualInfoAC(lm, p.window_bits, bits, p.chunk_bytes, max_window_bytes=p.max_window_bytes,
                       streams_per_batch=p.streams_per_batch, batch_windows=max(p.streams_per_batch, 4096),
                       device=device)


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _percent(x: float) -> str:
    s = f"{100 * x:.1f}"
    return ("0.0" if s == "-0.0" else s) + "%"  # a loss within 0.05% of uniform is no sign of anything


def format_tables(res: ExperimentResult) -> str:
    """The compression table and the M2 table as fixed-width text."""

    def table(head, lines):
        widths = [max([len(h)] + [len(line[i]) for line in lines]) for i, h in enumerate(head)]
        fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        return "\n".join([fmt(head), fmt(tuple("-" * w for w in widths)), *map(fmt, lines)])

    c_lines = [(_label(r.method, r.token_bits, res.m1.get("window_bits", 16)), f"{r.bits_per_byte:.3f}",
                f"{r.compression_ratio:.3f}", f"{r.bytes_per_token:.2f}", f"{r.encode_bytes_per_s / 1e3:,.1f}",
                "-" if r.decode_bytes_per_s is None else f"{r.decode_bytes_per_s / 1e3:,.1f}") for r in res.coding]
    ct = table(("method (validation text)", "bits/byte", "ratio", "bytes/token", "enc kB/s", "dec kB/s"), c_lines)
    m_lines = [(r.label, f"{r.params / 1e6:.2f}M", f"{r.steps}", f"{r.tokens_trained / 1e3:,.0f}k",
                f"{r.epochs:.2f}", f"{r.train_flops:.3g}", f"{r.bytes_per_token:.2f}", f"{r.compressed_bpb:.3f}",
                f"{r.val_bpb:.3f}", _percent(r.learned)) for r in res.m2]
    mt = table(("M2 trained on", "params", "steps", "tokens", "epochs", "train FLOPs", "bytes/tok", "uniform bpb",
                "val bpb", "learned"), m_lines)
    return ct + "\n\n" + mt


def run_experiment(corpus=None, *, preset: str | ExperimentPreset | None = None, runs=None, m1: str | None = None,
                   out_dir: str | None = None, device: str = "auto", m2_steps: int | None = None,
                   progress: bool = True, log: Callable[[str], None] | None = None,
                   force: bool = False) -> ExperimentResult:
    """Run the experiment and return (and log) its tables.

    Args:
        corpus: a path for :func:`~flopwise.models.data.load_corpus`, a ``TextCorpus``,
            ``"embedded"`` or None (the fetched corpus if present, else the embedded text).
        preset: ``"cpu"``, ``"gpu"``, ``"smoke"`` or an :class:`ExperimentPreset`; None
            picks by device.
        runs: M2 runs (see :func:`parse_runs`); default: the preset's.
        m1: an M1 checkpoint folder (a dense flopwise byte LM) instead of training one.
        out_dir: keep M1's checkpoint, every token array (``data/<run>/{train,val}.npy``)
            and ``results.json`` there (default: a temporary folder, removed). A new or empty
            folder is written in place (a run stopped part-way keeps what it finished).
        m2_steps: override the preset's M2 steps.
        force: replace an ``out_dir`` that holds an earlier experiment (only what this
            command writes; anything else is refused). The new run is written beside it and
            swapped in when it finishes, so a failed run leaves the earlier one as it was.
    """
    from flopwise.models.checkpoint import load_checkpoint
    from flopwise.models.data import ByteData, TextCorpus, TokenData, load_corpus
    from flopwise.models.train import Trainer, TrainConfig, resolve_device, resolve_preset
    from flopwise.models.transformer import ModelConfig

    log = log or (lambda s: print(s, flush=True))
    t_start = time.perf_counter()
    dev = resolve_device(device)
    p = resolve_preset(preset, ExperimentPreset, dev, device)
    run_keys = parse_runs(runs) if runs is not None else p.runs
    if m2_steps is not None:
        if isinstance(m2_steps, bool) or not isinstance(m2_steps, int) or m2_steps < 1:
            raise ValueError(f"m2_steps must be an int >= 1, got {m2_steps!r}")
        p = ExperimentPreset(**{**asdict(p), "m2_steps": m2_steps})
    if not isinstance(force, bool):
        raise TypeError(f"force must be a bool, got {force!r}")
    text = corpus if isinstance(corpus, TextCorpus) else load_corpus(corpus)
    train_text, val_text = text.train[: p.train_bytes], text.val[: p.val_bytes]
    log(f"corpus: {text.description}; M2 text: train {len(train_text):,} B, validation {len(val_text):,} B")
    notes: list[str] = []
    if m1 is not None:  # a given M1 is checked before anything is written
        ck = load_checkpoint(m1, device=dev)
        net, m1_bpb = ck.model, None
        CachedLM(net, context_len=min(p.m1_context, net.cfg.max_seq_len))  # a dense byte LM, or fail now
        bos = ((ck.trainer_state or {}).get("data") or {}).get("bos")
        if bos != 0:
            notes.append(f"M1 {m1} was not trained with bos=0 (its record says {bos}): every context "
                         "restart starts from an input it never saw, which costs bits (`flopwise train --bos 0`)")

    tmp = staging = out = None
    if out_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="flopwise-coding-")
        work = tmp.name
    else:
        out = os.path.abspath(out_dir)
        inputs = {"M1 checkpoint": m1,
                  "corpus": corpus if isinstance(corpus, str) and os.path.exists(corpus) else None}
        # the folder the output (or its staging folder) is made in, before any training
        check_writable(os.path.dirname(out), f"out {out_dir}", "pass another folder (--out)")
        if _check_out(out_dir, force, inputs):  # an earlier run stays until this one has finished
            staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=os.path.dirname(out))
            work = staging
            log(f"writing to {staging}; it replaces {out_dir} when the run has finished")
        else:
            work = out
            os.makedirs(work, exist_ok=True)
    try:
        if out_dir is not None:  # marks the folder as this command's from the start
            _write_json(os.path.join(work, "results.json"), ExperimentResult(
                p.name, text.name, str(dev), {}, [], [], time.perf_counter() - t_start, list(notes),
                complete=False).to_dict())
        # ---------------------------------------------------------------- M1
        data = ByteData(text, seed=0, bos=0)  # M1 learns the empty context CachedLM restarts from
        if m1 is None:
            cfg = TrainConfig(seq_len=p.m1_seq_len, batch_size=p.m1_batch, max_steps=p.m1_steps, lr=p.lr,
                              warmup_steps=max(1, p.m1_steps // 10), eval_tokens=65536, device=str(dev),
                              log_every=max(1, p.m1_steps // 10))
            trainer = Trainer(ModelConfig(**p.m1), cfg, data, progress=progress, label="M1       ")
            r = trainer.fit()
            trainer.save(os.path.join(work, "m1"))
            m1_path = None if out is None else os.path.join(out, "m1")  # where it is once the run is done
            net, m1_bpb = trainer.model, r.val_bpb
        else:
            m1_path = os.path.abspath(m1)
        net.eval()
        m1_info = {"path": m1_path, "params": net.num_parameters(),
                   "config": net.cfg.to_dict(), "val_bpb": m1_bpb, "context_ac": p.m1_context,
                   "window_bits": p.window_bits, "max_window_bytes": p.max_window_bytes}
        log(f"M1: {net.num_parameters() / 1e6:.2f}M parameters" +
            (f", validation {m1_bpb:.3f} bits/byte (its own {p.m1_steps} steps)" if m1_bpb is not None else ""))

        # ---------------------------------------------------------------- coding
        coding: list[CodingRow] = []
        val_tokens: dict[str, np.ndarray] = {}
        needed = {(k.split(":")[0], int(k.split(":")[1])) for k in run_keys if k != "bytes"}
        table = [(m, b) for m in ("gzip", "static", "ac", "equalinfo") for b in p.table_token_bits]
        for method, bits in table + sorted(needed - set(table)):
            coder = _coder(method, bits, p, net, train_text, dev)
            comp, enc_s = _timed(lambda: coder.compress(val_text))
            back, dec_s = _timed(lambda: coder.decompress(comp))
            if back != val_text:
                raise CorruptStreamError(f"{method} (N={bits}) did not decode the validation text exactly")
            n_tok = int(comp.tokens.size)
            coding.append(CodingRow(method, bits, len(val_text), n_tok, 8 * n_tok * (bits // 8) / len(val_text),
                                    len(val_text) / (n_tok * bits // 8), len(val_text) / n_tok,
                                    len(val_text) / enc_s, len(val_text) / dec_s))
            val_tokens[f"{method}:{bits}"] = comp.tokens
            log(f"coded validation with {_label(method, bits, p.window_bits)}: {coding[-1].bits_per_byte:.3f} bits/byte, "
                f"{coding[-1].bytes_per_token:.2f} bytes/token, encode {enc_s:.1f} s, decode {dec_s:.1f} s (exact)")

        # ---------------------------------------------------------------- M2
        rows: list[M2Row] = []

        def checkpoint_results() -> None:
            """Rewrite results.json with what is done (a run stopped by a time limit keeps it)."""
            if out_dir is not None:
                part = ExperimentResult(p.name, text.name, str(dev), m1_info, coding, rows,
                                        time.perf_counter() - t_start, list(notes), complete=False)
                _write_json(os.path.join(work, "results.json"), part.to_dict())

        checkpoint_results()
        width = max(len(_label(k.split(":")[0], 8 if k == "bytes" else int(k.split(":")[1]), p.window_bits))
                    for k in run_keys)  # progress labels in full, aligned
        for key in run_keys:
            if key == "bytes":
                bits, train_tok, val_tok = 8, np.frombuffer(train_text, np.uint8), np.frombuffer(val_text, np.uint8)
                method = "bytes"
            else:
                method, bits = key.split(":")[0], int(key.split(":")[1])
                coder = _coder(method, bits, p, net, train_text, dev)
                comp, enc_s = _timed(lambda: coder.compress(train_text, progress=None))
                train_tok, val_tok = comp.tokens, val_tokens[key]
                log(f"coded M2 training text with {_label(method, bits, p.window_bits)}: {train_tok.size:,} tokens "
                    f"in {enc_s:.1f} s")
            if out_dir is not None:
                folder = os.path.join(work, "data", key.replace(":", "-"))
                os.makedirs(folder, exist_ok=True)
                np.save(os.path.join(folder, "train.npy"), train_tok)
                np.save(os.path.join(folder, "val.npy"), val_tok)
            V = 1 << bits
            tdata = TokenData(train_tok, val_tok, vocab_size=V, val_bytes=len(val_text), name=key, seed=0,
                              train_bytes=len(train_text))
            mcfg = ModelConfig(**{**p.m2, "vocab_size": V, "max_seq_len": p.m2_seq_len})
            tcfg = TrainConfig(seq_len=p.m2_seq_len, batch_size=p.m2_batch, max_steps=p.m2_steps, lr=p.lr,
                               warmup_steps=max(1, p.m2_steps // 10), eval_tokens=None, device=str(dev),
                               log_every=max(1, p.m2_steps // 10))
            label = _label(method, bits, p.window_bits)
            trainer = Trainer(mcfg, tcfg, tdata, progress=progress, label=f"{label:{width}s} ")
            res = trainer.fit()
            ev = res.metrics  # the final evaluation: every validation token (eval_tokens=None)
            uniform = bits / tdata.bytes_per_token
            rows.append(M2Row(
                run=key, label=label, vocab_size=V, params=trainer.model.num_parameters(), steps=res.steps,
                tokens_trained=res.tokens, train_tokens=int(train_tok.size), epochs=res.tokens / max(1, train_tok.size),
                train_flops=res.flops, compressed_bpb=uniform, bytes_per_token=tdata.bytes_per_token,
                val_bpb=ev["val_bpb"], val_bits_per_token=ev["val_bits_per_token"],
                learned=1 - ev["val_bpb"] / uniform, seconds=res.seconds))
            log(f"  {label}: validation {ev['val_bpb']:.3f} bits/byte (uniform over its tokens: {uniform:.3f})")
            checkpoint_results()
        res = ExperimentResult(p.name, text.name, str(dev), m1_info, coding, rows, time.perf_counter() - t_start, notes)
        notes.append(f"M2: {p.m2_steps} steps x {p.m2_batch} sequences x {p.m2_seq_len} tokens for every run "
                     "(matched training FLOPs at equal vocabulary); val bpb = bits per token / bytes per token "
                     "over all validation tokens; uniform bpb = N / bytes per token (a model that learned "
                     "nothing); learned = 1 - val bpb / uniform bpb")
        notes.append("every method's validation text was decoded again and compared byte for byte (a mismatch "
                     "stops the run); EqualInfoAC decodes all windows of a batch in parallel, AC decodes each stream in sequence")
        if out_dir is not None:
            _write_json(os.path.join(work, "results.json"), res.to_dict())
        if staging is not None:
            from flopwise.models.safetensors_io import publish_folder, publish_mode

            publish_mode(staging)  # mkdtemp's 0700 is for the unfinished folder only
            # OUT may have changed during a long run: check again just before replacing it
            _check_out(out, True, inputs)
            publish_folder(staging, out)
            staging = None
        log("")
        log(format_tables(res))
        for n in notes:
            log(f"  {n}")
        log(f"total {res.seconds:.0f} s")
        return res
    finally:
        if tmp is not None:
            tmp.cleanup()
        if staging is not None:  # failed or stopped: the earlier run in OUT stays as it was
            shutil.rmtree(staging, ignore_errors=True)
