"""Methods, token packing, dataset folders and the ``flopwise coding`` command line."""

from __future__ import annotations

import argparse
import json
import os
import zlib

import numpy as np
import pytest
import torch

from flopwise.coding import (ArithmeticCoding, BuildOptions, CorruptStreamError, EqualInfoAC, GZip, ModuleModel,
                             StaticAC, bits_to_tokens, build, decode, tokens_to_bytes)


def test_tokens_pack_and_unpack():
    data = bytes(range(256)) + b"\x80"
    for n in (8, 16):
        t = bits_to_tokens(data, 8 * len(data) - 7, n)  # last byte holds one bit
        assert t.dtype == (np.uint8 if n == 8 else np.uint16)
        assert t.size == -(-(8 * len(data) - 7) // n)
        assert tokens_to_bytes(t, n)[: len(data)] == data
    assert bits_to_tokens(b"\xff", 3, 8).tolist() == [0xE0]  # bits past the end are cleared
    assert bits_to_tokens(b"\x12\x34\x56", 24, 16).tolist() == [0x1234, 0x5600]
    with pytest.raises(ValueError, match="token_bits"):
        bits_to_tokens(b"", 0, 12)


def test_tokens_refuse_what_a_cast_would_change():
    """An array is taken as bytes only when it holds bytes: a cast to uint8 would wrap 300 to 44
    and truncate floats."""
    assert bits_to_tokens(np.array([1, 255]), 16, 8).tolist() == [1, 255]  # integer values 0..255
    assert bits_to_tokens(np.array([0x12, 0x34], dtype=np.uint8), np.int64(16), 16).tolist() == [0x1234]
    for data in (np.array([300, 1]), np.array([-1, 1]), np.array([0x1234, 0xABCD], dtype=np.uint16)):
        with pytest.raises(ValueError, match=r"data must hold bytes \(values 0\.\.255\)"):
            bits_to_tokens(data, 16, 8)
    for data in (np.array([1.9, 2.5]), np.array([True, False]), 5, "ab"):
        with pytest.raises(TypeError, match="data must be bytes or a 1-D uint8 array"):
            bits_to_tokens(data, 16, 8)
    with pytest.raises(ValueError, match="data must be a 1-D array"):
        bits_to_tokens(np.zeros((2, 2), dtype=np.uint8), 16, 8)
    for nbits in (9.0, True, "9"):
        with pytest.raises(TypeError, match="nbits must be an int"):
            bits_to_tokens(b"\xff\xff", nbits, 8)
    with pytest.raises(ValueError, match="nbits must be >= 0"):
        bits_to_tokens(b"\xff", -1, 8)
    with pytest.raises(ValueError, match="tokens must be a 1-D array"):
        tokens_to_bytes(np.array([[1, 2], [3, 4]]), 8)


def test_side_arrays_are_checked(prose):
    """Side arrays of the wrong kind are corrupt input, named; a cast would truncate floats."""
    text = prose[:300]
    s = StaticAC.fit(prose[:5000], chunk_bytes=100)
    g = GZip(8, chunk_bytes=100)
    for coder, name in ((s, "stream_bits"), (s, "stream_bytes"), (g, "stream_nbytes")):
        comp = coder.compress(text)
        assert coder.decompress(comp) == text
        arrays = dict(comp.arrays)
        del arrays[name]
        with pytest.raises(CorruptStreamError, match=f"the side array {name} is missing"):
            coder.decompress(type(comp)(tokens=comp.tokens, arrays=arrays))
        for bad, what in ((comp.arrays[name] + 0.25, "holds float64, expected integers"),
                          (comp.arrays[name][None], r"has shape \(1, 3\), expected a 1-D array")):
            with pytest.raises(CorruptStreamError, match=f"the side array {name} {what}"):
                coder.decompress(type(comp)(tokens=comp.tokens, arrays={**comp.arrays, name: bad}))


def test_equal_info_checks_window_bits_when_built_and_its_side_array():
    from .conftest import TinyByteLM

    lm = ModuleModel(TinyByteLM(), context_len=4, batch_rows=8)
    with pytest.raises(ValueError, match="window_bits must be <= 512, got 1024"):
        EqualInfoAC(lm, window_bits=1024)
    EqualInfoAC(lm, window_bits=512)  # the largest window compress takes
    with pytest.raises(ValueError, match=r"window_bits must be a multiple of token_bits=8 in \[16, 512\], got 1024"):
        BuildOptions(method="equalinfo", window_bits=1024, m1="m1")  # refused with the options, not by the coder
    BuildOptions(method="equalinfo", window_bits=512, m1="m1")
    eq = EqualInfoAC(lm, 16, chunk_bytes=50, max_window_bytes=8)
    comp = eq.compress(b"hello, windows")
    assert eq.decompress(comp) == b"hello, windows"
    with pytest.raises(CorruptStreamError, match="the side array window_bytes is missing"):
        eq.decompress(type(comp)(tokens=comp.tokens, arrays={}))
    with pytest.raises(CorruptStreamError, match="the side array window_bytes holds float64"):
        eq.decompress(type(comp)(tokens=comp.tokens, arrays={"window_bytes": comp.arrays["window_bytes"] + 0.5}))


def test_static_ac_names_a_corrupt_stream_by_its_index():
    """Streams decode in batches of streams_per_batch: the error names the stream's own index."""
    text = bytes(range(32, 127)) * 3
    c = StaticAC.fit(text, chunk_bytes=20, streams_per_batch=3)
    comp = c.compress(text[:200])  # 10 streams
    start = sum(-(-int(b) // 8) for b in comp.arrays["stream_bits"][:7])  # stream 7's first token
    bad = comp.tokens.copy()
    bad[start] ^= 0x80
    with pytest.raises(CorruptStreamError, match=r"1 stream\(s\) did not decode .*indices \[7\]"):
        c.decompress(type(comp)(tokens=bad, arrays=comp.arrays))


@pytest.mark.parametrize("token_bits", [8, 16])
def test_gzip_and_static_roundtrip_on_prose(prose, token_bits):
    text = prose[:40_000]
    g = GZip(token_bits, chunk_bytes=10_000)
    comp = g.compress(text)
    assert g.decompress(comp) == text
    assert comp.arrays["stream_nbytes"][0] == len(zlib.compress(text[:10_000]))
    s = StaticAC.fit(text, token_bits=token_bits, chunk_bytes=2_000)
    comp_s = s.compress(text)
    assert s.decompress(comp_s) == text
    # StaticAC lands near the unigram entropy (~4.6-4.8 bits/byte on English), gzip well below it
    bpb = 8 * comp_s.tokens.size * (token_bits // 8) / len(text)
    assert 4.3 < bpb < 5.0
    assert comp_s.coded_bits <= 1.005 * comp_s.ideal_bits + 32 * comp_s.n_streams
    assert comp.tokens.size * token_bits < comp_s.tokens.size * token_bits


@pytest.mark.parametrize("data", [b"", b"a", bytes(range(256)), b"\x00" * 5000, b"\xff" * 3000,
                                  bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8))],
                         ids=["empty", "one", "every-byte", "run-00", "run-ff", "random"])
def test_edge_inputs_every_method(data, prose):
    from .conftest import TinyByteLM

    lm = ModuleModel(TinyByteLM(sharp=2.0), context_len=6, batch_rows=32)
    coders = [GZip(16, chunk_bytes=700), StaticAC.fit(prose[:50_000], chunk_bytes=700),
              ArithmeticCoding(lm, 8, chunk_bytes=400), EqualInfoAC(lm, 16, 16, chunk_bytes=700)]
    if len(data) > 1000:  # keep the model-driven coders short on CPU
        coders = coders[:2] + [ArithmeticCoding(lm, 8, chunk_bytes=600, streams_per_batch=8)]
        data = data[:1200] if data[0] != data[1] else data
    for c in coders:
        comp = c.compress(data)
        assert c.decompress(comp) == data, c.name


def _tiny_m1(path):
    from flopwise.models import transformer as tr
    torch.manual_seed(0)
    net = tr.Transformer(tr.ModelConfig.preset("tiny", max_seq_len=12, d_model=32, n_layers=1, d_ff=64))
    torch.save(net, path)
    return path


def _cli(argv):
    from flopwise import _cli_coding

    parser = argparse.ArgumentParser(prog="flopwise")
    _cli_coding.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_build_decode_every_method(tmp_path, prose):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(prose[:1500])
    m1 = _tiny_m1(str(tmp_path / "m1.pt"))
    runs = [("gzip", ["--token-bits", "16"]), ("static", []),
            ("ac", ["--m1", m1, "--chunk-bytes", "300"]),
            ("ac", ["--m1", m1, "--chunk-bytes", "300", "--m1-eval", "window"]),
            ("equalinfo", ["--m1", m1, "--window-bits", "16", "--token-bits", "16", "--chunk-bytes", "300"]),
            # a cached model's context is capped at the window's bytes + bos, whatever was asked
            ("equalinfo", ["--m1", m1, "--max-window-bytes", "5", "--context-len", "12", "--chunk-bytes", "300"])]
    for i, (method, extra) in enumerate(runs):
        out = tmp_path / f"out-{i}-{method}"
        assert _cli(["coding", "build", str(corpus), str(out), "--method", method, "--quiet", *extra]) == 0
        stats = json.loads((out / "stats.json").read_text())
        meta = json.loads((out / "meta.json").read_text())
        assert stats["input_bytes"] == 1500 and stats["compression_ratio"] > 0
        assert abs(stats["compression_ratio"] * stats["token_bytes"] - 1500) < 1e-6
        if method in ("ac", "equalinfo"):
            assert meta["m1"]["sha256"] and meta["m1"]["context_len"] == (6 if "--max-window-bytes" in extra else 12)
            assert meta["m1"]["eval"] == ("window" if "window" in extra else "cached")
        if method == "equalinfo":
            assert stats["windows"] == np.load(out / "window_bytes.npy").size
            assert np.load(out / "tokens.npy").size == stats["windows"] * 16 // int(
                extra[extra.index("--token-bits") + 1] if "--token-bits" in extra else 8)  # b = 16
        back = tmp_path / f"back-{i}-{method}.txt"
        assert _cli(["coding", "decode", str(out), str(back), "--quiet"]) == 0
        assert back.read_bytes() == prose[:1500]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def test_outputs_atomic_force_and_corruption(tmp_path, prose):
    corpus = tmp_path / "c.txt"
    corpus.write_bytes(prose[:6_000])
    out = tmp_path / "ds"
    build(str(corpus), str(out), BuildOptions(method="static", chunk_bytes=1000), progress=False)
    with pytest.raises(FileExistsError):
        build(str(corpus), str(out), BuildOptions(method="static"), progress=False)
    build(str(corpus), str(out), BuildOptions(method="static", token_bits=16, chunk_bytes=1000), force=True,
          progress=False)
    assert json.loads((out / "stats.json").read_text())["token_bits"] == 16
    assert decode(str(out), progress=False) == prose[:6_000]
    tokens = np.load(out / "tokens.npy")
    for i in (0, tokens.size // 2, tokens.size - 1):  # any flipped token: a clear error
        bad = tokens.copy()
        bad[i] ^= 1 << 5
        np.save(out / "tokens.npy", bad)
        with pytest.raises(CorruptStreamError):
            decode(str(out), progress=False)
    np.save(out / "tokens.npy", tokens[:-3])  # truncated
    with pytest.raises(CorruptStreamError):
        decode(str(out), progress=False)
    with pytest.raises(ValueError, match="M1"):
        BuildOptions(method="ac")
    with pytest.raises(FileNotFoundError):
        build(str(tmp_path / "missing.txt"), str(tmp_path / "x"), BuildOptions(), progress=False)


@pytest.mark.parametrize("change", ["last-huge", "last-2**40", "middle-short", "last-zero"])
def test_corrupt_stream_lengths_raise_at_once(tmp_path, prose, change):
    """Every stream but the last holds chunk_bytes bytes: another count is corruption, caught
    before the decoder would run that many model steps."""
    corpus = tmp_path / "c.txt"
    corpus.write_bytes(prose[:6_000])
    out = tmp_path / "ds"
    build(str(corpus), str(out), BuildOptions(method="static", chunk_bytes=2000), progress=False)
    a = np.load(out / "stream_bytes.npy")
    i, v = {"last-huge": (-1, 3_000_000), "last-2**40": (-1, 2**40), "middle-short": (1, 1999),
            "last-zero": (-1, 0)}[change]
    a[i] = v
    np.save(out / "stream_bytes.npy", a)
    with pytest.raises(CorruptStreamError, match="chunk_bytes = 2000"):
        decode(str(out), progress=False)


def test_build_force_over_a_file_and_bad_arguments(tmp_path, prose, capsys):
    from flopwise import cli

    corpus = tmp_path / "c.txt"
    corpus.write_bytes(prose[:3_000])
    target = tmp_path / "was-a-file"
    target.write_text("hi")
    with pytest.raises(FileExistsError, match="not a folder"):  # --force replaces build outputs only
        build(str(corpus), str(target), BuildOptions(method="gzip"), force=True, progress=False)
    assert target.read_text() == "hi"
    target.unlink()
    build(str(corpus), str(target), BuildOptions(method="gzip"), progress=False)
    assert target.is_dir() and sorted(os.listdir(tmp_path)) == ["c.txt", "was-a-file"]
    (tmp_path / "notamodel.pt").write_text("not a checkpoint")
    for argv, match in [
        (["coding", "build", str(corpus), str(tmp_path / "o1"), "--method", "ac", "--m1",
          str(tmp_path / "notamodel.pt")], "could not be loaded"),
        (["coding", "build", str(corpus), str(tmp_path / "o2"), "--method", "static", "--device", "cuda:0" if not torch.cuda.is_available()
          else "nodevice"], "device"),
        # the library's Python argument names, as typed on the command line
        (["coding", "build", str(corpus), str(tmp_path / "o3"), "--method", "ac"], "needs an M1 checkpoint (--m1 CKPT)"),
        (["coding", "build", str(corpus), str(tmp_path / "o4"), "--method", "equalinfo", "--window-bits", "8", "--m1",
          str(tmp_path / "notamodel.pt")], "error: --window-bits must be a multiple of --token-bits=8"),
        (["coding", "decode", str(target), str(target / "out.txt")], "error: TEXT_FILE "),
    ]:
        assert cli.main(argv) == 2
        assert match in capsys.readouterr().err
    meta = json.loads((target / "meta.json").read_text())
    meta["build_options"]["device"] = "cuda"  # GZip never runs on a device: decodes anywhere
    (target / "meta.json").write_text(json.dumps(meta))
    assert decode(str(target), progress=False) == prose[:3_000]
    del meta["build_options"]
    (target / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CorruptStreamError, match="build_options"):
        decode(str(target), progress=False)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc: a folder where no file can be made")
def test_unwritable_outputs_fail_before_the_work(tmp_path, prose, monkeypatch):
    corpus = tmp_path / "c.txt"
    corpus.write_bytes(prose[:3_000])

    def no_compression(*a, **k):
        raise AssertionError("compressed before checking the output folder")

    monkeypatch.setattr(GZip, "compress", no_compression)
    with pytest.raises(ValueError, match="out /proc/flopwise-out: cannot write in /proc"):
        build(str(corpus), "/proc/flopwise-out", BuildOptions(method="gzip"), progress=False)
    monkeypatch.undo()
    out = tmp_path / "built"
    build(str(corpus), str(out), BuildOptions(method="gzip"), progress=False)
    with pytest.raises(ValueError, match="text_file /proc/back.txt: cannot write in /proc"):
        decode(str(out), "/proc/back.txt", progress=False)


def test_sigterm_cleans_up_like_ctrl_c(tmp_path, prose):
    """A batch scheduler's time limit sends SIGTERM: the command must remove its partly written
    output as for Ctrl-C (Python's default handler ended the process and left .tmp-* behind)."""
    import signal
    import subprocess
    import sys

    corpus = tmp_path / "c.txt"
    corpus.write_bytes(prose[:3_000])
    work = tmp_path / "work"
    work.mkdir()
    # the signal arrives while the output's temporary folder is being written
    script = (
        "import os, signal, sys\n"
        "import flopwise.coding.dataset as d\n"
        "save = d.np.save\n"
        "def killed(*a, **k):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return save(*a, **k)\n"
        "d.np.save = killed\n"
        "from flopwise.cli import main\n"
        f"sys.argv = ['flopwise', 'coding', 'build', {str(corpus)!r}, {str(work / 'out')!r}, '--method', 'gzip']\n"
        "raise SystemExit(main())\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 128 + signal.SIGTERM, (r.returncode, r.stderr)
    assert r.stderr.strip().endswith("flopwise: terminated")
    assert os.listdir(work) == []
    # the handler replaces only Python's default, and is put back when the command returns
    for before in ("SIG_DFL", "SIG_IGN"):
        check = (f"import signal, sys\nsignal.signal(signal.SIGTERM, signal.{before})\n"
                 "from flopwise.cli import main\n"
                 "sys.argv = ['flopwise', 'scaling', 'optimal', '--compute', '1e21']\n"
                 "assert main() == 0\n"
                 f"print(signal.getsignal(signal.SIGTERM) is signal.{before})\n")
        r = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and r.stdout.strip().endswith("True"), (before, r.stdout, r.stderr)


def test_cached_eval_of_a_model_it_cannot_cache_names_the_option(tmp_path, prose):
    from flopwise.models import transformer as tr

    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(prose[:600])
    torch.manual_seed(0)
    net = tr.Transformer(tr.ModelConfig.preset("tiny", max_seq_len=12, d_model=32, n_layers=2, d_ff=64,
                                               mod="every_other"))
    m1 = str(tmp_path / "mod.pt")
    torch.save(net, m1)
    args = ["coding", "build", str(corpus), str(tmp_path / "out"), "--method", "ac", "--m1", m1, "--quiet",
            "--chunk-bytes", "300"]
    with pytest.raises(ValueError, match=r"--m1-eval cached.*use m1_eval='window' \(--m1-eval window\)"):
        _cli(args + ["--m1-eval", "cached"])
    assert not (tmp_path / "out").exists()
