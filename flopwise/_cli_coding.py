"""Argument parsing for ``flopwise coding ...`` (kept apart from cli.py so each command family has one file).

Handlers only parse, call ``flopwise.coding.dataset`` and print.
"""

from __future__ import annotations

import argparse
import json
import os

from flopwise._cli_types import positive_int as _positive_int, python_names_as_flags
from flopwise._files import check_writable


# Options that only some methods use: given for another method they would be recorded in
# meta.json and silently ignored, so they are refused instead.
_METHOD_OPTIONS = {
    "window_bits": ("--window-bits", ("equalinfo",)),
    "max_window_bytes": ("--max-window-bytes", ("equalinfo",)),
    "precision": ("--precision", ("static", "ac", "equalinfo")),
    "m1": ("--m1", ("ac", "equalinfo")),
    "context_len": ("--context-len", ("ac", "equalinfo")),
    "m1_eval": ("--m1-eval", ("ac", "equalinfo")),
    "batch_rows": ("--batch-rows", ("ac", "equalinfo")),
    "streams_per_batch": ("--streams-per-batch", ("ac", "equalinfo")),
    "train": ("--train", ("static",)),
    "device": ("--device", ("static", "ac", "equalinfo")),  # GZip runs on the host
}


# Python argument names in the library's messages, as typed on the command line (names that
# are also plain words, such as "device" or "train", are left alone)
_BUILD_NAMES = {"m1=...": "--m1 CKPT", "token_bits": "--token-bits", "chunk_bytes": "--chunk-bytes",
                **{k: flag for k, (flag, _) in _METHOD_OPTIONS.items() if "_" in k}}


def _cmd_build(args: argparse.Namespace) -> int:
    try:
        return _build(args)
    except ValueError as exc:
        raise ValueError(python_names_as_flags(str(exc), _BUILD_NAMES)) from None


def _build(args: argparse.Namespace) -> int:
    from flopwise.coding.dataset import BuildOptions, build

    for dest, (flag, methods) in _METHOD_OPTIONS.items():
        if getattr(args, dest) is not None and args.method not in methods:
            raise ValueError(f"{flag} applies to --method {' / '.join(methods)} only, not {args.method}")
    given = {k: getattr(args, k) for k in _METHOD_OPTIONS if k != "train" and getattr(args, k) is not None}
    opts = BuildOptions(method=args.method, token_bits=args.token_bits, chunk_bytes=args.chunk_bytes, **given)
    stats = build(args.corpus, args.out, opts, force=args.force, train=args.train,
                  progress=False if args.quiet else None)
    if args.json:
        print(json.dumps(stats, indent=1))
    else:
        ratio = stats["compression_ratio"]
        print(f"{args.method}: {stats['input_bytes']} bytes -> {stats['tokens']} tokens "
              f"({stats['token_bytes']} bytes), ratio {ratio:.3f}, {stats['bits_per_byte']:.3f} bits/byte, "
              f"{stats['bytes_per_token']:.3f} bytes/token" if ratio else f"{args.method}: empty input")
        print(f"wrote {args.out}")
    return 0


def _cmd_decode(args: argparse.Namespace) -> int:
    from flopwise.coding.dataset import decode

    try:
        data = decode(args.folder, args.text_file, force=args.force, device=args.device, m1=args.m1,
                      progress=False if args.quiet else None)
    except ValueError as exc:
        raise ValueError(python_names_as_flags(str(exc), {"text_file": "TEXT_FILE", "m1=...": "--m1 CKPT"})) from None
    print(f"decoded {len(data)} bytes (SHA-256 verified) -> {args.text_file}")
    return 0


def _check_json_path(path: str) -> None:
    """Refuse a --json FILE that could not be written, before the run rather than after it."""
    if os.path.isdir(path):
        raise ValueError(f"--json {path} is a folder; expected a file path")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"--json {path}: its folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"--json {path}: its folder {parent} is not writable")
    check_writable(parent, f"--json {path}", "pass another path")


def _cmd_experiment(args: argparse.Namespace) -> int:
    from flopwise.coding.experiment import run_experiment

    if args.json:
        _check_json_path(args.json)
    res = run_experiment(args.corpus, preset=args.preset, runs=args.runs, m1=args.m1, out_dir=args.out,
                         device=args.device, m2_steps=args.m2_steps, progress=not args.quiet, force=args.force)
    if args.json:
        _check_json_path(args.json)  # again: the run may have taken hours
        from flopwise.coding.dataset import _write_atomic  # a fresh temporary file, renamed over the path

        _write_atomic(args.json, json.dumps(res.to_dict(), indent=1).encode(), force=True)
        print(f"wrote {args.json}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("coding", help="compressed-text datasets: arithmetic coding, EqualInfoAC, GZip")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    csub = p.add_subparsers(dest="coding_command", metavar="SUBCOMMAND")

    b = csub.add_parser("build", help="compress a text file into token arrays + everything needed to decode")
    b.add_argument("corpus", help="input file (bytes)")
    b.add_argument("out", help="output folder (created atomically)")
    b.add_argument("--method", required=True, choices=("gzip", "static", "ac", "equalinfo"))
    b.add_argument("--token-bits", type=int, choices=(8, 16), default=8, help="bits per token (default 8)")
    b.add_argument("--window-bits", type=_positive_int, help="EqualInfoAC window size b, a multiple of the token bits "
                                                            ">= 16 (default 16)")
    b.add_argument("--chunk-bytes", type=_positive_int, default=4096, help="bytes per independent stream (default 4096)")
    b.add_argument("--precision", type=_positive_int, help="static/ac/equalinfo: frequency total 2^P, 9..24 (default 24)")
    b.add_argument("--max-window-bytes", type=_positive_int, help="EqualInfoAC: bytes per window at most (default 64)")
    b.add_argument("--m1", metavar="CKPT", help="M1 checkpoint (flopwise folder or torch.save'd module); ac/equalinfo")
    b.add_argument("--context-len", type=_positive_int, help="M1 context (default: its max_seq_len)")
    b.add_argument("--m1-eval", choices=("auto", "cached", "window"),
                   help="M1 evaluation: cached (KV cache, one token per step; dense flopwise models), window "
                        "(re-read the last context-len bytes every step; any module), auto (default: cached "
                        "where it applies)")
    b.add_argument("--batch-rows", type=_positive_int, help="ac/equalinfo: rows per M1 call, fixed (default 64)")
    b.add_argument("--streams-per-batch", type=_positive_int, help="ac/equalinfo: streams coded together (default 256)")
    b.add_argument("--train", metavar="FILE", help="StaticAC: fit the unigram model on FILE (default: the corpus)")
    b.add_argument("--device", help="static/ac/equalinfo: cpu or cuda (default cpu); decoding must use the same "
                                    "device type")
    b.add_argument("--force", action="store_true", help="replace an existing OUT")
    b.add_argument("--json", action="store_true", help="print the stats as JSON")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=_cmd_build)

    d = csub.add_parser("decode", help="invert `coding build` exactly (verified against the input's SHA-256)")
    d.add_argument("folder", help="a `coding build` output folder")
    d.add_argument("text_file", help="where to write the decoded bytes")
    d.add_argument("--device", help="override the recorded device (must match the encoder's for ac/equalinfo)")
    d.add_argument("--m1", metavar="CKPT", help="M1 checkpoint at another path (its hash must match)")
    d.add_argument("--force", action="store_true", help="replace an existing TEXT_FILE")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.set_defaults(func=_cmd_decode)

    e = csub.add_parser("experiment", help="train M2 models over each method's tokens at matched compute "
                                           "and compare validation bits per original byte")
    e.add_argument("--preset", choices=("cpu", "gpu", "gpu-fit", "smoke"),
                   help="sizes (default: gpu with CUDA, else cpu; gpu-fit: a few minutes on one GPU)")
    e.add_argument("--corpus", help="corpus folder, or 'embedded' (default: the fetched corpus, else embedded)")
    e.add_argument("--runs", help="M2 runs, comma separated: bytes, gzip, static, ac, equalinfo, each with an "
                                  "optional :8 or :16 (token bits; default 8). Default: the preset's")
    e.add_argument("--m1", metavar="CKPT", help="use this M1 (flopwise checkpoint folder) instead of training one")
    e.add_argument("--m2-steps", type=_positive_int, help="M2 optimizer steps (default: the preset's)")
    e.add_argument("--out", metavar="DIR", help="keep M1, the token arrays and results.json here (a new or "
                                                "empty folder, or an earlier experiment's with --force)")
    e.add_argument("--force", action="store_true", help="replace an earlier experiment in --out (swapped in once "
                                                        "the new run has finished)")
    e.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    e.add_argument("--json", metavar="FILE", help="write the results as JSON")
    e.add_argument("--quiet", action="store_true", help="no progress lines")
    e.set_defaults(func=_cmd_experiment)
