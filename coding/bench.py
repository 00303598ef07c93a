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
  their S distributions at once).

Checks: our coders are integer arithmetic and must agree bit for bit, so an encode
provider's first call (the harness's check call; later calls return the total bit count
only, as before) returns its ``(data, nbits)``: every stream's bit count and bytes must equal
the reference coder's, and the stream must decode (reference decoder) to the coded symbols.
Constriction writes different streams (whole 32-bit words), so its encode is held only to
the total size (within 1% + 64 bits per stream) and its decode case decodes its own words.
Decode providers must return exactly the coded symbols.

**Units**: ``Case.flops`` holds the symbol count, so the ``TFLOP/s`` column reads as
*T symbols/s* (multiply by 1e6 for M symbols/s); ``TB/s`` counts the cdf bytes read.
"""

from __future__ import annotations

import numpy as np
import torch

from flopwise.kernels.bench import Case, check_then

from . import rangecoder as rc


class _ExternalSize(int):
    """The total bit count of an external coder's streams (not ours: held to the size only)."""

    @property
    def bits(self) -> int:
        return int(self)


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


def _cases_for(B: int, S: int, device: str, with_constriction: bool, triton: bool | None = None) -> list[Case]:
    """Encode and decode cases; ``triton`` (default: on CUDA) adds the Triton coder (under
    the interpreter on CPU, for tests)."""
    V = 256
    freqs, sym, cdf = _work(B, S, V, device)
    data, nbits = rc.encode(sym, cdf)
    shape = f"B={B} S={S} V={V} {device}"
    n = B * S

    def enc_ours():
        return rc.encode(sym, cdf, validate=False)

    def dec_ours():
        return rc.decode(data, nbits, cdf, S, validate=False).cpu().numpy()

    sym_cpu = sym.cpu().numpy()

    def encode_check(out, ref):
        if isinstance(out, _ExternalSize):
            # 1% plus constriction's termination: whole 32-bit words per stream
            ref_bits = int(ref[1].sum())
            tol = 0.01 * ref_bits + 64 * B
            if not abs(out.bits - ref_bits) <= tol:
                return f"{out.bits} bits vs {ref_bits} bits (> 1% + 64 bits/stream)"
            return None
        if not (isinstance(out, tuple) and len(out) == 2):
            return f"expected (data, nbits), got {type(out).__name__}"
        (d, nb), (d_ref, nb_ref) = out, ref
        if nb.shape != nb_ref.shape or not torch.equal(nb.cpu(), nb_ref.cpu()):
            bad = int((nb.cpu() != nb_ref.cpu()).sum()) if nb.shape == nb_ref.shape else "all"
            return f"bit counts differ from the reference coder's ({bad} of {B} streams)"
        if d.dtype != torch.uint8 or d.dim() != 2 or d.shape[0] != B:
            return f"data must be [{B}, C] uint8, got {tuple(d.shape)} {d.dtype}"
        # the same stream bytes; a wider buffer may only hold zeros past the reference's
        d, d_ref = d.cpu(), d_ref.cpu()
        w = min(d.shape[1], d_ref.shape[1])
        if not (torch.equal(d[:, :w], d_ref[:, :w]) and not d[:, w:].any() and not d_ref[:, w:].any()):
            return "encoded bytes differ from the reference coder's"
        if not torch.equal(rc.decode(out[0], out[1], cdf, S, validate=False).cpu(), sym.cpu()):
            return "the stream does not decode to the coded symbols"
        return None

    def decode_check(out, ref):
        if not np.array_equal(np.asarray(ref), sym_cpu):
            return "the reference decodes other symbols than were coded"
        out = np.asarray(out)
        if out.shape != sym_cpu.shape or not np.array_equal(out, sym_cpu):
            return "decoded symbols differ from the coded symbols"
        return None

    enc = {"reference": check_then(enc_ours, lambda: int(enc_ours()[1].sum()))}
    dec = {"reference": dec_ours}
    if device == "cuda" if triton is None else triton:
        from .triton_coder import decode_triton, encode_triton

        def enc_triton():
            return encode_triton(sym, cdf, validate=False)

        enc["triton"] = check_then(enc_triton, lambda: int(enc_triton()[1].sum()))
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
            return _ExternalSize(total)

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
        Case(op="coding", shape=shape, providers=enc, check=encode_check, bytes=cdf.numel() * 8, count=n, unit="sym", mode="encode"),
        Case(op="coding", shape=shape, providers=dec, check=decode_check, bytes=cdf.numel() * 8, count=n, unit="sym", mode="decode"),
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
