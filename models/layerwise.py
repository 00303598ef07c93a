"""Run a causal LM checkpoint one decoder layer at a time.

A model too big for memory can still be evaluated exactly: the embeddings, the final
norm and the head stay loaded, and each decoder layer is read from the safetensors
files, run on the hidden states of the whole probe batch and freed before the next.
Memory: the embeddings and head plus one layer (see :func:`layerwise_bytes`), instead
of the whole model.

Two families:

* flopwise checkpoints: each layer is :func:`flopwise.models.transformer.build_layer`,
  loaded strictly (no missing, unexpected or mis-shaped tensor; no inf/NaN), exactly as
  :func:`flopwise.models.hf_formats.load_flopwise` loads the whole model.
* transformers checkpoints: each layer is loaded by transformers itself, through its
  ``from_pretrained`` with a one-layer copy of the config, so its own name conversions
  (per-expert tensors stacked into fused ones, say) apply as for the whole model. Config
  fields that describe layers by index (``layer_types``, ``mlp_only_layers``,
  ``decoder_sparse_step``) are narrowed to layer ``i``, and the one-layer model's layer
  is checked against layer ``i`` of the whole model built on the meta device (module
  classes, parameter names and shapes, sliding windows): a config field this module
  does not know to narrow fails that check instead of running another layer.

The hidden states between layers are float32, as the whole model in float32 computes
them; the logits agree with the whole model's up to float rounding.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import warnings

import torch

from .safetensors_io import CheckpointReader

__all__ = ["LayerwiseModel", "LayerwiseLoadError", "layerwise_bytes"]

_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
# transformers architectures whose forward this runner reproduces layer by layer (tested): the
# upcycler's sources and targets. Others may scale the embeddings in the model's forward, or
# keep per-layer settings in lists this runner does not narrow, and would give other logits.
HF_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe")
_FW_LAYER = re.compile(r"^layers\.(\d+)\.")
_IGNORED = re.compile(r"\.rotary_emb\.inv_freq$")  # buffers some older checkpoints carry


class LayerwiseLoadError(ValueError):
    """The checkpoint cannot be run layer by layer: a tensor is missing, unexpected,
    mis-shaped or not finite, its config does not load, or its architecture is not one this
    runner reproduces."""


def _groups(names, pattern: re.Pattern) -> tuple[dict[int, list[str]], list[str]]:
    layers: dict[int, list[str]] = {}
    rest = []
    for name in names:
        m = pattern.match(name)
        if m:
            layers.setdefault(int(m.group(1)), []).append(name)
        elif not _IGNORED.search(name):
            rest.append(name)
    return layers, rest


def layerwise_bytes(numels: dict[str, int]) -> int:
    """Memory a :class:`LayerwiseModel` needs for a checkpoint whose tensors have these
    sizes (name -> number of elements; ``{n: i.numel for n, i in
    CheckpointReader(folder).infos.items()}``): the embeddings, norm and head twice in
    float32 (as read, at most float32, while the float32 module is built from them) and a
    tenth more; the largest layer four times in float32 (as read, the module, the copy
    transformers makes when it stacks per-expert tensors, and a cast); and 256 MiB for the
    probe's activations. ``scripts/verify_memory.py`` measures it against the peak anonymous
    memory of a verification."""
    pattern = _FW_LAYER if any(_FW_LAYER.match(n) for n in numels) else _HF_LAYER
    layers, rest = _groups(numels, pattern)
    shell = sum(numels[n] for n in rest)
    layer = max((sum(numels[n] for n in names) for names in layers.values()), default=0)
    return int(8 * shell * 1.1) + 16 * layer + 2**28


def _some(items, n: int = 3) -> str:
    items = sorted(items)
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(repr(i) for i in items[:n]) + more


class LayerwiseModel:
    """A checkpoint folder evaluated layer by layer.

    ``family``: ``"flopwise"`` or ``"hf"``. ``what`` names the model in errors ("the
    upcycled model"). Loading problems raise :class:`LayerwiseLoadError` when the layer
    (or the embeddings and head) is loaded, naming the tensors with the layer's own index
    (as transformers names them: stacked experts under their fused names).

    Use::

        m = LayerwiseModel("big-model/", "hf")
        h = m.embed(tokens)                 # [B, S] -> [B, S, D] float32
        for i in range(m.n_layers):
            h = m.layer(i, h)               # loads layer i, runs it, frees it
        logits = m.logits(h)                # [B, S, vocab_size] float32

    ``config`` is the model's config object (transformers' config, or the flopwise
    :class:`~flopwise.models.ModelConfig` as ``cfg``).
    """

    def __init__(self, folder: str, family: str, *, what: str = "the model"):
        if family not in ("flopwise", "hf"):
            raise ValueError(f"family must be 'flopwise' or 'hf', got {family!r}")
        self.folder, self.family, self.what = folder, family, what
        self._shell = None
        try:
            self.reader = CheckpointReader(folder)
            if family == "flopwise":
                from .hf_formats import _flopwise_config, _load_config

                self.cfg = self.config = _flopwise_config(_load_config(folder))
                self.n_layers = self.cfg.n_layers
            else:
                from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig

                self.config = AutoConfig.from_pretrained(folder)
                if self.config.model_type not in HF_MODEL_TYPES:
                    raise LayerwiseLoadError(f"{what} ({folder}) is a {self.config.model_type!r} model; layer by layer "
                                             f"runs {', '.join(HF_MODEL_TYPES)} only")
                self.n_layers = int(self.config.num_hidden_layers)
                self._cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(self.config)]
                with torch.device("meta"), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    self._meta = self._cls._from_config(self.config)
        except (ImportError, MemoryError, LayerwiseLoadError):
            raise
        except Exception as exc:  # transformers raises many kinds; whatever it is, the model does not load
            text = " ".join(str(exc).split())
            raise LayerwiseLoadError(f"{what} ({folder}) does not load: {type(exc).__name__}: {text[:500]}") from exc
        self._layers, self._rest = _groups(self.reader.infos, _FW_LAYER if family == "flopwise" else _HF_LAYER)
        stray = sorted(i for i in self._layers if i >= self.n_layers)
        if stray:
            raise LayerwiseLoadError(f"{what} ({folder}) has tensors of layer(s) {stray[:3]} beyond its "
                                     f"{self.n_layers} layers, e.g. {_some(self._layers[stray[0]], 1)}")

    # ------------------------------------------------------------------ common
    def _error(self, problems: list[str], where: str) -> LayerwiseLoadError:
        return LayerwiseLoadError(f"{self.what} ({self.folder}) does not load ({where}): " + "; ".join(problems))

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B, S]`` -> the first layer's input ``[B, S, D]`` (float32)."""
        if self.family == "flopwise":
            return self._fw_shell()["embed"][tokens]
        with torch.no_grad():
            return self._hf_shell().get_input_embeddings()(tokens).float()

    def layer(self, i: int, h: torch.Tensor, *, mlp_inputs: list | None = None,
              mod_topk: bool = False) -> torch.Tensor:
        """Layer ``i`` (loaded now, freed on return) applied to ``h`` ``[B, S, D]``.

        ``mlp_inputs`` (a list): the rows the layer's MLP receives are appended to it as
        ``[rows, D]`` tensors. ``mod_topk``: a flopwise MoD layer routes each sequence's top k
        tokens, as in training, instead of inference's causal per-token decision (whose
        batches are padded with tokens it did not select, which its MLP also receives)."""
        if not 0 <= i < self.n_layers:
            raise ValueError(f"layer must be in [0, {self.n_layers}), got {i}")
        with torch.no_grad():
            if self.family == "flopwise":
                return self._fw_layer(i, h, mlp_inputs, mod_topk)
            return self._hf_layer(i, h, mlp_inputs)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The last layer's output ``[B, S, D]`` -> logits ``[B, S, vocab_size]`` (float32)."""
        with torch.no_grad():
            if self.family == "flopwise":
                s = self._fw_shell()
                return torch.nn.functional.linear(s["norm"](h.float()), s["head"])[..., : self.cfg.vocab_size]
            return self._hf_shell()(inputs_embeds=h, use_cache=False).logits.float()

    def release(self) -> None:
        """Free the embeddings and head (they are reloaded if needed again)."""
        self._shell = None

    # ------------------------------------------------------------------ flopwise
    def _fw_get(self, name: str) -> torch.Tensor:
        t = self.reader.get(name)
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise self._error([f"tensor {name!r} in {self.reader.infos[name].file} holds inf/NaN"], "weights")
        return t.float() if t.is_floating_point() else t

    def _fw_shell(self) -> dict:
        if self._shell is None:
            cfg = self.cfg
            want = {"embed.weight": (cfg.padded_vocab_size, cfg.d_model), "norm.weight": (cfg.d_model,)}
            if not cfg.tie_embeddings:
                want["head.weight"] = (cfg.padded_vocab_size, cfg.d_model)
            problems = [f"unexpected tensor {n!r}" for n in sorted(set(self._rest) - set(want))]
            problems += [f"missing tensor {n!r}" for n in want if n not in self.reader.infos]
            problems += [f"tensor {n!r} has shape {list(self.reader.infos[n].shape)}, config.json says {list(s)}"
                         for n, s in want.items() if n in self.reader.infos
                         and tuple(self.reader.infos[n].shape) != s]
            if problems:
                raise self._error(problems, "embeddings, norm and head")
            from .transformer import RMSNorm

            embed = self._fw_get("embed.weight")
            norm = RMSNorm(cfg.d_model, cfg.norm_eps)
            norm.weight.data.copy_(self._fw_get("norm.weight"))
            self._shell = {"embed": embed, "norm": norm,
                           "head": embed if cfg.tie_embeddings else self._fw_get("head.weight")}
        return self._shell

    def _fw_layer(self, i: int, h: torch.Tensor, mlp_inputs: list | None, mod_topk: bool) -> torch.Tensor:
        from .transformer import build_layer

        module = build_layer(self.cfg, i)
        prefix = f"layers.{i}."
        own = module.state_dict()
        stored = self._layers.get(i, [])
        problems = [f"unexpected tensor {n!r}" for n in stored if n[len(prefix):] not in own]
        problems += [f"missing tensor {prefix + n!r}" for n in own if prefix + n not in self.reader.infos]
        problems += [f"tensor {n!r} has shape {list(self.reader.infos[n].shape)}, config.json says "
                     f"{list(own[n[len(prefix):]].shape)}" for n in stored if n[len(prefix):] in own
                     and tuple(self.reader.infos[n].shape) != tuple(own[n[len(prefix):]].shape)]
        if problems:
            raise self._error(problems, f"layer {i}")
        module.load_state_dict({n[len(prefix):]: self._fw_get(n) for n in stored})
        module = module.float().eval()
        if mod_topk and hasattr(module, "routes_causally"):  # a MoDBlock: top-k routing in eval
            module.cfg = dataclasses.replace(module.cfg, causal="none")
        B, S = h.shape[:2]
        positions = torch.arange(S, device=h.device).expand(B, S)
        with _capture(getattr(module, "block", module).mlp, mlp_inputs):
            out, _ = module(h, positions)
        return out

    # ------------------------------------------------------------------ transformers
    def _hf_config(self, n_layers: int, i: int | None):
        """A copy of the config with ``n_layers`` (0 or 1) layers; with one, it is layer ``i``."""
        d = self.config.to_dict()
        d["num_hidden_layers"] = n_layers
        if n_layers == 1:
            # the one-layer model's embeddings and head are never used: keep them tiny
            d.update(vocab_size=8, pad_token_id=None, bos_token_id=None, eos_token_id=None,
                     tie_word_embeddings=False)
        types = d.get("layer_types")
        if types is not None:
            d["layer_types"] = [types[i]] if n_layers else []
        if "mlp_only_layers" in d or "decoder_sparse_step" in d:
            # qwen2_moe / qwen3_moe: layer i is sparse unless listed, and only every step-th
            step = d.get("decoder_sparse_step") or 1
            sparse = (i is not None and i not in (d.get("mlp_only_layers") or ())
                      and (i + 1) % step == 0)
            d["decoder_sparse_step"] = 1
            d["mlp_only_layers"] = [] if sparse or not n_layers else [0]
        return type(self.config).from_dict(d)

    def _hf_load(self, config, state_dict: dict, where: str, allowed_missing: set[str]):
        kwargs = dict(config=config, state_dict=state_dict, dtype=torch.float32, output_loading_info=True,
                      ignore_mismatched_sizes=True)
        from transformers.utils import logging as hf_logging

        bar, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
        # one bar per layer would bury the caller's output, and transformers' load report would
        # list the tensors each one-layer load leaves out on purpose (the problems that matter
        # are in the loading info, checked below)
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
                model, info = self._cls.from_pretrained(None, **kwargs)
        except (ImportError, MemoryError):
            raise
        except Exception as exc:  # transformers raises many kinds; whatever it is, it does not load
            text = " ".join(str(exc).split())
            raise self._error([f"transformers: {type(exc).__name__}: {text[:500]}"], where) from exc
        finally:
            hf_logging.set_verbosity(verbosity)
            if bar:
                hf_logging.enable_progress_bar()
        problems = []
        for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
            found = [k if isinstance(k, str) else str(k) for k in (info.get(key) or ())]
            if key == "missing_keys":
                found = [k for k in found if k not in allowed_missing]
            if found:
                problems.append(f"{key.replace('_', ' ')} {_some(found)}")
        if problems:
            raise self._error(problems, where)
        return model.eval()

    def _hf_shell(self):
        if self._shell is None:
            config = self._hf_config(0, None)
            sd = {n: self.reader.get(n) for n in self._rest}
            self._shell = self._hf_load(config, sd, "embeddings, norm and head", set())
        return self._shell

    def _hf_layer(self, i: int, h: torch.Tensor, mlp_inputs: list | None) -> torch.Tensor:
        src, dst = f"model.layers.{i}.", "model.layers.0."
        config = self._hf_config(1, i)
        sd = {dst + n[len(src):]: self.reader.get(n) for n in self._layers.get(i, []) if not _IGNORED.search(n)}
        where = f"layer {i}"
        try:
            model = self._hf_load(config, sd, where, {"model.embed_tokens.weight", "model.norm.weight",
                                                      "lm_head.weight"})
        except LayerwiseLoadError as exc:  # name the tensors as the checkpoint does
            raise LayerwiseLoadError(str(exc).replace(dst, src)) from None
        layer = model.model.layers[0]
        if _signature(layer) != _signature(self._meta.model.layers[i]):
            raise self._error([f"the one-layer copy of the config does not build layer {i} as the whole model "
                               f"does ({type(self.config).__name__} has a per-layer setting this runner does not "
                               "narrow)"], where)
        out = []
        hook = layer.register_forward_hook(lambda m, args, o: out.append(o[0] if isinstance(o, tuple) else o))
        try:
            with _capture(layer.mlp, mlp_inputs):
                model(inputs_embeds=h, use_cache=False)
        finally:
            hook.remove()
        return out[0].float()


@contextlib.contextmanager
def _capture(module: torch.nn.Module, into: list | None):
    """Append the rows ``module`` receives (its first argument, as ``[rows, D]``) to ``into``."""
    if into is None:
        yield
        return

    def keep(m, args):
        into.append(args[0].detach().reshape(-1, args[0].shape[-1]))

    hook = module.register_forward_pre_hook(keep)
    try:
        yield
    finally:
        hook.remove()


def _signature(layer: torch.nn.Module) -> tuple:
    """What makes two decoder layers compute the same function given the same weights:
    module classes, parameter and buffer names and shapes, and per-module attention
    settings."""
    modules = tuple((n, type(m).__name__) for n, m in layer.named_modules())
    tensors = tuple((n, tuple(t.shape)) for n, t in (*layer.named_parameters(), *layer.named_buffers()))
    settings = tuple((n, a, repr(getattr(m, a))) for n, m in layer.named_modules()
                     for a in ("sliding_window", "is_sliding", "attention_type", "is_causal", "scaling", "top_k",
                               "num_experts", "norm_topk_prob")
                     if hasattr(m, a) and not callable(getattr(m, a)))
    return modules, tensors, settings
