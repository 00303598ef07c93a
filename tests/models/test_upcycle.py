"""Sparse upcycling: tiny random Llama / Mistral / Qwen2 / Qwen3 / flopwise models are converted and
loaded back with transformers' own MoE classes (or flopwise's Transformer); copy-initialised
MoEs must reproduce the dense logits. Also: expert and router inits, layer selection,
reproducibility, optimizer moments, atomic writes, bad input, dry-run sizes, the CLI."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import transformers  # noqa: E402  (a test dependency: the real client that loads our output)
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,  # noqa: E402
                          MixtralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen2MoeForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM, Qwen3MoeForCausalLM)

from flopwise import _cli_upcycle  # noqa: E402
from flopwise.models import ModelConfig, Transformer  # noqa: E402
from flopwise.models.hf_formats import load_flopwise, save_flopwise  # noqa: E402
from flopwise.models.safetensors_io import CheckpointReader, read_header  # noqa: E402
from flopwise.models.upcycle import (UpcycleOptions, UpcycleWarning, VerificationError,  # noqa: E402
                                     plan_upcycle, resolve_layers, upcycle)

transformers.logging.set_verbosity_error()
V, D, F, L = 96, 32, 48, 4
TOL = 1e-4


def _tiny(arch: str, folder, *, tied=False, shard=None, **kw):
    """Save a random dense model; returns the model (eval, float32)."""
    common = dict(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied)
    cls = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
           "qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[arch]
    if arch == "qwen3":  # Qwen3Config's head_dim is 128 unless told
        common["head_dim"] = D // 4
    model = cls[1](cls[0](**{**common, **kw})).eval()
    with torch.no_grad():  # RMSNorm weights start at 1: perturb them so a swapped norm would show
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(folder), safe_serialization=True, **({"max_shard_size": shard} if shard else {}))
    return model


def _load(cls, folder):
    model, info = cls.from_pretrained(str(folder), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def _probe():
    return torch.randint(V, (2, 12), generator=torch.Generator().manual_seed(1))


def _diff(a, b) -> float:
    x = _probe()
    with torch.no_grad():
        return float((a(x).logits - b(x).logits).abs().max())


def _no_leftovers(parent) -> None:
    assert not [p for p in os.listdir(parent) if ".tmp-" in p or ".old-" in p]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("src") / "llama"
    torch.manual_seed(0)
    return folder, _tiny("llama", folder, shard="40KB")


# ------------------------------------------------------------------ Hugging Face round trips
def test_llama_sharded_to_mixtral_reproduces_dense(llama, tmp_path):
    src, dense = llama
    assert os.path.isfile(src / "model.safetensors.index.json")  # the source really is sharded
    opts = UpcycleOptions(n_experts=4, top_k=2, format="mixtral", max_shard_bytes=60_000, seed=3)
    report = upcycle(str(src), str(tmp_path / "mix"), opts, verify=True)
    assert report.verify.expected_equal and report.verify.max_abs_diff <= TOL and abs(report.verify.kl) < 1e-6
    out = tmp_path / "mix"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    data_bytes = sum(os.path.getsize(out / f) - 8 - struct.unpack("<Q", (out / f).read_bytes()[:8])[0]
                     for f in set(index["weight_map"].values()))
    assert index["metadata"]["total_size"] == data_bytes == report.output_bytes
    assert "model.layers.3.block_sparse_moe.experts.3.w2.weight" in index["weight_map"]
    moe = _load(MixtralForCausalLM, out)
    assert moe.config.num_local_experts == 4 and moe.config.num_experts_per_tok == 2
    assert _diff(dense, moe) <= TOL
    # Experts are copies; w1 = gate, w3 = up, w2 = down (a swap would break equality above too).
    a = CheckpointReader(str(src))
    b = CheckpointReader(str(out))
    for w, kind in (("w1", "gate"), ("w3", "up"), ("w2", "down")):
        torch.testing.assert_close(b.get(f"model.layers.2.block_sparse_moe.experts.1.{w}.weight"),
                                   a.get(f"model.layers.2.mlp.{kind}_proj.weight"), rtol=0, atol=0)
    # Provenance: method, options, seed and source hashes in every shard's metadata.
    with safe_open(str(out / index["weight_map"]["lm_head.weight"]), "pt") as f:
        prov = json.loads(f.metadata()["flopwise_upcycle"])
    assert prov["method"] == "sparse_upcycling" and prov["seed"] == 3 and prov["options"]["n_experts"] == 4
    assert set(prov["source_files"]) == {p for p in os.listdir(src) if p.endswith(".safetensors")}
    assert all(len(h) == 64 for h in prov["source_files"].values())
    import hashlib

    assert prov["source_config_sha256"] == hashlib.sha256((src / "config.json").read_bytes()).hexdigest()


@pytest.mark.parametrize("layers, kinds", [
    ("all", "MMMM"), ("every_other", "DMDM"), ("last:1", "DDDM"), ([0, 2], "MDMD"),
], ids=["all", "every_other", "last1", "list"])
def test_qwen2_moe_layer_selection(llama, tmp_path, layers, kinds):
    src, dense = llama
    out = tmp_path / "q"
    upcycle(str(src), str(out), UpcycleOptions(n_experts=4, top_k=2, format="qwen2_moe", layers=layers))
    moe = _load(Qwen2MoeForCausalLM, out)
    got = "".join("M" if type(layer.mlp).__name__ == "Qwen2MoeSparseMoeBlock" else "D" for layer in moe.model.layers)
    assert got == kinds
    cfg = json.loads((out / "config.json").read_text())
    if layers == "every_other":
        assert cfg["decoder_sparse_step"] == 2 and cfg["mlp_only_layers"] == []
    assert cfg["norm_topk_prob"] is True
    assert _diff(dense, moe) <= TOL


def test_mistral_tied_and_qwen2_bias(tmp_path):
    torch.manual_seed(1)
    dense = _tiny("mistral", tmp_path / "mistral", tied=True, sliding_window=None)
    assert "lm_head.weight" not in load_file(str(tmp_path / "mistral" / "model.safetensors"))
    upcycle(str(tmp_path / "mistral"), str(tmp_path / "mix"), UpcycleOptions(n_experts=3, top_k=3, format="mixtral"))
    moe = _load(MixtralForCausalLM, tmp_path / "mix")
    assert moe.config.tie_word_embeddings and _diff(dense, moe) <= TOL

    qwen = _tiny("qwen2", tmp_path / "qwen2")
    upcycle(str(tmp_path / "qwen2"), str(tmp_path / "qmoe"),
            UpcycleOptions(n_experts=4, top_k=1, format="qwen2_moe", layers="every_other", shared_d_ff=16))
    moe = _load(Qwen2MoeForCausalLM, tmp_path / "qmoe")
    assert moe.config.qkv_bias and moe.config.shared_expert_intermediate_size == 16
    assert _diff(qwen, moe) <= TOL  # the non-empty shared expert adds exactly zero
    with pytest.raises(ValueError, match=r"q_proj\.bias.*qwen2_moe"):
        upcycle(str(tmp_path / "qwen2"), str(tmp_path / "bad"), UpcycleOptions(n_experts=4, format="mixtral"))
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("layers, kinds", [("all", "MMMM"), ("every_other", "DMDM"), ([0, 3], "MDDM")],
                         ids=["all", "every_other", "list"])
def test_qwen3_to_qwen3_moe_reproduces_dense(tmp_path, layers, kinds):
    """Qwen3 (per-head q/k norms, perturbed by _tiny) -> Qwen3-MoE, loaded by transformers'
    own class: the copied experts reproduce the dense logits, the q/k norms are copied."""
    torch.manual_seed(5)
    src = tmp_path / "qwen3"
    dense = _tiny("qwen3", src)
    out = tmp_path / "moe"
    report = upcycle(str(src), str(out), UpcycleOptions(n_experts=4, top_k=2, format="qwen3_moe", layers=layers),
                     verify=True)
    assert report.verify.passed and not report.verify.config_diffs and report.verify.max_abs_diff <= TOL
    moe = _load(Qwen3MoeForCausalLM, out)
    got = "".join("M" if type(layer.mlp).__name__ == "Qwen3MoeSparseMoeBlock" else "D" for layer in moe.model.layers)
    assert got == kinds
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_moe" and cfg["norm_topk_prob"] is True and cfg["attention_bias"] is False
    assert cfg["intermediate_size"] == F and cfg["moe_intermediate_size"] == F and cfg["head_dim"] == D // 4
    assert _diff(dense, moe) <= TOL
    a, b = CheckpointReader(str(src)), CheckpointReader(str(out))
    for name in ("model.layers.1.self_attn.q_norm.weight", "model.layers.2.self_attn.k_norm.weight"):
        assert torch.equal(a.get(name), b.get(name))
    assert not torch.equal(a.get("model.layers.1.self_attn.q_norm.weight"), torch.ones(D // 4))


def test_qwen3_attention_bias_sliding_window_and_untied(tmp_path):
    torch.manual_seed(6)
    src = tmp_path / "qwen3"
    dense = _tiny("qwen3", src, attention_bias=True, tied=True, use_sliding_window=True, sliding_window=4,
                  max_window_layers=0)  # every layer slides
    with pytest.warns(UpcycleWarning, match="renormalize=False"):
        upcycle(str(src), str(tmp_path / "moe"), UpcycleOptions(n_experts=3, top_k=1, format="qwen3_moe",
                                                                renormalize=False))
    moe = _load(Qwen3MoeForCausalLM, tmp_path / "moe")
    assert moe.config.attention_bias and moe.config.tie_word_embeddings and moe.config.sliding_window == 4
    assert moe.config.norm_topk_prob is False
    # top-1 without renormalisation scales each expert's output by its router probability: not
    # the dense model; with renormalisation (weight 1) it is, biases and window included
    upcycle(str(src), str(tmp_path / "moe1"), UpcycleOptions(n_experts=3, top_k=1, format="qwen3_moe"), verify=True)
    moe1 = _load(Qwen3MoeForCausalLM, tmp_path / "moe1")
    x = torch.randint(V, (2, 12), generator=torch.Generator().manual_seed(1))  # 12 > window 4: the window matters
    with torch.no_grad():
        assert float((dense(x).logits - moe1(x).logits).abs().max()) <= TOL
        assert float((dense(x).logits - moe(x).logits).abs().max()) > 10 * TOL
    from flopwise.models.upcycle import _attention_windows

    assert _attention_windows(dense.config) == _attention_windows(moe1.config) == [4] * L
    # transformers before 4.53 slides Qwen3-MoE's layers from max_window_layers on (default 28)
    assert json.loads((tmp_path / "moe1" / "config.json").read_text())["max_window_layers"] == 0
    # layers that mix sliding and full attention have no Qwen3-MoE form
    mixed = tmp_path / "mixed"
    _tiny("qwen3", mixed, use_sliding_window=True, sliding_window=4, max_window_layers=2)
    with pytest.raises(ValueError, match=r"layers mix sliding and full attention \(2 of 4 sliding\), which qwen3_moe"):
        upcycle(str(mixed), str(tmp_path / "bad"), UpcycleOptions(n_experts=2, format="qwen3_moe"))
    assert not (tmp_path / "bad").exists()


def test_qwen3_formats_are_refused_where_the_q_k_norms_do_not_fit(llama, tmp_path, capsys):
    torch.manual_seed(7)
    src = tmp_path / "qwen3"
    _tiny("qwen3", src)
    for fmt in ("mixtral", "qwen2_moe", "flopwise"):
        with pytest.raises(ValueError, match=rf"option format='{fmt}': qwen3 sources convert to 'qwen3_moe': "
                                             r"qwen3's attention normalises each head's queries and keys"):
            upcycle(str(src), str(tmp_path / fmt), UpcycleOptions(n_experts=2, top_k=1, format=fmt))
        assert not (tmp_path / fmt).exists()
    with pytest.raises(ValueError, match=r"option format='qwen3_moe': llama sources convert to 'mixtral' or "
                                         r"'qwen2_moe': qwen3_moe's attention normalises .* which llama lacks"):
        upcycle(str(llama[0]), str(tmp_path / "l"), UpcycleOptions(n_experts=2, top_k=1, format="qwen3_moe"))
    with pytest.raises(ValueError, match="shared_d_ff is only expressible in the qwen2_moe format"):
        UpcycleOptions(n_experts=2, format="qwen3_moe", shared_d_ff=8)
    # the command line picks qwen3_moe for a qwen3 source when --format is not given
    parser = argparse.ArgumentParser()
    _cli_upcycle.add_parser(parser.add_subparsers())
    args = parser.parse_args(["upcycle", str(src), str(tmp_path / "cli"), "--experts", "2", "--top-k", "1",
                              "--dry-run", "--json"])
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "qwen3_moe" and not (tmp_path / "cli").exists()
    # bias tensors must be those config.json's attention_bias gives the dense model: one that
    # transformers would leave out (or initialise at random) would make the MoE differ from it
    partial = tmp_path / "partial"
    _tiny("qwen3", partial, attention_bias=True)
    sd = load_file(str(partial / "model.safetensors"))
    del sd["model.layers.2.self_attn.o_proj.bias"]
    save_file(sd, str(partial / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.2\.self_attn\.o_proj\.bias' in a qwen3 "
                                         r"checkpoint \(attention_bias=true in config\.json\): transformers would "
                                         r"initialise it at random"):
        upcycle(str(partial), str(tmp_path / "p"), UpcycleOptions(n_experts=2, format="qwen3_moe"))
    cfg = json.loads((partial / "config.json").read_text())
    (partial / "config.json").write_text(json.dumps({**cfg, "attention_bias": False}))
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.q_proj\.bias' in a "
                                         r"qwen3 checkpoint \(attention_bias=false in config\.json\): transformers "
                                         r"would not load it"):
        upcycle(str(partial), str(tmp_path / "p"), UpcycleOptions(n_experts=2, format="qwen3_moe"))
    assert not (tmp_path / "p").exists()
    # the q/k norms are part of the source's layout: a checkpoint without them is refused
    sd = load_file(str(src / "model.safetensors"))
    del sd["model.layers.0.self_attn.k_norm.weight"]
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_norm\.weight"):
        upcycle(str(src), str(tmp_path / "k"), UpcycleOptions(n_experts=2, format="qwen3_moe"))


def test_verify_that_cannot_fit_in_memory_is_refused_before_writing(llama, tmp_path, monkeypatch, capsys):
    """--verify holds both models in float32, or, where they do not fit, one layer at a time
    (tests/models/test_layerwise.py): where the machine has less memory available than that,
    it is refused up front (the kernel would otherwise kill the process midway)."""
    from flopwise.models import upcycle as up

    src, _ = llama
    opts = UpcycleOptions(n_experts=4, top_k=2, format="mixtral")
    plan = plan_upcycle(str(src), opts)
    dense = sum(i.numel for i in CheckpointReader(str(src)).infos.values())
    assert plan.verify_bytes_estimate >= 4 * (dense + plan.total_params)
    assert plan.summary()["verify_bytes_estimate"] == plan.verify_bytes_estimate
    least = plan.verify_layerwise_bytes_estimate
    monkeypatch.setattr(up, "_available_memory", lambda: least - 1)
    with pytest.raises(ValueError, match=r"^option verify: verification layer by layer \(the embeddings and head and "
                                         r"one layer at a time\) needs about 0\.3 GB, and this machine has 0\.3 GB "
                                         r"available"):
        upcycle(str(src), str(tmp_path / "moe"), opts, verify=True)
    assert not (tmp_path / "moe").exists()
    _no_leftovers(tmp_path)
    parser = argparse.ArgumentParser()
    _cli_upcycle.add_parser(parser.add_subparsers())
    args = parser.parse_args(["upcycle", str(src), str(tmp_path / "cli"), "--experts", "4", "--verify"])
    with pytest.raises(ValueError, match=r"^--verify: verification layer by layer"):
        args.func(args)
    args = parser.parse_args(["upcycle", str(src), str(tmp_path / "cli"), "--experts", "4", "--dry-run"])
    assert args.func(args) == 0
    assert "available here: --verify would be refused" in capsys.readouterr().out
    # without verification it is written; verify_upcycle refuses too, unless told not to check
    upcycle(str(src), str(tmp_path / "moe"), opts)
    with pytest.raises(ValueError, match=r"^verify_upcycle layer by layer .*; verify on a machine with more memory "
                                         r"\(check_memory=False skips this refusal\)$"):
        up.verify_upcycle(str(src), str(tmp_path / "moe"))
    assert up.verify_upcycle(str(src), str(tmp_path / "moe"), check_memory=False).passed
    monkeypatch.setattr(up, "_available_memory", lambda: least)  # just enough
    assert upcycle(str(src), str(tmp_path / "moe2"), opts, verify=True).verify.passed
    monkeypatch.setattr(up, "_available_memory", lambda: None)  # not known: not checked
    assert up.verify_upcycle(str(src), str(tmp_path / "moe")).passed
    monkeypatch.undo()
    have = up._available_memory()
    assert have is None or have > 2**20  # this machine's figure is read (Linux) and plausible


@pytest.mark.parametrize("arch, change, match", [
    ("mistral", "add", r"unexpected tensor 'model\.layers\.0\.self_attn\.q_proj\.bias' in a mistral checkpoint "
                       r"\(mistral's attention has no biases\): transformers would not load it"),
    ("qwen2", "drop", r"missing tensor 'model\.layers\.0\.self_attn\.k_proj\.bias' in a qwen2 checkpoint \(qwen2's "
                      r"attention has q, k and v biases, no o bias\): transformers would initialise it at random"),
    ("llama", "add", r"unexpected tensor 'model\.layers\.0\.self_attn\.q_proj\.bias' in a llama checkpoint "
                     r"\(attention_bias=false in config\.json\)"),
])
def test_attention_biases_must_be_those_the_dense_model_loads(tmp_path, arch, change, match):
    """A bias tensor transformers would leave out of the dense model, or one it would
    initialise at random, is refused: the MoE, which would hold it, would compute otherwise."""
    torch.manual_seed(8)
    src = tmp_path / arch
    _tiny(arch, src, **({"sliding_window": None} if arch == "mistral" else {}))
    sd = load_file(str(src / "model.safetensors"))
    if change == "add":
        sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(D)
    else:
        del sd["model.layers.0.self_attn.k_proj.bias"]
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    fmt = "qwen2_moe"  # the format that holds q/k/v biases
    with pytest.raises(ValueError, match=match):
        upcycle(str(src), str(tmp_path / "moe"), UpcycleOptions(n_experts=2, format=fmt))
    assert not (tmp_path / "moe").exists()


# Keys an older or hand-written config.json may leave out: transformers then takes the source
# class's defaults, which differ from Mixtral's (rope_theta 1e6, rms_norm_eps 1e-5, 8 KV
# heads, no sliding window) and Qwen2-MoE's (16 KV heads).
_LEFT_OUT = ("num_key_value_heads", "head_dim", "rope_theta", "rope_parameters", "rope_scaling", "rms_norm_eps",
             "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "sliding_window",
             "use_sliding_window", "max_window_layers", "layer_types", "tie_word_embeddings", "attention_dropout",
             "initializer_range", "hidden_act", "use_cache")


@pytest.mark.parametrize("arch, fmt, extra", [
    ("llama", "mixtral", {}), ("llama", "qwen2_moe", {}), ("mistral", "mixtral", {}), ("mistral", "qwen2_moe", {}),
    ("qwen2", "qwen2_moe", {}), ("qwen3", "qwen3_moe", {}),
    # RoPE settings without a base: the base is the source's default (legacy form and v5 form)
    ("llama", "mixtral", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}, "num_key_value_heads": 4}),
    ("llama", "mixtral", {"rope_parameters": {"rope_type": "linear", "factor": 2.0}, "num_key_value_heads": 4}),
], ids=["llama-mixtral", "llama-qwen2_moe", "mistral-mixtral", "mistral-qwen2_moe", "qwen2-qwen2_moe",
        "qwen3-qwen3_moe", "rope_scaling", "rope_parameters"])
def test_config_keys_left_out_take_the_source_defaults(tmp_path, arch, fmt, extra):
    torch.manual_seed(4)
    heads = {"llama": 4, "mistral": 8, "qwen2": 32, "qwen3": 32}[arch]  # the KV heads each class assumes
    head_dim = 128 if arch == "qwen3" else 64 // heads  # Qwen3 stores 128 unless told; the others derive it
    src = tmp_path / arch
    _tiny(arch, src, hidden_size=64, num_attention_heads=heads, num_key_value_heads=heads,
          **({"head_dim": head_dim} if arch == "qwen3" else {}))
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**{k: v for k, v in cfg.items() if k not in _LEFT_OUT}, **extra}))
    cls = {"llama": LlamaForCausalLM, "mistral": MistralForCausalLM, "qwen2": Qwen2ForCausalLM,
           "qwen3": Qwen3ForCausalLM}[arch]
    dense = _load(cls, src)  # the dense model as transformers reads the shortened config
    report = upcycle(str(src), str(tmp_path / "moe"), UpcycleOptions(n_experts=4, top_k=2, format=fmt), verify=True)
    assert report.verify.passed and not report.verify.config_diffs
    moe = _load({"mixtral": MixtralForCausalLM, "qwen2_moe": Qwen2MoeForCausalLM,
                 "qwen3_moe": Qwen3MoeForCausalLM}[fmt], tmp_path / "moe")
    assert _diff(dense, moe) <= TOL
    from flopwise.models.upcycle import _attention_windows

    a, b = dense.config, moe.config
    assert (b.rms_norm_eps, b.rope_parameters["rope_theta"], b.num_key_value_heads, b.max_position_embeddings,
            b.bos_token_id, b.eos_token_id) == (a.rms_norm_eps, a.rope_parameters["rope_theta"], a.num_key_value_heads,
                                                a.max_position_embeddings, a.bos_token_id, a.eos_token_id)
    assert _attention_windows(a) == _attention_windows(b) == [4096 if arch == "mistral" else None] * L
    out = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert out["num_key_value_heads"] == heads and out["head_dim"] == head_dim


def test_kv_heads_left_out_are_the_architectures_default(tmp_path):
    """Qwen2Config takes 32 KV heads when config.json names none (not num_attention_heads):
    a checkpoint saved with 4 does not load in transformers, and is refused with the reason."""
    torch.manual_seed(4)
    src = tmp_path / "qwen2"
    _tiny("qwen2", src, num_key_value_heads=4)
    cfg = json.loads((src / "config.json").read_text())
    del cfg["num_key_value_heads"]
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"num_attention_heads \(4\) must be a multiple of num_key_value_heads "
                                         r"\(32, qwen2's default when config.json leaves it out\)"):
        upcycle(str(src), str(tmp_path / "moe"), UpcycleOptions(n_experts=2, format="qwen2_moe"))
    assert not (tmp_path / "moe").exists()


def test_source_defaults_are_transformers_defaults():
    """The converter's table of source defaults (used without transformers) is what
    transformers' config classes assume, and covers every key the targets take over."""
    from flopwise.models.hf_formats import _COMMON, _HF_DEFAULTS

    sizes = dict(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L, num_attention_heads=4)
    for arch, cls in (("llama", LlamaConfig), ("mistral", MistralConfig), ("qwen2", Qwen2Config),
                      ("qwen3", Qwen3Config)):
        table = _HF_DEFAULTS[arch]
        assert set(_COMMON) - set(sizes) - {"rope_scaling", "rope_parameters", "dtype", "torch_dtype"} <= set(table)
        for key, value in table.items():
            cfg = cls(**sizes, **({"use_sliding_window": True} if key == "sliding_window" else {}))
            if key == "rope_theta":
                got = cfg.rope_parameters["rope_theta"]
            else:  # Qwen2Config has no head_dim: Qwen2's attention then derives it
                got = getattr(cfg, key, D // 4 if key == "head_dim" else "absent")
            if value is None and key in ("num_key_value_heads", "head_dim"):
                value = 4 if key == "num_key_value_heads" else D // 4
            assert got == value, (arch, key, got, value)


# ------------------------------------------------------------------ expert and router inits
def test_inits_break_equality_with_a_warning(llama, tmp_path):
    src, dense = llama
    a = CheckpointReader(str(src))
    gate = a.get("model.layers.1.mlp.gate_proj.weight")
    for init in ("noise", "drop"):
        out = tmp_path / init
        with pytest.warns(UpcycleWarning, match=init):
            report = upcycle(str(src), str(out), UpcycleOptions(n_experts=4, format="mixtral", expert_init=init,
                                                                noise_std=0.5, drop_ratio=0.25), verify=True)
        assert not report.verify.expected_equal and report.verify.max_abs_diff > 1e-3
        b = CheckpointReader(str(out))
        w1 = [b.get(f"model.layers.1.block_sparse_moe.experts.{e}.w1.weight") for e in range(4)]
        assert not torch.equal(w1[0], w1[1])  # experts differ from each other
        if init == "drop":
            for e in range(4):  # exactly r*F neurons re-drawn, the same ones in w1, w3 (rows) and w2 (columns)
                rows = (w1[e] != gate).any(1)
                assert int(rows.sum()) == round(0.25 * F)
                w3 = b.get(f"model.layers.1.block_sparse_moe.experts.{e}.w3.weight")
                w2 = b.get(f"model.layers.1.block_sparse_moe.experts.{e}.w2.weight")
                up = a.get("model.layers.1.mlp.up_proj.weight")
                down = a.get("model.layers.1.mlp.down_proj.weight")
                assert torch.equal((w3 != up).any(1), rows) and torch.equal((w2 != down).any(0), rows)
                fresh = w1[e][rows]
                assert abs(float(fresh.std()) - float(gate.std())) < 0.5 * float(gate.std())


@pytest.mark.parametrize("renorm", [True, False], ids=["renorm", "megatron"])
def test_granularity_splits_neurons_and_scales(llama, tmp_path, renorm):
    src, _ = llama
    E, G, k = 4, 2, 2
    with pytest.warns(UpcycleWarning, match="granularity"):
        upcycle(str(src), str(tmp_path / "g"), UpcycleOptions(n_experts=E, top_k=k, granularity=G, format="qwen2_moe",
                                                              renormalize=renorm))
    s = G ** (1 / 3) if renorm else (E / G * G**2 / k) ** (1 / 3)
    a, b = CheckpointReader(str(src)), CheckpointReader(str(tmp_path / "g"))
    gate, down = a.get("model.layers.0.mlp.gate_proj.weight"), a.get("model.layers.0.mlp.down_proj.weight")
    Fe = F // G
    for e in range(E):
        g = e % G
        torch.testing.assert_close(b.get(f"model.layers.0.mlp.experts.{e}.gate_proj.weight"), s * gate[g * Fe:(g + 1) * Fe])
        torch.testing.assert_close(b.get(f"model.layers.0.mlp.experts.{e}.down_proj.weight"), s * down[:, g * Fe:(g + 1) * Fe])
    cfg = json.loads((tmp_path / "g" / "config.json").read_text())
    assert cfg["moe_intermediate_size"] == Fe and cfg["intermediate_size"] == F and cfg["norm_topk_prob"] is renorm
    _load(Qwen2MoeForCausalLM, tmp_path / "g")


def _with_tokenizer(src, folder, text: str):
    """A copy of the checkpoint in ``src`` with a word-level tokenizer of ``text``'s words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    shutil.copytree(src, folder)
    words = sorted(set(text.split()))
    tok = Tokenizer(models.WordLevel({w: i + 1 for i, w in enumerate(words)} | {"<unk>": 0}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(str(folder))
    return folder


def test_router_inits(llama, tmp_path):
    src, dense = llama
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    # k-means needs the source's own token ids: without a tokenizer the text cannot be read
    with pytest.raises(ValueError, match=r"calibration_text: the source .* has no tokenizer"):
        upcycle(str(src), str(tmp_path / "km"), UpcycleOptions(n_experts=4, format="mixtral", router_init="kmeans",
                                                               calibration_text=str(text)))
    assert not (tmp_path / "km").exists()
    src = _with_tokenizer(src, tmp_path / "tok", text.read_text())
    got = {}
    for init in ("normal", "zeros", "orthogonal", "kmeans"):
        out = tmp_path / init
        upcycle(str(src), str(out), UpcycleOptions(n_experts=4, format="mixtral", router_init=init,
                                                   calibration_text=str(text) if init == "kmeans" else None))
        got[init] = CheckpointReader(str(out)).get("model.layers.2.block_sparse_moe.gate.weight")
        if init == "kmeans":
            assert _diff(dense, _load(MixtralForCausalLM, out)) <= TOL
    assert torch.count_nonzero(got["zeros"]) == 0
    assert abs(float(got["normal"].std()) - 0.02) < 0.006
    o = got["orthogonal"]
    torch.testing.assert_close(o @ o.t(), (0.02**2 * D) * torch.eye(4), atol=1e-6, rtol=1e-4)
    km = got["kmeans"]
    torch.testing.assert_close(km.norm(dim=1), torch.full((4,), 0.02 * math.sqrt(D)))
    assert float((km @ km.t() - torch.diag(torch.diag(km @ km.t()))).abs().max()) > 0  # distinct centroids
    import hashlib

    prov = json.loads((tmp_path / "kmeans" / "upcycle.json").read_text())
    assert prov["calibration_text_sha256"] == hashlib.sha256(text.read_bytes()).hexdigest()


def test_seeded_per_layer_and_expert(llama, tmp_path):
    """The same tensors whatever the shard split or the set of layers converted."""
    src, _ = llama
    base = dict(n_experts=4, format="qwen2_moe", expert_init="noise", seed=7)
    with pytest.warns(UpcycleWarning):
        upcycle(str(src), str(tmp_path / "a"), UpcycleOptions(**base, max_shard_bytes=30_000))
        upcycle(str(src), str(tmp_path / "b"), UpcycleOptions(**base, layers=[2]))
        upcycle(str(src), str(tmp_path / "c"), UpcycleOptions(**{**base, "seed": 8}))
    a, b, c = (CheckpointReader(str(tmp_path / x)) for x in "abc")
    assert len(a.files) > 1 and len(b.files) == 1
    names = [n for n in b.infos if n.startswith("model.layers.2.mlp.")]
    assert len(names) == 4 * 3 + 1 + 4
    for n in names:
        assert torch.equal(a.get(n), b.get(n)), n
    assert not torch.equal(a.get("model.layers.2.mlp.experts.0.up_proj.weight"),
                           c.get("model.layers.2.mlp.experts.0.up_proj.weight"))


# ------------------------------------------------------------------ flopwise checkpoints and optimizer state
def test_flopwise_dense_to_moe_with_adam_moments(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_heads=2, d_ff=48, n_layers=3, max_seq_len=32)
    model = Transformer(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    tokens = torch.randint(64, (2, 9))
    for _ in range(2):
        opt.zero_grad()
        model(tokens, tokens).loss.backward()
        opt.step()
    model.eval()
    save_flopwise(model, str(tmp_path / "dense"))
    names = {id(p): n for n, p in model.named_parameters()}
    moments = {}
    for p, st in opt.state.items():
        moments[f"exp_avg.{names[id(p)]}"] = st["exp_avg"]
        moments[f"exp_avg_sq.{names[id(p)]}"] = st["exp_avg_sq"]
    moments["step"] = torch.tensor(2.0)
    save_file(moments, str(tmp_path / "dense" / "optimizer.safetensors"), metadata={"step": "2"})

    report = upcycle(str(tmp_path / "dense"), str(tmp_path / "moe"),
                     UpcycleOptions(n_experts=4, top_k=2, layers="every_other"), verify=True)
    assert report.verify.max_abs_diff <= TOL
    moe = load_flopwise(str(tmp_path / "moe")).eval()
    assert moe.cfg.mlp == ("dense", "moe", "dense") and moe.cfg.moe_n_experts == 4
    with torch.no_grad():
        assert float((moe(tokens).logits - model(tokens).logits).abs().max()) <= TOL
    # Moments: experts carry the dense MLP's (transposed into [E, D, F]), the router zeros.
    with safe_open(str(tmp_path / "moe" / "optimizer.safetensors"), "pt") as f:
        assert f.metadata()["step"] == "2"
        m = {k: f.get_tensor(k) for k in f.keys()}
    assert float(m.pop("step")) == 2.0
    w_in = moments["exp_avg.layers.1.mlp.w_in.weight"]
    for e in range(4):
        assert torch.equal(m["exp_avg.layers.1.mlp.w_gate"][e], w_in[:48].t())
        assert torch.equal(m["exp_avg.layers.1.mlp.w_up"][e], w_in[48:].t())
        assert torch.equal(m["exp_avg_sq.layers.1.mlp.w_down"][e], moments["exp_avg_sq.layers.1.mlp.w_out.weight"].t())
    assert torch.count_nonzero(m["exp_avg.layers.1.mlp.router.weight"]) == 0
    # Training resumes: the moments load into Adam for the MoE's parameters and a step runs.
    params = dict(moe.named_parameters())
    assert set(k.split(".", 1)[1] for k in m) == set(params)
    moe.train()
    opt2 = torch.optim.Adam(moe.parameters(), lr=1e-3)
    for n, p in params.items():
        opt2.state[p] = {"step": torch.tensor(2.0), "exp_avg": m[f"exp_avg.{n}"].clone(),
                         "exp_avg_sq": m[f"exp_avg_sq.{n}"].clone()}
    moe(tokens, tokens).loss.backward()
    opt2.step()
    assert all(torch.isfinite(p).all() for p in moe.parameters())


# ------------------------------------------------------------------ trust: atomic writes, bad input, dry run
def test_atomic_writes_and_force(llama, tmp_path, monkeypatch):
    src, _ = llama
    dst = tmp_path / "out"
    opts = UpcycleOptions(n_experts=2, top_k=1, format="mixtral", max_shard_bytes=30_000)
    dst.mkdir()
    (dst / "keep.txt").write_text("old")
    with pytest.raises(FileExistsError, match="force"):
        upcycle(str(src), str(dst), opts)
    # force replaces only earlier upcycle outputs, never a folder of other files
    with pytest.raises(FileExistsError, match="not an upcycle output.*keep.txt"):
        upcycle(str(src), str(dst), opts, force=True)
    assert os.listdir(dst) == ["keep.txt"]
    (dst / "keep.txt").unlink()
    upcycle(str(src), str(dst), UpcycleOptions(n_experts=2, top_k=1, format="mixtral"), force=True)  # empty: ok
    before = sorted(os.listdir(dst))
    assert "upcycle.json" in before and "model.safetensors" in before
    # A failure in the middle (after some shards are written) leaves the old folder intact.
    from flopwise.models import upcycle as up

    real, calls = up.write_shard, []

    def failing(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return real(*args, **kw)

    monkeypatch.setattr(up, "write_shard", failing)
    with pytest.raises(OSError, match="disk full"):
        upcycle(str(src), str(dst), opts, force=True)
    assert sorted(os.listdir(dst)) == before
    _no_leftovers(tmp_path)
    monkeypatch.setattr(up, "write_shard", real)
    upcycle(str(src), str(dst), opts, force=True)
    assert (dst / "model.safetensors.index.json").exists() and not (dst / "model.safetensors").exists()
    _no_leftovers(tmp_path)
    (dst / "notes.txt").write_text("mine")  # an upcycle output the user added to is kept too
    with pytest.raises(FileExistsError, match="notes.txt"):
        upcycle(str(src), str(dst), opts, force=True)
    assert (dst / "notes.txt").read_text() == "mine"
    # A verification failure publishes nothing.
    monkeypatch.setattr(up, "_equality_warnings", lambda o: [])
    with pytest.raises(VerificationError):
        upcycle(str(src), str(tmp_path / "v"), UpcycleOptions(n_experts=2, format="mixtral", expert_init="noise",
                                                              noise_std=1.0), verify=True)
    assert not (tmp_path / "v").exists()
    _no_leftovers(tmp_path)


def _rewrite(folder, drop=None, reshape=None):
    """Rewrite a single-file checkpoint without one tensor or with one tensor reshaped."""
    path = str(folder / "model.safetensors")
    sd = load_file(path)
    if drop:
        del sd[drop]
    if reshape:
        sd[reshape] = sd[reshape][:-1].contiguous()
    save_file(sd, path, metadata={"format": "pt"})


@pytest.mark.parametrize("case, pattern", [
    ("unknown_arch", r"model_type='gpt2'"),
    ("missing", r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"),
    ("shape", r"shape mismatch for tensor 'model\.layers\.2\.mlp\.down_proj\.weight'"),
    ("truncated", r"corrupt safetensors file .*model\.safetensors"),
    ("bad_header", r"corrupt safetensors file .*not JSON"),
    ("topk", r"n_experts \(E=2\) must be >= top_k \(k=4\)"),
    ("mixtral_subset", r"option layers: the mixtral format"),
], ids=["unknown_arch", "missing", "shape", "truncated", "bad_header", "topk", "mixtral_subset"])
def test_bad_input_names_the_problem_and_writes_nothing(tmp_path, case, pattern):
    torch.manual_seed(0)
    src = tmp_path / "src"
    _tiny("llama", src)
    opts = dict(n_experts=4, top_k=2, format="mixtral")
    if case == "unknown_arch":
        cfg = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    elif case == "missing":
        _rewrite(src, drop="model.layers.1.mlp.up_proj.weight")
    elif case == "shape":
        _rewrite(src, reshape="model.layers.2.mlp.down_proj.weight")
    elif case == "truncated":
        p = src / "model.safetensors"
        p.write_bytes(p.read_bytes()[:-100])
    elif case == "bad_header":
        p = src / "model.safetensors"
        raw = bytearray(p.read_bytes())
        raw[8] = ord("#")
        p.write_bytes(bytes(raw))
    elif case == "mixtral_subset":
        opts["layers"] = "every_other"
    dst = tmp_path / "dst"
    with pytest.raises(ValueError, match=pattern):
        upcycle(str(src), str(dst), UpcycleOptions(**{**opts, "n_experts": 2, "top_k": 4}) if case == "topk"
                else UpcycleOptions(**opts))
    assert not dst.exists()
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_dry_run_matches_the_real_output(llama, tmp_path):
    src, _ = llama
    opts = UpcycleOptions(n_experts=4, top_k=2, format="qwen2_moe", layers="every_other", max_shard_bytes=50_000)
    s = plan_upcycle(str(src), opts).summary()
    assert not (tmp_path / "q").exists()
    upcycle(str(src), str(tmp_path / "q"), opts)
    moe = _load(Qwen2MoeForCausalLM, tmp_path / "q")
    n_total = sum(p.numel() for p in moe.parameters())
    assert s["total_params"] == n_total
    assert s["total_params"] - s["active_params"] == 2 * 2 * 3 * D * F  # 2 MoE layers x (E - k) idle experts
    files = {x["file"]: x["bytes"] for x in s["shards"]}
    index = json.loads((tmp_path / "q" / "model.safetensors.index.json").read_text())
    assert set(files) == set(index["weight_map"].values()) and sum(files.values()) == s["output_bytes"]
    for f, nbytes in files.items():
        infos, _ = read_header(str(tmp_path / "q" / f))
        assert sum(i.nbytes for i in infos.values()) == nbytes
    assert s["peak_bytes_estimate"] > 0 and s["exact"]
    assert resolve_layers("last:2", 5) == [3, 4] and resolve_layers("0,3", 5) == [0, 3]
    with pytest.raises(ValueError, match="layers"):
        resolve_layers([7], 4)


def test_cli(llama, tmp_path, capsys):
    src, dense = llama
    parser = argparse.ArgumentParser()
    _cli_upcycle.add_parser(parser.add_subparsers())

    def run(*argv):
        args = parser.parse_args(["upcycle", *map(str, argv)])
        return args.func(args)

    dst = tmp_path / "cli"
    assert run(src, dst, "--experts", 4, "--top-k", 2, "--format", "qwen2_moe", "--layers", "1,3",
               "--dry-run", "--json") == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["moe_layers"] == [1, 3] and not dst.exists()
    assert run(src, dst, "--experts", 4, "--top-k", 2, "--verify", "--json", "--max-shard-size", "50KB") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["verify"]["passed"] and out["verify"]["max_abs_diff"] <= TOL
    assert _diff(dense, _load(MixtralForCausalLM, dst)) <= TOL
    with pytest.raises(FileExistsError):
        run(src, dst, "--experts", 4)
    with pytest.raises(ValueError, match=r"--experts \(E=2\) must be >= --top-k"):  # flags, not field names
        run(src, tmp_path / "x", "--experts", 2, "--top-k", 3)
    # an option the chosen method does not use is refused, not silently ignored
    for extra, match in ((["--noise-std", "0.1"], "--noise-std is used only with --expert-init noise"),
                         (["--expert-init", "noise", "--drop-ratio", "0.3"], "--drop-ratio is used only"),
                         (["--router-init", "zeros", "--router-std", "0.1"], "--router-std is used only"),
                         (["--calibration-text", src / "config.json"], "--calibration-text is used only")):
        with pytest.raises(ValueError, match=match):
            run(src, tmp_path / "y", "--experts", 4, *extra)
        assert not (tmp_path / "y").exists()
    assert run(src, tmp_path / "y", "--experts", 4, "--expert-init", "noise", "--noise-std", "0.1",
               "--dry-run", "--json") == 0


def test_streaming_reader_and_copy_fallback(llama, tmp_path, monkeypatch):
    """Row reads match safe_open's slices; without copy_file_range the bytes go through memory."""
    src, _ = llama
    reader = CheckpointReader(str(src))
    name = "model.layers.1.mlp.down_proj.weight"
    with safe_open(reader.info(name).file, "pt") as f:
        assert torch.equal(reader.get(name, (5, 17)), f.get_slice(name)[5:17])
    with pytest.raises(ValueError, match="rows"):
        reader.get(name, (3, 99))

    def unsupported(*args, **kw):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", unsupported)
    upcycle(str(src), str(tmp_path / "m"), UpcycleOptions(n_experts=2, top_k=1, format="mixtral"))
    b = CheckpointReader(str(tmp_path / "m"))
    assert torch.equal(b.get("model.layers.1.block_sparse_moe.experts.1.w2.weight"), reader.get(name))
    assert torch.equal(b.get("lm_head.weight"), reader.get("lm_head.weight"))


# ------------------------------------------------------------------ destinations, sources and formats
def _tiny_flopwise(folder, **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(**{**dict(vocab_size=64, d_model=32, n_heads=2, d_ff=48, n_layers=2, max_seq_len=32), **kw})
    model = Transformer(cfg).eval()
    save_flopwise(model, str(folder))
    return model


def test_force_never_touches_the_source(tmp_path):
    parent = tmp_path / "parent"
    parent.mkdir()
    _tiny_flopwise(parent / "dense")
    _tiny_flopwise(parent / "dense2")
    os.symlink(parent / "dense", tmp_path / "link")
    opts = UpcycleOptions(n_experts=2, top_k=1)
    before = {p: sorted(os.listdir(p)) for p in (parent, parent / "dense", parent / "dense2")}
    for src, dst, what in ((tmp_path / "link", parent / "dense", "is the source"),  # same folder via a symlink
                           (parent / "dense2", parent, "contains the source"),
                           (parent / "dense", parent / "dense" / "model.safetensors", "is inside the source")):
        with pytest.raises(ValueError, match=what):
            upcycle(str(src), str(dst), opts, force=True)
    assert {p: sorted(os.listdir(p)) for p in before} == before
    # force replaces an earlier upcycle output, never an unrelated folder or a symlink
    upcycle(str(parent / "dense"), str(tmp_path / "moe"), opts)
    upcycle(str(parent / "dense"), str(tmp_path / "moe"), opts, force=True)
    with pytest.raises(FileExistsError, match="not an upcycle output"):
        upcycle(str(parent / "dense"), str(parent / "dense2"), opts, force=True)
    with pytest.raises(FileExistsError, match="symlink"):
        upcycle(str(parent / "dense2"), str(tmp_path / "link"), opts, force=True)
    assert {p: sorted(os.listdir(p)) for p in before} == before
    # the published folder has the mode a new folder gets, not mkdtemp's private 0700
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(tmp_path / "moe").st_mode & 0o777 == 0o777 & ~mask


def test_destination_checked_again_before_it_is_replaced(tmp_path, monkeypatch):
    """A long upcycle: what appears at the destination meanwhile is never deleted."""
    from flopwise.models import upcycle as up

    _tiny_flopwise(tmp_path / "dense")
    opts = UpcycleOptions(n_experts=2, top_k=1)
    upcycle(str(tmp_path / "dense"), str(tmp_path / "moe"), opts)
    before = sorted(os.listdir(tmp_path / "moe"))
    real = up.publish_mode

    def meanwhile(folder):  # runs after the shards are written, before the rename
        (tmp_path / "moe" / "notes.txt").write_text("mine")
        (tmp_path / "new").mkdir(exist_ok=True)
        real(folder)

    monkeypatch.setattr(up, "publish_mode", meanwhile)
    with pytest.raises(FileExistsError, match="notes.txt"):
        upcycle(str(tmp_path / "dense"), str(tmp_path / "moe"), opts, force=True)
    assert sorted(os.listdir(tmp_path / "moe")) == sorted(before + ["notes.txt"])
    with pytest.raises(FileExistsError, match="exists; pass force=True"):  # created meanwhile, no force
        upcycle(str(tmp_path / "dense"), str(tmp_path / "new"), opts)
    assert os.listdir(tmp_path / "new") == []
    _no_leftovers(tmp_path)


def test_check_replaceable_folder(tmp_path, monkeypatch):
    """The rule every --force output folder follows (upcycle, checkpoints, coding build)."""
    from flopwise.models.safetensors_io import check_replaceable_folder

    def check(path, allowed=("a.json", "b.bin"), **kw):
        check_replaceable_folder(path, allowed, kind="a test output", advice="do it yourself",
                                 required=("a.json",), folders=("sub",), **kw)

    check(tmp_path / "absent")
    d = tmp_path / "d"
    d.mkdir()
    check(d)  # an empty folder
    (d / "a.json").write_text("{}")
    (d / "b.bin").write_bytes(b"")
    (d / "sub").mkdir()
    (d / "sub" / "anything").write_text("x")  # an allowed folder's contents are not checked
    check(d)
    check(d, allowed=lambda e: e.endswith((".json", ".bin")))
    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to(d)
    (tmp_path / "dangling").symlink_to(tmp_path / "absent")
    for path, why in ((tmp_path / "file", "is not a folder"), (tmp_path / "link", "is a symlink"),
                      (tmp_path / "dangling", "is a symlink")):
        with pytest.raises(FileExistsError, match=f"^{path} {why}; do it yourself$"):
            check(path)
    e = tmp_path / "e"
    for make, name in ((lambda p: p.write_text(""), ".hidden"), (lambda p: p.mkdir(), "a.json"),
                       (lambda p: p.write_text(""), "sub"), (lambda p: p.symlink_to(d / "b.bin"), "b.bin"),
                       (lambda p: p.symlink_to(d / "sub"), "sub")):
        shutil.rmtree(e, ignore_errors=True)
        shutil.copytree(d, e)
        shutil.rmtree(e / name) if (e / name).is_dir() else (e / name).unlink(missing_ok=True)
        make(e / name)
        with pytest.raises(FileExistsError, match=f"^{e} is not a test output: it holds '{name}', which "
                                                  f"replacing it would delete; do it yourself$"):
            check(e)
    (e / name).unlink()
    for i in range(5):
        (e / f"x{i}").write_text("")
    with pytest.raises(FileExistsError, match=r"holds 'x0', 'x1', 'x2' and 2 more, which"):
        check(e, name="the output")
    f = tmp_path / "f"
    f.mkdir()
    (f / "b.bin").write_bytes(b"")
    with pytest.raises(FileExistsError, match=r"^the output is not a test output \(no a.json\); do it"):
        check(f, name="the output")

    def unreadable(path):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(os, "listdir", unreadable)
    with pytest.raises(PermissionError):  # a folder that cannot be listed is never replaced
        check(d)


def test_flopwise_source_with_moe_layers_keeps_their_settings(tmp_path):
    # expert choice: kept for the new layers, and exactness is no longer promised
    _tiny_flopwise(tmp_path / "ec", mlp=("moe", "dense"), moe_router="expert_choice", moe_capacity_factor=1.5,
                   moe_n_experts=4)
    opts = UpcycleOptions(n_experts=4, top_k=2, layers=(1,))
    with pytest.warns(UpcycleWarning, match="expert-choice"):
        report = upcycle(str(tmp_path / "ec"), str(tmp_path / "ec_moe"), opts, verify=True)
    assert not report.verify.expected_equal
    cfg = json.loads((tmp_path / "ec_moe" / "config.json").read_text())
    assert cfg["moe_router"] == "expert_choice" and cfg["moe_capacity_factor"] == 1.5 and cfg["mlp"] == ["moe", "moe"]
    # existing experts of another hidden size: the new ones must match them
    _tiny_flopwise(tmp_path / "dff", mlp=("moe", "dense"), d_ff=64, moe_d_ff=32, moe_n_experts=4)
    with pytest.raises(ValueError, match=r"hidden size 32 \(moe_d_ff\).*granularity"):
        upcycle(str(tmp_path / "dff"), str(tmp_path / "dff_moe"), opts)
    assert not (tmp_path / "dff_moe").exists()
    with pytest.warns(UpcycleWarning, match="granularity"):
        upcycle(str(tmp_path / "dff"), str(tmp_path / "dff_moe"), UpcycleOptions(n_experts=4, top_k=2, layers=(1,),
                                                                                 granularity=2))
    moe = load_flopwise(str(tmp_path / "dff_moe"))
    assert moe.cfg.moe_d_ff == 32 and moe.cfg.mlp == ("moe", "moe")
    # group-limited routing is kept and stays exact (k copies of the MLP, weights summing to
    # one); a route scale is kept and scales the new layers, so exactness is not promised
    group = dict(moe_n_group=2, moe_topk_group=1, moe_group_score="max")
    _tiny_flopwise(tmp_path / "grp", mlp=("moe", "dense"), moe_n_experts=4, **group)
    report = upcycle(str(tmp_path / "grp"), str(tmp_path / "grp_moe"), opts, verify=True)
    assert report.verify.expected_equal and report.verify.passed
    assert load_flopwise(str(tmp_path / "grp_moe")).cfg.moe_n_group == 2
    _tiny_flopwise(tmp_path / "scaled", mlp=("moe", "dense"), moe_n_experts=4, moe_route_scale=2.5, **group)
    with pytest.warns(UpcycleWarning, match=r"moe_route_scale=2.5.*no longer reproduces"):
        report = upcycle(str(tmp_path / "scaled"), str(tmp_path / "scaled_moe"), opts, verify=True)
    assert not report.verify.expected_equal
    assert load_flopwise(str(tmp_path / "scaled_moe")).cfg.moe_route_scale == 2.5
    # a dense source's config may set them too (unused until now): the new layers take them
    _tiny_flopwise(tmp_path / "dense_scaled", moe_route_scale=2.5)
    plan = plan_upcycle(str(tmp_path / "dense_scaled"), UpcycleOptions(n_experts=4, top_k=2))
    assert not plan.exact and any("moe_route_scale=2.5" in w for w in plan.warnings)
    _tiny_flopwise(tmp_path / "dense_grouped", moe_n_group=4, moe_topk_group=2)  # fits the default 8 experts
    with pytest.raises(ValueError, match=r"take the source config's other moe_\* fields.*n_experts=6.*moe_n_group "
                                         r"must divide the number of experts E = 6"):
        plan_upcycle(str(tmp_path / "dense_grouped"), UpcycleOptions(n_experts=6, top_k=2))


def test_flopwise_source_rejects_stray_tensors(tmp_path):
    _tiny_flopwise(tmp_path / "src")
    path = str(tmp_path / "src" / "model.safetensors")
    sd = load_file(path)
    for extra in ("layers.2.norm1.weight", "extra_buffer"):
        save_file({**sd, extra: torch.zeros(32)}, path)
        with pytest.raises(ValueError, match=f"unexpected tensor '{extra}'"):
            upcycle(str(tmp_path / "src"), str(tmp_path / "moe"), UpcycleOptions(n_experts=2, top_k=1))
    assert not (tmp_path / "moe").exists()
    with pytest.raises(ValueError, match="every_other.*none of the source's 1 layer"):
        resolve_layers("every_other", 1)


def test_qwen2_sliding_window_without_layer_types(tmp_path):
    """Older Qwen2 configs have no layer_types: Qwen2 slides from max_window_layers on,
    while Qwen2-MoE would derive another pattern; the output states the source's."""
    torch.manual_seed(2)
    src = tmp_path / "q"
    dense = _tiny("qwen2", src, use_sliding_window=True, sliding_window=4, max_window_layers=2)
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("layer_types", None)
    (src / "config.json").write_text(json.dumps(cfg))
    report = upcycle(str(src), str(tmp_path / "moe"), UpcycleOptions(n_experts=4, top_k=2, format="qwen2_moe"),
                     verify=True)
    assert report.verify.passed and not report.verify.config_diffs
    out = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert out["layer_types"] == ["full_attention"] * 2 + ["sliding_attention"] * 2
    assert _diff(dense, _load(Qwen2MoeForCausalLM, tmp_path / "moe")) <= TOL
    # A window the probe is too short to show is still caught: verify compares the configs.
    from flopwise.models.upcycle import verify_upcycle

    out["sliding_window"] = 64
    (tmp_path / "moe" / "config.json").write_text(json.dumps(out))
    v = verify_upcycle(str(src), str(tmp_path / "moe"), seq_len=4)
    assert not v.passed and any("sliding window" in d for d in v.config_diffs)


def test_mixed_mlp_dtypes_are_kept_per_matrix(llama, tmp_path):
    src, _ = llama
    reader = CheckpointReader(str(src))
    tensors = {n: reader.get(n) for n in reader.infos}
    for n in tensors:
        if "up_proj" in n:
            tensors[n] = tensors[n].to(torch.float16)
        elif "gate_proj" in n:
            tensors[n] = tensors[n].to(torch.bfloat16)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    save_file(tensors, str(mixed / "model.safetensors"), metadata={"format": "pt"})
    (mixed / "config.json").write_text((src / "config.json").read_text())
    upcycle(str(mixed), str(tmp_path / "moe"), UpcycleOptions(n_experts=2, top_k=1, format="mixtral"))
    out = CheckpointReader(str(tmp_path / "moe"))
    for w, kind in (("w1", "gate"), ("w3", "up"), ("w2", "down")):
        got = out.get(f"model.layers.1.block_sparse_moe.experts.1.{w}.weight")
        assert torch.equal(got, tensors[f"model.layers.1.mlp.{kind}_proj.weight"]), w  # dtype and values
    # copied bytes of another dtype than planned are refused, not written
    from flopwise.models.safetensors_io import FileRange, ShardPlan, write_shard

    info = reader.info("model.layers.1.mlp.up_proj.weight")
    plan = ShardPlan("x.safetensors", [("t", torch.bfloat16, info.shape)])
    with pytest.raises(TypeError, match="hold torch.float32, planned torch.bfloat16"):
        write_shard(str(tmp_path / "x.safetensors"), plan,
                    lambda name: iter([FileRange(info.file, info.start, info.nbytes // 2, info.dtype)]))


def test_tokenizer_and_chat_files_are_carried(llama, tmp_path):
    src, _ = llama
    copy = tmp_path / "src"
    copy.mkdir()
    for f in os.listdir(src):
        (copy / f).write_bytes((src / f).read_bytes())
    extra = {"chat_template.jinja": "{{ messages }}", "chat_template.json": "{}", "added_tokens.json": "{}"}
    for name, text in extra.items():
        (copy / name).write_text(text)
    (copy / "additional_chat_templates").mkdir()
    (copy / "additional_chat_templates" / "tool.jinja").write_text("{{ tools }}")
    upcycle(str(copy), str(tmp_path / "moe"), UpcycleOptions(n_experts=2, top_k=1, format="mixtral"))
    for name, text in extra.items():
        assert (tmp_path / "moe" / name).read_text() == text
    assert (tmp_path / "moe" / "additional_chat_templates" / "tool.jinja").read_text() == "{{ tools }}"
    # and such an output can be replaced again with force
    upcycle(str(copy), str(tmp_path / "moe"), UpcycleOptions(n_experts=2, top_k=1, format="mixtral"), force=True)


def test_save_flopwise_replaces_a_sharded_checkpoint(tmp_path):
    _tiny_flopwise(tmp_path / "dense")
    out = tmp_path / "moe"
    upcycle(str(tmp_path / "dense"), str(out), UpcycleOptions(n_experts=2, top_k=1, max_shard_bytes=20_000))
    assert (out / "model.safetensors.index.json").exists()
    model = load_flopwise(str(out))
    with torch.no_grad():
        model.layers[0].mlp.w_gate.zero_()
    save_flopwise(model, str(out))
    assert not (out / "model.safetensors.index.json").exists()
    assert not [f for f in os.listdir(out) if f.startswith("model-")]
    assert (out / "upcycle.json").exists()  # other files stay
    assert torch.count_nonzero(load_flopwise(str(out)).layers[0].mlp.w_gate) == 0
    # a folder with both layouts is ambiguous: refused, not read
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
    with pytest.raises(ValueError, match="both model.safetensors and model.safetensors.index.json"):
        CheckpointReader(str(out))
    (out / "model.safetensors").unlink()
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"embed.weight": "../x.safetensors"}}))
    with pytest.raises(ValueError, match="paths are refused"):
        CheckpointReader(str(out))


def test_cli_reports_os_errors_in_one_line(tmp_path, monkeypatch, capsys):
    """A destination that cannot be created fails at once: no traceback, and the source is
    not hashed first."""
    from flopwise import cli
    from flopwise.models import upcycle as up

    _tiny_flopwise(tmp_path / "dense")
    hashed = []
    monkeypatch.setattr(up, "_sha256", lambda *a: hashed.append(a) or "0" * 64)

    def denied(*a, **kw):
        raise PermissionError(13, "Permission denied", kw.get("dir"))

    monkeypatch.setattr(up.tempfile, "mkdtemp", denied)
    assert cli.main(["upcycle", str(tmp_path / "dense"), str(tmp_path / "moe"), "--experts", "2", "--top-k", "1",
                     "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot create the destination" in err and "Permission denied" in err
    assert not hashed and not (tmp_path / "moe").exists()


# ------------------------------------------------------------------ --force, --verify and the remaining checks
def test_force_keeps_a_model_saved_into_the_output(llama, tmp_path):
    """A model fine-tuned from the upcycled one and saved back into its folder has the same
    file names (and sizes) as the upcycle wrote: --force must not delete it."""
    src, _ = llama
    out = tmp_path / "moe"
    opts = UpcycleOptions(n_experts=2, top_k=1, format="mixtral")
    upcycle(str(src), str(out), opts)
    upcycle(str(src), str(out), opts, force=True)  # an unchanged output is replaced
    moe = _load(MixtralForCausalLM, out)
    with torch.no_grad():
        for p in moe.parameters():
            p.add_(0.01)
    moe.save_pretrained(str(out))
    tuned = {f: (out / f).read_bytes() for f in os.listdir(out)}
    with pytest.raises(FileExistsError, match=r"is an upcycle output, but 'config\.json', .*'model\.safetensors'.* "
                                              r"saved or changed there since.*fine-tuned.*move it away or remove it"):
        upcycle(str(src), str(out), opts, force=True)
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == tuned
    # the same size is not enough: a file rewritten in place counts as changed
    shutil.rmtree(out)
    upcycle(str(src), str(out), opts)
    with open(out / "model.safetensors", "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\x00\x00\x80\x3f")
    with pytest.raises(FileExistsError, match="'model.safetensors' was saved or changed"):
        upcycle(str(src), str(out), opts, force=True)
    # an upcycle.json without the record of written files (an older output) is not enough either
    shutil.rmtree(out)
    upcycle(str(src), str(out), opts)
    prov = json.loads((out / "upcycle.json").read_text())
    assert set(prov["output_files"]) == set(os.listdir(out)) - {"upcycle.json"}
    del prov["output_files"]
    (out / "upcycle.json").write_text(json.dumps(prov))
    with pytest.raises(FileExistsError, match="without the record of the files"):
        upcycle(str(src), str(out), opts, force=True)
    assert (out / "model.safetensors").exists()


def test_flopwise_target_stores_aux_loss_coef_and_renormalize(tmp_path, capsys):
    """The flopwise format stores both (moe_load_balance_coef, moe_normalize_topk); a source
    that already has MoE layers keeps its own, and a different explicit value is refused."""
    from flopwise.models.hf_formats import load_flopwise

    _tiny_flopwise(tmp_path / "dense")
    parser = argparse.ArgumentParser()
    _cli_upcycle.add_parser(parser.add_subparsers())
    args = parser.parse_args(["upcycle", str(tmp_path / "dense"), str(tmp_path / "moe"), "--experts", "2",
                              "--top-k", "1", "--aux-loss-coef", "0.1", "--no-renormalize", "--layers", "0",
                              "--quiet"])
    assert args.func(args) == 0
    assert "warning: renormalize=False" in capsys.readouterr().err
    cfg = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert (cfg["moe_load_balance_coef"], cfg["moe_normalize_topk"]) == (0.1, False)
    layer = load_flopwise(str(tmp_path / "moe")).layers[0].mlp
    assert (layer.config.load_balance_coef, layer.config.normalize_topk) == (0.1, False)
    # the rest of that model's layers: its settings apply to them; no option given -> taken over
    with pytest.warns(UpcycleWarning, match="renormalize=False"):
        upcycle(str(tmp_path / "moe"), str(tmp_path / "moe2"),
                UpcycleOptions(n_experts=2, top_k=1, layers=[1], renormalize=False))
    cfg2 = json.loads((tmp_path / "moe2" / "config.json").read_text())
    assert (cfg2["mlp"], cfg2["moe_load_balance_coef"], cfg2["moe_normalize_topk"]) == (["moe", "moe"], 0.1, False)
    with pytest.raises(ValueError, match=r"option aux_loss_coef=0\.01: the source's existing MoE layers have "
                                         r"moe_load_balance_coef=0\.1"):
        plan_upcycle(str(tmp_path / "moe"), UpcycleOptions(n_experts=2, top_k=1, layers=[1], renormalize=False,
                                                           aux_loss_coef=0.01))
    with pytest.raises(ValueError, match=r"option renormalize=True: the source's existing MoE layers have "
                                         r"moe_normalize_topk=False"):
        plan_upcycle(str(tmp_path / "moe"), UpcycleOptions(n_experts=2, top_k=1, layers=[1]))


def test_flopwise_source_with_selection_biases(tmp_path, monkeypatch):
    """A trained flopwise MoE with auxiliary-loss-free balancing (expert_bias buffers, which
    have no optimizer moments): its biases are copied, the new layer gets a zero one, and the
    optimizer state is upcycled without moments for them; the result resumes training."""
    from flopwise.models.checkpoint import load_checkpoint
    from flopwise.models.data import embedded_corpus
    from flopwise.models.train import TrainConfig, Trainer

    monkeypatch.setenv("FLOPWISE_BACKEND", "reference")  # the upcycler is under test, not the kernels
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=64, mlp=["moe", "dense"],
                      moe_n_experts=4, moe_top_k=1, moe_bias_update_rate=0.01)
    data = embedded_corpus()
    t = Trainer(cfg, TrainConfig(seq_len=32, batch_size=2, max_steps=4, warmup_steps=1, eval_tokens=64), data,
                progress=False)
    for _ in range(3):
        t.train_step()
    bias0 = t.model.layers[0].mlp.expert_bias.clone()
    assert bias0.abs().sum() > 0
    t.save(tmp_path / "run")
    report = upcycle(str(tmp_path / "run"), str(tmp_path / "moe"), UpcycleOptions(n_experts=4, top_k=1, layers=[1]),
                     verify=True)
    assert report is not None
    ck = load_checkpoint(tmp_path / "moe")
    assert torch.equal(ck.model.layers[0].mlp.expert_bias, bias0)
    assert torch.equal(ck.model.layers[1].mlp.expert_bias, torch.zeros(4))
    assert not any("expert_bias" in k for k in ck.optimizer)
    resumed = Trainer.resume(tmp_path / "moe", data, progress=False, out_dir=str(tmp_path / "cont"))
    resumed.train_step()
    assert resumed.model.layers[1].mlp.expert_bias.abs().sum() > 0


def test_verify_checks_loading(llama, tmp_path):
    """Tensors transformers reports missing (initialised at random), unexpected or of another
    shape fail verification, and a model that does not load raises VerificationError."""
    from flopwise.models.upcycle import verify_upcycle

    src, _ = llama
    good = tmp_path / "good"
    upcycle(str(src), str(good), UpcycleOptions(n_experts=4, top_k=2, format="mixtral", max_shard_bytes=10**9))
    sd = load_file(str(good / "model.safetensors"))
    for case, match in (("missing", "missing keys 'model.norm.weight'"), ("unexpected", "unexpected keys"),
                        ("mismatched", "mismatched keys"), ("broken", "transformers cannot load the upcycled")):
        bad = tmp_path / case
        shutil.copytree(good, bad)
        if case == "missing":
            save_file({k: v for k, v in sd.items() if k != "model.norm.weight"}, str(bad / "model.safetensors"),
                      metadata={"format": "pt"})
        elif case == "unexpected":
            save_file({**sd, "model.layers.0.extra.weight": torch.zeros(3)}, str(bad / "model.safetensors"),
                      metadata={"format": "pt"})
        elif case == "mismatched":
            cfg = json.loads((bad / "config.json").read_text())
            (bad / "config.json").write_text(json.dumps({**cfg, "intermediate_size": F // 2}))
        else:
            (bad / "model.safetensors").write_bytes(b"not a safetensors file")
        with pytest.raises(VerificationError, match=match):
            verify_upcycle(str(src), str(bad))


def test_verify_checks_every_expert(llama, tmp_path):
    """The probe routes its tokens to some experts only: experts it never reaches are still
    compared with their source MLP."""
    from flopwise.models.upcycle import verify_upcycle

    src, _ = llama
    out = tmp_path / "moe"
    E = 16
    upcycle(str(src), str(out), UpcycleOptions(n_experts=E, top_k=1, format="mixtral", max_shard_bytes=10**9))
    moe = _load(MixtralForCausalLM, out)
    tokens = torch.randint(V, (2, 16), generator=torch.Generator().manual_seed(0))  # verify's probe
    with torch.no_grad():
        logits = moe(tokens, output_router_logits=True).router_logits
    unrouted = [(i, e) for i, r in enumerate(logits) for e in sorted(set(range(E)) - set(r.argmax(-1).tolist()))]
    assert unrouted
    sd = load_file(str(out / "model.safetensors"))
    for i, e in unrouted:
        for w in ("w1", "w2", "w3"):
            sd[f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight"].zero_()
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    v = verify_upcycle(str(src), str(out))
    assert v.max_abs_diff <= TOL  # the probe alone cannot tell
    assert not v.passed and "differ from the source MLP" in v.tensor_errors[0]
    i, e = unrouted[0]
    assert f"expert {e} of layer {i}" in v.tensor_errors[0]


@pytest.mark.parametrize("init", ["noise", "drop", "granularity"])
def test_verify_checks_inexact_inits_by_their_definition(llama, tmp_path, init):
    """Where the MoE is not meant to reproduce the dense logits, verify still checks each
    expert against what its init defines, and says what it checked."""
    from flopwise.models.upcycle import verify_upcycle

    src, _ = llama
    out = tmp_path / "moe"
    kw = {"noise": dict(expert_init="noise", noise_std=0.05), "drop": dict(expert_init="drop", drop_ratio=0.25),
          "granularity": dict(granularity=2)}[init]
    with pytest.warns(UpcycleWarning):
        report = upcycle(str(src), str(out), UpcycleOptions(n_experts=4, top_k=2, format="qwen2_moe",
                                                            max_shard_bytes=10**9, **kw), verify=True)
    assert report.verify.passed and not report.verify.expected_equal
    assert any(c.startswith("experts: each of 48 expert matrices") for c in report.verify.checks)
    sd = load_file(str(out / "model.safetensors"))
    name = "model.layers.2.mlp.experts.1.up_proj.weight"
    up = CheckpointReader(str(src)).get("model.layers.2.mlp.up_proj.weight")
    if init == "noise":  # an expert left unperturbed
        sd[name] = up.clone()
    elif init == "drop":  # a kept neuron changed
        kept = int((sd[name] == up).all(1).nonzero()[0])
        sd[name][kept] += 1.0
    else:  # the other neuron shard
        sd[name] = sd["model.layers.2.mlp.experts.0.up_proj.weight"].clone()
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    v = verify_upcycle(str(src), str(out))
    assert not v.passed and "expert 1 of layer 2 (up)" in v.tensor_errors[0], v.tensor_errors


def _run_cli(*argv):
    parser = argparse.ArgumentParser()
    _cli_upcycle.add_parser(parser.add_subparsers())
    args = parser.parse_args(["upcycle", *map(str, argv)])
    return args.func(args)


def test_cli_sizes_that_overflow_are_refused():
    for text in ("inf", "1e400"):
        with pytest.raises(argparse.ArgumentTypeError, match="not a size"):
            _cli_upcycle._size(text)


def test_cli_names_the_no_renormalize_flag(llama, tmp_path):
    src, _ = llama
    with pytest.raises(ValueError, match=r"^renormalize=False \(--no-renormalize\) is not expressible in the mixtral"):
        _run_cli(src, tmp_path / "x", "--no-renormalize")


def test_dry_run_checks_the_destination(llama, tmp_path):
    """A dry run refuses the destinations the real run refuses."""
    src, _ = llama
    with pytest.raises(ValueError, match="is the source"):
        _run_cli(src, src, "--dry-run")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists; pass force"):
        _run_cli(src, tmp_path / "taken", "--dry-run")
    with pytest.raises(FileExistsError, match="not an upcycle output"):
        _run_cli(src, tmp_path / "taken", "--dry-run", "--force")
    assert _run_cli(src, tmp_path / "free", "--dry-run", "--json") == 0


def test_zero_noise_is_exact(llama, tmp_path):
    """Noise of std 0 leaves the copies exact: no warning, and verify expects the dense logits."""
    import warnings

    src, dense = llama
    with warnings.catch_warnings():
        warnings.simplefilter("error", UpcycleWarning)
        report = upcycle(str(src), str(tmp_path / "n0"), UpcycleOptions(n_experts=2, format="mixtral",
                                                                         expert_init="noise", noise_std=0.0),
                         verify=True)
    assert report.verify.expected_equal and report.verify.max_abs_diff <= TOL and not report.warnings


def test_licence_is_carried_and_the_model_card_is_not(llama, tmp_path):
    """A licence binds derivatives too: it travels with the MoE (and such an output can
    still be replaced with force). The dense model's card (its name, its evaluations) does not
    describe the MoE."""
    src = tmp_path / "src"
    shutil.copytree(llama[0], src)
    terms = {"LICENSE": "licence", "USE_POLICY.md": "policy", "NOTICE.txt": "notice"}
    for name, text in terms.items():
        (src / name).write_text(text)
    (src / "notes.txt").write_text("not carried")
    (src / "README.md").write_text("the dense model's card")
    opts = UpcycleOptions(n_experts=2, format="mixtral")
    upcycle(str(src), str(tmp_path / "t"), opts)
    for name, text in terms.items():
        assert (tmp_path / "t" / name).read_text() == text
    assert not (tmp_path / "t" / "notes.txt").exists() and not (tmp_path / "t" / "README.md").exists()
    upcycle(str(src), str(tmp_path / "t"), opts, force=True)


def test_swish_is_silu(tmp_path):
    """hidden_act "swish" is transformers' other name for SiLU."""
    torch.manual_seed(5)
    src = tmp_path / "llama"
    dense = _tiny("llama", src, hidden_act="swish")
    assert json.loads((src / "config.json").read_text())["hidden_act"] == "swish"
    upcycle(str(src), str(tmp_path / "sw"), UpcycleOptions(n_experts=2, format="mixtral"), verify=True)
    assert _diff(dense, _load(MixtralForCausalLM, tmp_path / "sw")) <= TOL


def test_pytorch_pickle_source_is_explained(llama, tmp_path):
    src, dense = llama
    binary = tmp_path / "bin"
    binary.mkdir()
    shutil.copy(src / "config.json", binary / "config.json")
    torch.save(dense.state_dict(), str(binary / "pytorch_model.bin"))
    with pytest.raises(ValueError, match=r"pytorch_model\.bin: .*not supported.*safe_serialization=True"):
        upcycle(str(binary), str(tmp_path / "b"), UpcycleOptions(n_experts=2, format="mixtral"))
    assert not (tmp_path / "b").exists()


def test_attention_biases_no_target_holds(tmp_path):
    """Llama's attention_bias puts a bias on o_proj too: qwen2_moe is not suggested."""
    torch.manual_seed(6)
    _tiny("llama", tmp_path / "ab", attention_bias=True)
    for fmt, match in (("mixtral", "mixtral has no attention biases; qwen2_moe cannot hold them either"),
                       ("qwen2_moe", "o_proj.bias'?: qwen2_moe has no o_proj bias")):
        with pytest.raises(ValueError, match=match) as info:
            upcycle(str(tmp_path / "ab"), str(tmp_path / "m"), UpcycleOptions(n_experts=2, format=fmt))
        assert "use format" not in str(info.value)


def test_flopwise_target_with_a_shared_expert(tmp_path):
    """--shared-d-ff for the flopwise format: a shared expert whose down projection is zero,
    so the MoE still reproduces the dense logits; a source that already has one passes it on."""
    dense = _tiny_flopwise(tmp_path / "dense")
    report = upcycle(str(tmp_path / "dense"), str(tmp_path / "moe"),
                     UpcycleOptions(n_experts=2, top_k=1, layers=[0], shared_d_ff=16), verify=True)
    assert report is not None
    moe = load_flopwise(str(tmp_path / "moe"))
    layer = moe.layers[0].mlp
    assert moe.cfg.moe_shared_d_ff == 16 and layer.shared.gate.weight.shape == (16, 32)
    assert torch.count_nonzero(layer.shared.down.weight) == 0 and torch.count_nonzero(layer.shared.gate.weight) > 0
    tokens = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(moe(tokens).logits, dense(tokens).logits, atol=1e-5, rtol=1e-5)
    # the second layer takes over the source's shared expert (option left at 0)
    upcycle(str(tmp_path / "moe"), str(tmp_path / "moe2"), UpcycleOptions(n_experts=2, top_k=1, layers=[1]))
    moe2 = load_flopwise(str(tmp_path / "moe2"))
    assert moe2.layers[1].mlp.shared.up.weight.shape == (16, 32)
    with pytest.raises(ValueError, match=r"option shared_d_ff=8: the source's existing MoE layers have "
                                         r"moe_shared_d_ff=16"):
        plan_upcycle(str(tmp_path / "moe"), UpcycleOptions(n_experts=2, top_k=1, layers=[1], shared_d_ff=8))
    with pytest.raises(ValueError, match=r"option shared_d_ff=20 cannot be stored: the config pads it to 32"):
        _tiny_flopwise(tmp_path / "padded", pad_to_multiple_of=16)
        plan_upcycle(str(tmp_path / "padded"), UpcycleOptions(n_experts=2, top_k=1, shared_d_ff=20))
    with pytest.raises(ValueError, match="option shared_d_ff is only expressible in the qwen2_moe format"):
        UpcycleOptions(n_experts=2, format="mixtral", shared_d_ff=8)
