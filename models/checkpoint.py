"""Training checkpoints: one folder, safetensors for tensors, JSON for the rest.

Layout (the dense-model part is what :mod:`flopwise.models.upcycle` reads)::

    CKPT/
      config.json           ModelConfig.to_dict()
      model.safetensors     the state dict; a tied head is stored once, as embed.weight
      optimizer.safetensors AdamW moments exp_avg.<param name>, exp_avg_sq.<param name>
                            (fp32, the parameters' shapes) and a scalar tensor "step";
                            the step also in the header metadata ("step")
      trainer_state.json    step, tokens seen, RNG states, data position, the TrainConfig
                            and the ModelConfig trained ("model_config")

Writes are atomic: everything goes into a temporary sibling folder that is renamed onto
``CKPT`` only when complete, so a crash never leaves a half-written checkpoint where a
good one was.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .safetensors_io import CheckpointReader, check_replaceable_folder, publish_folder, publish_mode, umask
from .transformer import ModelConfig, Transformer

__all__ = ["Checkpoint", "save_checkpoint", "check_replaceable", "load_checkpoint", "load_model", "optimizer_tensors",
           "load_optimizer_tensors", "rng_state", "set_rng_state", "check_trainer_state"]

FILES = ("config.json", "model.safetensors", "optimizer.safetensors", "trainer_state.json")


# ----------------------------------------------------------------------------------------
# RNG state <-> JSON
# ----------------------------------------------------------------------------------------


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def rng_state() -> dict:
    """Every global generator a training step might draw from, as JSON-able values."""
    np_state = np.random.get_state()
    state = {
        "torch": _b64(torch.get_rng_state()),
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def check_trainer_state(state, where) -> None:
    """ValueError naming ``where`` (the trainer_state.json file) unless ``state`` has what
    :meth:`~flopwise.models.train.Trainer.resume` reads: ``step`` and ``tokens_seen``
    (ints >= 0), ``train_config`` and ``data`` (objects, ``data.sha256`` a string) and RNG
    states that :func:`set_rng_state` can restore (checked on fresh generators, leaving the
    global ones alone)."""
    if not isinstance(state, dict):
        raise ValueError(f"corrupt {where}: not a JSON object")
    missing = [k for k in ("step", "tokens_seen", "rng", "data", "train_config") if k not in state]
    if missing:
        raise ValueError(f"corrupt {where}: missing {missing}")
    for k in ("step", "tokens_seen"):
        v = state[k]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"corrupt {where}: {k} must be an int >= 0, got {v!r}")
    if not isinstance(state["train_config"], dict):
        raise ValueError(f"corrupt {where}: train_config must be an object")
    data = state["data"]
    if not isinstance(data, dict) or not isinstance(data.get("sha256"), str):
        raise ValueError(f"corrupt {where}: data must be an object with the corpus checksum (sha256)")
    rng = state["rng"]
    try:
        if not isinstance(rng, dict):
            raise TypeError("not an object")
        t = _unb64(rng["torch"])
        if t.numel() != torch.get_rng_state().numel():
            raise ValueError(f"the torch state has {t.numel()} bytes, not {torch.get_rng_state().numel()}")
        v, internal, gauss = rng["python"]
        random.Random().setstate((v, tuple(internal), gauss))
        name, keys, pos, has_gauss, cached = rng["numpy"]
        np.random.RandomState().set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
        if "cuda" in rng and not (isinstance(rng["cuda"], list) and all(isinstance(c, str) for c in rng["cuda"])):
            raise TypeError("the cuda states must be a list of strings")
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        what = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
        raise ValueError(f"corrupt {where}: unusable RNG state ({what})") from None


def set_rng_state(state: dict) -> None:
    """Inverse of :func:`rng_state` (CUDA states are restored when CUDA is present)."""
    torch.set_rng_state(_unb64(state["torch"]))
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        states = [_unb64(s) for s in state["cuda"]]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


# ----------------------------------------------------------------------------------------
# Optimizer state <-> named tensors
# ----------------------------------------------------------------------------------------


def optimizer_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Adam(W) moments by parameter name: ``exp_avg.<name>``, ``exp_avg_sq.<name>`` and
    ``step`` (a float32 scalar). Parameters without state (never stepped) are left out;
    every parameter with state must share one step count."""
    out: dict[str, torch.Tensor] = {}
    steps = set()
    for name, p in model.named_parameters():
        st = optimizer.state.get(p)
        if not st:
            continue
        out[f"exp_avg.{name}"] = st["exp_avg"].detach().cpu().contiguous()
        out[f"exp_avg_sq.{name}"] = st["exp_avg_sq"].detach().cpu().contiguous()
        steps.add(float(st["step"]))
    if len(steps) > 1:
        raise ValueError(f"parameters disagree on the optimizer step: {sorted(steps)}")
    out["step"] = torch.tensor(steps.pop() if steps else 0.0, dtype=torch.float32)
    return out


def load_optimizer_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                           tensors: dict[str, torch.Tensor]) -> None:
    """Put :func:`optimizer_tensors`' output back into ``optimizer`` (built over ``model``'s
    parameters). Unknown names or wrong shapes raise ValueError."""
    params = dict(model.named_parameters())
    names = {k.split(".", 1)[1] for k in tensors if k.startswith(("exp_avg.", "exp_avg_sq."))}
    unknown = sorted(names - set(params))
    if unknown:
        raise ValueError(f"optimizer state for unknown parameters {unknown[:3]}")
    if "step" not in tensors:
        raise ValueError("optimizer state has no 'step' tensor")
    step = tensors["step"].to(torch.float32).reshape(())
    for name in sorted(names):
        p = params[name]
        m, v = tensors.get(f"exp_avg.{name}"), tensors.get(f"exp_avg_sq.{name}")
        if m is None or v is None:
            raise ValueError(f"optimizer state for {name!r} lacks exp_avg or exp_avg_sq")
        if m.shape != p.shape or v.shape != p.shape:
            raise ValueError(f"optimizer state for {name!r} has shape {tuple(m.shape)}, parameter {tuple(p.shape)}")
        # Match what torch's AdamW would have created: moments like the parameter, step a
        # float32 scalar (on the parameter's device only for fused/capturable variants).
        on_device = any(g.get("fused") or g.get("capturable") for g in optimizer.param_groups)
        optimizer.state[p] = {
            "step": step.clone().to(p.device if on_device else "cpu"),
            "exp_avg": m.to(device=p.device, dtype=p.dtype).clone(),
            "exp_avg_sq": v.to(device=p.device, dtype=p.dtype).clone(),
        }


# ----------------------------------------------------------------------------------------
# Save / load
# ----------------------------------------------------------------------------------------


def _model_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        sd.pop("head.weight", None)  # the same tensor as embed.weight
    return sd


def check_replaceable(path: str | os.PathLike) -> None:
    """FileExistsError unless ``path`` is absent, an empty folder or a flopwise checkpoint
    folder (config.json, model weights, and nothing but the files :func:`save_checkpoint`
    writes): replacing it deletes what it holds, and a user's own files must never go."""
    check_replaceable_folder(path, FILES, kind="a flopwise checkpoint folder",
                             required=("config.json", "model.safetensors"),
                             advice="a checkpoint replaces only an empty folder or an earlier checkpoint folder: "
                                    "remove or move it yourself, or choose another folder")


def save_checkpoint(path: str | os.PathLike, model: Transformer, optimizer: torch.optim.Optimizer | None = None,
                    *, trainer_state: dict | None = None) -> Path:
    """Write ``model`` (and ``optimizer``, ``trainer_state``) to the folder ``path``,
    atomically. An existing checkpoint there is replaced; anything else at ``path`` (a
    folder of other files, a file, a symlink) raises FileExistsError and stays untouched
    (see :func:`check_replaceable`). Returns the path."""
    from safetensors.torch import save_file

    if not isinstance(model, Transformer):
        raise TypeError(f"model must be a flopwise Transformer, got {type(model).__name__}")
    path = Path(path)
    check_replaceable(path)
    for parent in (path.parent, *path.parent.parents):
        if os.path.lexists(parent):
            if not parent.is_dir():
                raise FileExistsError(f"cannot save a checkpoint to {path}: {parent} is a file, not a folder")
            break
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(model.cfg.to_dict(), indent=2) + "\n")
        save_file(_model_tensors(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if optimizer is not None:
            opt = optimizer_tensors(model, optimizer)
            save_file(opt, str(tmp / "optimizer.safetensors"),
                      metadata={"format": "pt", "step": str(int(opt["step"]))})
        if trainer_state is not None:
            (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1) + "\n")
        # safetensors writes its files private (0600): every file gets the mode open() gives the JSONs
        mode = 0o666 & ~umask()
        for f in tmp.iterdir():
            os.chmod(f, mode)
        publish_mode(str(tmp))  # mkdtemp made it private; the checkpoint gets the usual mode
        if os.path.lexists(path):
            check_replaceable(path)  # again: the folder may have changed while the files were written
        # the old checkpoint is moved aside, the new one renamed in place and synced, and only
        # then the old one deleted; stopped in between, the old one is put back
        publish_folder(str(tmp), str(path))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns. ``optimizer``: the named tensors of
    ``optimizer.safetensors`` (None if absent); ``trainer_state``: the parsed JSON (None if
    absent)."""

    model: Transformer
    config: ModelConfig
    optimizer: dict[str, torch.Tensor] | None
    trainer_state: dict | None


def _read_json_object(f: Path) -> dict:
    try:
        raw = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"corrupt {f}: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"corrupt {f}: not a JSON object")
    return raw


def _read_config(path: Path) -> ModelConfig:
    f = path / "config.json"
    if not f.exists():
        hint = f": the run's checkpoint is {path / 'last'}" if (path / "last" / "config.json").is_file() else ""
        raise FileNotFoundError(f"no config.json in {path}{hint}")
    return ModelConfig.from_dict(_read_json_object(f))


def _read_tensors(path: Path, stem: str) -> dict[str, torch.Tensor]:
    """All tensors of ``<stem>.safetensors`` or its shards (``<stem>.safetensors.index.json``,
    as :mod:`flopwise.models.upcycle` writes large checkpoints). Corrupt files raise
    ValueError naming the file."""
    reader = CheckpointReader(str(path), stem=stem)
    return {name: reader.get(name) for name in reader.infos}


def _has(path: Path, stem: str) -> bool:
    return (path / f"{stem}.safetensors").exists() or (path / f"{stem}.safetensors.index.json").exists()


def load_model(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> Transformer:
    """The :class:`Transformer` stored in checkpoint folder ``path`` (``model.safetensors``
    or shards with ``model.safetensors.index.json``). Missing or unexpected tensors, and
    tensors whose shape differs from what config.json implies, raise ValueError."""
    path = Path(path)
    if path.is_file():
        raise FileNotFoundError(f"{path} is a file, not a checkpoint folder: pass the folder that holds "
                                f"config.json and model.safetensors ({path.parent}?)")
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {path}")
    _read_config(path)  # a missing or corrupt config.json named as such
    if not _has(path, "model"):
        raise FileNotFoundError(f"no model.safetensors (or model.safetensors.index.json) in {path}")
    from .hf_formats import load_flopwise

    return load_flopwise(str(path)).to(device)


def load_checkpoint(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> Checkpoint:
    """Model, optimizer tensors and trainer state of the checkpoint folder ``path``."""
    path = Path(path)
    model = load_model(path, device=device)
    opt = _read_tensors(path, "optimizer") if _has(path, "optimizer") else None
    state = None
    f = path / "trainer_state.json"
    if f.exists():
        state = _read_json_object(f)
    return Checkpoint(model, model.cfg, opt, state)
