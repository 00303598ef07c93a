"""Byte-level text data: the English corpus, its fixed train/validation split, batches.

Two sources of real English text:

* the **embedded default**, Python's own reference documentation shipped with the standard
  library (``pydoc_data.topics``, ~460 KB of prose with some code): no download, so
  ``flopwise demo`` runs on a fresh machine;
* the **corpus** (~6 MB), made by :func:`fetch_corpus` (``flopwise data fetch``) from two
  Debian packages of real prose: the King James Bible (``bible-kjv-text``, decoded by the
  ``bible`` program of ``bible-kjv``) and the Jargon File 4.4.7 (``jargon-text``). It is
  cached outside the repository in ``$FLOPWISE_DATA/corpus`` (default
  ``~/.cache/flopwise/corpus``): ``train.txt``, ``val.txt`` and ``manifest.json`` (package
  versions, sizes, SHA-256).

The split is fixed and the same for both: the text is cut into sections of at least
``SECTION_BYTES`` bytes that end at a paragraph break, and every ``VAL_EVERY``-th section
(indices 19, 39, ...) is validation, so about 5% of the text, spread evenly through every
source, is held out.

Tokens are bytes (vocabulary 256) in :class:`ByteData`; :class:`TokenData` holds any other
token ids (e.g. compressed text, vocabulary 65536) with the same batches. Training batches
are a pure function of ``(seed, step, micro-step)`` (:meth:`ByteData.batch`), so a resumed
run needs only the step to continue on the same data. Validation windows are fixed
(:meth:`ByteData.eval_windows`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from .safetensors_io import check_replaceable_folder

__all__ = [
    "SECTION_BYTES",
    "VAL_EVERY",
    "TextCorpus",
    "ByteData",
    "TokenData",
    "data_dir",
    "corpus_dir",
    "split_text",
    "embedded_corpus",
    "fetch_corpus",
    "load_corpus",
    "bits_per_byte",
    "encode",
    "decode",
]

SECTION_BYTES = 4096
VAL_EVERY = 20
_CORPUS_FILES = ("train.txt", "val.txt", "manifest.json")
# Debian packages: (package, what it contributes). bible-kjv holds only the decoder program.
_PACKAGES = ("bible-kjv", "bible-kjv-text", "jargon-text")


# ----------------------------------------------------------------------------------------
# Locations
# ----------------------------------------------------------------------------------------


def data_dir() -> Path:
    """``$FLOPWISE_DATA``, else ``$XDG_CACHE_HOME/flopwise``, else ``~/.cache/flopwise``."""
    env = os.environ.get("FLOPWISE_DATA")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "flopwise"


def corpus_dir() -> Path:
    """Where :func:`fetch_corpus` writes and :func:`load_corpus` looks: ``data_dir()/corpus``."""
    return data_dir() / "corpus"


# ----------------------------------------------------------------------------------------
# Text, split, encoding
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextCorpus:
    """Train and validation text as UTF-8 bytes, with a one-line description of the source
    and where it was read from (``source``: the folder or file, or ``"embedded"``)."""

    name: str
    train: bytes
    val: bytes
    description: str
    source: str = ""

    def __post_init__(self):
        if not isinstance(self.train, bytes) or not isinstance(self.val, bytes):
            raise TypeError("train and val must be bytes")
        if not self.train or not self.val:
            raise ValueError(f"corpus {self.name!r}: train and val must both be non-empty")

    @property
    def sha256(self) -> str:
        """SHA-256 of train then val: one checksum for the exact text trained and evaluated on."""
        return hashlib.sha256(self.train + self.val).hexdigest()


def split_text(text: str, *, section_bytes: int = SECTION_BYTES, val_every: int = VAL_EVERY) -> tuple[str, str]:
    """The fixed split: consecutive paragraphs are grouped into sections of at least
    ``section_bytes`` UTF-8 bytes; section ``j`` is validation iff ``j % val_every ==
    val_every - 1``. Returns ``(train, val)``; paragraphs keep their order in each."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if section_bytes < 1 or val_every < 2:
        raise ValueError(f"section_bytes must be >= 1 and val_every >= 2, got {section_bytes}, {val_every}")
    train, val, section, size, j = [], [], [], 0, 0
    for para in re.split(r"\n\s*\n", text):
        para = para.strip("\n")
        if not para.strip():
            continue
        section.append(para)
        size += len(para.encode("utf-8")) + 2
        if size >= section_bytes:
            (val if j % val_every == val_every - 1 else train).append("\n\n".join(section))
            section, size, j = [], 0, j + 1
    if section:
        (val if j % val_every == val_every - 1 else train).append("\n\n".join(section))
    return "\n\n".join(train) + "\n", "\n\n".join(val) + "\n"


def embedded_corpus() -> TextCorpus:
    """Python's reference-manual topics (``pydoc_data.topics``, shipped with CPython): real
    English prose, no network needed. Topics in sorted order, then :func:`split_text`."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k].strip() for k in sorted(topics))
    train, val = split_text(text)
    return TextCorpus("python-docs", train.encode("utf-8"), val.encode("utf-8"),
                      "Python reference manual topics (pydoc_data.topics, embedded in the standard library)",
                      "embedded")


def encode(text: str) -> torch.Tensor:
    """UTF-8 bytes of ``text`` as int64 token ids ``[N]`` (vocabulary 256)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def decode(tokens) -> str:
    """Token ids (bytes) back to text; invalid UTF-8 (a cut multi-byte character) is replaced."""
    ids = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
    return bytes(int(t) & 0xFF for t in ids).decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------------------
# The corpus: fetch from Debian packages, load
# ----------------------------------------------------------------------------------------


def _run(cmd: list[str], cwd: str | None = None) -> str:
    try:
        res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise RuntimeError(f"{cmd[0]} not found: fetching the corpus needs a Debian-based system "
                           "(apt-get, dpkg-deb)") from None
    if res.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()[-500:]}")
    return res.stdout


def _clean_kjv(raw: str) -> str:
    """``bible`` prints ``Genesis 1`` headings and ``  1 In the beginning ...`` verses; the
    verse numbers are dropped (digits a byte model would only learn to count)."""
    lines = [re.sub(r"^\s*\d+ ", "", line).rstrip() for line in raw.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def _clean_jargon(raw: str) -> str:
    """Drop the box-drawing table lines and the three-space indent; keep the prose."""
    lines = [line.strip() for line in raw.splitlines() if not re.search("[\u2500-\u257f]", line)]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


_CORPUS_NAME = "kjv+jargon"


def _corpus_mismatch(manifest: dict, train: bytes, val: bytes) -> str | None:
    """Why ``train`` and ``val`` (the bytes of train.txt and val.txt) are not the text
    ``manifest`` describes (its ``train_bytes``, ``val_bytes`` and ``sha256`` of train then
    val; a key it lacks is not checked), or None when they are."""
    for key, f, data in (("train_bytes", "train.txt", train), ("val_bytes", "val.txt", val)):
        want = manifest.get(key)
        if want is not None and len(data) != want:
            return f"{f} is {len(data):,} B, its manifest.json says {want:,} B"
    want = manifest.get("sha256")
    if want is not None:
        got = hashlib.sha256(train + val).hexdigest()
        if got != want:
            return f"the SHA-256 of train.txt + val.txt is {got}, its manifest.json says {want}"
    return None


def _read_manifest(folder: Path) -> dict:
    """``folder/manifest.json`` as a dict; ValueError naming the file if it is not one."""
    path = folder / "manifest.json"
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(m, dict):
        raise ValueError(f"{path} is not a JSON object")
    return m


def _check_fetch_dest(dest: Path) -> None:
    """FileExistsError unless :func:`fetch_corpus` may replace what is at ``dest``: nothing,
    an empty folder, or a corpus folder it wrote (manifest.json, train.txt and val.txt, a
    manifest of its own, nothing else). A file, a symlink or anyone else's files never go."""
    advice = ("`flopwise data fetch` replaces only an empty folder or a corpus folder it wrote (manifest.json, "
              "train.txt, val.txt and nothing else): remove or move it yourself, or choose another folder (--dir)")
    check_replaceable_folder(dest, _CORPUS_FILES, required=_CORPUS_FILES, advice=advice,
                             kind="a corpus folder written by `flopwise data fetch`", name=f"corpus folder {dest}")
    if os.path.isdir(dest) and os.listdir(dest):
        try:
            ours = _read_manifest(dest).get("name") == _CORPUS_NAME
        except (OSError, ValueError):
            ours = False
        if not ours:
            raise FileExistsError(f"corpus folder {dest} holds a manifest.json that is not one `flopwise data fetch` "
                                  f"wrote; {advice}")


def fetch_corpus(dest: str | os.PathLike | None = None, *, force: bool = False,
                 log: Callable[[str], None] = print) -> dict:
    """Download the Debian packages, extract the text, split it and cache it in ``dest``
    (default :func:`corpus_dir`). Needs ``apt-get`` (``apt-get download`` works without
    root) and ``dpkg-deb``; nothing is installed. Written atomically (a temporary folder
    renamed into place). Returns the manifest (also ``dest/manifest.json``).

    A corpus already in ``dest`` whose train.txt and val.txt match its manifest (sizes,
    SHA-256) is kept and its manifest returned; one that does not raises ValueError (the
    folder is damaged or was edited) unless ``force``. ``dest`` must otherwise be absent, an
    empty folder, or (with ``force``) a corpus folder this function wrote: anything else (a
    file, a folder with other files) raises FileExistsError and stays untouched."""
    dest = Path(dest) if dest is not None else corpus_dir()
    if not force and dest.is_dir() and all((dest / f).is_file() for f in _CORPUS_FILES):
        try:
            manifest = _read_manifest(dest)
        except ValueError as exc:
            problem = str(exc)
        else:
            problem = _corpus_mismatch(manifest, (dest / "train.txt").read_bytes(), (dest / "val.txt").read_bytes())
        if problem is None:
            log(f"corpus already at {dest}: train.txt and val.txt match its manifest.json "
                "(force=True (--force) fetches it again)")
            return manifest
        raise ValueError(f"corpus folder {dest} does not match its manifest.json: {problem}; the folder is damaged "
                         "or was edited: fetch it again with force=True (--force)")
    _check_fetch_dest(dest)  # before the download: refuse early, and never delete what it did not write
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=dest.parent) as work:
        versions = {}
        for pkg in _PACKAGES:
            log(f"apt-get download {pkg}")
            try:
                _run(["apt-get", "download", pkg], cwd=work)
            except RuntimeError as exc:
                raise RuntimeError(f"{exc}\n(is the package list current? `apt-get update` first)") from None
        root = os.path.join(work, "root")
        for deb in sorted(Path(work).glob("*.deb")):
            _run(["dpkg-deb", "-x", str(deb), root])
            pkg, version = deb.name.split("_")[:2]
            versions[pkg] = version.replace("%3a", ":")
        missing = [p for p in _PACKAGES if p not in versions]
        if missing:
            raise RuntimeError(f"apt-get download did not produce {missing}")
        kjv = _run([os.path.join(root, "usr/bin/bible"), "-l100000", "-p", os.path.join(root, "usr/lib"),
                    "gen1:1-rev22:21"])
        import gzip

        with gzip.open(os.path.join(root, "usr/share/doc/jargon-text/jargon.txt.gz"), "rt", encoding="utf-8") as f:
            jargon = f.read()
        sources = [("King James Bible", "bible-kjv-text", _clean_kjv(kjv)),
                   ("The Jargon File 4.4.7", "jargon-text", _clean_jargon(jargon))]
        train_parts, val_parts, manifest_sources = [], [], []
        for title, pkg, text in sources:
            tr, va = split_text(text)
            train_parts.append(tr)
            val_parts.append(va)
            manifest_sources.append({"title": title, "package": pkg, "version": versions[pkg],
                                     "bytes": len(text.encode("utf-8"))})
        train = "\n".join(train_parts).encode("utf-8")
        val = "\n".join(val_parts).encode("utf-8")
        out = Path(work) / "corpus"
        out.mkdir()
        (out / "train.txt").write_bytes(train)
        (out / "val.txt").write_bytes(val)
        manifest = {
            "name": _CORPUS_NAME,
            "sources": manifest_sources,
            "decoder": {"package": "bible-kjv", "version": versions["bible-kjv"]},
            "split": f"sections of >= {SECTION_BYTES} bytes at paragraph breaks, every {VAL_EVERY}th "
                     f"(j % {VAL_EVERY} == {VAL_EVERY - 1}) is validation, per source",
            "train_bytes": len(train),
            "val_bytes": len(val),
            "sha256": hashlib.sha256(train + val).hexdigest(),
        }
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        _check_fetch_dest(dest)  # again: the download took a while, and someone may have written there since
        if os.path.lexists(dest):
            os.replace(dest, Path(work) / "old")  # an empty folder or our own earlier corpus: checked above
        os.replace(out, dest)
    log(f"corpus: {dest} train {len(train):,} B, val {len(val):,} B, sha256 {manifest['sha256']}")
    return manifest


def load_corpus(path: str | os.PathLike | None = None) -> TextCorpus:
    """The text to train on.

    * ``None``: the fetched corpus in :func:`corpus_dir` when present, else the embedded
      default (:func:`embedded_corpus`).
    * ``"embedded"``: the embedded default.
    * a folder holding ``train.txt`` and ``val.txt`` (what :func:`fetch_corpus` writes).
    * a UTF-8 text file: split with :func:`split_text`.
    """
    if path is None:
        d = corpus_dir()
        if (d / "train.txt").exists() and (d / "val.txt").exists():
            return load_corpus(d)
        return embedded_corpus()
    if str(path) == "embedded":
        return embedded_corpus()
    p = Path(path).expanduser()
    if p.is_dir():
        if not ((p / "train.txt").exists() and (p / "val.txt").exists()):
            raise FileNotFoundError(f"corpus folder {p} has no train.txt and val.txt (run `flopwise data fetch`)")
        desc, name = f"text in {p}", p.name
        train, val = (p / "train.txt").read_bytes(), (p / "val.txt").read_bytes()
        if (p / "manifest.json").exists():
            m = _read_manifest(p)
            # Train on the text the manifest describes, or not at all: a damaged or edited file
            # would otherwise be trained on under the manifest's name (a cheap check, ~6 MB).
            problem = _corpus_mismatch(m, train, val)
            if problem is not None:
                raise ValueError(f"corpus folder {p} does not match its manifest.json: {problem}; the folder is "
                                 f"damaged or was edited: fetch it again with `flopwise data fetch --dir {p} --force` "
                                 "(fetch_corpus(..., force=True)), or remove the manifest.json of a folder of your "
                                 "own text")
            name = m.get("name", name)
            desc = " + ".join(f"{s['title']} (Debian {s['package']} {s['version']})" for s in m.get("sources", [])) \
                or desc
        return TextCorpus(name, train, val, desc, str(p.resolve()))
    if p.is_file():
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"corpus file {p} is not UTF-8 text ({exc.reason} at byte {exc.start}): pass a text "
                             "file, a folder with train.txt and val.txt, or 'embedded'") from None
        train, val = split_text(text)
        if not val.strip():
            # No section reached the validation slot: validation would be one newline, and
            # the run would fail only at its final evaluation, after all the training.
            size = len(text.encode("utf-8"))
            raise ValueError(
                f"corpus file {p} ({size:,} B) is too small for the fixed split: every {VAL_EVERY}th section of "
                f">= {SECTION_BYTES:,} B is validation, so it needs more than {(VAL_EVERY - 1) * SECTION_BYTES:,} B "
                "of text (paragraphs separated by blank lines) to hold any validation text; or pass a folder "
                "with train.txt and val.txt")
        return TextCorpus(p.stem, train.encode("utf-8"), val.encode("utf-8"), f"{p} (fixed section split)",
                          str(p.resolve()))
    raise FileNotFoundError(f"corpus not found: {p}")


# ----------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------


class _WindowData:
    """Train/validation token tensors with deterministic batches: the shared implementation
    of :class:`ByteData` and :class:`TokenData`.

    ``batch(step, micro, batch_size, seq_len)`` draws ``batch_size`` random windows of
    ``seq_len + 1`` tokens from the training array with a generator seeded from
    ``(seed, step, micro)``: no hidden state, so resuming at ``step`` replays the same data.
    ``eval_windows`` walks the validation array in consecutive non-overlapping windows.

    Subclasses set ``train``, ``val`` (1-D integer tensors), ``seed``, ``vocab_size``,
    ``bytes_per_token`` and ``corpus`` (``.name``, ``.sha256``).
    """

    train: torch.Tensor
    val: torch.Tensor
    seed: int
    vocab_size: int
    bytes_per_token: float
    bos: int | None = None
    # How error messages name the arrays and their length unit.
    _train_what, _val_what, _unit = "training tokens", "validation tokens", " tokens"

    def batch(self, step: int, micro: int, batch_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tokens [B, S], targets [B, S])`` int64, targets shifted by one token."""
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
        n = self.train.numel() - seq_len - 1  # the last start a whole window fits after
        if n < 0:
            raise ValueError(f"{self._train_what} ({self.train.numel()}{self._unit}) is shorter than "
                             f"seq_len + 1 = {seq_len + 1}")
        # One generator per (seed, step, micro): a large odd multiplier keeps the streams apart.
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 1_009 + micro)
        starts = torch.randint(0, n + 1, (batch_size,), generator=g)
        win = self.train[starts[:, None] + torch.arange(seq_len + 1)].long()
        return self._inputs(win), win[:, 1:]

    def _inputs(self, win: torch.Tensor) -> torch.Tensor:
        x = win[:, :-1]
        if self.bos is not None:
            x = x.clone()
            x[:, 0] = self.bos
        return x

    def check_lengths(self, seq_len: int) -> None:
        """ValueError unless both arrays hold at least one window of ``seq_len + 1`` tokens:
        what :meth:`batch` and :meth:`eval_windows` need, checked before any training."""
        for what, arr in ((self._train_what, self.train), (self._val_what, self.val)):
            if arr.numel() < seq_len + 1:
                raise ValueError(f"{what} of {self.corpus.name!r} ({arr.numel():,}{self._unit}) is shorter than one "
                                 f"window, seq_len + 1 = {seq_len + 1}: use a shorter seq_len or more text")

    def eval_windows(self, seq_len: int, batch_size: int, max_tokens: int | None = None
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Consecutive non-overlapping validation windows (the first ``max_tokens`` predicted
        tokens, rounded down to whole windows; at least one window), in batches; int64."""
        per = seq_len
        n_windows = (self.val.numel() - 1) // per
        if n_windows < 1:
            raise ValueError(f"{self._val_what} ({self.val.numel()}{self._unit}) is shorter than "
                             f"seq_len + 1 = {seq_len + 1}")
        if max_tokens is not None:
            n_windows = max(1, min(n_windows, max_tokens // per))
        starts = torch.arange(n_windows) * per
        for i in range(0, n_windows, batch_size):
            s = starts[i:i + batch_size]
            win = self.val[s[:, None] + torch.arange(seq_len + 1)].long()
            yield self._inputs(win), win[:, 1:]


class ByteData(_WindowData):
    """Train/validation bytes as uint8 tensors, with deterministic batches.

    ``batch(step, micro, batch_size, seq_len)`` draws ``batch_size`` random windows of
    ``seq_len + 1`` bytes from the training text with a generator seeded from
    ``(seed, step, micro)``: no hidden state, so resuming at ``step`` replays the same data.
    Tokens are bytes: ``vocab_size`` 256, ``bytes_per_token`` 1.

    ``bos``: when set, the first input of every window (training and validation) is this id
    instead of the window's first byte, whose successor stays the first target. The model
    then learns to predict a byte from an empty context, as a coder that restarts its
    context (an M1 under :class:`~flopwise.coding.models.CachedLM`, whose contexts start
    with ``bos_id``) asks it to. Without it the first prediction after a restart comes from
    an input the model never saw in training. Checkpoints record it and
    :meth:`~flopwise.models.train.Trainer.resume` restores it.
    """

    vocab_size = 256
    bytes_per_token = 1.0
    _train_what, _val_what, _unit = "training text", "validation text", " B"

    def __init__(self, corpus: TextCorpus, *, seed: int = 0, bos: int | None = None):
        if not isinstance(corpus, TextCorpus):
            raise TypeError(f"corpus must be a TextCorpus, got {type(corpus).__name__}")
        if bos is not None and (isinstance(bos, bool) or not isinstance(bos, int) or not 0 <= bos < 256):
            raise ValueError(f"bos must be None or a byte value in [0, 256), got {bos!r}")
        self.bos = bos
        self.corpus = corpus
        self.seed = int(seed)
        self.train = torch.frombuffer(bytearray(corpus.train), dtype=torch.uint8)
        self.val = torch.frombuffer(bytearray(corpus.val), dtype=torch.uint8)
        self.train_bytes = len(corpus.train)
        self.val_bytes = len(corpus.val)


class _TokenCorpus:
    """What a checkpoint records about :class:`TokenData`'s source: ``name`` and
    ``sha256`` (of the vocabulary size, the lengths and both arrays as little-endian
    int32/int64, so the same ids give the same checksum whatever dtype they came in)."""

    def __init__(self, name: str, vocab_size: int, train: torch.Tensor, val: torch.Tensor):
        self.name = name
        self._parts = (vocab_size, train, val)
        self._sha256: str | None = None

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            vocab_size, train, val = self._parts
            h = hashlib.sha256(f"tokens:{vocab_size}:{train.numel()}:{val.numel()}:{train.dtype}\n".encode())
            for t in (train, val):
                a = t.numpy()
                h.update(np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).data)
            self._sha256 = h.hexdigest()
        return self._sha256

    def __repr__(self) -> str:
        return f"_TokenCorpus(name={self.name!r})"


def _token_array(x, arg: str, vocab_size: int) -> torch.Tensor:
    """``x`` (1-D integer numpy array or torch tensor of ids in ``[0, vocab_size)``) as a
    CPU int32 tensor (int64 when ``vocab_size`` does not fit int32)."""
    if isinstance(x, torch.Tensor):
        if x.dtype == torch.bool or x.is_floating_point() or x.is_complex():
            raise TypeError(f"{arg} must hold integer token ids, got dtype {x.dtype}")
        a = x.detach().cpu().numpy()
    elif isinstance(x, np.ndarray):
        a = x
    else:
        raise TypeError(f"{arg} must be a 1-D integer numpy array or torch tensor, got {type(x).__name__}")
    if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{arg} must hold integer token ids (uint8, uint16, int32, int64, ...), got dtype {a.dtype}")
    if a.ndim != 1:
        raise ValueError(f"{arg} must be 1-D, got shape {tuple(a.shape)}")
    if a.size:
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"{arg} holds token ids in [{lo}, {hi}], outside [0, vocab_size={vocab_size})")
    out = np.ascontiguousarray(a, dtype=np.int32 if vocab_size <= 2**31 else np.int64)
    if np.may_share_memory(out, a):
        out = out.copy()  # own the memory: later edits of the caller's array change nothing here
    return torch.from_numpy(out)


class TokenData(_WindowData):
    """Arbitrary token ids (e.g. compressed-text tokens, vocabulary 256 or 65536) with
    :class:`ByteData`'s batches: the same ``batch`` and ``eval_windows``, the same windows
    for the same ids.

    Args:
        train, val: 1-D integer numpy arrays or torch tensors (uint8, uint16, int32, int64,
            ...) of ids in ``[0, vocab_size)``; stored as CPU int32 tensors (int64 for a
            vocabulary beyond int32).
        vocab_size: the number of token ids (>= 2).
        val_bytes: the bytes of original text ``val`` encodes: ``bytes_per_token =
            val_bytes / len(val)`` turns nats per token into bits per original byte.
        name: names the source in checkpoints (``corpus.name``).
        seed: data order (see :meth:`batch`).
        train_bytes: the original bytes ``train`` encodes (informational), or None.
    """

    def __init__(self, train, val, *, vocab_size: int, val_bytes: int, name: str, seed: int = 0,
                 train_bytes: int | None = None):
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2:
            raise ValueError(f"vocab_size must be an int >= 2, got {vocab_size!r}")
        if isinstance(val_bytes, bool) or not isinstance(val_bytes, int) or val_bytes < 1:
            raise ValueError(f"val_bytes must be an int >= 1 (bytes of original text in val), got {val_bytes!r}")
        if train_bytes is not None and (isinstance(train_bytes, bool) or not isinstance(train_bytes, int)
                                        or train_bytes < 1):
            raise ValueError(f"train_bytes must be None or an int >= 1, got {train_bytes!r}")
        if not isinstance(name, str) or not name:
            raise TypeError(f"name must be a non-empty str, got {name!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.train = _token_array(train, "train", vocab_size)
        self.val = _token_array(val, "val", vocab_size)
        if self.train.numel() < 2:
            raise ValueError(f"train must hold at least 2 tokens, got {self.train.numel()}")
        if self.val.numel() < 2:
            raise ValueError(f"val must hold at least 2 tokens, got {self.val.numel()}")
        self.vocab_size = vocab_size
        self.seed = seed
        self.val_bytes = val_bytes
        self.train_bytes = train_bytes
        self.bytes_per_token = val_bytes / self.val.numel()
        self.corpus = _TokenCorpus(name, vocab_size, self.train, self.val)

    def __repr__(self) -> str:
        return (f"TokenData({self.corpus.name!r}, vocab_size={self.vocab_size}, train={self.train.numel():,} "
                f"tokens, val={self.val.numel():,} tokens, {self.bytes_per_token:.4f} bytes/token)")


def bits_per_byte(logits: torch.Tensor, targets: torch.Tensor, *, bytes_per_token: float = 1.0) -> float:
    """Cross-entropy of ``targets [..]`` under ``logits [.., V]`` in bits per byte:
    ``mean nats / ln 2 / bytes_per_token`` (1 for a byte-level model)."""
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} do not match")
    if bytes_per_token <= 0:
        raise ValueError(f"bytes_per_token must be > 0, got {bytes_per_token}")
    nats = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1).long())
    return float(nats) / math.log(2) / bytes_per_token
