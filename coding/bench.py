"""Benchmark suite for the range coder alone (probabilities given): ``flopwise bench coding``.

Work: ``B`` independent streams of ``S`` symbols, vocabulary 256, a different quantised
distribution for every symbol (``cdf [B, S, 257]`` int64, computed outside the timed call
by ``quantize_logits``, so the timed calls pass ``validate=False``: the argument checks read
every table once, which on a GPU costs more than coding, which reads two entries per step).

Providers:

* ``reference`` - flopwise's vectorised torch coder (:func:`flopwise.coding.rangecoder.encode`
  / ``decode``): one int64 step advances all B streams; on CUDA on the GPU, else on CPU.
* ``triton`` (CUDA only) - :mod:`flopwise.coding.triton_coder`, all S steps in one launch.
* ``constriction`` - constriction's range coder (Rust, 24-bit precision, the same quantised
  probabilities), one Python call per stream on the CPU (its batch API: all S symbols with
  their S distributions at once). Checked: encode sizes within 1% of ours, decode exact.

**Units**: ``Case.flops`` holds the symbol count, so the ``TFLOP/s`` column reads as
*T symbols/s* (multiply by 1e6 for M symbols/s); ``TB/s`` counts the cdf bytes read.
"""

from __future__ import annotations

import numpy as np
import torch

from flopwise.kernels.bench import Case

from . import rangecoder as rc


def _work(B: int, S: int, V: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    freqs = rc.quantize_logits(torch.randn(B, S, V, generator=g) * 3)
    sym = torch.multinomial(freqs.reshape(-1, V).double(), 1, generator=g).reshape(B, S)
    cdf = rc.cdf_from_freqs(freqs)
    return freqs, sym.to(device), cdf.to(device)


def _constriction():
    try:
        import constriction  # noqa: F401

        return constriction
    except ImportError:
        return None


def _cases_for(B: int, S: int, device: str, with_constriction: bool) -> list[Case]:
    V = 256
    freqs, sym, cdf = _work(B, S, V, device)
    data, nbits = rc.encode(sym, cdf)
    shape = f"B={B} S={S} V={V} {device}"
    n = B * S

    def enc_ours():
        d, nb = rc.encode(sym, cdf, validate=False)
        return int(nb.sum())

    def dec_ours():
        return rc.decode(data, nbits, cdf, S, validate=False).cpu().numpy()

    def size_check(out, ref):
        # 1% plus constriction's termination: whole 32-bit words per stream
        tol = 0.01 * ref + 64 * B
        return None if abs(out - ref) <= tol else f"{out} bits vs {ref} bits (> 1% + 64 bits/stream)"

    def exact_check(out, ref):
        return None if np.array_equal(np.asarray(out), np.asarray(ref)) else "decoded symbols differ"

    enc = {"reference": enc_ours}
    dec = {"reference": dec_ours}
    if device == "cuda":
        from .triton_coder import decode_triton, encode_triton

        enc["triton"] = lambda: int(encode_triton(sym, cdf, validate=False)[1].sum())
        dec["triton"] = lambda: decode_triton(data, nbits, cdf, S, validate=False).cpu().numpy()
    cs = _constriction() if with_constriction else None
    if cs is not None:
        probs = (freqs.double() / 2**24).numpy()
        sym_np = sym.cpu().numpy().astype(np.int32)
        family = cs.stream.model.Categorical(perfect=False)
        words = []

        def enc_cs():
            total = 0
            words.clear()
            for b in range(B):
                e = cs.stream.queue.RangeEncoder()
                e.encode(sym_np[b], family, probs[b])
                w = e.get_compressed()
                words.append(w)
                total += 32 * w.size
            return total

        enc_cs()

        def dec_cs():
            out = np.empty((B, S), dtype=np.int64)
            for b in range(B):
                d = cs.stream.queue.RangeDecoder(words[b])
                out[b] = d.decode(family, probs[b])
            return out

        enc["constriction"] = enc_cs
        dec["constriction"] = dec_cs
    return [
        Case(op="coding", shape=shape, providers=enc, check=size_check, bytes=cdf.numel() * 8, count=n, unit="sym", mode="encode"),
        Case(op="coding", shape=shape, providers=dec, check=exact_check, bytes=cdf.numel() * 8, count=n, unit="sym", mode="decode"),
    ]


def _equal_info_cases(n_streams: int, stream_bytes: int, device: str) -> list[Case]:
    """EqualInfoAC decoding under a KV-cached LM (a small random Transformer on English text):
    ``parallel`` decodes every window of a batch at once (windows are independent);
    ``reference`` decodes each stream's windows in order, one window per stream at a time,
    as a decoder without independent windows would (the encoder's schedule)."""
    from pydoc_data.topics import topics

    from flopwise.models.transformer import ModelConfig, Transformer

    from . import streams as st
    from .models import CachedLM

    text = "\n".join(topics[k] for k in sorted(topics)).encode()[: n_streams * stream_bytes]
    sym = torch.frombuffer(bytearray(text), dtype=torch.uint8).long().reshape(n_streams, stream_bytes).to(device)
    torch.manual_seed(0)
    net = Transformer(ModelConfig.preset("tiny", d_model=64, n_layers=2, n_heads=4, d_ff=176, max_seq_len=65))
    lm = CachedLM(net.to(device), context_len=65, batch_rows=n_streams)
    cfg = rc.CoderConfig(min_freq=st.equal_info_min_freq(16, 24))
    enc = st.encode_equal_info(sym, None, lm, cfg, 16, 64)
    counts, per_stream = enc.counts, enc.stream_windows.tolist()
    first = np.concatenate([[0], np.cumsum(per_stream)[:-1]]).astype(np.int64)
    n = int(counts.sum())

    def parallel():
        return torch.cat(st.decode_equal_info(enc.windows, counts, lm, cfg, 16, batch_windows=4096)).cpu().numpy()

    def sequential():
        pieces = [None] * len(counts)
        for r in range(max(per_stream)):
            idx = torch.tensor([first[b] + r for b in range(n_streams) if r < per_stream[b]], device=enc.windows.device)
            out = st.decode_streams(enc.windows[idx], None, counts[idx], lm, cfg, max_bits=16)
            for j, w in enumerate(idx.tolist()):
                pieces[w] = out[j, : int(counts[w])]
        return torch.cat(pieces).cpu().numpy()

    def exact(out, ref):
        return None if np.array_equal(out, ref) else "decoded symbols differ"

    # model steps each schedule runs (what bounds a GPU, where one step costs about the same
    # for 32 or 4,096 rows): rounds of one window per stream vs length-sorted batches
    c = counts.cpu()
    seq_steps = sum(max(int(c[first[b] + r]) for b in range(n_streams) if r < per_stream[b])
                    for r in range(max(per_stream)))
    srt = torch.sort(c).values
    par_steps = sum(int(srt[i : i + 4096].max()) for i in range(0, len(srt), 4096))
    shape = (f"streams={n_streams} bytes={stream_bytes} windows={len(counts)} b=16 "
             f"steps seq/par={seq_steps}/{par_steps} {device}")
    return [Case(op="equalinfo-decode", shape=shape, providers={"reference": sequential, "parallel": parallel},
                 check=exact, count=n, unit="B", mode="decode")]


def cases(gpu: bool) -> list[Case]:
    if gpu:
        # the target shape: 4,096 streams, vocabulary 256 (H100); constriction on this host's CPU
        return (_cases_for(4096, 32, "cuda", False) + _cases_for(4096, 32, "cpu", True)
                + _equal_info_cases(64, 256, "cuda"))
    return _cases_for(512, 32, "cpu", True) + _equal_info_cases(32, 256, "cpu")
