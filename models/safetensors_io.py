"""Streaming safetensors: strict header parsing, tensor reads by row range, shard writing.

Why not ``safetensors.safe_open`` for the bulk data: it memory-maps whole files, and the
pages a conversion touches stay resident (and counted in the process's RSS) until the
file is closed, so reading a 10 GB shard costs up to 10 GB of RSS. Here a tensor (or a
range of its rows) is read with one positioned read into a buffer the caller owns, and a
shard is written tensor by tensor from chunks, so memory is bounded by the largest chunk
in flight. The on-disk format is the same (8-byte little-endian header length, JSON
header, raw little-endian data), and files written here load with ``safe_open``.

Shape legend: ``rows`` is a range over a tensor's first dimension.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from typing import Callable, Collection, Iterable, Iterator, Sequence

import torch

__all__ = [
    "DTYPES",
    "TensorInfo",
    "FileRange",
    "ShardPlan",
    "CheckpointReader",
    "read_header",
    "plan_shards",
    "write_shard",
    "write_index",
    "rewrite_metadata",
]

# safetensors dtype codes <-> torch dtypes (the ones checkpoints use).
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_CODES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype, shape and absolute byte range."""

    name: str
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute offset of the first byte in the file
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def row_bytes(self) -> int:
        """Bytes of one index along the first dimension."""
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else 0


def read_header(path: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header. Returns ``(tensors, metadata)``.

    Raises ValueError naming the file (and tensor) on anything malformed: short file,
    oversized or non-JSON header, unknown dtype, byte ranges that overlap, leave gaps, do
    not match ``shape`` x itemsize, or run past the end of the file.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"corrupt safetensors file {path}: shorter than 8 bytes")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise ValueError(f"corrupt safetensors file {path}: header length {n} exceeds the file ({size} bytes)")
            raw = f.read(n)
    except OSError as exc:
        raise ValueError(f"cannot read safetensors file {path}: {exc}") from exc
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"corrupt safetensors file {path}: header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError(f"corrupt safetensors file {path}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + n
    infos: dict[str, TensorInfo] = {}
    spans = []
    for name, entry in header.items():
        try:
            code, shape, (a, b) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"corrupt safetensors file {path}: bad header entry for tensor {name!r}") from None
        if code not in DTYPES:
            raise ValueError(f"unsupported dtype {code!r} of tensor {name!r} in {path}")
        if any(not isinstance(d, int) or d < 0 for d in shape) or not (isinstance(a, int) and isinstance(b, int)):
            raise ValueError(f"corrupt safetensors file {path}: bad shape/offsets for tensor {name!r}")
        itemsize = torch.empty((), dtype=DTYPES[code]).element_size()
        if b - a != math.prod(shape) * itemsize or a < 0:
            raise ValueError(f"corrupt safetensors file {path}: tensor {name!r} has {b - a} bytes for shape {list(shape)}")
        if base + b > size:
            raise ValueError(f"corrupt safetensors file {path}: tensor {name!r} runs past the end of the file (truncated?)")
        infos[name] = TensorInfo(name, path, DTYPES[code], shape, base + a, b - a)
        spans.append((a, b, name))
    spans.sort()
    end = 0
    for a, b, name in spans:
        if a != end:
            raise ValueError(f"corrupt safetensors file {path}: tensor {name!r} starts at {a}, expected {end}")
        end = b
    return infos, {str(k): str(v) for k, v in metadata.items()}


class CheckpointReader:
    """Tensors of a single ``*.safetensors`` file or of a folder (``model.safetensors`` or
    a sharded checkpoint with ``<stem>.safetensors.index.json``).

    ``infos`` maps every tensor name to its :class:`TensorInfo` (headers only);
    :meth:`get` reads one tensor (or a range of its rows) into fresh memory.
    """

    def __init__(self, path: str, stem: str = "model"):
        self.path = path
        self.files: list[str] = []
        self.metadata: dict[str, str] = {}
        if os.path.isfile(path):
            self.files = [path]
        elif os.path.isdir(path):
            index = os.path.join(path, f"{stem}.safetensors.index.json")
            single = os.path.join(path, f"{stem}.safetensors")
            if os.path.isfile(index) and os.path.isfile(single):
                # Which one is current cannot be told from the files; reading either could
                # silently return stale weights.
                raise ValueError(f"{path} holds both {stem}.safetensors and {stem}.safetensors.index.json "
                                 "(one of them is stale): remove the outdated one")
            if os.path.isfile(index):
                self.files = self._files_from_index(index)
            elif os.path.isfile(single):
                self.files = [single]
            else:
                raise FileNotFoundError(f"no {stem}.safetensors or {stem}.safetensors.index.json in {path}")
        else:
            raise FileNotFoundError(f"checkpoint not found: {path}")
        self.infos: dict[str, TensorInfo] = {}
        for f in self.files:
            infos, meta = read_header(f)
            self.metadata.update(meta)
            for name, info in infos.items():
                if name in self.infos:
                    raise ValueError(f"tensor {name!r} appears in both {self.infos[name].file} and {f}")
                self.infos[name] = info
        if self._weight_map is not None:
            for name, fname in self._weight_map.items():
                info = self.infos.get(name)
                if info is None or os.path.basename(info.file) != fname:
                    raise ValueError(f"index lists tensor {name!r} in {fname}, but that file does not hold it")
            extra = sorted(set(self.infos) - set(self._weight_map))
            if extra:
                raise ValueError(f"tensor {extra[0]!r} is in a shard but not in the index")

    _weight_map: dict[str, str] | None = None

    def _files_from_index(self, index: str) -> list[str]:
        try:
            with open(index) as f:
                data = json.load(f)
            wm = data["weight_map"]
            if not isinstance(wm, dict):
                raise TypeError
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"corrupt index {index}: needs a JSON object with a 'weight_map' ({exc})") from None
        self._weight_map = {str(k): str(v) for k, v in wm.items()}
        folder = os.path.dirname(index)
        files = []
        for fname in dict.fromkeys(self._weight_map.values()):
            full = os.path.join(folder, fname)
            if os.path.basename(fname) != fname or fname in ("", ".", ".."):
                raise ValueError(f"index {index} names shard {fname!r}: shards must be plain file names in "
                                 "the index's folder (paths are refused)")
            if not os.path.isfile(full):
                raise ValueError(f"index {index} names shard {fname!r}, which does not exist")
            files.append(full)
        return files

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def info(self, name: str) -> TensorInfo:
        try:
            return self.infos[name]
        except KeyError:
            raise ValueError(f"missing tensor {name!r} in {self.path}") from None

    def get(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor ``name`` (rows ``[r0, r1)`` of its first dimension when given)."""
        info = self.info(name)
        shape = list(info.shape)
        start, nbytes = info.start, info.nbytes
        if rows is not None:
            r0, r1 = rows
            if not (shape and 0 <= r0 <= r1 <= shape[0]):
                raise ValueError(f"rows {rows} out of range for tensor {name!r} of shape {shape}")
            start += r0 * info.row_bytes
            nbytes = (r1 - r0) * info.row_bytes
            shape[0] = r1 - r0
        buf = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            view = memoryview(buf.numpy())
            with open(info.file, "rb", buffering=0) as f:
                got = 0
                while got < nbytes:
                    n = os.preadv(f.fileno(), [view[got:]], start + got)
                    if n <= 0:
                        raise ValueError(f"tensor {name!r}: {info.file} ended early (truncated?)")
                    got += n
        return buf.view(info.dtype).reshape(shape)


def umask() -> int:
    """The process's umask, read without changing it where the OS allows (``os.umask`` sets
    it, which would race with files other threads create meanwhile)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish_mode(path: str) -> None:
    """Give a folder made by ``tempfile.mkdtemp`` (mode 0700, private while written) the
    mode ``os.mkdir`` would have given it, before it is renamed into place."""
    os.chmod(path, 0o777 & ~umask())


def fsync_dir(path: str) -> None:
    """Make a rename or deletion in folder ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def path_within(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (plain string paths: resolve symlinks first)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def publish_folder(tmp: str, dst: str, fsync: bool = True) -> None:
    """Rename the finished folder ``tmp`` onto ``dst``; an existing ``dst`` (checked by the
    caller as replaceable) is moved aside first and deleted only after the new one is in
    place. Wherever it stops (a failed rename, Ctrl-C or SIGTERM between the two renames),
    ``dst`` is left whole: the old one is moved back if the new one is not in place."""
    parent = os.path.dirname(os.path.abspath(dst))
    if not os.path.lexists(dst):
        os.rename(tmp, dst)
        if fsync:  # the rename itself survives a crash only once the parent is synced
            fsync_dir(parent)
        return
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.old-", dir=parent)
    os.rmdir(old)
    try:
        os.rename(dst, old)
        os.rename(tmp, dst)
        if fsync:
            fsync_dir(parent)
    finally:
        if os.path.lexists(old):
            if not os.path.lexists(dst):  # stopped between the renames: the old one goes back
                os.rename(old, dst)
            elif os.path.isdir(old) and not os.path.islink(old):
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.remove(old)


def check_replaceable_folder(path: str | os.PathLike, allowed: Collection[str] | Callable[[str], bool], *,
                             kind: str, advice: str, required: Sequence[str] = (), folders: Collection[str] = (),
                             name: str | None = None) -> None:
    """FileExistsError unless a tool may delete what is at ``path`` to put its output folder
    there: nothing, an empty folder, or a folder that holds every name in ``required`` and
    nothing but regular files whose names ``allowed`` accepts (a collection of names or a
    predicate) and folders named in ``folders`` (whose contents are not checked). Anything
    else is a user's, and must never go: a symlink (at ``path`` or in it), a file, another
    entry, hidden ones included. A folder that cannot be listed raises os.listdir's OSError.

    The message reads ``"{name} {why}; {advice}"``: ``name`` (default: ``path``) names the
    folder, ``kind`` says what it would have to be ("an upcycle output"), ``advice`` what may
    be replaced and what to do instead."""
    path = os.fspath(path)
    if not os.path.lexists(path):
        return
    if os.path.islink(path):
        why = "is a symlink"
    elif not os.path.isdir(path):
        why = "is not a folder"
    else:
        entries = sorted(os.listdir(path))
        ok = allowed if callable(allowed) else allowed.__contains__

        def kept(e: str) -> bool:
            p = os.path.join(path, e)
            return not os.path.islink(p) and ((os.path.isfile(p) and ok(e)) or (os.path.isdir(p) and e in folders))

        foreign = [e for e in entries if not kept(e)]
        missing = [r for r in required if r not in entries]
        if foreign:
            more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
            why = f"is not {kind}: it holds {', '.join(map(repr, foreign[:3]))}{more}, which replacing it would delete"
        elif entries and missing:
            why = f"is not {kind} (no {' and no '.join(missing)})"
        else:
            return
    raise FileExistsError(f"{path if name is None else name} {why}; {advice}")


@dataclass(frozen=True)
class FileRange:
    """A chunk given as bytes of an existing file: :func:`write_shard` copies it in the
    kernel (``copy_file_range``) without passing it through user memory. ``dtype``: what
    the bytes hold; raw bytes carry no type, so :func:`write_shard` checks it against the
    planned dtype (None skips the check)."""

    path: str
    offset: int
    nbytes: int
    dtype: torch.dtype | None = None


_COPY_BLOCK = 64 * 2**20


def _copy_range(chunk: FileRange, out_fd: int) -> None:
    """Append ``chunk`` to ``out_fd`` (at its current position)."""
    with open(chunk.path, "rb", buffering=0) as src:
        done = 0
        fast = hasattr(os, "copy_file_range")
        while done < chunk.nbytes:
            want = min(chunk.nbytes - done, 1 << 30)
            if fast:
                try:
                    n = os.copy_file_range(src.fileno(), out_fd, want, chunk.offset + done)
                except OSError:  # other filesystem or kernel without support: copy through memory
                    fast = False
                    continue
            else:
                data = os.pread(src.fileno(), min(want, _COPY_BLOCK), chunk.offset + done)
                n = len(data)
                view, m = memoryview(data), 0
                while m < n:
                    m += os.write(out_fd, view[m:])
            if n <= 0:
                raise ValueError(f"{chunk.path} ended early while copying bytes at offset {chunk.offset + done} (truncated?)")
            done += n


def dtype_code(dtype: torch.dtype) -> str:
    try:
        return _CODES[dtype]
    except KeyError:
        raise TypeError(f"dtype {dtype} cannot be stored in safetensors") from None


@dataclass
class ShardPlan:
    """One output file: its name and the (name, dtype, shape) of its tensors, in order."""

    file: str
    tensors: list[tuple[str, torch.dtype, tuple[int, ...]]]

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(d, s) for _, d, s in self.tensors)


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def plan_shards(tensors: Iterable[tuple[str, torch.dtype, tuple[int, ...]]], max_shard_bytes: int,
                stem: str = "model") -> list[ShardPlan]:
    """Greedy, order-preserving split into files of at most ``max_shard_bytes`` (a single
    larger tensor gets a file of its own). One shard is named ``<stem>.safetensors``;
    several ``<stem>-00001-of-0000N.safetensors`` (Hugging Face's convention)."""
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
    groups: list[list] = [[]]
    size = 0
    for t in tensors:
        n = _nbytes(t[1], t[2])
        if groups[-1] and size + n > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += n
    if len(groups) == 1:
        return [ShardPlan(f"{stem}.safetensors", groups[0])]
    k = len(groups)
    return [ShardPlan(f"{stem}-{i + 1:05d}-of-{k:05d}.safetensors", g) for i, g in enumerate(groups)]


def _header_bytes(plan: ShardPlan, metadata: dict[str, str] | None) -> bytes:
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    off = 0
    for name, dtype, shape in plan.tensors:
        n = _nbytes(dtype, shape)
        header[name] = {"dtype": dtype_code(dtype), "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw


def write_shard(path: str, plan: ShardPlan, produce: Callable[[str], Iterator[torch.Tensor]],
                metadata: dict[str, str] | None = None, *, fsync: bool = True,
                on_tensor: Callable[[str, int], None] | None = None) -> int:
    """Write one shard: the header (known up front from ``plan``), then each tensor's bytes
    from ``produce(name)``, an iterator of chunks whose concatenation (in C order) is the
    tensor (or :class:`FileRange` pieces of other files, copied in the kernel). Chunks are
    written as they come, so only one is alive at a time. Returns the
    bytes written. ``on_tensor(name, nbytes)`` is called after each tensor."""
    total = 0
    with open(path, "wb", buffering=0) as f:
        head = _header_bytes(plan, metadata)
        f.write(head)
        total += len(head)
        for name, dtype, shape in plan.tensors:
            want = _nbytes(dtype, shape)
            got = 0
            for chunk in produce(name):
                if isinstance(chunk, FileRange):
                    if chunk.dtype is not None and chunk.dtype != dtype:
                        raise TypeError(f"tensor {name!r}: bytes copied from {chunk.path} hold {chunk.dtype}, "
                                        f"planned {dtype}")
                    if got + chunk.nbytes > want:
                        raise ValueError(f"tensor {name!r}: produced more than the planned {want} bytes "
                                         f"for shape {list(shape)}")
                    _copy_range(chunk, f.fileno())
                    got += chunk.nbytes
                    continue
                if chunk.dtype != dtype:
                    raise TypeError(f"tensor {name!r}: produced dtype {chunk.dtype}, planned {dtype}")
                flat = chunk.contiguous().reshape(-1).view(torch.uint8)
                if flat.numel():
                    view = memoryview(flat.numpy())
                    done = 0
                    while done < len(view):
                        done += f.write(view[done:])
                got += flat.numel()
            if got != want:
                raise ValueError(f"tensor {name!r}: produced {got} bytes, planned {want} for shape {list(shape)}")
            total += got
            if on_tensor is not None:
                on_tensor(name, got)
        if fsync:
            os.fsync(f.fileno())
    return total


def rewrite_metadata(path: str, plan: ShardPlan, metadata: dict[str, str]) -> None:
    """Replace the metadata of a shard written by :func:`write_shard` in place. The new
    header must have exactly the old one's length (e.g. fixed-length hashes replacing
    placeholders), so no data moves."""
    head = _header_bytes(plan, metadata)
    with open(path, "r+b", buffering=0) as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if len(head) != 8 + n:
            raise ValueError(f"new header of {path} is {len(head) - 8} bytes, the old one {n}: cannot patch in place")
        os.pwrite(f.fileno(), head, 0)


def write_index(path: str, shards: list[ShardPlan], metadata: dict[str, str] | None = None) -> None:
    """``<stem>.safetensors.index.json``: ``{"metadata": {"total_size": ...}, "weight_map": {...}}``."""
    meta = {"total_size": sum(s.nbytes for s in shards)}
    if metadata:
        meta.update(metadata)
    wm = {name: s.file for s in shards for name, _, _ in s.tensors}
    with open(path, "w") as f:
        json.dump({"metadata": meta, "weight_map": wm}, f, indent=2)
        f.write("\n")
