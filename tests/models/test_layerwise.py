"""Layer-by-layer evaluation (models/layerwise.py) and the layer-by-layer upcycle verification:
the logits equal the whole model's; each layer is built as the whole model builds it; loading
problems name the checkpoint's tensors; a verification picks the layer-by-layer way only where
the whole models do not fit in memory, and reports where a broken layer starts."""

from __future__ import annotations

import argparse
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from flopwise import _cli_upcycle
from flopwise._cli_upcycle import _human as up_human
from flopwise.models.hf_formats import load_flopwise
from flopwise.models.layerwise import LayerwiseLoadError, LayerwiseModel, layerwise_bytes
from flopwise.models.safetensors_io import CheckpointReader
from flopwise.models.upcycle import UpcycleOptions, VerificationError, plan_upcycle, upcycle, verify_upcycle

from .test_upcycle import TOL, V, _tiny, _tiny_flopwise


def _tokens(vocab=V, shape=(2, 12)):
    return torch.randint(vocab, shape, generator=torch.Generator().manual_seed(5))


def _streamed(folder, family, tokens):
    m = LayerwiseModel(str(folder), family)
    h = m.embed(tokens)
    for i in range(m.n_layers):
        h = m.layer(i, h)
    return m.logits(h)


def _whole(folder, family, tokens):
    with torch.no_grad():
        if family == "flopwise":
            return load_flopwise(str(folder), dtype=torch.float32).eval()(tokens).logits
        return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()(tokens).logits


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Dense sources and their upcycles: (folder, family) by name."""
    root = tmp_path_factory.mktemp("layerwise")
    torch.manual_seed(0)
    _tiny("llama", root / "llama", shard="40KB")
    upcycle(str(root / "llama"), str(root / "mixtral"), UpcycleOptions(n_experts=4, top_k=2, format="mixtral"))
    upcycle(str(root / "llama"), str(root / "qwen2_moe"),
            UpcycleOptions(n_experts=4, top_k=2, format="qwen2_moe", layers="1,3", shared_d_ff=16))
    # full attention in layers 0-1, a window of 4 in layers 2-3 (shorter than the probe)
    _tiny("qwen3", root / "qwen3", use_sliding_window=True, sliding_window=4, max_window_layers=2)
    _tiny("qwen3", root / "qwen3_all_slide", tied=True, use_sliding_window=True, sliding_window=4,
          max_window_layers=0)
    upcycle(str(root / "qwen3_all_slide"), str(root / "qwen3_moe"),
            UpcycleOptions(n_experts=3, top_k=1, format="qwen3_moe"))
    _tiny_flopwise(root / "fw", n_layers=3, routing=("all", "mod", "all"), mod_capacity=0.5)
    upcycle(str(root / "fw"), str(root / "fw_moe"), UpcycleOptions(n_experts=4, top_k=2, layers="1,2"))
    return {name: (root / name, "flopwise" if name.startswith("fw") else "hf") for name in
            ("llama", "mixtral", "qwen2_moe", "qwen3", "qwen3_moe", "fw", "fw_moe")}


@pytest.mark.parametrize("name", ["llama", "mixtral", "qwen2_moe", "qwen3", "qwen3_moe", "fw", "fw_moe"])
def test_layer_by_layer_logits_equal_the_whole_model(sources, name):
    folder, family = sources[name]
    tokens = _tokens(64 if family == "flopwise" else V)
    a = _streamed(folder, family, tokens)
    b = _whole(folder, family, tokens)
    assert a.shape == b.shape and a.dtype == torch.float32
    assert float((a - b).abs().max()) <= 1e-5 * float(b.abs().max())


def test_each_layer_is_built_as_the_whole_model_builds_it(sources, monkeypatch):
    """Narrowing the config to one layer must keep that layer's own settings: a narrowing that
    gives layer 2 (sliding window) layer 0's full attention loads the same weights, so only the
    comparison with the whole model (on the meta device) can catch it."""
    folder, family = sources["qwen3"]
    m = LayerwiseModel(str(folder), family)
    assert [getattr(layer.self_attn, "sliding_window", None) for layer in m._meta.model.layers] == [None, None, 4, 4]
    original = LayerwiseModel._hf_config
    monkeypatch.setattr(LayerwiseModel, "_hf_config", lambda self, n, i: original(self, n, 0 if n else i))
    h = m.embed(_tokens())
    h = m.layer(1, m.layer(0, h))  # layers 0 and 1 are layer 0's kind: fine
    with pytest.raises(LayerwiseLoadError, match=r"does not load \(layer 2\): the one-layer copy of the config does "
                                                 r"not build layer 2 as the whole model does"):
        m.layer(2, h)
    # qwen2_moe: layer 1 is sparse, layer 0 dense; built as layer 0 it lacks the dense MLP
    # and has no place for the experts
    folder, family = sources["qwen2_moe"]
    m = LayerwiseModel(str(folder), family)
    with pytest.raises(LayerwiseLoadError, match=r"\(layer 1\): missing keys 'model\.layers\.1\.mlp\.down_proj\.weight'"
                                                 r".*; unexpected keys 'model\.layers\.1\.mlp\.experts"):
        m.layer(1, m.embed(_tokens()))


def _edit(folder, change):
    """Apply ``change(state_dict)`` to every safetensors file of ``folder`` (index kept in step)."""
    files = [f for f in os.listdir(folder) if f.endswith(".safetensors")]
    index = folder / "model.safetensors.index.json"
    for f in files:
        sd = load_file(str(folder / f))
        change(sd, f)
        save_file(sd, str(folder / f), metadata={"format": "pt"})
        if index.exists():
            data = json.loads(index.read_text())
            wm = {n: v for n, v in data["weight_map"].items() if v != f or n in sd}
            wm.update({n: f for n in sd})
            index.write_text(json.dumps({**data, "weight_map": wm}))


@pytest.mark.parametrize("name, change, pattern", [
    # transformers stacks the experts: three where four were expected
    ("mixtral", "drop", r"the model \(.*\) does not load \(layer 2\): mismatched keys .*'model\.layers\.2\.mlp\."
                        r"experts\.down_proj', torch\.Size\(\[3, 32, 48\]\), torch\.Size\(\[4, 32, 48\]\)"),
    ("mixtral", "extra", r"does not load \(layer 1\): unexpected keys 'model\.layers\.1\.mlp\.stray\.weight'"),
    ("mixtral", "beyond", r"has tensors of layer\(s\) \[7\] beyond its 4 layers, e\.g\. 'model\.layers\.7\.x'"),
    ("mixtral", "shell", r"does not load \(embeddings, norm and head\): missing keys 'model\.norm\.weight'"),
    ("fw_moe", "drop", r"does not load \(layer 2\): missing tensor 'layers\.2\.mlp\.w_down'"),
    ("fw_moe", "extra", r"does not load \(layer 1\): unexpected tensor 'layers\.1\.mlp\.stray\.weight'"),
    ("fw_moe", "nan", r"does not load \(weights\): tensor 'layers\.1\.block\.attn\.wo\.weight' in .* holds inf/NaN"),
    ("fw_moe", "shell", r"does not load \(embeddings, norm and head\): missing tensor 'norm\.weight'"),
])
def test_loading_problems_name_the_checkpoint_tensors(sources, tmp_path, name, change, pattern):
    folder, family = sources[name]
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    hf = family == "hf"
    target = {"drop": "model.layers.2.block_sparse_moe.experts.1.w2.weight" if hf else "layers.2.mlp.w_down",
              "extra": "model.layers.1.mlp.stray.weight" if hf else "layers.1.mlp.stray.weight",
              "beyond": "model.layers.7.x", "nan": "layers.1.block.attn.wo.weight",
              "shell": "model.norm.weight" if hf else "norm.weight"}[change]

    def edit(sd, f):
        if change in ("drop", "shell") and target in sd:
            del sd[target]
        elif change in ("extra", "beyond") and f == sorted(x for x in os.listdir(bad) if x.endswith(".safetensors"))[0]:
            sd[target] = torch.zeros(2, 2)
        elif change == "nan" and target in sd:
            sd[target][0, 0] = float("nan")

    _edit(bad, edit)
    with pytest.raises(LayerwiseLoadError, match=pattern):
        _streamed(bad, family, _tokens(64 if family == "flopwise" else V))


def test_memory_estimate(sources):
    folder, _ = sources["mixtral"]
    infos = CheckpointReader(str(folder)).infos
    numels = {n: i.numel for n, i in infos.items()}
    shell = sum(v for n, v in numels.items() if not n.startswith("model.layers."))
    layer = max(sum(v for n, v in numels.items() if n.startswith(f"model.layers.{i}.")) for i in range(4))
    assert layerwise_bytes(numels) == int(8 * shell * 1.1) + 16 * layer + 2**28
    assert layerwise_bytes(numels) < layerwise_bytes({**numels, "model.layers.0.big": 10**6})


@pytest.mark.parametrize("name", ["llama", "qwen3_all_slide", "fw"])
def test_verify_layer_by_layer_equals_the_whole_verification(sources, tmp_path, name):
    src = sources[name][0] if name != "qwen3_all_slide" else sources["qwen3"][0].parent / "qwen3_all_slide"
    fmt = {"llama": "qwen2_moe", "qwen3_all_slide": "qwen3_moe", "fw": "flopwise"}[name]
    opts = UpcycleOptions(n_experts=4, top_k=2, format=fmt, layers="0,2" if fmt == "qwen2_moe" else "all")
    report = upcycle(str(src), str(tmp_path / "moe"), opts, verify=True, verify_layerwise=True)
    v = report.verify
    assert v.passed and v.layerwise and len(v.layer_diffs) == (3 if name == "fw" else 4)
    assert max(v.layer_diffs) <= TOL and v.max_abs_diff <= TOL
    assert any("computed layer by layer" in c for c in v.checks)
    whole = verify_upcycle(str(src), str(tmp_path / "moe"), layerwise=False)
    assert whole.passed and not whole.layerwise and not whole.layer_diffs
    assert abs(whole.max_abs_diff - v.max_abs_diff) <= 1e-6 and abs(whole.kl - v.kl) <= 1e-9


def test_verify_layer_by_layer_finds_the_broken_layer(sources, tmp_path):
    """The experts of layer 2 scaled: the hidden states agree after layers 0 and 1 and differ
    from layer 2 on; both ways report the same logit difference."""
    src = sources["llama"][0]
    out = tmp_path / "moe"
    upcycle(str(src), str(out), UpcycleOptions(n_experts=4, top_k=2, format="mixtral"))

    def edit(sd, f):
        for n in sd:
            if n.startswith("model.layers.2.block_sparse_moe.experts.") and n.endswith("w2.weight"):
                sd[n] = sd[n] * 3

    _edit(out, edit)
    v = verify_upcycle(str(src), str(out), layerwise=True)
    assert not v.passed and v.tensor_errors  # the recorded options: the experts are not copies
    assert v.layer_diffs[0] <= TOL and v.layer_diffs[1] <= TOL and v.layer_diffs[2] > 10 * TOL
    assert any("first above the tolerance after layer 2" in c for c in v.checks)
    whole = verify_upcycle(str(src), str(out), layerwise=False)
    assert abs(whole.max_abs_diff - v.max_abs_diff) <= 1e-5 * whole.max_abs_diff
    assert whole.max_abs_diff > 10 * TOL


def test_verification_goes_layer_by_layer_only_where_the_whole_models_do_not_fit(sources, tmp_path, monkeypatch,
                                                                                 capsys):
    from flopwise.models import upcycle as up

    src = sources["llama"][0]
    opts = UpcycleOptions(n_experts=4, top_k=2, format="mixtral")
    plan = plan_upcycle(str(src), opts)
    full, by_layer = plan.verify_bytes_estimate, plan.verify_layerwise_bytes_estimate
    assert by_layer < full
    assert plan.summary()["verify_layerwise_bytes_estimate"] == by_layer
    # the plan's estimate (from the recipes) equals the one from the written headers
    upcycle(str(src), str(tmp_path / "plain"), opts)
    written = {n: i.numel for n, i in CheckpointReader(str(tmp_path / "plain")).infos.items()}
    dense = {n: i.numel for n, i in CheckpointReader(str(src)).infos.items()}
    assert by_layer == max(layerwise_bytes(written), layerwise_bytes(dense))

    monkeypatch.setattr(up, "_available_memory", lambda: full)  # the whole models fit
    assert not upcycle(str(src), str(tmp_path / "a"), opts, verify=True).verify.layerwise
    monkeypatch.setattr(up, "_available_memory", lambda: full - 1)  # only layer by layer
    assert upcycle(str(src), str(tmp_path / "b"), opts, verify=True).verify.layerwise
    assert verify_upcycle(str(src), str(tmp_path / "b")).layerwise
    # not checking the memory skips the refusal, not the choice
    assert verify_upcycle(str(src), str(tmp_path / "b"), check_memory=False).layerwise
    with pytest.raises(ValueError, match=r"^option verify: verification loads the dense and the upcycled model in "
                                         r"float32, about 0\.3 GB"):
        upcycle(str(src), str(tmp_path / "c"), opts, verify=True, verify_layerwise=False)
    assert not (tmp_path / "c").exists()
    monkeypatch.setattr(up, "_available_memory", lambda: by_layer - 1)  # neither
    with pytest.raises(ValueError, match=r"^option verify: verification layer by layer \(the embeddings and head and "
                                         r"one layer at a time\) needs about 0\.3 GB, and this machine has 0\.3 GB"):
        upcycle(str(src), str(tmp_path / "c"), opts, verify=True)
    assert not (tmp_path / "c").exists()
    with pytest.raises(ValueError, match=r"^verify_upcycle layer by layer .*; verify on a machine with more memory "
                                         r"\(check_memory=False skips this refusal\)$"):
        verify_upcycle(str(src), str(tmp_path / "b"))
    assert verify_upcycle(str(src), str(tmp_path / "b"), check_memory=False).passed
    with pytest.raises(TypeError, match="verify_layerwise must be None, True or False"):
        upcycle(str(src), str(tmp_path / "c"), opts, verify=True, verify_layerwise=1)
    with pytest.raises(ValueError, match=r"verify_layerwise=True says how to verify, and verify is False"):
        upcycle(str(src), str(tmp_path / "c"), opts, verify_layerwise=True)
    assert not (tmp_path / "c").exists()
    with pytest.raises(TypeError, match="layerwise must be None, True or False"):
        verify_upcycle(str(src), str(tmp_path / "b"), layerwise=1)

    # the CLI: the dry run says which way --verify would go; --verify-layerwise forces it
    parser = argparse.ArgumentParser()
    _cli_upcycle.add_parser(parser.add_subparsers())
    for have, says in ((full, None), (full - 1, "--verify would go layer by layer"),
                       (by_layer - 1, "--verify would be refused")):
        monkeypatch.setattr(up, "_available_memory", lambda h=have: h)
        args = parser.parse_args(["upcycle", str(src), str(tmp_path / "d"), "--experts", "4", "--dry-run"])
        assert args.func(args) == 0
        text = capsys.readouterr().out
        assert f"{up_human(by_layer)} layer by layer" in text and f"--verify: {up_human(full)} (both" in text
        assert (says in text) if says else "would" not in text
    monkeypatch.setattr(up, "_available_memory", lambda: full)
    args = parser.parse_args(["upcycle", str(src), str(tmp_path / "e"), "--experts", "4", "--verify-layerwise",
                              "--json", "--quiet"])
    assert args.func(args) == 0
    got = json.loads(capsys.readouterr().out)["verify"]
    assert got["passed"] and got["layerwise"] and len(got["layer_diffs"]) == 4


def test_unreadable_model_is_a_verification_error(sources, tmp_path):
    src = sources["llama"][0]
    out = tmp_path / "moe"
    shutil.copytree(sources["mixtral"][0], out)
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "model_type": "no_such_model"}))
    with pytest.raises(VerificationError, match=r"the upcycled model \(.*\) does not load: ValueError"):
        verify_upcycle(str(src), str(out), layerwise=True, check_memory=False)


def test_architectures_not_known_to_run_layer_by_layer_are_refused(sources, tmp_path):
    """An architecture whose forward does more than embed -> layers -> norm -> head (gemma
    scales the embeddings; granite multiplies them in the model's forward) would give other
    logits layer by layer: only the tested ones run."""
    folder = tmp_path / "gemma"
    shutil.copytree(sources["llama"][0], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="gemma", architectures=["GemmaForCausalLM"])
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LayerwiseLoadError, match=r"is a 'gemma' model; layer by layer runs llama, mistral, qwen2, "
                                                 r"qwen3, mixtral, qwen2_moe, qwen3_moe only"):
        LayerwiseModel(str(folder), "hf")


def test_one_layer_loads_print_no_load_report(sources):
    """Each one-layer load leaves the embeddings and head out on purpose: transformers' report
    of them as missing would be noise; the caller's logging settings are restored."""
    import logging

    import transformers

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    root = transformers.logging.get_logger("transformers")
    handler = Keep()
    root.addHandler(handler)
    before = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_warning()
    try:
        AutoModelForCausalLM.from_pretrained(str(sources["mixtral"][0]), dtype=torch.float32)  # loads quietly
        assert not records, records
        _streamed(*sources["mixtral"], _tokens())
        assert not [r for r in records if "MISSING" in r.upper() or "embed_tokens" in r], records
        assert transformers.logging.get_verbosity() == transformers.logging.WARNING
    finally:
        transformers.logging.set_verbosity(before)
        root.removeHandler(handler)


def test_verify_memory_script(tmp_path):
    """scripts/verify_memory.py at a small size: both ways run in their own process, pass, and
    stay within their estimates."""
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "verify_memory.py")
    # the embeddings and head dominate (128,000 x 1,024, untied; 0.5 GB in bf16): the part of
    # the layer-by-layer estimate that once was too low (1.5 GB against 1.7 GB taken)
    proc = subprocess.run([sys.executable, script, "--layers", "2", "--d-model", "1024", "--d-ff", "256", "--heads",
                           "8", "--kv-heads", "2", "--vocab", "128000", "--experts", "2", "--dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line}
    assert set(rows) == {"verification", "idle process (imports only)", "layerwise", "whole"}
    idle = float(rows["idle process (imports only)"][1].split()[0])
    for mode in ("layerwise", "whole"):
        estimate, anon, rss, seconds, diff, passed = rows[mode]
        assert passed == "True" and float(diff) <= TOL and float(anon.split()[0]) > idle
        # the refusal check's estimate covers what the verification took beyond an idle process
        assert estimate.endswith(" GB") and float(estimate.split()[0]) >= float(anon.split()[0]) - idle


@pytest.mark.parametrize("name, fmt, layers", [("llama", "qwen2_moe", "0,1"), ("fw", "flopwise", "1")])
def test_kmeans_routers_are_centroids_of_the_whole_models_mlp_inputs(sources, tmp_path, monkeypatch, name, fmt, layers):
    """Router init kmeans runs the dense source a layer at a time, up to the last MoE layer
    only; its centroids equal those of the MLP inputs the whole model computes."""
    import math

    from flopwise.models import upcycle as up

    from .test_upcycle import D, _with_tokenizer

    folder, family = sources[name]
    text = tmp_path / "calib.txt"
    text.write_text("A small calibration text, with words that repeat and repeat again. " * 30)
    if family == "hf":
        folder = _with_tokenizer(folder, tmp_path / "tok", text.read_text())
    ran = []
    original = LayerwiseModel.layer
    monkeypatch.setattr(LayerwiseModel, "layer", lambda self, i, h, **kw: ran.append(i) or original(self, i, h, **kw))
    opts = UpcycleOptions(n_experts=3, top_k=2, format=fmt, layers=layers, router_init="kmeans",
                          calibration_text=str(text), seed=4)
    plan = plan_upcycle(str(folder), opts)
    dense = {n: i.numel for n, i in CheckpointReader(str(folder)).infos.items()}
    assert plan.peak_bytes_estimate >= layerwise_bytes(dense)  # the dense source runs before writing
    got = up._kmeans_routers(plan)
    assert sorted(got) == plan.moe_layers and ran == list(range(max(plan.moe_layers) + 1))
    # the same centroids from the whole model, its MLP inputs captured by hooks
    tokens = up._calibration_tokens(plan.source, str(text))
    cfg = plan.source.config
    seq = min(256, cfg.get("max_seq_len") or cfg["max_position_embeddings"])
    assert len(tokens) > seq
    batch = tokens[: (len(tokens) // seq) * seq].reshape(-1, seq)
    if family == "hf":
        whole = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        mlps = [layer.mlp for layer in whole.model.layers]
    else:
        import dataclasses

        whole = load_flopwise(str(folder), dtype=torch.float32).eval()
        mlps = [getattr(layer, "block", layer).mlp for layer in whole.layers]
        for layer in whole.layers:  # MoD layers: the training-time top k, as the MoE will see
            if hasattr(layer, "routes_causally"):
                layer.cfg = dataclasses.replace(layer.cfg, causal="none")
    seen = {i: [] for i in plan.moe_layers}
    for i in plan.moe_layers:
        mlps[i].register_forward_pre_hook(lambda m, a, i=i: seen[i].append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        whole(batch)
    d = D if family == "hf" else 32
    for i in plan.moe_layers:
        rows = torch.cat(seen[i])
        if family == "flopwise":  # MoD layer 1 at capacity 0.5: exactly half of each sequence, no padding
            assert len(rows) == batch.numel() // 2
        want = up._spherical_kmeans(rows, 3, up._gen(4, i, "kmeans")) * (0.02 * math.sqrt(d))
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-6)


def test_kmeans_through_a_mod_layer_that_selects_nothing_causally(tmp_path):
    """A MoD router whose causal decision selects no token (a bias of -50) still routes its
    top k in training, so k-means clusters those tokens rather than failing on none."""
    from flopwise.models import upcycle as up
    from flopwise.models.hf_formats import save_flopwise

    model = _tiny_flopwise(tmp_path / "ignored", n_layers=2, routing=("all", "mod"), mod_capacity=0.25)
    with torch.no_grad():
        model.layers[1].router.bias.fill_(-50.0)
    save_flopwise(model, str(tmp_path / "fw"))
    text = tmp_path / "calib.txt"
    text.write_text("Short calibration text for a router that never fires. " * 4)
    plan = plan_upcycle(str(tmp_path / "fw"), UpcycleOptions(n_experts=4, top_k=2, layers="1", router_init="kmeans",
                                                            calibration_text=str(text)))
    got = up._kmeans_routers(plan)
    assert list(got) == [1] and got[1].shape == (4, 32) and bool(torch.isfinite(got[1]).all())


def test_cli_check_verifies_an_existing_output(sources, tmp_path, capsys):
    """flopwise upcycle SRC DST --check: the verification of --verify on an output already
    written, with the options of its upcycle.json; exit status 1 when it fails."""
    parser = argparse.ArgumentParser()
    _cli_upcycle.add_parser(parser.add_subparsers())

    def run(*argv):
        args = parser.parse_args(["upcycle", *map(str, argv)])
        return args.func(args)

    src, out = sources["llama"][0], tmp_path / "mix"
    shutil.copytree(sources["mixtral"][0], out)
    assert run(src, out, "--check", "--quiet") == 0
    text = capsys.readouterr().out
    assert "(exact reproduction expected: ok)" in text and text.rstrip().endswith("passed")
    assert "checked tensors: the" in text  # the options came from upcycle.json
    assert run(src, out, "--check", "--verify-layerwise", "--json") == 0
    got = json.loads(capsys.readouterr().out)
    assert got["passed"] and got["layerwise"] and len(got["layer_diffs"]) == 4

    def edit(sd, f):
        for n in sd:
            if n.startswith("model.layers.1.block_sparse_moe.experts.") and n.endswith("w1.weight"):
                sd[n] = sd[n] * 2

    _edit(out, edit)
    assert run(src, out, "--check") == 1
    text = capsys.readouterr().out
    assert "exact reproduction expected: FAILED" in text and "FAILED tensors:" in text
    assert text.rstrip().endswith("FAILED")
    # options describe an upcycle to run: with --check they would be ignored, so they are refused
    with pytest.raises(ValueError, match=r"^--check verifies .* drop --experts, --seed$"):
        run(src, out, "--check", "--experts", "4", "--seed", "1")
    with pytest.raises(ValueError, match=r"drop --dry-run"):
        run(src, out, "--check", "--dry-run")
    # also at their default values: the output's own options may differ from them
    with pytest.raises(ValueError, match=r"drop --experts, --top-k$"):
        run(src, out, "--check", "--experts", "8", "--top-k", "2")
    # a model that does not load: exit 1, and with --json a JSON answer too
    (out / "config.json").write_text(json.dumps({**json.loads((out / "config.json").read_text()),
                                                 "num_local_experts": 3}))
    assert run(src, out, "--check") == 1
    assert "flopwise: verification failed:" in capsys.readouterr().err
    assert run(src, out, "--check", "--json") == 1
    got = json.loads(capsys.readouterr().out)
    assert got["passed"] is False and "mismatched" in got["error"]
    # not an upcycle output (no upcycle.json, or one without readable options), or no folder at all
    copy = tmp_path / "copy"
    shutil.copytree(src, copy)
    with pytest.raises(ValueError, match=r"^--check: .*copy has no upcycle\.json with the options of an upcycle"):
        run(src, copy, "--check")
    (copy / "upcycle.json").write_text('{"options": {"n_experts": "four"}}')
    with pytest.raises(ValueError, match=r"has no upcycle\.json with the options of an upcycle, or it cannot be read"):
        run(src, copy, "--check")
    with pytest.raises(ValueError, match=r"^--check: .*nowhere is not a folder"):
        run(src, tmp_path / "nowhere", "--check")
