"""Dataset folders as untrusted input, and build / decode never destroying the user's files."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from flopwise.coding import BuildOptions, CorruptStreamError, EqualInfoAC, GZip, ModuleModel, build, decode
from flopwise.coding.models import file_sha256
from flopwise.coding.tokens import tokens_to_bytes

from .test_dataset import _cli, _tiny_m1


@pytest.fixture(scope="module")
def folders(tmp_path_factory, prose):
    """A gzip folder and an ac folder of the same short text (copy one before editing it)."""
    root = tmp_path_factory.mktemp("built")
    corpus = root / "corpus.txt"
    corpus.write_bytes(prose[:600])
    m1 = _tiny_m1(str(root / "m1.pt"))
    build(str(corpus), str(root / "gzip"), BuildOptions(method="gzip", chunk_bytes=200), progress=False)
    build(str(corpus), str(root / "ac"), BuildOptions(method="ac", m1=m1, chunk_bytes=200), progress=False)
    return root


def _copy(folders, name, dst):
    shutil.copytree(folders / name, dst)
    return dst


def _edit_meta(folder, fn):
    meta = json.loads((folder / "meta.json").read_text())
    fn(meta)
    (folder / "meta.json").write_text(json.dumps(meta))


class _OpensAFile:
    """Unpickling this calls builtins.open: any code a pickle names runs on a plain load."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_decode_never_runs_code_from_a_pickled_m1(folders, tmp_path):
    ds = _copy(folders, "ac", tmp_path / "ds")
    marker = tmp_path / "ran"
    evil = ds / "m1.pt"
    torch.save(_OpensAFile(str(marker)), evil)
    # the folder can name a checkpoint it ships with and record that file's own hash
    _edit_meta(ds, lambda m: (m["build_options"].update(m1=str(evil)), m["m1"].update(sha256=file_sha256(evil))))
    with pytest.raises(ValueError, match="could not be loaded"):
        decode(str(ds), progress=False)
    assert not marker.exists()
    _edit_meta(ds, lambda m: m["m1"].update(sha256=file_sha256(folders / "m1.pt")))
    # the real M1, a torch.save'd flopwise model, still loads and decodes
    assert decode(str(ds), m1=str(folders / "m1.pt"), progress=False) == (folders / "corpus.txt").read_bytes()


def test_decode_compares_the_m1_hash_before_opening_the_checkpoint(folders, tmp_path, monkeypatch):
    ds = _copy(folders, "ac", tmp_path / "ds")
    _edit_meta(ds, lambda m: m["m1"].update(sha256="f" * 64))

    def no_load(*args, **kwargs):
        raise AssertionError("torch.load ran before the hash was compared")

    monkeypatch.setattr(torch, "load", no_load)
    with pytest.raises(ValueError, match="SHA-256"):
        decode(str(ds), progress=False)


def test_build_output_never_replaces_its_inputs_or_user_files(tmp_path, prose):
    proj = tmp_path / "proj"
    proj.mkdir()
    corpus = proj / "corpus.txt"
    corpus.write_bytes(prose[:500])
    (proj / "notes.txt").write_text("keep")
    gz = BuildOptions(method="gzip")
    with pytest.raises(ValueError, match="contains the corpus"):
        build(str(corpus), str(proj), gz, force=True, progress=False)
    with pytest.raises(ValueError, match="is or contains the corpus"):
        build(str(corpus), str(corpus), gz, force=True, progress=False)
    (tmp_path / "link").symlink_to(proj)
    with pytest.raises(ValueError, match="contains the corpus"):
        build(str(corpus), str(tmp_path / "link"), gz, force=True, progress=False)
    with pytest.raises(ValueError, match="contains the train file"):
        (tmp_path / "other.txt").write_bytes(prose[:100])
        build(str(tmp_path / "other.txt"), str(proj), BuildOptions(method="static"), train=str(corpus), force=True,
              progress=False)
    assert sorted(os.listdir(proj)) == ["corpus.txt", "notes.txt"] and corpus.read_bytes() == prose[:500]
    # --force replaces an earlier output, but not once it holds something a build does not write
    out = tmp_path / "out"
    build(str(corpus), str(out), gz, progress=False)
    build(str(corpus), str(out), BuildOptions(method="gzip", token_bits=16), force=True, progress=False)
    (out / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="mine.txt"):
        build(str(corpus), str(out), gz, force=True, progress=False)
    assert (out / "mine.txt").read_text() == "keep"
    # nor once one of its files is a symlink (a build writes none): someone else put it there
    (out / "mine.txt").unlink()
    os.replace(out / "stats.json", tmp_path / "stats.json")
    (out / "stats.json").symlink_to(tmp_path / "stats.json")
    with pytest.raises(FileExistsError, match="stats.json"):
        build(str(corpus), str(out), gz, force=True, progress=False)
    assert (out / "stats.json").is_symlink()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def test_decode_writes_through_a_fresh_temporary_file(folders, tmp_path, monkeypatch):
    text = decode(str(folders / "gzip"), progress=False)
    (tmp_path / "back.txt.tmp").write_text("someone else's file")
    decode(str(folders / "gzip"), str(tmp_path / "back.txt"), progress=False)
    assert (tmp_path / "back.txt").read_bytes() == text
    assert (tmp_path / "back.txt.tmp").read_text() == "someone else's file"
    (tmp_path / "adir").mkdir()
    with pytest.raises(ValueError, match="is a directory"):
        decode(str(folders / "gzip"), str(tmp_path / "adir"), force=True, progress=False)

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        decode(str(folders / "gzip"), str(tmp_path / "back2.txt"), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["adir", "back.txt", "back.txt.tmp"]


@pytest.mark.parametrize("name,edit,field", [
    ("gzip", lambda m: m.update(input={}), "input.bytes"),
    ("gzip", lambda m: m["input"].pop("sha256"), "input.sha256"),
    ("gzip", lambda m: m["build_options"].update(foo=1), "build_options.foo"),
    ("gzip", lambda m: m["build_options"].update(chunk_bytes=0), "chunk_bytes"),
    ("ac", lambda m: m.update(m1={"eval": "cached"}), "m1.sha256"),
    ("ac", lambda m: m["m1"].pop("context_len"), "m1.context_len"),
    ("ac", lambda m: m.update(m1=None), "m1 must be an object"),
], ids=["input-empty", "no-sha256", "unknown-option", "chunk-0", "m1-no-keys", "m1-no-context", "m1-null"])
def test_malformed_meta_names_the_field(folders, tmp_path, name, edit, field):
    ds = _copy(folders, name, tmp_path / "ds")
    _edit_meta(ds, edit)
    with pytest.raises(CorruptStreamError, match=f"meta.json: .*{field}"):
        decode(str(ds), progress=False)


def _npy_header(shape, descr="|u1") -> bytes:
    header = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode()
    header += b" " * (63 - (10 + len(header)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header


@pytest.mark.parametrize("content", [
    lambda b: b[:-1],
    lambda b: b"garbage",
    lambda b: _npy_header((999_999_999_999,)) + b"\x00" * 8,
    lambda b: _npy_header((2,), "|O") + b"\x00" * 16,
], ids=["truncated", "garbage", "huge-shape", "pickled-objects"])
def test_corrupt_npy_is_a_corrupt_stream_naming_the_file(folders, tmp_path, content):
    ds = _copy(folders, "gzip", tmp_path / "ds")
    raw = (ds / "tokens.npy").read_bytes()
    (ds / "tokens.npy").write_bytes(content(raw))
    with pytest.raises(CorruptStreamError, match="tokens.npy"):
        decode(str(ds), progress=False)


def test_invalid_meta_json_names_the_file(folders, tmp_path):
    ds = _copy(folders, "gzip", tmp_path / "ds")
    (ds / "meta.json").write_text((ds / "meta.json").read_text()[:-5])
    with pytest.raises(CorruptStreamError, match="meta.json: not valid JSON"):
        decode(str(ds), progress=False)


def test_option_errors_name_the_option(tiny_lm):
    with pytest.raises(ValueError, match="window_bits .*16.* got 8"):
        BuildOptions(method="equalinfo", m1="m1.pt", window_bits=8)
    for name in ("streams_per_batch", "max_window_bytes", "batch_rows"):
        with pytest.raises(ValueError, match=f"{name} must be an int >= 1"):
            BuildOptions(method="equalinfo", m1="m1.pt", **{name: 0})
    with pytest.raises(ValueError, match=r"precision must be an int in \[9, 24\]"):
        BuildOptions(method="static", precision=8)
    with pytest.raises(ValueError, match="m1 is used by"):
        BuildOptions(method="gzip", m1="m1.pt")
    lm = ModuleModel(tiny_lm, context_len=4, batch_rows=4)
    for name in ("streams_per_batch", "batch_windows", "max_window_bytes"):
        with pytest.raises(ValueError, match=f"{name} must be an int >= 1"):
            EqualInfoAC(lm, **{name: 0})
    with pytest.raises(ValueError, match="window_bits .*>= 16"):
        EqualInfoAC(lm, window_bits=8)


def test_output_folder_has_the_umask_mode(folders):
    mask = os.umask(0)
    os.umask(mask)
    assert (os.stat(folders / "gzip").st_mode & 0o777) == 0o777 & ~mask


def test_gzip_checks_stream_ends_and_padding(prose):
    g = GZip(16, chunk_bytes=300)
    text = next(prose[i : i + 900] for i in range(0, 9000, 7)
                if all(len(c) % 2 for c in _zlen(prose[i : i + 900], 300)))  # every stream padded
    comp = g.compress(text)
    assert g.decompress(comp) == text
    bad = comp.tokens.copy()
    bad[-1] |= 1  # the padding byte of the last stream
    with pytest.raises(CorruptStreamError, match="padding"):
        g.decompress(type(comp)(tokens=bad, arrays=comp.arrays))
    g8 = GZip(8, chunk_bytes=300)
    comp8 = g8.compress(text)
    n = comp8.arrays["stream_nbytes"].copy()
    n[0] += 1  # stream 0 would read stream 1's first byte
    n[1] -= 1
    with pytest.raises(CorruptStreamError, match="stream 0"):
        g8.decompress(type(comp8)(tokens=comp8.tokens, arrays={"stream_nbytes": n}))


def _zlen(text, chunk):
    import zlib

    return [zlib.compress(text[i : i + chunk]) for i in range(0, len(text), chunk)]


def test_float_tokens_are_refused():
    with pytest.raises(TypeError, match="integer"):
        tokens_to_bytes(np.array([1.5, 2.0]), 8)


def test_cli_names_the_argument(tmp_path, prose, capsys):
    from flopwise import cli

    corpus = tmp_path / "c.txt"
    corpus.write_bytes(prose[:300])
    for argv, match in [
        (["--method", "gzip", "--window-bits", "32"], "--window-bits applies to --method equalinfo only"),
        (["--method", "static", "--streams-per-batch", "8"], "--streams-per-batch applies"),
        (["--method", "gzip", "--m1", "m1.pt"], "--m1 applies"),
        (["--method", "static", "--train", str(tmp_path / "missing.txt")], "train file not found"),
    ]:
        assert cli.main(["coding", "build", str(corpus), str(tmp_path / "o"), *argv]) == 2
        assert match in capsys.readouterr().err
    assert cli.main(["coding", "build", str(tmp_path), str(tmp_path / "o"), "--method", "gzip"]) == 2
    assert "corpus" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert _cli(["coding", "build", str(corpus), str(tmp_path / "o"), "--method", "gzip", "--quiet"]) == 0
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    assert meta["build_options"]["window_bits"] == 16  # the defaults are still recorded


def test_the_m1_loaded_is_the_one_hashed(tmp_path, monkeypatch):
    """A module file is read once, and the bytes hashed are the bytes unpickled; a checkpoint
    folder that changes while it loads is refused."""
    from flopwise.coding.dataset import load_m1
    from flopwise.models import hf_formats
    from flopwise.models import transformer as tr

    path = _tiny_m1(str(tmp_path / "m1.pt"))
    sha = file_sha256(path)
    first = torch.load(path, weights_only=False).embed.weight.clone()
    real_scan = torch.serialization.get_unsafe_globals_in_checkpoint

    def swap_then_scan(f):  # another file takes its place after the hash
        torch.manual_seed(1)
        torch.save(tr.Transformer(tr.ModelConfig.preset("tiny", max_seq_len=12, d_model=32, n_layers=1, d_ff=64)),
                   path)
        return real_scan(f)

    monkeypatch.setattr(torch.serialization, "get_unsafe_globals_in_checkpoint", swap_then_scan)
    model, info = load_m1(path, expect_sha256=sha)
    assert info["sha256"] == sha and torch.equal(model.module.embed.weight, first)

    folder = tmp_path / "m1"
    hf_formats.save_flopwise(torch.load(path, weights_only=False), str(folder))
    real_load = hf_formats.load_flopwise

    def edit_then_load(p, *a, **kw):
        (folder / "config.json").write_text((folder / "config.json").read_text() + " ")
        return real_load(p, *a, **kw)

    monkeypatch.setattr(hf_formats, "load_flopwise", edit_then_load)
    with pytest.raises(ValueError, match="changed while it was being loaded"):
        load_m1(str(folder))


def test_decode_never_writes_into_the_folder_or_the_m1(folders, tmp_path):
    """TEXT_FILE may not be a file of the folder being decoded, nor the M1 checkpoint (or a
    file in it), however it is named: --force replaces a user's file, never these."""
    ds = _copy(folders, "gzip", tmp_path / "ds")
    kept = {p: (ds / p).read_bytes() for p in os.listdir(ds)}
    (tmp_path / "link").symlink_to(ds)
    for target in (ds / "tokens.npy", ds / "meta.json", ds / "new.txt", tmp_path / "link" / "tokens.npy"):
        with pytest.raises(ValueError, match="text_file .* inside the dataset folder"):
            decode(str(ds), str(target), force=True, progress=False)
    assert {p: (ds / p).read_bytes() for p in os.listdir(ds)} == kept
    # the M1 named in meta.json (here a copy of it, so the shared fixture stays intact)
    ac = _copy(folders, "ac", tmp_path / "ac")
    m1 = tmp_path / "m1.pt"
    shutil.copy(folders / "m1.pt", m1)
    _edit_meta(ac, lambda m: m["build_options"].update(m1=str(m1)))
    m1_bytes = m1.read_bytes()
    (tmp_path / "m1link.pt").symlink_to(m1)
    for target in (m1, tmp_path / "m1link.pt"):
        with pytest.raises(ValueError, match="is or is inside the M1 checkpoint recorded in meta.json"):
            decode(str(ac), str(target), force=True, progress=False)
    assert m1.read_bytes() == m1_bytes
    # an M1 given instead (a checkpoint folder): nothing inside it either
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"is or is inside the M1 checkpoint \(m1, --m1\)"):
        decode(str(ac), str(ck / "config.json"), m1=str(ck), force=True, progress=False)
    assert (ck / "config.json").read_text() == "{}"
    # anywhere else is fine
    assert decode(str(ac), str(tmp_path / "back.txt"), progress=False) == (folders / "corpus.txt").read_bytes()


def test_gzip_build_refuses_a_device(tmp_path, prose, capsys):
    """GZip runs on the host: --device is refused like every option a method does not use
    (it used to be recorded in meta.json, even "cuda" on a machine without CUDA)."""
    from flopwise import cli

    corpus = tmp_path / "c.txt"
    corpus.write_bytes(prose[:300])
    assert cli.main(["coding", "build", str(corpus), str(tmp_path / "o"), "--method", "gzip", "--device", "cuda"]) == 2
    assert "--device applies to --method static / ac / equalinfo only" in capsys.readouterr().err
    with pytest.raises(ValueError, match="gzip runs on the host"):
        build(str(corpus), str(tmp_path / "o"), BuildOptions(method="gzip", device="cuda"), progress=False)
    assert not (tmp_path / "o").exists()
    assert _cli(["coding", "build", str(corpus), str(tmp_path / "o"), "--method", "gzip", "--quiet"]) == 0
    assert json.loads((tmp_path / "o" / "meta.json").read_text())["device"] == "cpu"
