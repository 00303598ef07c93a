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
renamed; an existing ``out`` is replaced only with ``force=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .methods import METHODS, ArithmeticCoding, Compressed, EqualInfoAC, GZip, StaticAC
from .models import CachedLM, ModuleModel, StaticModel, file_sha256
from .rangecoder import CoderConfig, CorruptStreamError

__all__ = ["BuildOptions", "M1_EVAL", "build", "decode", "compression_stats", "load_m1", "Progress"]

FORMAT_VERSION = 1
# How M1 is evaluated: "cached" (CachedLM: KV cache, one token per stream per step), "window"
# (ModuleModel: the last context_len bytes re-read every step), "auto" (cached for a dense
# flopwise Transformer, else window). Folders written before m1_eval existed used "window".
M1_EVAL = ("auto", "cached", "window")


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
        if self.method in ("ac", "equalinfo") and not self.m1:
            raise ValueError(f"method {self.method!r} needs an M1 checkpoint (m1=...)")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device must be a torch device name such as 'cpu' or 'cuda', got {self.device!r}") from exc

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


def load_m1(path: str, *, context_len: int | None = None, batch_rows: int = 64, device="cpu",
            eval_mode: str = "window", max_context: int | None = None):
    """A flopwise checkpoint folder (``config.json`` + ``model.safetensors``) or a ``torch.save``d
    module file -> (model, info dict with the path, SHA-256 and settings).

    ``eval_mode`` (see :data:`M1_EVAL`): ``"cached"`` gives a :class:`CachedLM` (dense flopwise
    Transformers only), ``"window"`` a :class:`ModuleModel`, ``"auto"`` the first that applies.
    ``context_len`` defaults to the model's ``max_seq_len``; a cached model's is capped at
    ``max_context``."""
    if eval_mode not in M1_EVAL:
        raise ValueError(f"eval_mode must be one of {M1_EVAL}, got {eval_mode!r}")
    if os.path.isdir(path):
        from flopwise.models.hf_formats import load_flopwise

        module = load_flopwise(path)
        digest = hashlib.sha256()
        for name in sorted(os.listdir(path)):
            full = os.path.join(path, name)
            if os.path.isfile(full):
                digest.update(name.encode() + b"\0" + file_sha256(full).encode())
        sha = digest.hexdigest()
    elif os.path.isfile(path):
        try:
            module = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise ValueError(f"M1 checkpoint {path} could not be loaded: it must be a flopwise checkpoint folder "
                             f"or a torch.save'd module file ({type(exc).__name__}: {exc})") from None
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"{path} does not hold a torch.nn.Module")
        sha = file_sha256(path)
    else:
        raise FileNotFoundError(f"M1 checkpoint not found: {path}")
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
        model = CachedLM(module, context_len=context_len, batch_rows=batch_rows)
    else:
        model = ModuleModel(module, context_len=context_len, batch_rows=batch_rows)
    info = {"path": os.path.abspath(path), "sha256": sha, "eval": eval_mode, "context_len": context_len,
            "batch_rows": batch_rows,
            "pad_id": model.pad_id, "device": str(device), "dtype": str(next(module.parameters()).dtype),
            "torch": torch.__version__}
    return model, info


def _coder(opts: BuildOptions, train: bytes | None, static_freqs: np.ndarray | None):
    """The method object for ``opts`` (and the M1 info dict, if any)."""
    if opts.method == "gzip":
        return GZip(opts.token_bits, opts.chunk_bytes), None
    if opts.method == "static":
        cfg = CoderConfig(precision=opts.precision)
        if static_freqs is not None:
            model = StaticModel(torch.from_numpy(static_freqs).long(), cfg)
        else:
            model = StaticModel.fit(train, cfg=cfg)
        return StaticAC(model, opts.token_bits, opts.chunk_bytes, device=opts.device), None
    model, info = load_m1(opts.m1, context_len=opts.context_len, batch_rows=opts.batch_rows, device=opts.device,
                          eval_mode=opts.m1_eval,
                          max_context=EqualInfoAC.context_len(opts.max_window_bytes)
                          if opts.method == "equalinfo" else None)
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


def _read_corpus(path: str) -> bytes:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"corpus not found: {path}")
    with open(path, "rb") as f:
        return f.read()


def build(corpus: str, out: str, opts: BuildOptions, *, force: bool = False, train: str | None = None,
          progress: bool | None = None) -> dict:
    """Compress the file ``corpus`` into the folder ``out``; returns the stats dict.

    ``train``: file to fit StaticAC's unigram model on (default: the corpus itself).
    ``progress``: show a progress bar (default: on stderr for inputs over 1 MB).
    """
    if not isinstance(opts, BuildOptions):
        raise TypeError("opts must be a BuildOptions")
    out = os.path.abspath(out)
    if os.path.exists(out) and not force:
        raise FileExistsError(f"{out} exists; pass force=True (--force) to replace it")
    opts.check_device()
    data = _read_corpus(corpus)
    coder, m1_info = _coder(opts, _read_corpus(train) if train else data, None)
    show = len(data) > (1 << 20) if progress is None else progress
    t0 = time.perf_counter()
    comp = coder.compress(data, progress=Progress(f"{opts.method}", show))
    seconds = time.perf_counter() - t0
    stats = compression_stats(comp, len(data), opts.token_bits, opts.method, opts.window_bits)
    stats["encode_seconds"] = seconds
    meta = {
        "format_version": FORMAT_VERSION,
        "method": opts.method,
        "build_options": asdict(opts),
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
        if os.path.exists(out):
            old = out + ".old-" + os.path.basename(tmp)
            os.rename(out, old)
            os.rename(tmp, out)
            if os.path.isdir(old) and not os.path.islink(old):
                shutil.rmtree(old, ignore_errors=True)
            else:  # --force over a file (or a link): remove it, not just folders
                os.remove(old)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return stats


def decode(folder: str, text_file: str | None = None, *, force: bool = False, device: str | None = None,
           m1: str | None = None, progress: bool | None = None) -> bytes:
    """Invert :func:`build`: returns the original bytes (and writes them to ``text_file``
    atomically when given). Raises :class:`CorruptStreamError` when the data do not decode to
    the recorded input (SHA-256 checked), ``ValueError`` when the M1 checkpoint's hash differs."""
    meta_path = os.path.join(folder, "meta.json")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{folder} is not a coding output folder (no meta.json)")
    if text_file and os.path.exists(text_file) and not force:
        raise FileExistsError(f"{text_file} exists; pass force=True (--force) to replace it")
    with open(meta_path) as f:
        meta = json.load(f)
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"unsupported format_version {meta.get('format_version') if isinstance(meta, dict) else None}")
    missing = [k for k in ("method", "build_options", "input") if not isinstance(meta.get(k), dict if k != "method" else str)]
    if missing:
        raise CorruptStreamError(f"{meta_path} lacks or has malformed field(s) {missing}")
    bo = dict(meta["build_options"])
    bo.setdefault("m1_eval", "window")
    if meta.get("m1"):
        # evaluate M1 exactly as the encoder did: the mode "auto" resolved to, the context used
        bo["m1_eval"] = meta["m1"].get("eval", "window")
        bo["context_len"] = meta["m1"]["context_len"]
    if device:
        bo["device"] = device
    if m1:
        bo["m1"] = m1
    opts = BuildOptions(**bo)
    opts.check_device()
    static = None
    if opts.method == "static":
        static = np.load(os.path.join(folder, "static_model.npy"))
    coder, m1_info = _coder(opts, None, static)
    if m1_info is not None and m1_info["sha256"] != meta["m1"]["sha256"]:
        raise ValueError(f"M1 checkpoint {opts.m1} has SHA-256 {m1_info['sha256'][:12]}..., "
                         f"the data were built with {meta['m1']['sha256'][:12]}...")
    tokens = np.load(os.path.join(folder, "tokens.npy"))
    arrays = {}
    for name in ("stream_bits", "stream_bytes", "window_bytes", "stream_nbytes"):
        p = os.path.join(folder, f"{name}.npy")
        if os.path.isfile(p):
            arrays[name] = np.load(p)
    comp = Compressed(tokens=tokens, arrays=arrays)
    n = meta["input"]["bytes"]
    show = n > (1 << 20) if progress is None else progress
    try:
        kwargs = {} if opts.method == "gzip" else {"progress": Progress("decode", show)}
        data = coder.decompress(comp, **kwargs)
    except KeyError as exc:
        raise CorruptStreamError(f"missing side array {exc} in {folder}") from None
    if len(data) != n or hashlib.sha256(data).hexdigest() != meta["input"]["sha256"]:
        raise CorruptStreamError("decoded data do not match the recorded input (size or SHA-256 differ)")
    if text_file:
        tmp = text_file + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, text_file)
    return data
