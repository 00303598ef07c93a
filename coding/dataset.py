"""Build and invert compressed-text datasets on disk (``flopwise coding build / decode``).

An output folder holds:

* ``tokens.npy`` - every token, uint8 (N = 8) or uint16 (N = 16), streams / windows in order;
* side arrays needed to decode (``stream_bits.npy`` + ``stream_bytes.npy`` for ac/static,
  ``window_bytes.npy`` for equalinfo, ``stream_nbytes.npy`` for gzip);
* ``static_model.npy`` (StaticAC: the exact integer frequency table);
* ``meta.json`` - method, options, the M1 checkpoint by path and SHA-256 with the evaluation
  settings that must match, the input's size and SHA-256, torch version and device;
* ``stats.json`` - compression ratio (input bytes / token bytes), bits per byte, bytes per
  token and per window, coded bits against the ideal code length.

The folder appears atomically: it is written under a temporary name beside ``out`` and
renamed. An existing ``out`` is replaced only with ``force=True``, and only when it is an empty
folder or an earlier build's output (``meta.json`` and nothing a build does not write); ``out``
may never be, or contain, the corpus, the training file or the M1 checkpoint.

Decoding treats the folder as untrusted input: ``meta.json`` is checked field by field before
anything else, every ``.npy`` header is checked against its file's size (and never unpickled),
and an M1 checkpoint is hashed and compared with the recorded SHA-256 before it is opened.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import importlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .methods import METHODS, ArithmeticCoding, Compressed, EqualInfoAC, GZip, StaticAC
from .models import CachedLM, ModuleModel, StaticModel, file_sha256
from .rangecoder import MAX_PRECISION, CoderConfig, CorruptStreamError
from .tokens import TOKEN_BITS, token_dtype
from flopwise._files import check_writable
from flopwise.models.safetensors_io import check_replaceable_folder, path_within, publish_folder, publish_mode, umask

__all__ = ["BuildOptions", "M1_EVAL", "build", "decode", "compression_stats", "load_m1", "Progress"]

FORMAT_VERSION = 1
# How M1 is evaluated: "cached" (CachedLM: KV cache, one token per stream per step), "window"
# (ModuleModel: the last context_len bytes re-read every step), "auto" (cached for a dense
# flopwise Transformer, else window). Folders written before m1_eval existed used "window".
M1_EVAL = ("auto", "cached", "window")
# 256 byte symbols at frequency >= 1 need 2^precision > 256
_MIN_PRECISION = 9
# EqualInfoAC windows: at least 16 bits (see BuildOptions), at most EqualInfoAC's 512, so
# the per-window buffers stay small whatever a meta.json claims
_MIN_WINDOW_BITS, _MAX_WINDOW_BITS = 16, 512


@dataclass
class BuildOptions:
    """Options of ``flopwise coding build`` (see the CLI help for each)."""

    method: str = "gzip"
    token_bits: int = 8
    window_bits: int = 16
    chunk_bytes: int = 4096
    precision: int = 24
    max_window_bytes: int = 64
    m1: str | None = None
    context_len: int | None = None
    batch_rows: int = 64
    streams_per_batch: int = 256
    device: str = "cpu"
    m1_eval: str = "auto"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.m1_eval not in M1_EVAL:
            raise ValueError(f"m1_eval must be one of {M1_EVAL}, got {self.m1_eval!r}")
        if self.m1 is not None and not isinstance(self.m1, str):
            raise TypeError(f"m1 must be a path (str) or None, got {type(self.m1).__name__}")
        if self.method in ("ac", "equalinfo") and not self.m1:
            raise ValueError(f"method {self.method!r} needs an M1 checkpoint (m1=...)")
        if self.method in ("gzip", "static") and self.m1:
            raise ValueError(f"m1 is used by methods 'ac' and 'equalinfo' only, not {self.method!r}")
        for name, lo, hi in (("token_bits", None, None), ("window_bits", 1, None), ("chunk_bytes", 1, None),
                             ("precision", _MIN_PRECISION, MAX_PRECISION), ("max_window_bytes", 1, None),
                             ("context_len", 1, None), ("batch_rows", 1, None), ("streams_per_batch", 1, None)):
            v = getattr(self, name)
            if v is None and name == "context_len":
                continue
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be an int, got {type(v).__name__} {v!r}")
            if lo is not None and (v < lo or (hi is not None and v > hi)):
                raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {v}" if hi is not None
                                 else f"{name} must be an int >= {lo}, got {v}")
        if self.token_bits not in TOKEN_BITS:
            raise ValueError(f"token_bits must be one of {TOKEN_BITS}, got {self.token_bits}")
        if self.method == "equalinfo" and (self.window_bits % self.token_bits
                                           or not _MIN_WINDOW_BITS <= self.window_bits <= _MAX_WINDOW_BITS):
            # a window must hold any single byte from an empty interval: with 8 bits no frequency
            # floor leaves the other 255 bytes room (256 * 2^(precision - 8) = 2^precision)
            raise ValueError(f"window_bits must be a multiple of token_bits={self.token_bits} in "
                             f"[{_MIN_WINDOW_BITS}, {_MAX_WINDOW_BITS}], got {self.window_bits}"
                             + (" (a window of 8 bits cannot hold every byte)" if self.window_bits < 16 else ""))
        if not isinstance(self.device, str):
            raise TypeError(f"device must be a torch device name such as 'cpu' or 'cuda', got {self.device!r}")
        try:
            kind = torch.device(self.device).type
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device must be a torch device name such as 'cpu' or 'cuda', got {self.device!r}") from exc
        if kind not in ("cpu", "cuda"):  # the coders' integer kernels run on these only
            raise ValueError(f"device must be 'cpu' or 'cuda' (optionally 'cuda:N'), got {self.device!r}")

    def check_device(self) -> None:
        """The coders run on ``device``: CUDA must be there (GZip runs on the host, always)."""
        if self.method != "gzip" and torch.device(self.device).type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r}: no CUDA device is available here"
                             + (" (decoding must use the device type the data were built on)"
                                if self.m1 else ""))


class Progress:
    """A one-line progress bar on stderr, redrawn at most every 0.5 s; silent when disabled."""

    def __init__(self, label: str, enabled: bool = True, stream=sys.stderr):
        self.label, self.enabled, self.stream = label, enabled, stream
        self.t0 = self.last = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self.last < 0.5 and done < total:
            return
        self.last = now
        frac = done / total if total else 1.0
        bar = "#" * int(30 * frac)
        rate = done / max(now - self.t0, 1e-9)
        self.stream.write(f"\r{self.label} [{bar:<30}] {100 * frac:5.1f}% {done}/{total} ({rate:,.0f}/s)")
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()


# A torch.save'd module file is a pickle, and unpickling can run any code. M1 files are read
# with torch's weights-only unpickler, which builds only the classes it is given: the module
# classes of torch.nn and of flopwise's own models (and their config dataclasses / enums).
_PICKLE_MODULES = ("torch.nn.modules", "flopwise.models")


def _allowed_global(name: str):
    """The class ``name`` (``module.Class``) when the weights-only unpickler may build it, else None."""
    mod_name, _, attr = name.rpartition(".")
    if not any(mod_name == m or mod_name.startswith(m + ".") for m in _PICKLE_MODULES):
        return None
    try:
        obj = getattr(importlib.import_module(mod_name), attr, None)
    except ImportError:
        return None
    if not isinstance(obj, type) or obj.__module__ != mod_name:
        return None
    if issubclass(obj, (torch.nn.Module, enum.Enum)) or dataclasses.is_dataclass(obj):
        return obj
    return None


def _load_module_file(path: str, data: bytes) -> torch.nn.Module:
    """``torch.load`` of a module file's bytes ``data`` (read from ``path``) with
    ``weights_only=True`` and only the classes of :data:`_PICKLE_MODULES` allowed: a file that
    needs anything else is refused unopened."""
    hint = ("it must be a flopwise checkpoint folder or a torch.save'd module built from torch.nn / "
            "flopwise.models classes")
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(data))
    except Exception as exc:
        raise ValueError(f"M1 checkpoint {path} could not be loaded: {hint} ({type(exc).__name__}: {exc})") from None
    allowed = {n: _allowed_global(n) for n in names}
    refused = [n for n, obj in allowed.items() if obj is None]
    if refused:
        raise ValueError(f"M1 checkpoint {path} could not be loaded: unpickling it would call {refused[:4]}, which "
                         f"flopwise does not run from a file (it could execute any code); save the model as a "
                         f"flopwise checkpoint folder (config.json + model.safetensors) instead")
    try:
        with torch.serialization.safe_globals(list(allowed.values())):
            module = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"M1 checkpoint {path} could not be loaded: {hint} ({type(exc).__name__}: {exc})") from None
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"M1 checkpoint {path} does not hold a torch.nn.Module (found {type(module).__name__})")
    return module


def _m1_sha256(path: str) -> str:
    """SHA-256 of a module file, or of a checkpoint folder's files (names and contents)."""
    if os.path.isdir(path):
        digest = hashlib.sha256()
        for name in sorted(os.listdir(path)):
            full = os.path.join(path, name)
            if os.path.isfile(full):
                digest.update(name.encode() + b"\0" + file_sha256(full).encode())
        return digest.hexdigest()
    return file_sha256(path)


def load_m1(path: str, *, context_len: int | None = None, batch_rows: int = 64, device="cpu",
            eval_mode: str = "window", max_context: int | None = None, expect_sha256: str | None = None):
    """A flopwise checkpoint folder (``config.json`` + ``model.safetensors``) or a ``torch.save``d
    module file -> (model, info dict with the path, SHA-256 and settings).

    ``eval_mode`` (see :data:`M1_EVAL`): ``"cached"`` gives a :class:`CachedLM` (dense flopwise
    Transformers only), ``"window"`` a :class:`ModuleModel`, ``"auto"`` the first that applies.
    ``context_len`` defaults to the model's ``max_seq_len``; a cached model's is capped at
    ``max_context``. ``expect_sha256``: the checkpoint is hashed first and a different hash
    raises ``ValueError`` before anything is read from it. A module file is unpickled with
    ``weights_only=True`` and only torch.nn / flopwise.models classes allowed."""
    if eval_mode not in M1_EVAL:
        raise ValueError(f"eval_mode must be one of {M1_EVAL}, got {eval_mode!r}")
    if not os.path.isdir(path) and not os.path.isfile(path):
        raise FileNotFoundError(f"M1 checkpoint not found: {path}")
    data = None
    if os.path.isdir(path):
        sha = _m1_sha256(path)
    else:  # read once: the bytes hashed are the bytes loaded
        with open(path, "rb") as f:
            data = f.read()
        sha = hashlib.sha256(data).hexdigest()
    if expect_sha256 is not None and sha != expect_sha256:
        raise ValueError(f"M1 checkpoint {path} has SHA-256 {sha[:12]}..., "
                         f"the data were built with {expect_sha256[:12]}...")
    if data is None:
        from flopwise.models.hf_formats import load_flopwise

        module = load_flopwise(path)
        if _m1_sha256(path) != sha:  # the hash recorded must be the model's that was loaded
            raise ValueError(f"M1 checkpoint {path} changed while it was being loaded; load it again")
    else:
        module = _load_module_file(path, data)
    module = module.to(device)
    if eval_mode == "auto":
        from flopwise.models.transformer import Block, Transformer

        dense = isinstance(module, Transformer) and all(isinstance(b, Block) and not b.is_moe for b in module.layers)
        eval_mode = "cached" if dense else "window"
    if context_len is None:
        cfg = getattr(module, "cfg", None)
        context_len = getattr(cfg, "max_seq_len", None)
        if context_len is None:
            raise ValueError("context_len is needed for a module without cfg.max_seq_len")
    if max_context is not None and eval_mode == "cached":
        context_len = min(context_len, max_context)  # slots past max_context would stay unused
    if eval_mode == "cached":
        try:
            model = CachedLM(module, context_len=context_len, batch_rows=batch_rows)
        except (TypeError, ValueError) as exc:  # the library's advice, in the terms of this option
            raise ValueError(f"m1_eval='cached' (--m1-eval cached) needs a dense flopwise Transformer as M1 "
                             f"({exc}); use m1_eval='window' (--m1-eval window) for this model") from None
    else:
        model = ModuleModel(module, context_len=context_len, batch_rows=batch_rows)
    info = {"path": os.path.abspath(path), "sha256": sha, "eval": eval_mode, "context_len": context_len,
            "batch_rows": batch_rows,
            "pad_id": model.pad_id, "device": str(device), "dtype": str(next(module.parameters()).dtype),
            "torch": torch.__version__}
    return model, info


def _coder(opts: BuildOptions, train: bytes | None, static_model: StaticModel | None = None,
           m1_sha256: str | None = None):
    """The method object for ``opts`` (and the M1 info dict, if any)."""
    if opts.method == "gzip":
        return GZip(opts.token_bits, opts.chunk_bytes), None
    if opts.method == "static":
        model = static_model if static_model is not None else StaticModel.fit(
            train, cfg=CoderConfig(precision=opts.precision))
        return StaticAC(model, opts.token_bits, opts.chunk_bytes, device=opts.device), None
    model, info = load_m1(opts.m1, context_len=opts.context_len, batch_rows=opts.batch_rows, device=opts.device,
                          eval_mode=opts.m1_eval,
                          max_context=EqualInfoAC.context_len(opts.max_window_bytes)
                          if opts.method == "equalinfo" else None, expect_sha256=m1_sha256)
    if opts.method == "ac":
        return ArithmeticCoding(model, opts.token_bits, opts.chunk_bytes, opts.precision,
                                streams_per_batch=opts.streams_per_batch, device=opts.device), info
    return EqualInfoAC(model, opts.window_bits, opts.token_bits, opts.chunk_bytes, opts.precision,
                       opts.max_window_bytes, streams_per_batch=opts.streams_per_batch, device=opts.device), info


def compression_stats(comp: Compressed, input_bytes: int, token_bits: int, method: str,
                      window_bits: int | None = None) -> dict:
    """Compression ratio, bits per byte, bytes per token / window, overhead over the ideal."""
    n_tok = int(comp.tokens.size)
    token_bytes = n_tok * token_bits // 8
    side = int(sum(a.size for a in comp.arrays.values()))
    s = {
        "method": method,
        "input_bytes": input_bytes,
        "tokens": n_tok,
        "token_bits": token_bits,
        "token_bytes": token_bytes,
        "compression_ratio": input_bytes / token_bytes if token_bytes else None,
        "bits_per_byte": 8 * token_bytes / input_bytes if input_bytes else None,
        "bytes_per_token": input_bytes / n_tok if n_tok else None,
        "streams": comp.n_streams,
        "coded_bits": comp.coded_bits,
        "side_arrays_entries": side,
    }
    if method in ("static", "ac"):
        ideal = comp.ideal_bits
        s["ideal_bits"] = ideal
        s["overhead_fraction"] = comp.coded_bits / ideal - 1 if ideal > 0 else None
        s["overhead_bits_per_stream"] = (comp.coded_bits - ideal) / comp.n_streams if comp.n_streams else None
        # the bound the coder guarantees: at most 0.5% + 4 bytes per stream over the ideal
        s["overhead_within_bound"] = bool(comp.coded_bits <= 1.005 * ideal + 32 * comp.n_streams)
    if method == "equalinfo":
        s["window_bits"] = window_bits
        s["windows"] = comp.n_windows
        s["bytes_per_window"] = input_bytes / comp.n_windows if comp.n_windows else None
        s["ideal_bits"] = comp.ideal_bits
        s["padding_bits"] = comp.n_windows * window_bits - comp.coded_bits
        s["overhead_fraction"] = comp.coded_bits / comp.ideal_bits - 1 if comp.ideal_bits > 0 else None
    return s


def _read_corpus(path: str, what: str = "corpus") -> bytes:
    if os.path.isdir(path):
        raise ValueError(f"{what} {path} is a directory; expected a file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    with open(path, "rb") as f:
        return f.read()


# Everything build writes into an output folder: --force replaces only a folder holding
# nothing else, so it can never delete files a user keeps there.
_OUTPUT_FILES = frozenset({"tokens.npy", "stream_bits.npy", "stream_bytes.npy", "window_bytes.npy",
                           "stream_nbytes.npy", "static_model.npy", "meta.json", "stats.json"})
# the side arrays each method writes and its decoder needs
_SIDE_ARRAYS = {"gzip": ("stream_nbytes",), "static": ("stream_bits", "stream_bytes"),
                "ac": ("stream_bits", "stream_bytes"), "equalinfo": ("window_bytes",)}


_REPLACES = ("force (--force) replaces only an empty folder or an earlier `coding build` output: remove it "
             "yourself if it should go")


def _check_out(out: str, force: bool, inputs: dict[str, str | None]) -> None:
    """Refuse an output folder that is, or contains, an input (a replaced folder would take the
    input with it), and one that exists, unless ``force`` and it is safe to replace."""
    real = os.path.realpath(out)
    for what, path in inputs.items():
        if path is None:
            continue
        if path_within(os.path.realpath(path), real):
            raise ValueError(f"out {out} is or contains the {what} {path}; choose an output folder outside it")
    if os.path.lexists(out):
        if not force:
            raise FileExistsError(f"{out} exists; pass force=True (--force) to replace it")
        check_replaceable_folder(out, _OUTPUT_FILES, required=("meta.json",), kind="a `coding build` output",
                                 advice=_REPLACES)
        if os.listdir(out) and not _is_build_meta(os.path.join(out, "meta.json")):
            raise FileExistsError(f"{out} has a meta.json that is not a `coding build` output's; {_REPLACES}")


def _is_build_meta(path: str) -> bool:
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("method") in METHODS


def build(corpus: str, out: str, opts: BuildOptions, *, force: bool = False, train: str | None = None,
          progress: bool | None = None) -> dict:
    """Compress the file ``corpus`` into the folder ``out``; returns the stats dict.

    ``train``: file to fit StaticAC's unigram model on (default: the corpus itself).
    ``progress``: show a progress bar (default: on stderr for inputs over 1 MB).
    ``force``: replace an existing ``out`` that is an empty folder or an earlier build's output.
    """
    if not isinstance(opts, BuildOptions):
        raise TypeError("opts must be a BuildOptions")
    if train is not None and opts.method != "static":
        raise ValueError(f"train (--train) is used by method 'static' only, not {opts.method!r}")
    if opts.method == "gzip" and torch.device(opts.device).type != "cpu":
        raise ValueError(f"device (--device) is used by methods 'static', 'ac' and 'equalinfo' only: gzip runs on "
                         f"the host (got device={opts.device!r})")
    out = os.path.abspath(out)
    inputs = {"corpus": corpus, "train file": train, "M1 checkpoint": opts.m1}
    _check_out(out, force, inputs)
    check_writable(os.path.dirname(out), f"out {out}", "pass another output folder")  # before the compression
    opts.check_device()
    data = _read_corpus(corpus)
    coder, m1_info = _coder(opts, _read_corpus(train, "train file") if train else data)
    show = len(data) > (1 << 20) if progress is None else progress
    t0 = time.perf_counter()
    comp = coder.compress(data, progress=Progress(f"{opts.method}", show))
    seconds = time.perf_counter() - t0
    stats = compression_stats(comp, len(data), opts.token_bits, opts.method, opts.window_bits)
    stats["encode_seconds"] = seconds
    recorded = asdict(opts)
    if opts.m1:  # decode may run from another directory
        recorded["m1"] = os.path.abspath(opts.m1)
    meta = {
        "format_version": FORMAT_VERSION,
        "method": opts.method,
        "build_options": recorded,
        "coder_options": coder.options(),
        "m1": m1_info,
        "input": {"path": os.path.abspath(corpus), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()},
        "torch": torch.__version__,
        "device": (torch.cuda.get_device_name(opts.device) if opts.device.startswith("cuda") and opts.method != "gzip"
                   else opts.device),
    }
    parent = os.path.dirname(out) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(out) + "-", dir=parent)
    try:
        np.save(os.path.join(tmp, "tokens.npy"), comp.tokens)
        for name, arr in comp.arrays.items():
            np.save(os.path.join(tmp, f"{name}.npy"), arr)
        if opts.method == "static":
            np.save(os.path.join(tmp, "static_model.npy"), coder.model.freqs.cpu().numpy())
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        with open(os.path.join(tmp, "stats.json"), "w") as f:
            json.dump(stats, f, indent=1)
        publish_mode(tmp)  # mkdtemp's 0700 is for the unfinished folder only
        # the folder may have changed during a long build: check again just before replacing it
        _check_out(out, force, inputs)
        publish_folder(tmp, out)  # an earlier output (checked above) goes only once this one is in place
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return stats


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _read_meta(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            meta = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptStreamError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise CorruptStreamError(f"{path}: expected a JSON object, found {type(meta).__name__}")
    return meta


def _check_meta(meta: dict, path: str) -> tuple[BuildOptions, dict | None, dict]:
    """Every field decode reads, checked before anything else: -> (the recorded build options,
    the M1 record or None, the input record). Raises CorruptStreamError naming the field."""
    def bad(field: str, what: str):
        raise CorruptStreamError(f"{path}: {field} {what}")

    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported format_version {meta.get('format_version')!r} "
                         f"(this flopwise reads {FORMAT_VERSION})")
    method = meta.get("method")
    if method not in METHODS:
        bad("method", f"must be one of {METHODS}, got {method!r}")
    bo = meta.get("build_options")
    if not isinstance(bo, dict):
        bad("build_options", "must be an object")
    known = {f.name for f in dataclasses.fields(BuildOptions)}
    unknown = sorted(set(bo) - known)
    if unknown:
        bad(f"build_options.{unknown[0]}", f"is not a build option (known: {sorted(known)})")
    if bo.get("method") != method:
        bad("build_options.method", f"must equal method {method!r}, got {bo.get('method')!r}")
    inp = meta.get("input")
    if not isinstance(inp, dict):
        bad("input", "must be an object")
    if not _is_int(inp.get("bytes")) or inp["bytes"] < 0:
        bad("input.bytes", f"must be an int >= 0, got {inp.get('bytes')!r}")
    if not isinstance(inp.get("sha256"), str) or not _SHA256.fullmatch(inp["sha256"]):
        bad("input.sha256", "must be 64 lowercase hex digits")
    bo = dict(bo)
    bo.setdefault("m1_eval", "window")  # folders written before m1_eval existed
    m1 = meta.get("m1")
    if method in ("ac", "equalinfo"):
        if not isinstance(m1, dict):
            bad("m1", f"must be an object for method {method!r}, got {type(m1).__name__}")
        if not isinstance(m1.get("sha256"), str) or not _SHA256.fullmatch(m1["sha256"]):
            bad("m1.sha256", "must be 64 lowercase hex digits")
        if not _is_int(m1.get("context_len")) or m1["context_len"] < 1:
            bad("m1.context_len", f"must be an int >= 1, got {m1.get('context_len')!r}")
        m1_eval = m1.get("eval", "window")
        if m1_eval not in ("cached", "window"):
            bad("m1.eval", f"must be 'cached' or 'window', got {m1_eval!r}")
        # evaluate M1 exactly as the encoder did: the mode "auto" resolved to, the context used
        bo["m1_eval"], bo["context_len"] = m1_eval, m1["context_len"]
    else:
        if m1 is not None:
            bad("m1", f"must be null for method {method!r}")
        bo["m1"] = None  # folders written before m1 was refused for these methods may name one
    try:
        opts = BuildOptions(**bo)
    except (TypeError, ValueError) as exc:
        raise CorruptStreamError(f"{path}: build_options: {exc}") from None
    return opts, m1, inp


def _load_npy(path: str, what: str) -> np.ndarray:
    """A 1-D integer array from a .npy file, never unpickled, its header checked against the
    file's size before any data is read (a header may claim any shape)."""
    if not os.path.isfile(path):
        raise CorruptStreamError(f"{path}: missing ({what} is needed to decode)")
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy version {version}")
        except (ValueError, TypeError, SyntaxError, EOFError, OverflowError) as exc:
            raise CorruptStreamError(f"{path}: not a valid .npy file ({exc})") from None
        if dtype.hasobject or dtype.kind not in "iu":
            raise CorruptStreamError(f"{path}: holds {dtype}, expected integers")
        if len(shape) != 1:
            raise CorruptStreamError(f"{path}: has shape {shape}, expected a 1-D array")
        n = shape[0]
        size = os.fstat(f.fileno()).st_size - f.tell()
        if size != n * dtype.itemsize:
            raise CorruptStreamError(f"{path}: its header declares {n} entries of {dtype.itemsize} bytes, "
                                     f"the file holds {size} bytes of data (truncated or padded)")
        arr = np.fromfile(f, dtype=dtype, count=n)
    if arr.size != n:
        raise CorruptStreamError(f"{path}: read {arr.size} of {n} entries")
    return arr


def _write_atomic(path: str, data: bytes, *, force: bool) -> None:
    """Write ``data`` to ``path`` through a fresh temporary file beside it (never a fixed name
    another file may hold), renamed over ``path``; the temporary file never outlives a failure."""
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                               dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp's 0600 is for the unfinished file only
        if os.path.isdir(path):
            raise ValueError(f"text_file {path} is a directory; expected a file path")
        if not force and os.path.lexists(path):
            raise FileExistsError(f"{path} exists; pass force=True (--force) to replace it")
        os.replace(tmp, path)
        tmp = None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass


def _check_text_file(text_file: str, what: str, path: str) -> None:
    """Refuse a ``text_file`` that is, or lies inside, ``path`` (symlinks resolved): writing it
    would change the data or the model being decoded."""
    real = os.path.realpath(path)
    # what os.replace would change (the parent resolved), and where a symlink text_file points
    targets = {os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(text_file))),
                            os.path.basename(text_file)), os.path.realpath(text_file)}
    if any(path_within(t, real) for t in targets):
        raise ValueError(f"text_file {text_file} is or is inside the {what} {path}; writing it would change what "
                         "is being decoded: choose a path outside it")


def decode(folder: str, text_file: str | None = None, *, force: bool = False, device: str | None = None,
           m1: str | None = None, progress: bool | None = None) -> bytes:
    """Invert :func:`build`: returns the original bytes (and writes them to ``text_file``
    atomically when given). Raises :class:`CorruptStreamError` when the folder's files are
    malformed or the data do not decode to the recorded input (SHA-256 checked), ``ValueError``
    when the M1 checkpoint's hash differs (checked before the checkpoint is opened), and when
    ``text_file`` is inside ``folder`` or is (or is inside) the M1 checkpoint, symlinks resolved."""
    meta_path = os.path.join(folder, "meta.json")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{folder} is not a coding output folder (no meta.json)")
    if text_file:
        if os.path.isdir(text_file):
            raise ValueError(f"text_file {text_file} is a directory; expected a file path")
        if os.path.lexists(text_file) and not force:
            raise FileExistsError(f"{text_file} exists; pass force=True (--force) to replace it")
        parent = os.path.dirname(os.path.abspath(text_file))
        if not os.path.isdir(parent):
            raise FileNotFoundError(f"the folder of text_file {text_file} does not exist")
        check_writable(parent, f"text_file {text_file}", "pass another path")  # before the decoding
        _check_text_file(text_file, "dataset folder", folder)
    opts, m1_meta, inp = _check_meta(_read_meta(meta_path), meta_path)
    # text_file may be none of the folder, the M1 named in meta.json or one given instead of it
    protected = [(what, path) for what, path in (("dataset folder", folder), ("M1 checkpoint recorded in meta.json",
                 opts.m1), ("M1 checkpoint (m1, --m1)", m1)) if path]
    for what, path in protected if text_file else ():
        _check_text_file(text_file, what, path)
    # decode-time overrides are the caller's input, not the folder's: plain ValueErrors
    if device:
        opts = dataclasses.replace(opts, device=device)
    if m1:
        if opts.method not in ("ac", "equalinfo"):
            raise ValueError(f"m1 is used by methods 'ac' and 'equalinfo' only; this folder holds {opts.method!r}")
        opts = dataclasses.replace(opts, m1=m1)
    opts.check_device()
    tokens = _load_npy(os.path.join(folder, "tokens.npy"), "the token array")
    want = np.dtype(token_dtype(opts.token_bits))
    if tokens.dtype.kind != want.kind or tokens.dtype.itemsize != want.itemsize:
        raise CorruptStreamError(f"{os.path.join(folder, 'tokens.npy')}: holds {tokens.dtype}, "
                                 f"expected {want} for token_bits={opts.token_bits}")
    arrays = {name: _load_npy(os.path.join(folder, f"{name}.npy"), f"the side array {name}")
              for name in _SIDE_ARRAYS[opts.method]}
    static = None
    if opts.method == "static":
        p = os.path.join(folder, "static_model.npy")
        freqs = _load_npy(p, "the static model")
        try:
            static = StaticModel(torch.from_numpy(freqs.astype(np.int64)), CoderConfig(precision=opts.precision))
        except (TypeError, ValueError) as exc:
            raise CorruptStreamError(f"{p}: not a valid frequency table ({exc})") from None
    coder, _ = _coder(opts, None, static, m1_meta["sha256"] if m1_meta else None)
    comp = Compressed(tokens=tokens, arrays=arrays)
    n = inp["bytes"]
    show = n > (1 << 20) if progress is None else progress
    kwargs = {} if opts.method == "gzip" else {"progress": Progress("decode", show)}
    data = coder.decompress(comp, **kwargs)
    if len(data) != n or hashlib.sha256(data).hexdigest() != inp["sha256"]:
        raise CorruptStreamError(f"{folder}: decoded data do not match the recorded input (size or SHA-256 differ)")
    if text_file:
        for what, path in protected:  # again: paths may have changed during a long decode
            _check_text_file(text_file, what, path)
        _write_atomic(text_file, data, force=force)
    return data
