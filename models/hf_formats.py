"""Checkpoint naming schemes that upcycling reads and writes.

Sources (dense, SwiGLU MLPs): Hugging Face ``llama``, ``mistral``, ``qwen2`` and ``qwen3`` folders
(``config.json`` + ``model.safetensors`` or shards with ``model.safetensors.index.json``)
and flopwise folders (``config.json`` = a :class:`~flopwise.models.ModelConfig` as JSON +
``model.safetensors``). :func:`describe_source` validates names and shapes from the
headers alone and returns a :class:`DenseSource`.

Targets: Hugging Face ``mixtral`` (every layer MoE, per-expert
``block_sparse_moe.experts.N.w1/w2/w3``), ``qwen2_moe`` (layer subsets via
``decoder_sparse_step`` / ``mlp_only_layers``, a shared expert), ``qwen3_moe`` (the same
layer subsets, no shared expert; per-head q/k norms, so only for ``qwen3`` sources) and
``flopwise`` (stacked
``w_gate/w_up [E, D, F]``, ``w_down [E, F, D]``). :func:`moe_names` gives a target's
tensor names, :func:`target_config` its ``config.json``.

Canonical MLP orientation used between the two: ``gate``, ``up``: ``[F, D]`` (out, in, as
``nn.Linear`` stores them), ``down``: ``[D, F]``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field

from .safetensors_io import CheckpointReader

__all__ = ["SOURCE_ARCHS", "TARGET_FORMATS", "DenseSource", "describe_source", "moe_names", "target_config",
           "load_flopwise", "save_flopwise"]

SOURCE_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "flopwise")
TARGET_FORMATS = ("flopwise", "mixtral", "qwen2_moe", "qwen3_moe")
# The Hugging Face formats each source architecture can be written in: Qwen3's attention
# normalises each head's queries and keys (q_norm, k_norm), which only Qwen3-MoE has, and
# Qwen3-MoE has them in every layer, which the other sources cannot fill.
HF_TARGETS = {"llama": ("mixtral", "qwen2_moe"), "mistral": ("mixtral", "qwen2_moe"),
              "qwen2": ("mixtral", "qwen2_moe"), "qwen3": ("qwen3_moe",)}
MLP_KINDS = ("gate", "up", "down")
_LAYER_RE = re.compile(r"^(?:model\.)?layers\.(\d+)\.")
# Buffers some older checkpoints carry; recomputed by the model, never needed.
_IGNORED = re.compile(r"\.rotary_emb\.inv_freq$")


@dataclass
class DenseSource:
    """A validated dense checkpoint.

    Attributes:
        arch: ``llama``, ``mistral``, ``qwen2``, ``qwen3`` or ``flopwise``.
        config: the raw ``config.json``.
        reader: the tensors (headers read, data not).
        n_layers, d_model, d_ff: sizes.
        mlp: per layer, ``{kind: (tensor name, rows or None)}`` in canonical orientation for
            HF; flopwise keeps gate and up stacked in ``w_in`` (rows ``[0, F)`` and
            ``[F, 2F)``) and ``w_out`` = down (both nn.Linear, so the same orientation).
        mlp_prefix: per layer, the name prefix of its MLP module (``...mlp.``).
        layer_tensors: per layer, its non-MLP tensor names; ``global_tensors``: the rest.
        attn_bias: names of attention bias tensors (only some targets can hold them).
        hf_config: Hugging Face sources: ``config`` as transformers reads it, every key the
            MoE targets read filled in with the source architecture's default when
            config.json leaves it out, ``num_key_value_heads`` and ``head_dim`` resolved.
    """

    arch: str
    folder: str
    config: dict
    reader: CheckpointReader
    n_layers: int
    d_model: int
    d_ff: int
    mlp: list[dict[str, tuple[str, tuple[int, int] | None]]]
    mlp_prefix: list[str]
    layer_tensors: list[list[str]]
    global_tensors: list[str]
    attn_bias: list[str] = field(default_factory=list)
    hf_config: dict = field(default_factory=dict)
    buffers: frozenset = frozenset()

    @property
    def family(self) -> str:
        return "flopwise" if self.arch == "flopwise" else "hf"


def _load_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"source checkpoint folder not found: {folder}")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"no config.json in {folder}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"corrupt {path}: {exc}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"corrupt {path}: not a JSON object")
    return cfg


def _int(cfg: dict, key: str, where: str) -> int:
    v = cfg.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{where}: config field {key!r} must be a positive int, got {v!r}")
    return v


def _check_shape(reader: CheckpointReader, name: str, shape: tuple[int, ...]) -> None:
    got = reader.info(name).shape  # raises "missing tensor ..."
    if tuple(got) != tuple(shape):
        raise ValueError(f"shape mismatch for tensor {name!r}: expected {list(shape)} from config.json, got {list(got)}")


def describe_source(folder: str) -> DenseSource:
    """Read ``config.json`` and the safetensors headers of a dense checkpoint and check every
    expected tensor exists with the shape the config implies. Raises ValueError naming the
    architecture, tensor or config field on any mismatch, and for unexpected tensors."""
    cfg = _load_config(folder)
    if "model_type" in cfg:
        mt = cfg["model_type"]
        if mt not in HF_TARGETS:
            raise ValueError(f"unknown architecture model_type={mt!r} in {folder}/config.json; "
                             "upcycling reads llama, mistral, qwen2, qwen3 and flopwise checkpoints")
        return _describe_hf(folder, cfg, mt)
    if {"d_model", "n_layers", "vocab_size"} <= set(cfg):
        return _describe_flopwise(folder, cfg)
    raise ValueError(f"unknown architecture in {folder}/config.json: no 'model_type' (Hugging Face) "
                     "and no flopwise ModelConfig fields")


# What transformers' config class of each source architecture (LlamaConfig, MistralConfig,
# Qwen2Config, Qwen3Config) assumes for a key config.json leaves out, for every key the MoE targets read:
# their own defaults differ (Mixtral: rope_theta 1e6, rms_norm_eps 1e-5, 8 KV heads), so a
# missing key is written out with the source's value. None for num_key_value_heads and
# head_dim: derived (num_attention_heads; hidden_size // num_attention_heads). The tests
# check this table against transformers' classes.
_HF_DEFAULTS = {
    "llama": dict(num_key_value_heads=None, head_dim=None, hidden_act="silu", max_position_embeddings=2048,
                  initializer_range=0.02, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
                  attention_dropout=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=None, use_cache=True),
    "mistral": dict(num_key_value_heads=8, head_dim=None, hidden_act="silu", max_position_embeddings=131072,
                    initializer_range=0.02, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
                    attention_dropout=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=None, use_cache=True,
                    sliding_window=4096),
    "qwen2": dict(num_key_value_heads=32, head_dim=None, hidden_act="silu", max_position_embeddings=32768,
                  initializer_range=0.02, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
                  attention_dropout=0.0, bos_token_id=None, eos_token_id=None, pad_token_id=None, use_cache=True,
                  use_sliding_window=False, sliding_window=4096, max_window_layers=28),
    # Qwen3 stores head_dim (128 unless told), it does not derive it
    "qwen3": dict(num_key_value_heads=32, head_dim=128, hidden_act="silu", max_position_embeddings=32768,
                  initializer_range=0.02, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
                  attention_dropout=0.0, bos_token_id=None, eos_token_id=None, pad_token_id=None, use_cache=True,
                  use_sliding_window=False, sliding_window=4096, max_window_layers=28),
}
# Names of the SiLU activation in transformers' ACT2FN.
_SILU = ("silu", "swish")


def _rope_theta(cfg: dict, default: float) -> float:
    """The RoPE base transformers uses: ``rope_scaling`` (legacy) or ``rope_parameters``
    (v5) when it has one, else ``rope_theta``, else the architecture's default."""
    params = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    if isinstance(params, dict) and params.get("rope_theta") is not None:
        return params["rope_theta"]
    return cfg["rope_theta"] if cfg.get("rope_theta") is not None else default


def _hf_config(cfg: dict, arch: str, where: str) -> dict:
    """``cfg`` with the architecture's defaults filled in and the derived sizes resolved."""
    defaults = _HF_DEFAULTS[arch]
    out = {**{k: v for k, v in defaults.items() if k != "rope_theta"}, **cfg}
    out["rope_theta"] = _rope_theta(cfg, defaults["rope_theta"])
    H, D = cfg["num_attention_heads"], cfg["hidden_size"]
    for key, derived in (("num_key_value_heads", H), ("head_dim", D // H)):
        if out[key] is None:
            out[key] = derived
        elif isinstance(out[key], bool) or not isinstance(out[key], int) or out[key] < 1:
            raise ValueError(f"{where}: config field {key!r} must be a positive int, got {out[key]!r}")
    if H % out["num_key_value_heads"]:
        raise ValueError(f"{where}: num_attention_heads ({H}) must be a multiple of num_key_value_heads "
                         f"({out['num_key_value_heads']}"
                         + (f", {arch}'s default when config.json leaves it out" if "num_key_value_heads" not in cfg
                            else "") + ")")
    return out


def _describe_hf(folder: str, raw: dict, arch: str) -> DenseSource:
    where = f"{folder}/config.json"
    L, D, F = _int(raw, "num_hidden_layers", where), _int(raw, "hidden_size", where), _int(raw, "intermediate_size", where)
    V, H = _int(raw, "vocab_size", where), _int(raw, "num_attention_heads", where)
    cfg = _hf_config(raw, arch, where)
    KV, hd = cfg["num_key_value_heads"], cfg["head_dim"]
    if cfg["hidden_act"] not in _SILU:
        raise ValueError(f"hidden_act={cfg['hidden_act']!r}: upcycling supports SwiGLU (silu) MLPs only")
    if cfg.get("mlp_bias"):
        raise ValueError("mlp_bias=True: MoE targets have no MLP biases (option mlp_bias of the source config)")
    _refuse_pickles(folder)
    reader = CheckpointReader(folder)
    # Which attention projections have a bias, as transformers builds the dense model: a
    # bias tensor it would not load (or one it would initialise at random) makes the MoE,
    # which would load it, compute something else.
    flag = raw.get("attention_bias", False)
    if arch in ("llama", "qwen3") and not isinstance(flag, bool):
        raise ValueError(f"{where}: config field 'attention_bias' must be true or false, got {flag!r}")
    if arch in ("llama", "qwen3"):
        biased, why = "qkvo" if flag else "", f"attention_bias={str(flag).lower()} in config.json"
    else:
        biased, why = {"mistral": ("", "mistral's attention has no biases"),
                       "qwen2": ("qkv", "qwen2's attention has q, k and v biases, no o bias")}[arch]
    tied = bool(cfg.get("tie_word_embeddings", False))
    expect: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if not tied or "lm_head.weight" in reader:
        expect["lm_head.weight"] = (V, D)
    mlp, prefixes, layer_tensors, bias = [], [], [], []
    for i in range(L):
        p = f"model.layers.{i}."
        own = {p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
               p + "self_attn.q_proj.weight": (H * hd, D), p + "self_attn.k_proj.weight": (KV * hd, D),
               p + "self_attn.v_proj.weight": (KV * hd, D), p + "self_attn.o_proj.weight": (D, H * hd)}
        if arch == "qwen3":  # RMSNorm of each head's queries and keys
            own.update({p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)})
        for proj, n in (("q", H * hd), ("k", KV * hd), ("v", KV * hd), ("o", D)):
            name = p + f"self_attn.{proj}_proj.bias"
            if (name in reader) != (proj in biased):
                raise ValueError(f"{'unexpected' if name in reader else 'missing'} tensor {name!r} in a {arch} "
                                 f"checkpoint ({why}): transformers would "
                                 + ("not load it" if name in reader else "initialise it at random"))
            if name in reader:
                own[name] = (n,)
                bias.append(name)
        expect.update(own)
        layer_tensors.append(sorted(own))
        m = {"gate": (p + "mlp.gate_proj.weight", None), "up": (p + "mlp.up_proj.weight", None),
             "down": (p + "mlp.down_proj.weight", None)}
        for kind, (name, _) in m.items():
            expect[name] = (F, D) if kind != "down" else (D, F)
        mlp.append(m)
        prefixes.append(p + "mlp.")
    implied = [k for k in ("num_key_value_heads", "head_dim") if raw.get(k) is None]
    for name, shape in expect.items():
        try:
            _check_shape(reader, name, shape)
        except ValueError as exc:
            if not implied or "shape mismatch" not in str(exc):
                raise
            raise ValueError(f"{exc}; config.json leaves out {' and '.join(implied)}, which {arch} (as transformers "
                             f"reads it) takes as {' and '.join(str(cfg[k]) for k in implied)}") from None
    extra = [n for n in reader.infos if n not in expect and not _IGNORED.search(n)]
    if extra:
        raise ValueError(f"unexpected tensor {extra[0]!r} in a {arch} checkpoint ({len(extra)} unexpected in all)")
    glob = [n for n in expect if not _LAYER_RE.match(n)]
    return DenseSource(arch, folder, raw, reader, L, D, F, mlp, prefixes, layer_tensors, glob, bias, cfg)


def _refuse_pickles(folder: str) -> None:
    """A folder with PyTorch pickles (``pytorch_model.bin``) and no safetensors: say how to
    convert it (pickles are not read: loading one runs code, and it cannot be streamed)."""
    names = os.listdir(folder)
    if any(n in ("model.safetensors", "model.safetensors.index.json") for n in names):
        return
    bins = sorted(n for n in names if re.fullmatch(r"pytorch_model(-\d+-of-\d+)?\.bin(\.index\.json)?", n))
    if bins:
        raise ValueError(f"{folder} holds {bins[0]}: PyTorch pickle checkpoints (.bin) are not supported, only "
                         "safetensors; convert it first, e.g. AutoModelForCausalLM.from_pretrained(src)"
                         ".save_pretrained(out, safe_serialization=True) with transformers")


def _flopwise_config(cfg: dict):
    from .transformer import ModelConfig

    names = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(cfg) - names)
    if unknown:
        raise ValueError(f"unknown ModelConfig field {unknown[0]!r} in a flopwise config.json")
    return ModelConfig(**cfg)


def _describe_flopwise(folder: str, raw: dict) -> DenseSource:
    mc = _flopwise_config(raw)
    reader = CheckpointReader(folder)
    D, F, L = mc.d_model, mc.ffn_dim, mc.n_layers
    mlp, prefixes, layer_tensors = [], [], []
    for i in range(L):
        blk = f"layers.{i}." + ("block." if mc.routing[i] == "mod" else "")
        p = blk + "mlp."
        prefixes.append(p)
        if mc.mlp[i] == "dense":
            _check_shape(reader, p + "w_in.weight", (2 * F, D))
            _check_shape(reader, p + "w_out.weight", (D, F))
            mlp.append({"gate": (p + "w_in.weight", (0, F)), "up": (p + "w_in.weight", (F, 2 * F)),
                        "down": (p + "w_out.weight", None)})
        else:
            mlp.append({})  # already MoE: carried over unchanged
        own = sorted(n for n in reader.infos if n.startswith(f"layers.{i}.")
                     and not (mc.mlp[i] == "dense" and n.startswith(p)))
        layer_tensors.append(own)
    _check_shape(reader, "embed.weight", (mc.padded_vocab_size, D))
    _check_shape(reader, "norm.weight", (D,))
    if not mc.tie_embeddings:
        _check_shape(reader, "head.weight", (mc.padded_vocab_size, D))
    buffers = _check_flopwise_tensors(reader, mc)
    glob = sorted(n for n in reader.infos if not _LAYER_RE.match(n))
    return DenseSource("flopwise", folder, raw, reader, L, D, F, mlp, prefixes, layer_tensors, glob,
                       buffers=buffers)


def _check_flopwise_tensors(reader: CheckpointReader, mc) -> frozenset:
    """Every stored tensor must be one the model has, with its shape, and none may be
    missing: a stray tensor would otherwise be copied into (or dropped from) the output
    unnoticed. The expected set comes from the model itself, built without memory.
    Returns the names of the stored buffers (state, not parameters: no optimizer moments),
    such as an MoE layer's ``expert_bias``."""
    import torch

    from .transformer import Transformer

    with torch.device("meta"):
        model = Transformer(mc)
    expected = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    for name, info in reader.infos.items():
        if name not in expected:
            raise ValueError(f"unexpected tensor {name!r} in a flopwise checkpoint ({reader.path}): "
                             "the ModelConfig in config.json has no such parameter")
        if tuple(info.shape) != expected[name]:
            raise ValueError(f"shape mismatch for tensor {name!r}: expected {list(expected[name])} from "
                             f"config.json, got {list(info.shape)}")
    for name in expected:
        if name not in reader and not (mc.tie_embeddings and name == "head.weight"):
            raise ValueError(f"missing tensor {name!r} in {reader.path}")
    return frozenset(n for n in expected if n not in params)


def moe_names(fmt: str, src: DenseSource, layer: int, n_experts: int) -> dict:
    """Target tensor names of one MoE layer: ``router``; ``experts[kind][e]`` (HF
    per-expert) or ``stacked[kind]`` (flopwise); ``shared`` (qwen2_moe: its shared expert's
    ``gate/up/down`` and ``gate_weight``; flopwise: ``gate/up/down``, when there is one)."""
    i = layer
    if fmt == "mixtral":
        p = f"model.layers.{i}.block_sparse_moe."
        w = {"gate": "w1", "up": "w3", "down": "w2"}
        return {"router": p + "gate.weight",
                "experts": {k: [p + f"experts.{e}.{w[k]}.weight" for e in range(n_experts)] for k in MLP_KINDS}}
    if fmt == "qwen2_moe":
        p = f"model.layers.{i}.mlp."
        return {"router": p + "gate.weight",
                "experts": {k: [p + f"experts.{e}.{k}_proj.weight" for e in range(n_experts)] for k in MLP_KINDS},
                "shared": {**{k: p + f"shared_expert.{k}_proj.weight" for k in MLP_KINDS},
                           "gate_weight": p + "shared_expert_gate.weight"}}
    if fmt == "qwen3_moe":
        p = f"model.layers.{i}.mlp."
        return {"router": p + "gate.weight",
                "experts": {k: [p + f"experts.{e}.{k}_proj.weight" for e in range(n_experts)] for k in MLP_KINDS}}
    if fmt == "flopwise":
        p = src.mlp_prefix[i]
        return {"router": p + "router.weight", "stacked": {k: p + f"w_{k}" for k in MLP_KINDS},
                "shared": {k: p + f"shared.{k}.weight" for k in MLP_KINDS}}
    raise ValueError(f"format must be one of {TARGET_FORMATS}, got {fmt!r}")


# Source config keys that mean the same thing in the MoE targets.
_COMMON = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
           "head_dim", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
           "rope_theta", "rope_scaling", "rope_parameters", "tie_word_embeddings", "attention_dropout",
           "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "dtype", "use_cache")


def target_config(fmt: str, src: DenseSource, *, n_experts: int, top_k: int, expert_d_ff: int,
                  moe_layers: list[int], renormalize: bool, shared_d_ff: int, aux_loss_coef: float) -> dict:
    """``config.json`` of the upcycled model."""
    if fmt == "flopwise":
        mc = _flopwise_config(src.config)
        mlp = tuple("moe" if i in moe_layers else m for i, m in enumerate(mc.mlp))
        if "moe" in mc.mlp:
            # Existing MoE layers keep their router, capacity factor and expert size (one
            # set of MoE fields covers every MoE layer; the compatibility check made the new
            # layers agree with them).
            new = mc.replace(mlp=mlp)
        else:
            try:
                new = mc.replace(mlp=mlp, moe_n_experts=n_experts, moe_top_k=top_k, moe_router="token_choice",
                                 moe_d_ff=None if expert_d_ff == mc.ffn_dim else expert_d_ff,
                                 moe_normalize_topk=renormalize, moe_load_balance_coef=aux_loss_coef,
                                 moe_shared_d_ff=shared_d_ff)
            except (TypeError, ValueError) as exc:  # e.g. a group limit set for another expert count
                raise ValueError(f"the new MoE layers take the source config's other moe_* fields, and with "
                                 f"n_experts={n_experts}, top_k={top_k} they do not fit: {exc} (edit them in the "
                                 "source's config.json)") from None
            if new.moe_shared_ffn_dim != shared_d_ff:
                raise ValueError(f"option shared_d_ff={shared_d_ff} cannot be stored: the config pads it to "
                                 f"{new.moe_shared_ffn_dim} (pad_to_multiple_of={mc.pad_to_multiple_of}); choose a "
                                 "multiple of it")
        if new.moe_ffn_dim != expert_d_ff:
            raise ValueError(f"expert hidden size {expert_d_ff} (d_ff / option granularity) cannot be stored: the "
                             f"config's experts have {new.moe_ffn_dim} (moe_d_ff rounded up to a multiple of "
                             f"pad_to_multiple_of={mc.pad_to_multiple_of}); choose another granularity")
        return json.loads(json.dumps(dataclasses.asdict(new)))
    # Every key the target reads is written, a missing one with the source architecture's
    # default: left out, the target class would fill in its own.
    c = src.hf_config
    out = {k: c[k] for k in _COMMON if k in c}
    L = src.n_layers
    if fmt == "mixtral":
        window = _one_window(src, fmt, "; use format 'qwen2_moe'")
        out.update(model_type="mixtral", architectures=["MixtralForCausalLM"], intermediate_size=expert_d_ff,
                   num_local_experts=n_experts, num_experts_per_tok=top_k, router_aux_loss_coef=aux_loss_coef,
                   output_router_logits=False, router_jitter_noise=0.0, sliding_window=window)
        return out
    # qwen2_moe, qwen3_moe: layer i is MoE when (i + 1) % decoder_sparse_step == 0 and i is
    # not in mlp_only_layers
    sparse = sorted(moe_layers)
    if sparse == list(range(L)):
        step, only = 1, []
    elif sparse == list(range(1, L, 2)):
        step, only = 2, []
    else:
        step, only = 1, [i for i in range(L) if i not in sparse]
    out.update(intermediate_size=src.d_ff, moe_intermediate_size=expert_d_ff, num_experts=n_experts,
               num_experts_per_tok=top_k, decoder_sparse_step=step, mlp_only_layers=only, norm_topk_prob=renormalize,
               router_aux_loss_coef=aux_loss_coef, output_router_logits=False)
    if fmt == "qwen3_moe":
        window = _one_window(src, fmt)
        out.update(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], attention_bias=bool(src.attn_bias),
                   use_sliding_window=window is not None, sliding_window=window)
        if window is not None:  # transformers before 4.53 slides from layer max_window_layers on (default 28)
            out["max_window_layers"] = 0
        return out
    out.update(model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"],
               shared_expert_intermediate_size=shared_d_ff, qkv_bias=bool(src.attn_bias))
    # layer_types is always written: without it Qwen2MoeConfig derives the attention of each
    # layer by its own rule (sliding on even layers below max_window_layers), which is not
    # Qwen2's (sliding from max_window_layers on) nor Mistral's (every layer).
    types = source_layer_types(src)
    if "sliding_attention" in types:
        out.update(use_sliding_window=True, sliding_window=c["sliding_window"], layer_types=types,
                   max_window_layers=c.get("max_window_layers", 0))
    else:
        out.update(use_sliding_window=False, layer_types=types)
    return out


def _one_window(src: DenseSource, fmt: str, hint: str = "") -> int | None:
    """The sliding window of a target that applies one window to every layer or none
    (Mixtral, Qwen3-MoE): None for full attention. (A Qwen2 config keeps a sliding_window
    value even when use_sliding_window is off: copying it would narrow a full-attention model.)"""
    types = source_layer_types(src)
    if len(set(types)) > 1:
        raise ValueError(f"{src.folder}/config.json: layers mix sliding and full attention "
                         f"({types.count('sliding_attention')} of {src.n_layers} sliding), which {fmt} cannot "
                         f"express{hint}")
    return src.hf_config["sliding_window"] if types and types[0] == "sliding_attention" else None


def source_layer_types(src: DenseSource) -> list[str]:
    """Per layer, ``"sliding_attention"`` or ``"full_attention"`` as the dense model runs it."""
    c, L = src.hf_config, src.n_layers
    if src.arch in ("qwen2", "qwen3"):
        if not (c.get("use_sliding_window") and c.get("sliding_window")):
            return ["full_attention"] * L
        types = c.get("layer_types")
        if types is None:  # older configs: Qwen2Config's (and Qwen3Config's) rule
            mwl = c["max_window_layers"]
            return ["sliding_attention" if i >= mwl else "full_attention" for i in range(L)]
        if not (isinstance(types, list) and len(types) == L
                and set(types) <= {"sliding_attention", "full_attention"}):
            raise ValueError(f"{src.folder}/config.json: layer_types must list 'sliding_attention' or "
                             f"'full_attention' for each of the {L} layers, got {types!r}")
        return list(types)
    if src.arch == "mistral" and c.get("sliding_window"):
        return ["sliding_attention"] * L
    return ["full_attention"] * L


# ------------------------------------------------------------------ flopwise folders
def save_flopwise(model, folder: str, *, metadata: dict[str, str] | None = None) -> None:
    """Write a :class:`~flopwise.models.Transformer` as a flopwise checkpoint folder:
    ``config.json`` (its ModelConfig) and ``model.safetensors`` (the state dict; a tied head
    is stored once, as ``embed.weight``).

    Into an existing folder: other files stay, but the weights of an earlier save are
    replaced whole: each new file is written beside its target and renamed onto it, and a
    sharded checkpoint there (``model.safetensors.index.json`` and its shards, which readers
    prefer over ``model.safetensors``) is removed after the new file is in place."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        sd.pop("head.weight", None)
    index = os.path.join(folder, "model.safetensors.index.json")
    stale = _stale_shards(folder, index)
    tag = f".tmp-{os.getpid()}"
    tmp_model = os.path.join(folder, "model.safetensors" + tag)
    tmp_config = os.path.join(folder, "config.json" + tag)
    try:
        save_file(sd, tmp_model, metadata={"format": "pt", **(metadata or {})})
        with open(tmp_config, "w") as f:
            json.dump(dataclasses.asdict(model.cfg), f, indent=2)
        for path in (tmp_model, tmp_config):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp_model, os.path.join(folder, "model.safetensors"))
        os.replace(tmp_config, os.path.join(folder, "config.json"))
    except BaseException:
        for path in (tmp_model, tmp_config):
            if os.path.lexists(path):
                os.remove(path)
        raise
    # Until the index is gone a reader refuses the folder (both an index and a single file)
    # rather than read the old shards.
    if os.path.lexists(index):
        os.remove(index)
    for path in stale:
        if os.path.lexists(path):
            os.remove(path)


def _stale_shards(folder: str, index: str) -> list[str]:
    """Shard files of an earlier sharded save in ``folder``: those its index names and any
    ``model-NNNNN-of-NNNNN.safetensors``."""
    names = {n for n in os.listdir(folder) if re.fullmatch(r"model-\d+-of-\d+\.safetensors", n)}
    try:
        with open(index) as f:
            wm = json.load(f).get("weight_map", {})
        names |= {v for v in wm.values() if isinstance(v, str) and os.path.basename(v) == v
                  and v.startswith("model") and v.endswith(".safetensors") and v != "model.safetensors"}
    except (OSError, ValueError, AttributeError):
        pass  # no index, or an unreadable one: the pattern above still finds the shards
    return [os.path.join(folder, n) for n in sorted(names)]


def load_flopwise(folder: str, *, dtype=None):
    """Load a flopwise checkpoint folder (single file or sharded) into a
    :class:`~flopwise.models.Transformer`. Missing or unexpected tensors, and shapes that
    differ from config.json's, raise ValueError; so does a tensor holding inf/NaN."""
    import torch

    from .transformer import Transformer

    mc = _flopwise_config(_load_config(folder))
    model = Transformer(mc)
    reader = CheckpointReader(folder)
    own = model.state_dict()
    for name, info in reader.infos.items():
        if name in own and tuple(own[name].shape) != tuple(info.shape):
            raise ValueError(f"flopwise checkpoint {folder}: tensor {name!r} has shape {list(info.shape)}, the "
                             f"model of config.json expects {list(own[name].shape)} (config.json does not match "
                             "the weights)")
    sd = {n: reader.get(n) for n in reader.infos}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not (mc.tie_embeddings and m == "head.weight")]
    if missing or unexpected:
        raise ValueError(f"flopwise checkpoint {folder}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    # Every stored tensor is a parameter (the RoPE tables are not saved): inf/NaN in one is
    # damage or a diverged run, never a legitimate value.
    for name, t in sd.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"flopwise checkpoint {folder}: tensor {name!r} in {reader.infos[name].file} holds "
                             "inf/NaN (a damaged file, or weights saved after training diverged)")
    return model.to(dtype) if dtype is not None else model
