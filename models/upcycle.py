"""Sparse upcycling: dense SwiGLU checkpoints -> Mixture-of-Experts checkpoints.

Komatsuzaki et al. 2023: each selected MLP becomes E experts initialised from it, plus a
new router. Options (:class:`UpcycleOptions`): experts and top-k, which layers, expert
init (exact copies, copies + Gaussian noise, Drop-Upcycling, Megatron's neuron-split
granularity), router init (normal, zeros, orthogonal, k-means centroids of calibration
hidden states), output format (flopwise, Hugging Face Mixtral, Qwen2-MoE or Qwen3-MoE).

How it works: :func:`plan_upcycle` reads the source's ``config.json`` and safetensors
headers, validates them, and returns an :class:`UpcyclePlan` (every output tensor with a
recipe, the shard layout, sizes and parameter counts: ``--dry-run`` prints it).
:func:`upcycle` then streams: each output tensor is produced from one source tensor at a
time and written chunk by chunk into a temporary folder, which is renamed onto the
destination only when everything (and ``verify``, if asked) succeeded.

Reproducibility: every random draw uses a generator seeded from ``(seed, layer, expert,
purpose)``, never a shared stream, so any subset of tensors (one shard, one layer) comes out
bit-identical however the work is split.

Exactness: with copy init, granularity 1 and renormalised top-k weights every selected
expert computes the dense MLP and the weights sum to one, so the MoE reproduces the dense
logits (up to float rounding) whatever the router; settings that break this are listed in
:attr:`UpcyclePlan.warnings`.

Optimizer state: a source folder may hold ``optimizer.safetensors`` (or shards with
``optimizer.safetensors.index.json``) with Adam moments ``exp_avg.<param>`` and
``exp_avg_sq.<param>`` (same shapes and layout as the parameters) and the step count in
the metadata key ``step``. The same recipes upcycle them: every expert gets the dense MLP's
moments (its neuron shard for granularity > 1; zeros for neurons Drop-Upcycling
re-initialised), routers and zero-initialised shared experts get zeros.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import stat
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from .hf_formats import (HF_TARGETS, MLP_KINDS, TARGET_FORMATS, DenseSource, _flopwise_config, describe_source,
                         moe_names, target_config)
from .layerwise import LayerwiseLoadError, LayerwiseModel, layerwise_bytes
from .safetensors_io import (CheckpointReader, FileRange, ShardPlan, check_replaceable_folder, path_within, plan_shards,
                             publish_folder, publish_mode, rewrite_metadata, write_index, write_shard)

__all__ = ["UpcycleOptions", "UpcyclePlan", "UpcycleReport", "VerifyResult", "UpcycleWarning",
           "VerificationError", "resolve_layers", "plan_upcycle", "upcycle", "verify_upcycle"]

EXPERT_INITS = ("copy", "noise", "drop")
ROUTER_INITS = ("normal", "zeros", "orthogonal", "kmeans")
_DEFAULT_AUX_LOSS_COEF = 0.01  # Mixtral's and Qwen-MoE's router_aux_loss_coef, MoEConfig's default
_BLOCK = 64 * 2**20  # bytes copied per read/write when the kernel cannot copy file to file
_HASH_BUFFER = 8 * 2**20
# Files beside the weights that describe how to tokenize, chat and generate: they apply
# unchanged to the MoE, so they are copied.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "spiece.model",
                    "chat_template.jinja", "chat_template.json", "generation_config.json")
_TOKENIZER_DIRS = ("additional_chat_templates",)
# Licence, use policy and model card: they bind derivatives too, so they travel with the MoE.
# (Not the model card, README.md: it describes the dense model, its name and its evaluations.)
_TERMS_FILE = re.compile(r"(LICEN[CS]E|COPYING|NOTICE|USE_POLICY)([-_.][\w.-]*)?", re.IGNORECASE)


class UpcycleWarning(UserWarning):
    """An option makes the MoE differ from the dense model at initialisation."""


class VerificationError(RuntimeError):
    """``verify`` expected the MoE to reproduce the dense logits and it did not."""


@dataclass(frozen=True)
class UpcycleOptions:
    """What to build.

    Attributes:
        n_experts: experts per MoE layer (E); top_k: experts per token (k <= E).
        format: ``"flopwise"``, ``"mixtral"``, ``"qwen2_moe"`` or ``"qwen3_moe"`` (flopwise
            sources convert to flopwise; Llama, Mistral and Qwen2 to mixtral or qwen2_moe;
            Qwen3 to qwen3_moe).
        layers: ``"all"``, ``"every_other"`` (1, 3, 5, ...: the paper keeps the first block
            dense), ``"last:N"`` or a sequence of layer indices.
        expert_init: ``"copy"`` (the paper), ``"noise"`` (copy + N(0, (noise_std * std(W))^2)
            per matrix) or ``"drop"`` (Drop-Upcycling: per expert, a fraction ``drop_ratio``
            of its intermediate neurons re-drawn from N(mean(W), std(W)^2) of the original
            matrix, the same neurons in gate, up and down).
        granularity: G; each MLP is split into G neuron shards of F/G, expert e holds shard
            e mod G (E must be a multiple of G). Weights are scaled by Megatron-Core's
            (E/G * G^2 / k)^(1/3) without renormalisation, G^(1/3) with it (renormalised
            top-k weights sum to one instead of about k / E).
        router_init: ``"normal"`` (N(0, router_std^2)), ``"zeros"``, ``"orthogonal"`` (rows
            orthogonal, norm router_std * sqrt(D)) or ``"kmeans"`` (spherical k-means
            centroids of each layer's MLP inputs on ``calibration_text``, same row norm).
        calibration_text: path of a UTF-8 text file (kmeans only); tokenised with the source's
            tokenizer (a Hugging Face source must have one), as bytes for flopwise sources.
        renormalize: renormalise the top-k weights (qwen2_moe's and qwen3_moe's
            ``norm_topk_prob``, flopwise's ``moe_normalize_topk``; Mixtral always renormalises).
        shared_d_ff: shared expert size (qwen2_moe: 0, the default, stores an empty one;
            flopwise: ``moe_shared_d_ff``, 0 for none). A non-empty one gets a zero down
            projection (and qwen2_moe's a zero gate), so it adds exactly 0. A flopwise
            source that already has MoE layers keeps its own, so the option must then equal
            it (or be left at 0 with a source that has none).
        aux_loss_coef: load-balancing coefficient written to the config (HF formats'
            ``router_aux_loss_coef``, flopwise's ``moe_load_balance_coef``); None (default):
            0.01, or a flopwise source's own coefficient when it already has MoE layers. Such a
            source keeps its MoE settings for the new layers, so a given coefficient, and
            ``renormalize``, must then equal the source's.
        seed: base seed of every random draw.
        max_shard_bytes: output shard size limit (Hugging Face's default is 5 GB).
        optimizer: upcycle ``optimizer.safetensors`` when the source has one.
    """

    n_experts: int = 8
    top_k: int = 2
    format: str = "flopwise"
    layers: str | tuple[int, ...] = "all"
    expert_init: str = "copy"
    noise_std: float = 0.01
    drop_ratio: float = 0.5
    granularity: int = 1
    router_init: str = "normal"
    router_std: float = 0.02
    calibration_text: str | None = None
    renormalize: bool = True
    shared_d_ff: int = 0
    aux_loss_coef: float | None = None
    seed: int = 0
    max_shard_bytes: int = 5 * 10**9
    optimizer: bool = True

    def __post_init__(self):
        for name in ("n_experts", "top_k", "granularity", "max_shard_bytes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"option {name} must be a positive int, got {v!r}")
        if self.n_experts < self.top_k:
            raise ValueError(f"option n_experts (E={self.n_experts}) must be >= top_k (k={self.top_k})")
        if self.n_experts % self.granularity:
            raise ValueError(f"option n_experts ({self.n_experts}) must be a multiple of granularity ({self.granularity})")
        if self.format not in TARGET_FORMATS:
            raise ValueError(f"option format must be one of {TARGET_FORMATS}, got {self.format!r}")
        if self.expert_init not in EXPERT_INITS:
            raise ValueError(f"option expert_init must be one of {EXPERT_INITS}, got {self.expert_init!r}")
        if self.router_init not in ROUTER_INITS:
            raise ValueError(f"option router_init must be one of {ROUTER_INITS}, got {self.router_init!r}")
        if self.router_init == "kmeans" and not self.calibration_text:
            raise ValueError("option router_init='kmeans' needs calibration_text (a text file)")
        if self.calibration_text is not None and self.router_init != "kmeans":
            raise ValueError(f"option calibration_text is used only by router_init='kmeans', not "
                             f"{self.router_init!r}: drop it or choose kmeans")
        if not (0 < self.drop_ratio <= 1):
            raise ValueError(f"option drop_ratio must be in (0, 1], got {self.drop_ratio}")
        for name in ("noise_std", "router_std", "aux_loss_coef"):
            v = getattr(self, name)
            if v is None and name == "aux_loss_coef":
                continue
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"option {name} must be finite and >= 0, got {v}")
        if isinstance(self.shared_d_ff, bool) or not isinstance(self.shared_d_ff, int) or self.shared_d_ff < 0:
            raise ValueError(f"option shared_d_ff must be an int >= 0, got {self.shared_d_ff!r}")
        if self.shared_d_ff and self.format not in ("qwen2_moe", "flopwise"):
            raise ValueError("option shared_d_ff is only expressible in the qwen2_moe format (for Llama, Mistral and "
                             "Qwen2 sources) and the flopwise format; qwen3_moe, the format of Qwen3 sources, and "
                             "mixtral have no shared expert")
        if not self.renormalize and self.format == "mixtral":
            raise ValueError("option renormalize=False is not expressible in the mixtral format "
                             "(it always renormalises top-k weights)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"option seed must be an int, got {type(self.seed).__name__}")
        if not isinstance(self.layers, str):
            object.__setattr__(self, "layers", tuple(self.layers))


def resolve_layers(spec: str | Sequence[int], n_layers: int) -> list[int]:
    """Layer indices that become MoE: ``"all"``, ``"every_other"`` (1, 3, 5, ...),
    ``"last:N"``, ``"0,2,5"`` or a sequence of ints."""
    if isinstance(spec, str):
        if spec == "all":
            return list(range(n_layers))
        if spec == "every_other":
            if n_layers < 2:  # would select no layer: an "upcycle" that changes nothing
                raise ValueError(f"option layers='every_other' selects layers 1, 3, ...: none of the source's "
                                 f"{n_layers} layer(s); pick layers explicitly (e.g. 'all')")
            return list(range(1, n_layers, 2))
        m = re.fullmatch(r"last:(\d+)", spec)
        if m:
            n = int(m.group(1))
            if not 1 <= n <= n_layers:
                raise ValueError(f"option layers={spec!r}: n must be in [1, {n_layers}]")
            return list(range(n_layers - n, n_layers))
        if re.fullmatch(r"\d+(,\d+)*", spec):
            spec = [int(s) for s in spec.split(",")]
        else:
            raise ValueError(f"option layers must be 'all', 'every_other', 'last:N' or a list like '0,2,5', got {spec!r}")
    items = list(spec)
    if not items or any(isinstance(i, bool) or not isinstance(i, int) for i in items):
        raise ValueError(f"option layers must be a non-empty list of ints, got {spec!r}")
    bad = [i for i in items if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"option layers: index {bad[0]} out of range for {n_layers} layers")
    return sorted(set(items))


def _seed_for(seed: int, *parts) -> int:
    """A 63-bit seed from (seed, layer, expert, purpose): order-independent randomness."""
    h = hashlib.sha256("/".join(map(str, (seed, *parts))).encode()).digest()
    return int.from_bytes(h[:8], "little") & (2**63 - 1)


def _gen(seed: int, *parts) -> torch.Generator:
    return torch.Generator().manual_seed(_seed_for(seed, *parts))


@dataclass(frozen=True)
class _Recipe:
    """How one output tensor is made. kind: ``copy`` (of ``src``, rows optional),
    ``router`` (layer), ``expert`` (layer, mlp kind, experts: one per HF tensor, all E for a
    flopwise stacked tensor; ``transpose`` for flopwise), ``normal`` (seeded N(0, 0.02),
    ``zeros``; ``buffer``: module state (an MoE layer's ``expert_bias``), which has no
    optimizer moments."""

    kind: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    src: str = ""
    rows: tuple[int, int] | None = None
    layer: int = -1
    mlp: str = ""
    experts: tuple[int, ...] = ()
    transpose: bool = False
    buffer: bool = False  # module state, not a parameter: no optimizer moments


@dataclass
class UpcyclePlan:
    """Everything :func:`upcycle` will write, known from headers alone."""

    source: DenseSource
    options: UpcycleOptions
    moe_layers: list[int]
    expert_d_ff: int
    scale: float
    config: dict
    recipes: dict[str, _Recipe]
    shards: list[ShardPlan]
    optimizer_shards: list[ShardPlan]
    warnings: list[str]
    total_params: int
    active_params: int
    peak_bytes_estimate: int
    optimizer_reader: CheckpointReader | None = None

    @property
    def output_bytes(self) -> int:
        return sum(s.nbytes for s in self.shards) + sum(s.nbytes for s in self.optimizer_shards)

    @property
    def exact(self) -> bool:
        """Whether the MoE should reproduce the dense logits."""
        return not self.warnings

    @property
    def verify_bytes_estimate(self) -> int:
        """Memory :func:`verify_upcycle` needs to load both models in float32 at once."""
        return _verify_bytes(_params(self.source.reader), self.total_params)

    @property
    def verify_layerwise_bytes_estimate(self) -> int:
        """Memory :func:`verify_upcycle` needs layer by layer (``layerwise=True``): the
        larger of the two models' embeddings and head plus its largest layer."""
        moe = {n: math.prod(r.shape) for n, r in self.recipes.items()}
        return max(layerwise_bytes(_numels(self.source.reader)), layerwise_bytes(moe))

    def summary(self) -> dict:
        """JSON-ready description (what ``--dry-run`` prints)."""
        return {
            "source": self.source.folder, "source_arch": self.source.arch, "format": self.options.format,
            "moe_layers": self.moe_layers, "n_experts": self.options.n_experts, "top_k": self.options.top_k,
            "expert_d_ff": self.expert_d_ff, "output_bytes": self.output_bytes,
            "shards": [{"file": s.file, "bytes": s.nbytes, "tensors": len(s.tensors)}
                       for s in self.shards + self.optimizer_shards],
            "total_params": self.total_params, "active_params": self.active_params,
            "peak_bytes_estimate": self.peak_bytes_estimate, "verify_bytes_estimate": self.verify_bytes_estimate,
            "verify_layerwise_bytes_estimate": self.verify_layerwise_bytes_estimate,
            "exact": self.exact, "warnings": self.warnings,
        }


def _numels(reader: CheckpointReader) -> dict[str, int]:
    """Tensor name -> number of elements, from the headers."""
    return {n: i.numel for n, i in reader.infos.items()}


def _params(reader: CheckpointReader) -> int:
    return sum(_numels(reader).values())


def _verify_bytes(dense_params: int, moe_params: int) -> int:
    # Both models' parameters at 8 bytes each, twice float32: loading holds more than the
    # parameters (transformers 5.24 loading a bf16 Mixtral of 892M parameters keeps 6.1 GB
    # of anonymous memory, 1.7 times its 3.6 GB in float32; scripts/verify_memory.py), and
    # the probe's activations. Erring high only sends the check layer by layer.
    return 8 * (dense_params + moe_params) + 2**28


def _available_memory() -> int | None:
    """Bytes the kernel says a new allocation can take without swapping (Linux's MemAvailable);
    None where it is not known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _verify_layerwise(full: int, layerwise: int, what: str, choice: bool | None, refuse: bool = True,
                      advice: str = "upcycle without verify (every tensor is still produced from its recipe), then "
                                    "verify on a machine with more memory with "
                                    "flopwise.models.upcycle.verify_upcycle(source, output)") -> bool:
    """Whether to verify layer by layer: ``choice`` if given, else only where the
    two whole models would not fit in the memory available. With ``refuse``, a verification
    that cannot fit the chosen way raises ValueError before anything is loaded (the kernel
    would kill the process midway instead of raising)."""
    have = _available_memory()
    if choice is None:
        choice = have is not None and full > have and layerwise < full
    need = layerwise if choice else full
    if refuse and have is not None and need > have:
        how = ("layer by layer (the embeddings and head and one layer at a time) needs about "
               f"{need / 1e9:.1f} GB" if choice else
               f"loads the dense and the upcycled model in float32, about {need / 1e9:.1f} GB")
        raise ValueError(f"{what} {how}, and this machine has {have / 1e9:.1f} GB available; {advice}")
    return choice


def _check_compat(src: DenseSource, o: UpcycleOptions, moe_layers: list[int]) -> None:
    if src.family == "flopwise" and o.format != "flopwise":
        raise ValueError(f"option format={o.format!r}: flopwise sources convert to the flopwise format only")
    if src.family == "hf" and o.format not in HF_TARGETS[src.arch]:
        fits = " or ".join(repr(f) for f in HF_TARGETS[src.arch])
        if src.arch == "qwen3":
            why = ": qwen3's attention normalises each head's queries and keys (q_norm, k_norm), which only qwen3_moe has"
        elif o.format == "qwen3_moe":
            why = f": qwen3_moe's attention normalises each head's queries and keys (q_norm, k_norm), which {src.arch} lacks"
        else:
            why = ""
        raise ValueError(f"option format={o.format!r}: {src.arch} sources convert to {fits}{why}")
    if o.format == "mixtral":
        if moe_layers != list(range(src.n_layers)):
            raise ValueError("option layers: the mixtral format makes every layer MoE; "
                             "use format 'qwen2_moe' for a subset")
        if src.attn_bias:
            why = _qwen2_moe_bias_problem(src)
            raise ValueError(f"tensor {src.attn_bias[0]!r}: mixtral has no attention biases; "
                             + ("use format 'qwen2_moe'" if why is None else
                                f"qwen2_moe cannot hold them either ({why}): no target format holds this source's "
                                "attention biases"))
    if o.format == "qwen2_moe" and src.attn_bias:
        why = _qwen2_moe_bias_problem(src)
        if why is not None:
            raise ValueError(why)
    if src.d_ff % o.granularity:
        raise ValueError(f"option granularity ({o.granularity}) must divide the MLP hidden size {src.d_ff}")
    for i in moe_layers:
        if not src.mlp[i]:
            raise ValueError(f"option layers: layer {i} of the source is already MoE")
    if src.family == "flopwise" and any(not m for m in src.mlp):
        # One set of MoE fields in ModelConfig covers every MoE layer: the new layers must
        # match the existing ones (router and capacity factor are taken from the source).
        c, mc = src.config, _flopwise_config(src.config)
        if (c.get("moe_n_experts"), c.get("moe_top_k")) != (o.n_experts, o.top_k):
            raise ValueError("options n_experts/top_k must match the source's existing MoE layers "
                             f"({c.get('moe_n_experts')}/{c.get('moe_top_k')})")
        # (option, field, the source's value, the option's value that means "take the source's")
        for opt, field, want, unset in (("renormalize", "moe_normalize_topk", mc.moe_normalize_topk, None),
                                        ("aux_loss_coef", "moe_load_balance_coef", mc.moe_load_balance_coef, None),
                                        ("shared_d_ff", "moe_shared_d_ff", mc.moe_shared_ffn_dim, 0)):
            if getattr(o, opt) not in (want, unset):
                raise ValueError(f"option {opt}={getattr(o, opt)!r}: the source's existing MoE layers have "
                                 f"{field}={want!r}, which the new layers share; pass {opt}={want!r}")
        if src.d_ff // o.granularity != mc.moe_ffn_dim:
            raise ValueError(f"the source's existing MoE layers have experts of hidden size {mc.moe_ffn_dim} "
                             f"(moe_d_ff), the new ones would have {src.d_ff // o.granularity} (d_ff {src.d_ff} / "
                             f"option granularity {o.granularity}): they must match; choose the granularity "
                             "accordingly")


def _qwen2_moe_bias_problem(src: DenseSource) -> str | None:
    """Why qwen2_moe cannot hold the source's attention biases (None: it can). It has q, k
    and v biases in every layer, no o_proj bias."""
    o_bias = [n for n in src.attn_bias if n.endswith("o_proj.bias")]
    if o_bias:
        return f"tensor {o_bias[0]!r}: qwen2_moe has no o_proj bias"
    need = {f"model.layers.{i}.self_attn.{p}_proj.bias" for i in range(src.n_layers) for p in "qkv"}
    missing = sorted(need - set(src.attn_bias))
    if missing:
        return f"missing tensor {missing[0]!r}: qwen2_moe needs q/k/v biases in every layer or none"
    return None


def _source_warnings(src: DenseSource, moe_layers: list[int]) -> list[str]:
    if src.family != "flopwise":
        return []
    w = []
    if not all(src.mlp) and src.config.get("moe_router") == "expert_choice":
        w.append(f"the source's MoE layers use expert-choice routing, which the new MoE layers {moe_layers} share: "
                 "a token may be processed by more or fewer experts than top_k, so the MoE no longer reproduces "
                 "the dense model")
    scale = src.config.get("moe_route_scale", 1.0)
    if scale != 1.0:  # set in the source's config.json, whether or not it has MoE layers yet
        w.append(f"the source's config sets moe_route_scale={scale}, which the new MoE layers {moe_layers} take: "
                 f"they compute {scale} x the dense MLP, so the MoE no longer reproduces the dense model")
    return w


def _equality_warnings(o: UpcycleOptions) -> list[str]:
    w = []
    if o.expert_init == "drop" or (o.expert_init == "noise" and o.noise_std > 0):
        w.append(f"expert_init={o.expert_init!r} perturbs the experts: the MoE no longer reproduces the dense model")
    if o.granularity > 1:
        w.append(f"granularity={o.granularity} splits and rescales the MLP: the MoE no longer reproduces the dense model")
    if not o.renormalize:
        w.append("renormalize=False: the top-k weights sum to less than 1, so the MoE output is scaled down "
                 "relative to the dense model")
    return w


def plan_upcycle(src_folder: str, options: UpcycleOptions, *, dst_folder: str | None = None,
                 force: bool = False) -> UpcyclePlan:
    """Validate the source and the options and lay out the output (headers only). With
    ``dst_folder``, also check that :func:`upcycle` could publish there (with ``force``), as
    it will before writing anything."""
    if not isinstance(options, UpcycleOptions):
        raise TypeError(f"options must be UpcycleOptions, got {type(options).__name__}")
    o = options
    src = describe_source(src_folder)
    if dst_folder is not None:
        _check_destination(src_folder, dst_folder, force)
    moe_layers = resolve_layers(o.layers, src.n_layers)
    _check_compat(src, o, moe_layers)
    E, G, k = o.n_experts, o.granularity, o.top_k
    Fe, D = src.d_ff // G, src.d_model
    if G == 1:
        scale = 1.0
    elif o.renormalize:
        scale = G ** (1 / 3)
    else:
        scale = (E / G * G * G / k) ** (1 / 3)
    aux = o.aux_loss_coef
    if aux is None:
        aux = _DEFAULT_AUX_LOSS_COEF
        if src.family == "flopwise" and any(not m for m in src.mlp):  # already has MoE layers
            aux = _flopwise_config(src.config).moe_load_balance_coef
    config = target_config(o.format, src, n_experts=E, top_k=k, expert_d_ff=Fe, moe_layers=moe_layers,
                           renormalize=o.renormalize, shared_d_ff=o.shared_d_ff, aux_loss_coef=aux)
    info = src.reader.info
    recipes: dict[str, _Recipe] = {}

    def copy(name: str, rows=None, out: str | None = None):
        i = info(name)
        shape = i.shape if rows is None else (rows[1] - rows[0], *i.shape[1:])
        recipes[out or name] = _Recipe("copy", i.dtype, tuple(shape), src=name, rows=rows, buffer=name in src.buffers)

    for name in src.global_tensors:
        if not name.endswith(("norm.weight", "lm_head.weight", "head.weight")):
            copy(name)
    moe_set = set(moe_layers)
    expert_params = 0
    for i in range(src.n_layers):
        for name in src.layer_tensors[i]:
            copy(name)
        if i not in moe_set:
            for kind, (name, rows) in src.mlp[i].items():
                if name not in recipes:
                    copy(name)  # flopwise keeps gate and up in one tensor: copy it once
            continue
        names = moe_names(o.format, src, i, E)
        # Each expert matrix keeps its source matrix's dtype (they may differ within a
        # layer); new tensors take the gate's.
        dts = {kind: info(src.mlp[i][kind][0]).dtype for kind in MLP_KINDS}
        dt = dts["gate"]
        recipes[names["router"]] = _Recipe("router", dt, (E, D), layer=i)
        if o.format == "flopwise" and config.get("moe_bias_update_rate", 0) > 0:
            # auxiliary-loss-free balancing's selection bias (a buffer): zero, so routing starts unbiased
            recipes[src.mlp_prefix[i] + "expert_bias"] = _Recipe("zeros", torch.float32, (E,), layer=i, buffer=True)
        for kind in MLP_KINDS:
            kshape = (Fe, D) if kind != "down" else (D, Fe)
            if "stacked" in names:
                recipes[names["stacked"][kind]] = _Recipe("expert", dts[kind], (E, kshape[1], kshape[0]), layer=i,
                                                          mlp=kind, experts=tuple(range(E)), transpose=True)
            else:
                for e, n in enumerate(names["experts"][kind]):
                    recipes[n] = _Recipe("expert", dts[kind], kshape, layer=i, mlp=kind, experts=(e,))
        expert_params += 3 * D * Fe * E
        S = o.shared_d_ff
        if o.format == "flopwise":  # the config's shared expert (the source's, if it has MoE layers), or none
            S = _flopwise_config(config).moe_shared_ffn_dim
        if "shared" in names and (S or "gate_weight" in names["shared"]):  # qwen2_moe always has one
            sh = names["shared"]
            recipes[sh["gate"]] = _Recipe("normal" if S else "zeros", dt, (S, D), layer=i, mlp="shared_gate")
            recipes[sh["up"]] = _Recipe("normal" if S else "zeros", dt, (S, D), layer=i, mlp="shared_up")
            recipes[sh["down"]] = _Recipe("zeros", dt, (D, S), layer=i)
            if "gate_weight" in sh:
                recipes[sh["gate_weight"]] = _Recipe("zeros", dt, (1, D), layer=i)
    for name in src.global_tensors:
        if name.endswith(("norm.weight", "lm_head.weight", "head.weight")):
            copy(name)

    tensors = [(n, r.dtype, r.shape) for n, r in recipes.items()]
    shards = plan_shards(tensors, o.max_shard_bytes, stem="model")
    opt_reader, opt_shards = None, []
    if o.optimizer and _has_optimizer(src_folder):
        opt_reader = CheckpointReader(src_folder, stem="optimizer")
    if opt_reader is not None and not any(n.startswith("exp_avg.") for n in opt_reader.infos):
        opt_reader = None  # saved before the first optimizer step: no moments to upcycle yet
    if opt_reader is not None:
        _check_optimizer(opt_reader, recipes, src)
        opt = [(f"{m}.{n}", _moment_dtype(opt_reader, m, r, src), r.shape)
               for m in ("exp_avg", "exp_avg_sq") for n, r in recipes.items() if not r.buffer]
        if "step" in opt_reader:  # flopwise training checkpoints also keep the step as a tensor
            opt.insert(0, ("step", opt_reader.info("step").dtype, opt_reader.info("step").shape))
        opt_shards = plan_shards(opt, o.max_shard_bytes, stem="optimizer")
    total = sum(math.prod(r.shape) for r in recipes.values() if not r.buffer)
    active = total - (E - k) * 3 * D * Fe * len(moe_layers)
    # Working set: the largest source MLP matrix, its cached expert results (copy init: one
    # per neuron shard, i.e. one more matrix; a transposed copy for flopwise), float32
    # scratch for random inits, one copy block (pass-through bytes are copied file to file)
    # and the hashing buffer; with k-means routers, at least the layer-by-layer run of the
    # dense source that computes them.
    biggest = max((info(src.mlp[i][kk][0]).row_bytes * (src.d_ff if kk != "down" else info(src.mlp[i][kk][0]).shape[0])
                   for i in moe_layers for kk in MLP_KINDS), default=0)
    scratch = 0 if o.expert_init == "copy" and G == 1 else 3 * 4 * D * Fe
    peak = 2 * biggest + scratch + _BLOCK + _HASH_BUFFER
    if o.router_init == "kmeans":  # before writing: the dense source run a layer at a time
        peak = max(peak, layerwise_bytes(_numels(src.reader)))
    return UpcyclePlan(src, o, moe_layers, Fe, scale, config, recipes, shards, opt_shards,
                       _equality_warnings(o) + _source_warnings(src, moe_layers), total, active, peak, opt_reader)


def _has_optimizer(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, f))
               for f in ("optimizer.safetensors", "optimizer.safetensors.index.json"))


def _moment_dtype(reader: CheckpointReader, moment: str, r: _Recipe, src: DenseSource) -> torch.dtype:
    """Moments keep their stored dtype (often float32 beside bf16 weights); new tensors of an
    MoE layer (router, shared expert) take the dtype of that layer's MLP moments."""
    if r.kind == "copy":
        name = r.src
    else:  # an expert takes its own matrix's moments, new tensors the gate's
        name = src.mlp[r.layer][r.mlp if r.kind == "expert" else "gate"][0]
    return reader.info(f"{moment}.{name}").dtype


def _check_optimizer(reader: CheckpointReader, recipes: dict[str, _Recipe], src: DenseSource) -> None:
    """Every source parameter the recipes read needs both moments with its shape."""
    needed = {r.src for r in recipes.values() if r.kind == "copy" and not r.buffer}
    needed |= {src.mlp[r.layer][r.mlp][0] for r in recipes.values() if r.kind == "expert"}
    for m in ("exp_avg", "exp_avg_sq"):
        for name in sorted(needed):
            got = reader.info(f"{m}.{name}").shape  # raises "missing tensor 'exp_avg....'"
            if tuple(got) != tuple(src.reader.info(name).shape):
                raise ValueError(f"shape mismatch for tensor '{m}.{name}': {list(got)} vs the parameter's "
                                 f"{list(src.reader.info(name).shape)}")


def _dropped_neurons(o: UpcycleOptions, layer: int, e: int, Fe: int) -> torch.Tensor:
    """Drop-Upcycling: the intermediate neurons of expert ``e`` that are re-drawn (the same
    in its gate, up and down matrices)."""
    n = round(o.drop_ratio * Fe)
    return torch.randperm(Fe, generator=_gen(o.seed, layer, e, "drop"))[:n]


# ------------------------------------------------------------------ producing tensors
class _Producer:
    """Makes output tensors chunk by chunk. ``moments=True`` applies the recipes to Adam
    moments (``prefix`` ``exp_avg.`` / ``exp_avg_sq.``): no noise, no scaling, zeros for
    routers, shared experts and re-initialised neurons."""

    def __init__(self, plan: UpcyclePlan, routers: dict[int, torch.Tensor], reader=None, moments: bool = False):
        self.plan, self.o, self.routers = plan, plan.options, routers
        self.reader = reader or plan.source.reader
        self.moments = moments
        self._matrix_key = None
        self._matrix: torch.Tensor | None = None
        self._stats: tuple[float, float] | None = None
        self._expert_cache: dict = {}

    def __call__(self, out_name: str) -> Iterator[torch.Tensor]:
        prefix = ""
        if self.moments and out_name == "step":
            yield from self._copy("step", None)
            return
        if self.moments:
            prefix, out_name = out_name.split(".", 1)
            prefix += "."
        r = self.plan.recipes[out_name]
        if self.moments and r.kind in ("router", "zeros", "normal"):
            # New parameters have no history: their moments start at zero.
            yield torch.zeros(r.shape, dtype=_moment_dtype(self.reader, prefix[:-1], r, self.plan.source))
        elif r.kind == "copy":
            yield from self._copy(prefix + r.src, r.rows)
        elif r.kind == "router":
            yield self._router(r).to(r.dtype)
        elif r.kind == "zeros":
            yield torch.zeros(r.shape, dtype=r.dtype)
        elif r.kind == "normal":
            yield torch.empty(r.shape).normal_(0.0, 0.02, generator=_gen(self.o.seed, r.layer, r.mlp)).to(r.dtype)
        else:
            for e in r.experts:
                yield self._expert(prefix, r, e)

    def _copy(self, name: str, rows) -> Iterator[FileRange]:
        # Unchanged bytes never enter user memory: the kernel copies them file to file.
        info = self.reader.info(name)
        if rows is None:
            yield FileRange(info.file, info.start, info.nbytes, info.dtype)
        else:
            yield FileRange(info.file, info.start + rows[0] * info.row_bytes, (rows[1] - rows[0]) * info.row_bytes,
                            info.dtype)

    def _router(self, r: _Recipe) -> torch.Tensor:
        o, (E, D) = self.o, r.shape
        if o.router_init == "zeros":
            return torch.zeros(E, D)
        if o.router_init == "kmeans":
            return self.routers[r.layer]
        g = _gen(o.seed, r.layer, "router")
        if o.router_init == "orthogonal":
            w = torch.empty(E, D)
            torch.nn.init.orthogonal_(w, gain=o.router_std * math.sqrt(D), generator=g)
            return w
        return torch.empty(E, D).normal_(0.0, o.router_std, generator=g)

    def _load_matrix(self, prefix: str, layer: int, kind: str) -> torch.Tensor:
        key = (prefix, layer, kind)
        if self._matrix_key != key:
            self._matrix = self._expert_cache = None  # free before loading the next one
            name, rows = self.plan.source.mlp[layer][kind]
            self._matrix = self.reader.get(prefix + name, rows)
            self._matrix_key, self._stats, self._expert_cache = key, None, {}
        return self._matrix

    def _matrix_stats(self) -> tuple[float, float]:
        """Mean and std of the whole original matrix, accumulated in float64 by rows."""
        if self._stats is None:  # the statistics --verify checks the experts against
            self._stats = _mean_std(self._matrix)
        return self._stats

    def _dropped(self, layer: int, e: int, Fe: int) -> torch.Tensor:
        return _dropped_neurons(self.o, layer, e, Fe)

    def _expert(self, prefix: str, r: _Recipe, e: int) -> torch.Tensor | FileRange:
        o, plan = self.o, self.plan
        exact_copy = (o.granularity == 1 and not r.transpose
                      and (o.expert_init == "copy" or (self.moments and o.expert_init == "noise")))
        if exact_copy:  # the expert is the source matrix, byte for byte
            name, rows = plan.source.mlp[r.layer][r.mlp]
            return next(self._copy(prefix + name, rows))
        W = self._load_matrix(prefix, r.layer, r.mlp)
        Fe, g = plan.expert_d_ff, e % o.granularity
        deterministic = o.expert_init == "copy" or (self.moments and o.expert_init == "noise")
        if deterministic and g in self._expert_cache:
            return self._expert_cache[g]
        down = r.mlp == "down"
        x = W[:, g * Fe:(g + 1) * Fe] if down else W[g * Fe:(g + 1) * Fe]
        if self.moments:
            if o.expert_init == "drop":
                x = x.clone()
                idx = self._dropped(r.layer, e, Fe)
                if down:
                    x[:, idx] = 0
                else:
                    x[idx] = 0
        else:
            changed = o.expert_init != "copy" or plan.scale != 1.0
            if changed:
                x = x.float()
                if o.expert_init == "drop":
                    mean, std = self._matrix_stats()
                    idx = self._dropped(r.layer, e, Fe)
                    gen = _gen(o.seed, r.layer, e, r.mlp, "drop-init")
                    shape = (x.shape[0], len(idx)) if down else (len(idx), x.shape[1])
                    fresh = torch.empty(shape).normal_(mean, std, generator=gen)
                    x = x.clone()
                    if down:
                        x[:, idx] = fresh
                    else:
                        x[idx] = fresh
                elif o.expert_init == "noise":
                    _, std = self._matrix_stats()
                    gen = _gen(o.seed, r.layer, e, r.mlp, "noise")
                    x = x + torch.empty(x.shape).normal_(0.0, o.noise_std * std, generator=gen)
                if plan.scale != 1.0:
                    x = x * plan.scale
                x = x.to(r.dtype)
        if r.transpose:
            x = x.t()
        x = x.contiguous()
        if deterministic:
            self._expert_cache[g] = x
        return x


# ------------------------------------------------------------------ k-means router init
def _calibration_tokens(src: DenseSource, path: str, max_tokens: int = 4096) -> torch.Tensor:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"option calibration_text: cannot read {path}: {exc}") from None
    vocab = src.config["vocab_size"]
    if src.family == "flopwise":  # byte-level, as flopwise's own models are
        ids = [b % vocab for b in text.encode("utf-8")]
        return torch.tensor(ids[:max_tokens], dtype=torch.long)
    # Token ids of another vocabulary would give the routers centroids of meaningless inputs.
    if not (any(os.path.isfile(os.path.join(src.folder, f)) for f in ("tokenizer.json", "tokenizer.model"))
            or all(os.path.isfile(os.path.join(src.folder, f)) for f in ("vocab.json", "merges.txt"))):
        raise ValueError(f"option calibration_text: the source {src.folder} has no tokenizer (tokenizer.json, "
                         "tokenizer.model, or vocab.json with merges.txt) to turn the text into its token ids; copy "
                         "the model's tokenizer files into the source folder, or choose another router_init")
    from transformers import AutoTokenizer

    try:
        ids = AutoTokenizer.from_pretrained(src.folder).encode(text)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ValueError(f"option calibration_text: cannot load the tokenizer of {src.folder}: "
                         f"{type(exc).__name__}: {exc}") from None
    ids = ids[:max_tokens]
    if any(not 0 <= i < vocab for i in ids):
        raise ValueError(f"option calibration_text: the tokenizer in {src.folder} gives token id "
                         f"{max(ids)} outside the model's vocab_size {vocab}: tokenizer and model do not match")
    return torch.tensor(ids, dtype=torch.long)


def _load_model(folder: str, family: str, what: str, error: type[Exception] = VerificationError):
    """The model in ``folder`` in float32, as flopwise or transformers loads it. A load that
    fails, or leaves a parameter uninitialised (missing), unused (unexpected) or of another
    shape (mismatched), raises ``error`` naming ``what`` ("the upcycled model")."""
    if family == "flopwise":
        from .hf_formats import load_flopwise

        try:
            return load_flopwise(folder, dtype=torch.float32).eval()
        except (ValueError, OSError, RuntimeError) as exc:
            raise error(f"{what} ({folder}) does not load: {exc}") from None
    from transformers import AutoModelForCausalLM

    try:
        with warnings.catch_warnings():
            # transformers' init of a zero-size tensor (an MoE layer without a shared expert, say)
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
            # mismatched shapes are reported in the loading info (below) rather than raised
            # with a message that points at a log
            model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True,
                                                               ignore_mismatched_sizes=True)
    except (ImportError, MemoryError):
        raise
    except Exception as exc:  # transformers raises many kinds; whatever it is, the model does not load
        text = " ".join(str(exc).split())
        raise error(f"transformers cannot load {what} ({folder}): {type(exc).__name__}: "
                    f"{text[:500] + ' ...' if len(text) > 500 else text}") from exc
    bad = [f"{k.replace('_', ' ')} {_some(list(info.get(k) or ()))}"
           for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs") if info.get(k)]
    if bad:
        raise error(f"transformers loads {what} ({folder}) with " + "; ".join(bad))
    return model.eval()


def _some(items: list, n: int = 3) -> str:
    """``'a', 'b', 'c' and 4 more``."""
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(repr(i) for i in items[:n]) + more


def _spherical_kmeans(x: torch.Tensor, k: int, gen: torch.Generator, iters: int = 25) -> torch.Tensor:
    """Unit-norm centroids ``[k, D]`` of the rows of ``x`` by cosine similarity (k-means++
    seeding), so that ``argmax(centroids @ x)`` is the nearest centroid, as a router scores."""
    x = torch.nn.functional.normalize(x.double(), dim=1)
    first = int(torch.randint(len(x), (1,), generator=gen))
    cents = [x[first]]
    for _ in range(1, k):
        d = (1 - (x @ torch.stack(cents).t()).max(1).values).clamp_min(0)
        p = d / d.sum() if d.sum() > 0 else torch.full_like(d, 1 / len(d))
        cents.append(x[int(torch.multinomial(p, 1, generator=gen))])
    c = torch.stack(cents)
    for _ in range(iters):
        assign = (x @ c.t()).argmax(1)
        new = torch.zeros_like(c).index_add_(0, assign, x)
        empty = new.norm(dim=1) == 0
        new[empty] = c[empty]  # an empty cluster keeps its centroid
        c = torch.nn.functional.normalize(new, dim=1)
    return c.float()


def _kmeans_routers(plan: UpcyclePlan) -> dict[int, torch.Tensor]:
    """Per MoE layer, router rows = k-means centroids of that layer's MLP inputs on the
    calibration text (in a MoD layer, those of the tokens its training-time top-k routes).
    The dense model runs a layer at a time (:class:`~flopwise.models.layerwise.LayerwiseModel`;
    memory: its embeddings and head, one layer, and one layer's MLP inputs), up to the last
    MoE layer."""
    src, o = plan.source, plan.options
    tokens = _calibration_tokens(src, o.calibration_text)
    if len(tokens) < o.n_experts:
        raise ValueError(f"option calibration_text: {len(tokens)} tokens, need at least n_experts={o.n_experts}")
    # LayerwiseLoadError is a ValueError: a source that does not load is bad input
    model = LayerwiseModel(src.folder, src.family, what="the dense source")
    seq = min(256, src.config.get("max_seq_len") or src.config.get("max_position_embeddings") or 256)
    n = (len(tokens) // seq) * seq or len(tokens)
    batch = tokens[:n].reshape(-1, min(seq, n))
    out = {}
    h = model.embed(batch)
    model.release()
    for i in range(max(plan.moe_layers) + 1):
        captured: list | None = [] if i in plan.moe_layers else None
        # MoD layers route their top k tokens, as in training: those are the rows the MoE will see
        h = model.layer(i, h, mlp_inputs=captured, mod_topk=True)
        if captured is not None:
            x = torch.cat(captured) if captured else h.new_zeros(0, h.shape[-1])
            if len(x) < o.n_experts:
                raise ValueError(f"option calibration_text: the text gives layer {i}'s MLP {len(x)} tokens, need at "
                                 f"least n_experts={o.n_experts}: give a longer text")
            c = _spherical_kmeans(x, o.n_experts, _gen(o.seed, i, "kmeans"))
            out[i] = c * (o.router_std * math.sqrt(src.d_model))
    return out


# ------------------------------------------------------------------ writing
def _sha256(path: str, stop: threading.Event | None = None) -> str:
    """Hex digest of the file; "" as soon as ``stop`` is set (the upcycle failed, so hashing
    the rest of a large source would only delay the error)."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(_HASH_BUFFER)
        view = memoryview(buf)
        while n := f.readinto(buf):
            if stop is not None and stop.is_set():
                return ""
            h.update(view[:n])
    return h.hexdigest()


def _source_files(plan: UpcyclePlan) -> list[str]:
    files = list(plan.source.reader.files)
    if plan.optimizer_reader is not None:
        files += plan.optimizer_reader.files
    return files


def _provenance(plan: UpcyclePlan, hashes: dict[str, str], inputs: dict[str, str]) -> dict:
    """``inputs``: sha256 of the source's config.json and of the calibration text."""
    from flopwise import __version__

    return {"method": "sparse_upcycling", "flopwise_version": __version__, "source_arch": plan.source.arch,
            "options": asdict(plan.options), "seed": plan.options.seed, "moe_layers": plan.moe_layers,
            "scale": plan.scale, "source_files": hashes, **inputs}


def _metadata(prov: dict) -> dict[str, str]:
    return {"format": "pt", "flopwise_upcycle": json.dumps(prov, sort_keys=True)}


@dataclass
class VerifyResult:
    """What :func:`verify_upcycle` found. Dense vs MoE logits on a probe batch (float32); the
    settings outside the MLPs that must agree (``config_diffs``: attention, positions, sizes;
    a short probe cannot show a different sliding window or long-context rope scaling); the
    stored tensors against their definition (``tensor_errors``: a probe routes its tokens to
    some experts only, so each expert is compared with its source MLP directly). ``checks``
    says what was checked, in words."""

    max_abs_diff: float
    kl: float  # mean over tokens of KL(dense || moe), nats
    expected_equal: bool
    tolerance: float
    config_diffs: list[str] = field(default_factory=list)
    tensor_errors: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)
    layerwise: bool = False  # whether the models ran a layer at a time
    layer_diffs: list[float] = field(default_factory=list)  # layer by layer: max |hidden difference| after each

    @property
    def passed(self) -> bool:
        return (not self.config_diffs and not self.tensor_errors
                and (not self.expected_equal or self.max_abs_diff <= self.tolerance))


@dataclass
class UpcycleReport:
    """What :func:`upcycle` wrote."""

    destination: str
    files: list[str]
    output_bytes: int
    seconds: float
    warnings: list[str]
    verify: VerifyResult | None = None
    provenance: dict = field(default_factory=dict)


def verify_upcycle(src_folder: str, moe_folder: str, *, expected_equal: bool | None = None,
                   tolerance: float = 1e-4, batch: int = 2, seq_len: int = 16, seed: int = 0,
                   options: UpcycleOptions | None = None, check_memory: bool = True,
                   layerwise: bool | None = None) -> VerifyResult:
    """Check an upcycled model against its dense source.

    * Tensors (when the options are known: ``options``, else those recorded in the MoE's
      ``upcycle.json``): exactly the planned names, shapes and dtypes; copied tensors equal
      to the source's; every expert matrix against its source MLP by the expert init's
      definition (copy: the matrix or neuron shard, times the granularity scale; noise:
      within 8 noise standard deviations of it; drop: the kept neurons equal, the re-drawn
      ones those the seed names, within 8 standard deviations of the matrix mean); a
      shared expert's down projection and gate zero; routers finite.
    * Loading: both models load (flopwise or transformers) with no missing, unexpected or
      mismatched tensor; a failure raises VerificationError.
    * Configs: the settings outside the MLPs agree.
    * Logits: the same random tokens through both, in float32: max |difference| and mean
      KL(dense || moe); ``expected_equal`` (default: whether the options promise the dense
      logits) makes a difference above ``tolerance`` a failure.

    Memory: both whole models in float32 (:attr:`UpcyclePlan.verify_bytes_estimate`), or,
    with ``layerwise=True``, one model's embeddings and head plus one layer at a time
    (:attr:`UpcyclePlan.verify_layerwise_bytes_estimate`; :class:`~flopwise.models.layerwise.
    LayerwiseModel` runs each checkpoint a layer at a time, and transformers loads each
    layer). Both compute the same logits. ``layerwise=None`` (default) goes layer by layer
    only where the whole models would not fit in the memory available (Linux's
    MemAvailable). Where the chosen way does not fit either, ValueError is raised before
    anything is loaded (``check_memory=False`` skips that refusal, not the choice). Layer
    by layer, the result also holds each layer's max |hidden-state difference|
    (``layer_diffs``).
    """
    src = describe_source(src_folder)
    if layerwise is not None and not isinstance(layerwise, bool):
        raise TypeError(f"layerwise must be None, True or False, got {layerwise!r}")
    try:
        moe_numels = _numels(CheckpointReader(moe_folder))
    except (ValueError, OSError):  # unreadable headers: the loading check below reports them
        moe_numels = None
    if moe_numels is not None:
        full = _verify_bytes(_params(src.reader), sum(moe_numels.values()))
        by_layer = max(layerwise_bytes(_numels(src.reader)), layerwise_bytes(moe_numels))
        layerwise = _verify_layerwise(full, by_layer, "verify_upcycle", layerwise, refuse=check_memory,
                                      advice="verify on a machine with more memory (check_memory=False skips "
                                             "this refusal)")
    layerwise = bool(layerwise)
    checks: list[str] = []
    recorded = options is None
    if recorded:
        options = _recorded_options(moe_folder)
    if options is None:
        tensor_errors = []
        checks.append("tensors: not checked (no upcycle.json with the options in the MoE folder)")
        expected_equal = True if expected_equal is None else expected_equal
    else:
        try:
            plan = plan_upcycle(src_folder, options)
        except ValueError as exc:
            if not recorded:
                raise
            raise VerificationError(f"the options recorded in {moe_folder}/upcycle.json do not apply to the "
                                    f"source {src_folder}: {exc}") from None
        tensor_errors = _check_tensors(plan, moe_folder, checks)
        expected_equal = plan.exact if expected_equal is None else expected_equal
    vocab = src.config["vocab_size"]
    tokens = torch.randint(vocab, (batch, seq_len), generator=torch.Generator().manual_seed(seed))
    layer_diffs: list[float] = []
    try:
        if layerwise:
            dense = _open_layerwise(src_folder, src.family, "the dense source")
            moe = _open_layerwise(moe_folder, src.family, "the upcycled model")
            a, b, layer_diffs = _layerwise_logits(dense, moe, tokens)
        else:
            dense = _load_model(src_folder, src.family, "the dense source")
            moe = _load_model(moe_folder, src.family, "the upcycled model")
            with torch.no_grad():
                a = dense(tokens).logits.float()
                b = moe(tokens).logits.float()
    except VerificationError as exc:
        if tensor_errors:
            raise VerificationError(f"{exc}; and its tensors: {'; '.join(tensor_errors)}") from None
        raise
    checks.append("loading: both models load with no missing, unexpected or mismatched tensor"
                  + (" (layer by layer, each layer as the whole model loads it)" if layerwise else ""))
    diffs = _config_diffs(src.family, dense, moe)
    checks.append("configs: the settings outside the MLPs agree" if not diffs
                  else f"configs: {len(diffs)} setting(s) outside the MLPs differ")
    la, lb = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    kl = max(0.0, float((la.exp() * (la - lb)).sum(-1).mean()))  # >= 0; rounding can dip below
    diff = float((a - b).abs().max())
    checks.append(f"logits: max |difference| {diff:.3g} on {batch}x{seq_len} random tokens"
                  + (", computed layer by layer" if layerwise else "")
                  + (f" (the dense logits are expected: tolerance {tolerance:g})" if expected_equal
                     else " (not compared: the options change the MoE's function)"))
    if layer_diffs:
        worst = max(range(len(layer_diffs)), key=layer_diffs.__getitem__)
        checks.append(f"layers: max |hidden-state difference| {layer_diffs[worst]:.3g}, after layer {worst}"
                      + (f"; first above the tolerance after layer "
                         f"{next(i for i, d in enumerate(layer_diffs) if d > tolerance)}"
                         if expected_equal and layer_diffs[worst] > tolerance else ""))
    return VerifyResult(diff, kl, expected_equal, tolerance, diffs, tensor_errors, checks, layerwise, layer_diffs)


def _open_layerwise(folder: str, family: str, what: str) -> LayerwiseModel:
    try:
        return LayerwiseModel(folder, family, what=what)
    except LayerwiseLoadError as exc:
        raise VerificationError(str(exc)) from None


def _layerwise_logits(dense: LayerwiseModel, moe: LayerwiseModel, tokens: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Both models' logits, one model and one layer at a time, and after each layer the max
    |difference| of the hidden states."""
    try:
        hidden = []
        h = dense.embed(tokens)
        for i in range(dense.n_layers):
            h = dense.layer(i, h)
            hidden.append(h)
        a = dense.logits(h)
        dense.release()
        h = moe.embed(tokens)
        diffs = []
        for i in range(moe.n_layers):
            h = moe.layer(i, h)
            if i < len(hidden):
                diffs.append(float((h - hidden[i]).abs().max()))
        b = moe.logits(h)
        moe.release()
    except LayerwiseLoadError as exc:
        raise VerificationError(str(exc)) from None
    return a, b, diffs


def _recorded_options(moe_folder: str) -> UpcycleOptions | None:
    """The options in the MoE folder's ``upcycle.json``; None when there are none."""
    try:
        with open(os.path.join(moe_folder, "upcycle.json")) as f:
            recorded = json.load(f).get("options")
        return UpcycleOptions(**recorded) if isinstance(recorded, dict) else None
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def _check_tensors(plan: UpcyclePlan, moe_folder: str, checks: list[str]) -> list[str]:
    """The stored tensors against the plan's recipes (see :func:`verify_upcycle`); returns
    the problems found and appends what was checked to ``checks``."""
    try:
        reader = CheckpointReader(moe_folder)
    except (ValueError, OSError) as exc:
        return [f"the MoE's weights cannot be read: {exc}"]
    o, src = plan.options, plan.source
    errors: list[str] = []
    have = {n: (i.dtype, tuple(i.shape)) for n, i in reader.infos.items()}
    want = {n: (r.dtype, tuple(r.shape)) for n, r in plan.recipes.items()}
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    wrong = [n for n in want if n in have and have[n] != want[n]]
    if missing:
        errors.append(f"missing tensors {_some(missing)}")
    if extra:
        errors.append(f"unexpected tensors {_some(extra)}")
    if wrong:
        errors.append(f"{len(wrong)} tensor(s) of another dtype or shape than planned: "
                      + "; ".join(f"{n!r} is {have[n][0]} {list(have[n][1])}, planned {want[n][0]} {list(want[n][1])}"
                                  for n in wrong[:3]))
    checks.append(f"tensors: the {len(want)} planned tensors, with their shapes and dtypes, and no others")
    counts = {"copy": 0, "expert": 0, "new": 0}
    bad_experts: list[str] = []
    matrix_key, W, stats = None, None, None
    # experts grouped by source matrix, so that each is read once
    order = sorted((n for n in want if n in have and n not in wrong),
                   key=lambda n: (plan.recipes[n].kind == "expert", plan.recipes[n].layer, plan.recipes[n].mlp, n))
    for name in order:
        r = plan.recipes[name]
        try:
            got = reader.get(name)
        except (ValueError, OSError) as exc:
            errors.append(f"tensor {name!r} cannot be read: {exc}")
            continue
        if r.kind == "copy":
            counts["copy"] += 1
            if not torch.equal(got, src.reader.get(r.src, r.rows)):
                errors.append(f"tensor {name!r} differs from the source's {r.src!r}")
            continue
        if r.kind != "expert":
            counts["new"] += 1
            if r.kind == "zeros" and torch.count_nonzero(got):
                errors.append(f"tensor {name!r} should be zero (it keeps the model's function) and is not")
            elif not torch.isfinite(got).all():
                errors.append(f"tensor {name!r} holds non-finite values")
            continue
        if matrix_key != (r.layer, r.mlp):
            W = stats = None  # free before loading the next one
            mlp_name, rows = src.mlp[r.layer][r.mlp]
            W, matrix_key = src.reader.get(mlp_name, rows).float(), (r.layer, r.mlp)
            stats = _mean_std(W)
        parts = [got[j].t() for j in range(len(r.experts))] if r.transpose else [got]
        for e, x in zip(r.experts, parts):
            counts["expert"] += 1
            why = _expert_problem(plan, r, e, x, W, stats)
            if why:
                bad_experts.append(f"expert {e} of layer {r.layer} ({r.mlp}): {why}")
    if bad_experts:
        n = len(bad_experts)
        errors.append(f"{n} expert {'matrix does' if n == 1 else 'matrices do'} not match their definition: "
                      + "; ".join(bad_experts[:3]) + (f"; and {n - 3} more" if n > 3 else ""))
    checks.append(f"copied tensors: each of {counts['copy']} equal to the source's")
    shard = f"neuron shard (granularity {o.granularity})" if o.granularity > 1 else "matrix"
    scaled = f" times {plan.scale:.6g}" if plan.scale != 1.0 else ""
    if o.expert_init == "copy" or (o.expert_init == "noise" and o.noise_std == 0):
        how = f"equal to its source MLP {shard}{scaled}"
    elif o.expert_init == "noise":
        how = f"within 8 noise standard deviations of its source MLP {shard}{scaled}, and perturbed"
    else:
        how = (f"with its kept neurons equal to its source MLP {shard}{scaled} and the re-drawn ones (a "
               f"fraction {o.drop_ratio:g}, as the seed names them, the same in gate, up and down) within 8 "
               "standard deviations of the matrix mean")
    checks.append(f"experts: each of {counts['expert']} expert matrices {how}")
    checks.append(f"new tensors ({counts['new']}): routers finite"
                  + ("; shared experts add zero (zero down projection and gate)" if o.format == "qwen2_moe" else
                     "; shared experts add zero (zero down projection)" if o.format == "flopwise" and o.shared_d_ff
                     else ""))
    if plan.optimizer_shards:
        checks.append("optimizer moments: not checked")
    return errors


def _mean_std(W: torch.Tensor) -> tuple[float, float]:
    """Mean and (population) std of a matrix, accumulated in float64 by rows."""
    s = s2 = 0.0
    for a in range(0, W.shape[0], 1024):
        blk = W[a:a + 1024].double()
        s += float(blk.sum())
        s2 += float(blk.square().sum())
    mean = s / max(W.numel(), 1)
    return mean, math.sqrt(max(s2 / max(W.numel(), 1) - mean * mean, 0.0))


def _expert_problem(plan: UpcyclePlan, r: _Recipe, e: int, got: torch.Tensor, W: torch.Tensor,
                    stats: tuple[float, float]) -> str:
    """Why one stored expert matrix (canonical orientation) is not what its init defines, or
    "" when it is. Rounding to the stored dtype moves a value by up to eps of its size (and
    subnormals by their spacing)."""
    o = plan.options
    Fe, g, down = plan.expert_d_ff, e % o.granularity, r.mlp == "down"
    x = (W[:, g * Fe:(g + 1) * Fe] if down else W[g * Fe:(g + 1) * Fe]) * plan.scale
    info = torch.finfo(got.dtype)

    def rounding(v):
        return info.eps * (v.abs() + info.tiny)

    got = got.float()
    d = got - x
    mean, std = stats
    if o.expert_init == "copy" or (o.expert_init == "noise" and o.noise_std == 0):
        bad = d.abs() > rounding(x)
        return f"{int(bad.sum())} of {bad.numel()} values differ from the source MLP" if bad.any() else ""
    if o.expert_init == "noise":
        sigma = o.noise_std * std * plan.scale
        bad = d.abs() > 8 * sigma + rounding(x.abs() + 8 * sigma)
        if bad.any():
            return f"{int(bad.sum())} of {bad.numel()} values lie further than 8 noise std ({sigma:.3g}) from the source"
        # the noise must be there too, where it is larger than rounding
        if d.numel() >= 256 and sigma > 8 * info.eps * float(x.abs().mean()) and float(d.std()) < 0.5 * sigma:
            return f"carries noise of std {float(d.std()):.3g}, expected {sigma:.3g}"
        return ""
    dropped = torch.zeros(Fe, dtype=torch.bool)
    dropped[_dropped_neurons(o, r.layer, e, Fe)] = True
    mask = dropped.expand_as(d) if down else dropped[:, None].expand_as(d)
    bad = (d.abs() > rounding(x)) & ~mask
    if bad.any():
        return f"{int(bad.sum())} values of kept neurons differ from the source MLP"
    fresh = got[mask]
    if fresh.numel() and std > 0 and float((d[mask] == 0).float().mean()) > 0.5:
        return "its re-drawn neurons keep their source values"
    s = plan.scale
    far = (fresh - mean * s).abs() > 8 * std * s + rounding(fresh)
    if far.any():
        return f"{int(far.sum())} values of re-drawn neurons lie further than 8 std ({std * s:.3g}) from the mean"
    if fresh.numel() >= 256 and float(fresh.std()) < 0.5 * std * s:
        return f"re-drawn neurons have std {float(fresh.std()):.3g}, expected {std * s:.3g}"
    return ""


# Settings of a Hugging Face config that upcycling must carry over unchanged.
_HF_SAME = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_parameters", "rope_theta", "rope_scaling",
            "tie_word_embeddings", "hidden_act")


def _attention_windows(cfg) -> list:
    """Per layer, the sliding window the model applies (None: full attention)."""
    window = getattr(cfg, "sliding_window", None) or None
    types = getattr(cfg, "layer_types", None)
    if types is None:  # llama, mistral, mixtral: one setting for every layer
        return [window] * cfg.num_hidden_layers
    return [window if t == "sliding_attention" else None for t in types]


def _config_diffs(family: str, dense, moe) -> list[str]:
    """Differences between the loaded models' configs outside the MLPs, as
    ``"field: dense value != moe value"``."""
    if family == "flopwise":
        a, b = asdict(dense.cfg), asdict(moe.cfg)
        keys = [k for k in a if k != "mlp" and not k.startswith("moe_")]
        return [f"{k}: {a[k]!r} != {b.get(k)!r}" for k in keys if a[k] != b.get(k)]
    diffs = []
    for k in _HF_SAME:
        va, vb = getattr(dense.config, k, None), getattr(moe.config, k, None)
        if k == "head_dim":  # some configs derive it instead of storing it
            va = va or dense.config.hidden_size // dense.config.num_attention_heads
            vb = vb or moe.config.hidden_size // moe.config.num_attention_heads
        if va != vb:
            diffs.append(f"{k}: {va!r} != {vb!r}")
    wa, wb = _attention_windows(dense.config), _attention_windows(moe.config)
    if wa != wb:
        diffs.append(f"sliding window per layer: {wa} != {wb}")
    return diffs


def _write_all(plan: UpcyclePlan, tmp: str, routers, metadata, progress) -> list[tuple[str, ShardPlan, dict]]:
    """Write every shard (and index) into ``tmp``; returns (file, plan, metadata) per shard."""
    written = []
    jobs = [(plan.shards, _Producer(plan, routers), "model")]
    if plan.optimizer_shards:
        jobs.append((plan.optimizer_shards, _Producer(plan, routers, plan.optimizer_reader, moments=True), "optimizer"))
    total = sum(len(s.tensors) for shards, _, _ in jobs for s in shards)
    done = [0]

    def tick(name, nbytes):
        done[0] += 1
        if progress is not None:
            progress(done[0], total, name)

    for shards, producer, stem in jobs:
        meta = dict(metadata)
        if stem == "optimizer" and "step" in plan.optimizer_reader.metadata:
            meta["step"] = plan.optimizer_reader.metadata["step"]
        for s in shards:
            write_shard(os.path.join(tmp, s.file), s, producer, meta, fsync=False, on_tensor=tick)
            written.append((s.file, s, meta))
        if len(shards) > 1:
            write_index(os.path.join(tmp, f"{stem}.safetensors.index.json"), shards)
    return written


def upcycle(src_folder: str, dst_folder: str, options: UpcycleOptions, *, force: bool = False,
            verify: bool = False, progress: Callable[[int, int, str], None] | None = None,
            fsync: bool = True, verify_layerwise: bool | None = None) -> UpcycleReport:
    """Convert the dense checkpoint in ``src_folder`` into an MoE checkpoint at ``dst_folder``.

    Validation happens first, from headers; nothing is created if it fails. The output is
    written into a temporary folder beside ``dst_folder`` and renamed onto it at the end, so
    ``dst_folder`` either does not change or holds the complete result. An existing
    ``dst_folder`` is replaced only with ``force=True``, and only when it is an empty folder
    or an unchanged earlier upcycle output: ``upcycle.json`` records the size and
    modification time of every file the upcycle wrote, and a folder holding any other file,
    or one of those rewritten since (a fine-tuned model saved into it), is refused. A
    destination that is, contains or lies inside the source (symlinks resolved) is refused.
    With ``verify=True`` the output is checked before the rename (:func:`verify_upcycle`:
    tensors against their definition, loading, configs, logits); on any problem
    VerificationError is raised and nothing is published. Verification runs the two models
    a layer at a time where they would not fit in memory whole, or as ``verify_layerwise``
    says (see :func:`verify_upcycle`); where neither fits, ValueError is raised before
    anything is written. ``progress(done, total, tensor_name)`` is called after each tensor.

    Example::

        opts = UpcycleOptions(n_experts=8, top_k=2, format="mixtral")
        report = upcycle("llama-dense/", "llama-8x/", opts, verify=True)
        report.verify.max_abs_diff    # <= 1e-4 with copy init
    """
    t0 = time.perf_counter()
    if verify_layerwise is not None and not isinstance(verify_layerwise, bool):
        raise TypeError(f"verify_layerwise must be None, True or False, got {verify_layerwise!r}")
    if verify_layerwise is not None and not verify:
        raise ValueError(f"verify_layerwise={verify_layerwise} says how to verify, and verify is False: pass "
                         "verify=True, or leave verify_layerwise out")
    plan = plan_upcycle(src_folder, options)
    dst = _check_destination(src_folder, dst_folder, force)
    layerwise = None
    if verify:
        layerwise = _verify_layerwise(plan.verify_bytes_estimate, plan.verify_layerwise_bytes_estimate,
                                      "option verify: verification", verify_layerwise)
    parent = os.path.dirname(dst)
    state = _trainer_state(plan, src_folder)
    for w in plan.warnings:
        warnings.warn(w, UpcycleWarning, stacklevel=2)
    routers = _kmeans_routers(plan) if options.router_init == "kmeans" else {}
    # Source hashes go into every shard's header, but hashing (~0.5 GB/s) would double the
    # time if done first: a thread hashes while the shards are written with fixed-length
    # placeholders, which are then patched in place. It starts only once the temporary
    # folder exists, so a destination that cannot be written fails at once.
    sources = _source_files(plan)
    names = [os.path.basename(f) for f in sources]
    try:
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.tmp-", dir=parent)
    except OSError as exc:  # name the folder the user gave, not the temporary one
        raise type(exc)(exc.errno, f"cannot create the destination {dst_folder} in {parent}: "
                                   f"{exc.strerror}") from None
    stop = threading.Event()
    pool = ThreadPoolExecutor(max_workers=1)
    pending = {}
    try:
        pending = {name: pool.submit(_sha256, f, stop) for name, f in zip(names, sources)}
        inputs = {"source_config_sha256": _sha256(os.path.join(src_folder, "config.json"))}
        if options.calibration_text is not None:
            inputs["calibration_text_sha256"] = _sha256(options.calibration_text)
        placeholder = _metadata(_provenance(plan, {name: "0" * 64 for name in names}, inputs))
        shards = _write_all(plan, tmp, routers, placeholder, progress)
        prov = _provenance(plan, {name: fut.result() for name, fut in pending.items()}, inputs)
        for file, shard, meta in shards:
            rewrite_metadata(os.path.join(tmp, file), shard, {**meta, **_metadata(prov)})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(plan.config, f, indent=2)
            f.write("\n")
        if state is not None:
            with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
                json.dump(state, f, indent=1)
                f.write("\n")
        carried = [n for n in sorted(os.listdir(src_folder)) if n in _TOKENIZER_FILES or _TERMS_FILE.fullmatch(n)]
        for name in carried:
            if os.path.isfile(os.path.join(src_folder, name)):
                shutil.copyfile(os.path.join(src_folder, name), os.path.join(tmp, name))
        for name in _TOKENIZER_DIRS:
            if os.path.isdir(os.path.join(src_folder, name)):
                shutil.copytree(os.path.join(src_folder, name), os.path.join(tmp, name))
        # Every file as written, for --force to tell an unchanged output from one that files
        # were saved into since (a fine-tuned model, say).
        record = _output_record(tmp)
        with open(os.path.join(tmp, "upcycle.json"), "w") as f:
            json.dump({**prov, "output_files": record}, f, indent=2, sort_keys=True)
            f.write("\n")
        files = sorted([*record, "upcycle.json"])
        if fsync:  # data on disk before the rename makes it visible
            _fsync_all(tmp, files)
        result = None
        if verify:
            result = verify_upcycle(src_folder, tmp, expected_equal=plan.exact, options=options, check_memory=False,
                                    layerwise=layerwise)
            if result.config_diffs:
                raise VerificationError("the upcycled model's config differs from the source outside the MLPs: "
                                        + "; ".join(result.config_diffs) + "; nothing was written")
            if result.tensor_errors:
                raise VerificationError("the upcycled tensors do not match their definition: "
                                        + "; ".join(result.tensor_errors) + "; nothing was written")
            if not result.passed:
                raise VerificationError(f"the upcycled model does not reproduce the dense logits: max |diff| "
                                        f"{result.max_abs_diff:.3g} > {result.tolerance:g}; nothing was written")
        publish_mode(tmp)
        # the destination may have changed during a long upcycle: check again just before replacing it
        _check_destination(src_folder, dst_folder, force)
        publish_folder(tmp, dst, fsync=fsync)
    except BaseException:
        stop.set()
        for fut in pending.values():
            fut.cancel()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        pool.shutdown(wait=True)
    return UpcycleReport(dst_folder, files, plan.output_bytes, time.perf_counter() - t0, plan.warnings, result, prov)


def _check_destination(src_folder: str, dst_folder: str, force: bool) -> str:
    """The absolute destination path, after refusing destinations that would destroy the
    source or unrelated files when replaced. Paths are compared with symlinks resolved."""
    dst = os.path.abspath(dst_folder)
    src_real, dst_real = os.path.realpath(src_folder), os.path.realpath(dst)
    if path_within(dst_real, src_real) or path_within(src_real, dst_real):
        what = "is" if src_real == dst_real else ("is inside" if path_within(dst_real, src_real) else "contains")
        raise ValueError(f"destination {dst_folder} {what} the source {src_folder} (symlinks resolved: "
                         f"{dst_real} vs {src_real}); choose a destination outside the source")
    if os.path.lexists(dst):
        if not force:
            raise FileExistsError(f"destination {dst_folder} exists; pass force=True (--force) to replace it")
        _check_replaceable_output(dst, dst_folder)
    parent = os.path.dirname(dst)
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"destination's parent folder does not exist: {parent}")
    return dst


def _output_record(folder: str) -> dict[str, dict[str, int]]:
    """Size and modification time (ns) of every file under ``folder`` (relative paths with
    ``/``), as ``upcycle.json`` records them. Any rewrite of a file sets a new
    modification time: a model saved with the same shapes has the same sizes, never the
    same times. Cheap where hashes of the output would mean reading all of it again."""
    out = {}
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for name in sorted(names):
            path = os.path.join(root, name)
            st = os.lstat(path)
            out[os.path.relpath(path, folder).replace(os.sep, "/")] = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    out.pop("upcycle.json", None)
    return out


_FORCE_ADVICE = ("--force replaces only an empty folder or an unchanged earlier upcycle output: move it away or remove "
                 "it yourself, or choose another destination")


def _check_replaceable_output(dst: str, dst_folder: str) -> None:
    """FileExistsError unless ``dst`` is an empty folder or an upcycle output whose files are
    all, unchanged, those its ``upcycle.json`` records (symlinks never are)."""
    name = f"destination {dst_folder}"
    record = None
    if os.path.isdir(dst) and not os.path.islink(dst) and os.path.isfile(os.path.join(dst, "upcycle.json")):
        try:
            with open(os.path.join(dst, "upcycle.json")) as f:
                record = json.load(f).get("output_files")
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            record = None
        if not (isinstance(record, dict) and all(isinstance(v, dict) for v in record.values())):
            raise FileExistsError(f"{name} holds an upcycle.json without the record of the files the upcycle wrote "
                                  "(an output of an older flopwise, or an edited one), so files saved into it since "
                                  f"cannot be told apart; {_FORCE_ADVICE}")
    top = {p.split("/")[0] for p in record or ()}
    check_replaceable_folder(dst, lambda e: e == "upcycle.json" or e in top, folders=top, required=("upcycle.json",),
                             kind="an upcycle output", name=name, advice=_FORCE_ADVICE)
    if record is None:
        return  # an empty folder
    changed = []
    for root, dirs, names in os.walk(dst):
        dirs.sort()
        for entry in sorted(names) + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            path = os.path.join(root, entry)
            rel = os.path.relpath(path, dst).replace(os.sep, "/")
            if rel == "upcycle.json":
                continue
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode) or record.get(rel) != {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}:
                changed.append(rel)
    if changed:
        raise FileExistsError(f"{name} is an upcycle output, but {_some(changed)} "
                              f"{'was' if len(changed) == 1 else 'were'} saved or changed there since the upcycle "
                              "wrote it, or cannot be confirmed unchanged (a fine-tuned model saved into the "
                              "folder; a copy that did not keep the files' times, such as cp -r); "
                              f"{_FORCE_ADVICE}")


def _trainer_state(plan: UpcyclePlan, src_folder: str) -> dict | None:
    """The source's trainer_state.json for the output, or None when it does not carry over.

    With the upcycled Adam moments the MoE resumes the dense run where it stopped: step,
    learning-rate schedule, data position and RNG states. Its ``out_dir`` is cleared: it
    names the dense run's folder, and a resumed MoE must never write its checkpoints over
    the dense ones (:meth:`~flopwise.models.train.Trainer.resume` then writes under the
    upcycled folder unless given another ``out_dir``)."""
    if plan.options.format != "flopwise" or plan.optimizer_reader is None:
        return None
    path = os.path.join(src_folder, "trainer_state.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            state = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    if not isinstance(state, dict) or not isinstance(state.get("train_config", {}), dict):
        raise ValueError(f"corrupt {path}: expected a JSON object with a 'train_config' object")
    if "train_config" in state:
        state["train_config"] = {**state["train_config"], "out_dir": None}
    state["model_config"] = plan.config  # the MoE's, which a resume checks config.json against
    return state


def _fsync_all(folder: str, files: list[str]) -> None:
    for name in files:
        if os.path.isdir(os.path.join(folder, name)):
            continue
        fd = os.open(os.path.join(folder, name), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
