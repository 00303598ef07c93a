"""Argument parsing for ``flopwise upcycle SRC DST ...`` (sparse upcycling of a dense checkpoint).

Handlers only parse, call ``flopwise.models.upcycle`` and print.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import warnings


def _size(text: str) -> int:
    """``5GB``, ``500MB``, ``2GiB`` or a byte count."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    num = t.rstrip("KMGIB")
    try:
        v = int(float(num) * units[t[len(num):]])
    except (ValueError, KeyError, OverflowError):  # OverflowError: inf, 1e400
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MB, 2GiB)") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"size must be >= 1 byte: {text!r}")
    return v


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return str(n)


class _Bar:
    """One-line progress bar over tensors on stderr (only when stderr is a terminal or forced)."""

    def __init__(self, enabled: bool):
        self.enabled, self.t0, self.last = enabled, time.perf_counter(), 0.0

    def __call__(self, done: int, total: int, name: str) -> None:
        now = time.perf_counter()
        if not self.enabled or (now - self.last < 0.1 and done < total):
            return
        self.last = now
        width = 30
        fill = int(width * done / max(total, 1))
        sys.stderr.write(f"\r[{'#' * fill}{'.' * (width - fill)}] {done}/{total} tensors "
                         f"{now - self.t0:5.1f}s {name[-40:]:<40}")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _options(args: argparse.Namespace):
    from flopwise.models.upcycle import UpcycleOptions

    # options that only one choice uses: given with another, they would be silently ignored
    for flag, value, owner, choice, used in (
            ("--noise-std", args.noise_std, "--expert-init", args.expert_init, ("noise",)),
            ("--drop-ratio", args.drop_ratio, "--expert-init", args.expert_init, ("drop",)),
            ("--router-std", args.router_std, "--router-init", args.router_init, ("normal", "orthogonal", "kmeans"))):
        if value is not None and choice not in used:
            raise ValueError(f"{flag} is used only with {owner} {' or '.join(used)}, not {choice}: drop it")
    given = {k: v for k, v in (("noise_std", args.noise_std), ("drop_ratio", args.drop_ratio),
                               ("router_std", args.router_std), ("aux_loss_coef", args.aux_loss_coef)) if v is not None}
    return UpcycleOptions(
        **given,
        n_experts=args.experts, top_k=args.top_k, format=args.format, layers=args.layers,
        expert_init=args.expert_init,
        granularity=args.granularity, router_init=args.router_init,
        calibration_text=args.calibration_text, renormalize=not args.no_renormalize,
        shared_d_ff=args.shared_d_ff, seed=args.seed,
        max_shard_bytes=args.max_shard_size, optimizer=not args.no_optimizer)


def _cmd_upcycle(args: argparse.Namespace) -> int:
    from flopwise.models import upcycle as up

    opts = _options(args)
    if args.dry_run:  # including the destination: a dry run fails where the real one would
        summary = up.plan_upcycle(args.src, opts, dst_folder=args.dst, force=args.force).summary()
        if args.json:
            print(json.dumps(summary, indent=2))
            return 0
        print(f"{summary['source']} ({summary['source_arch']}) -> {args.dst} ({summary['format']}): "
              f"{summary['n_experts']} experts, top-{summary['top_k']}, MoE layers {summary['moe_layers']}")
        print(f"  output {_human(summary['output_bytes'])} in {len(summary['shards'])} files; "
              f"params total {summary['total_params']:,}, active per token {summary['active_params']:,}")
        have = up._available_memory()
        full, by_layer = summary["verify_bytes_estimate"], summary["verify_layerwise_bytes_estimate"]
        if have is None or have >= full:
            note = ""
        elif have >= by_layer:
            note = f"; {_human(have)} available here: --verify would go layer by layer"
        else:
            note = f"; {_human(have)} available here: --verify would be refused"
        print(f"  estimated peak memory {_human(summary['peak_bytes_estimate'])} (plus the interpreter and torch); "
              f"--verify: {_human(full)} (both models in float32), {_human(by_layer)} layer by layer{note}")
        for s in summary["shards"]:
            print(f"    {s['file']:<40} {_human(s['bytes']):>10} {s['tensors']:>6} tensors")
        for w in summary["warnings"]:
            print(f"  warning: {w}")
        return 0
    if args.quiet and (args.verify or args.verify_layerwise):
        _no_transformers_bars()  # --verify loads Hugging Face models: no loading bars either
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", up.UpcycleWarning)  # printed below, once
        try:
            report = up.upcycle(args.src, args.dst, opts, force=args.force,
                                verify=args.verify or args.verify_layerwise,
                                verify_layerwise=True if args.verify_layerwise else None,
                                progress=_Bar(not args.quiet and sys.stderr.isatty()))
        except up.VerificationError as exc:
            print(f"flopwise: verification failed: {exc}", file=sys.stderr)
            return 1
    for w in report.warnings:
        print(f"warning: {w}", file=sys.stderr)
    rate = report.output_bytes / max(report.seconds, 1e-9)
    out = {"destination": report.destination, "output_bytes": report.output_bytes, "seconds": round(report.seconds, 3),
           "files": report.files, "warnings": report.warnings}
    if report.verify is not None:
        out["verify"] = _verify_json(report.verify)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"wrote {args.dst}: {_human(report.output_bytes)} in {len(report.files)} files, "
          f"{report.seconds:.1f} s ({_human(rate)}/s)")
    if report.verify is not None:
        _print_verify(report.verify)
    return 0


def _no_transformers_bars() -> None:
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()


def _verify_json(v) -> dict:
    return {"max_abs_diff": v.max_abs_diff, "kl": v.kl, "expected_equal": v.expected_equal, "passed": v.passed,
            "layerwise": v.layerwise, "layer_diffs": v.layer_diffs, "config_diffs": v.config_diffs,
            "tensor_errors": v.tensor_errors, "checks": v.checks}


def _print_verify(v) -> None:
    ok = v.max_abs_diff <= v.tolerance
    print(f"verify: max |logit diff| {v.max_abs_diff:.3g}, KL(dense||moe) {v.kl:.3g} nats"
          + ((" (exact reproduction expected: ok)" if ok else f" (exact reproduction expected: FAILED, tolerance "
              f"{v.tolerance:g})") if v.expected_equal else ""))
    for c in v.checks:
        print(f"  checked {c}")
    for d in v.config_diffs:
        print(f"  FAILED config: {d}")
    for e in v.tensor_errors:
        print(f"  FAILED tensors: {e}")


_UNSET = object()  # a flag not on the command line (not a string: argparse would convert it)

# Flags that describe an upcycle to run: --check reads them from the output's upcycle.json.
_CHECK_CONFLICTS = (("experts", "--experts"), ("top_k", "--top-k"), ("format", "--format"), ("layers", "--layers"),
                    ("expert_init", "--expert-init"), ("noise_std", "--noise-std"), ("drop_ratio", "--drop-ratio"),
                    ("granularity", "--granularity"), ("router_init", "--router-init"),
                    ("router_std", "--router-std"), ("calibration_text", "--calibration-text"),
                    ("no_renormalize", "--no-renormalize"), ("shared_d_ff", "--shared-d-ff"),
                    ("aux_loss_coef", "--aux-loss-coef"), ("seed", "--seed"), ("max_shard_size", "--max-shard-size"),
                    ("no_optimizer", "--no-optimizer"), ("force", "--force"), ("dry_run", "--dry-run"),
                    ("verify", "--verify"))


def _cmd_check(args: argparse.Namespace, given: list[str]) -> int:
    """``--check``: verify an existing output against its source; writes nothing. ``given``:
    the flags of an upcycle to run that the command line holds (refused)."""
    from flopwise.models import upcycle as up

    if given:
        raise ValueError(f"--check verifies {args.dst} with the options recorded in its upcycle.json and writes "
                         f"nothing: drop {', '.join(given)}")
    if not os.path.isdir(args.dst):
        raise ValueError(f"--check: {args.dst} is not a folder (the output of an upcycle to verify)")
    if up._recorded_options(args.dst) is None:
        raise ValueError(f"--check: {args.dst} has no upcycle.json with the options of an upcycle, or it cannot be "
                         "read: not a flopwise upcycle output, or a damaged one. Without the options the tensors "
                         "cannot be checked; flopwise.models.upcycle.verify_upcycle(source, output, "
                         "expected_equal=...) compares the logits of any MoE with its source")
    if args.quiet:
        _no_transformers_bars()
    try:
        v = up.verify_upcycle(args.src, args.dst, layerwise=True if args.verify_layerwise else None)
    except up.VerificationError as exc:
        print(f"flopwise: verification failed: {exc}", file=sys.stderr)
        if args.json:
            print(json.dumps({"passed": False, "error": str(exc)}, indent=2))
        return 1
    if args.json:
        print(json.dumps(_verify_json(v), indent=2))
    else:
        _print_verify(v)
        print("passed" if v.passed else "FAILED")
    return 0 if v.passed else 1


def add_parser(sub) -> None:
    from flopwise.models.hf_formats import TARGET_FORMATS
    from flopwise.models.upcycle import EXPERT_INITS, ROUTER_INITS

    p = sub.add_parser("upcycle", help="turn a dense checkpoint into a Mixture-of-Experts checkpoint (sparse upcycling)")
    p.add_argument("src", help="dense checkpoint folder: Hugging Face llama/mistral/qwen2/qwen3 or flopwise")
    p.add_argument("dst", help="output folder (created atomically; must not exist unless --force)")
    p.add_argument("--experts", type=int, default=8, help="experts per MoE layer (default 8)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    p.add_argument("--format", choices=TARGET_FORMATS, default=None,
                   help="output format (default: flopwise for flopwise sources, qwen3_moe for qwen3, mixtral "
                        "otherwise)")
    p.add_argument("--layers", default="all",
                   help="which MLPs become MoE: all, every_other (1, 3, ...), last:N, or 0,2,5 (default all)")
    p.add_argument("--expert-init", choices=EXPERT_INITS, default="copy",
                   help="copy (the paper), noise (copy + Gaussian noise) or drop (Drop-Upcycling)")
    p.add_argument("--noise-std", type=float, help="noise std relative to each matrix's std (default 0.01)")
    p.add_argument("--drop-ratio", type=float, help="Drop-Upcycling fraction r of neurons (default 0.5)")
    p.add_argument("--granularity", type=int, default=1, help="neuron-split granularity G (default 1)")
    p.add_argument("--router-init", choices=ROUTER_INITS, default="normal",
                   help="normal N(0, 0.02) (default), zeros, orthogonal or kmeans (needs --calibration-text)")
    p.add_argument("--router-std", type=float, help="router init std / row scale (default 0.02)")
    p.add_argument("--calibration-text", metavar="FILE", help="UTF-8 text for --router-init kmeans")
    p.add_argument("--no-renormalize", action="store_true",
                   help="qwen2_moe, qwen3_moe, flopwise: do not renormalise the top-k weights (breaks exact "
                        "reproduction)")
    p.add_argument("--shared-d-ff", type=int, default=0,
                   help="qwen2_moe, flopwise: shared expert size (default 0: none; a flopwise source with MoE layers: "
                        "its own)")
    p.add_argument("--aux-loss-coef", type=float,
                   help="router load-balancing loss coefficient written to the config (default 0.01, or a "
                        "flopwise source's own when it already has MoE layers)")
    p.add_argument("--seed", type=int, default=0, help="seed; draws are keyed by (layer, expert) (default 0)")
    p.add_argument("--max-shard-size", type=_size, default=5 * 10**9, help="output shard limit (default 5GB)")
    p.add_argument("--no-optimizer", action="store_true", help="do not upcycle optimizer.safetensors")
    p.add_argument("--force", action="store_true",
                   help="replace an existing destination: an empty folder or an unchanged earlier upcycle output")
    p.add_argument("--verify", action="store_true",
                   help="before publishing, check every tensor against its definition, load both models, compare "
                        "their configs and their logits on a probe batch")
    p.add_argument("--verify-layerwise", action="store_true",
                   help="--verify running the models a layer at a time (memory: the embeddings, head and one "
                        "layer), with each layer's hidden-state difference; --verify does this by itself where "
                        "the whole models do not fit in memory")
    p.add_argument("--check", action="store_true",
                   help="verify an existing output DST against SRC as --verify does (the options recorded in "
                        "DST/upcycle.json); write nothing; exit status 1 if it fails")
    p.add_argument("--dry-run", action="store_true", help="print the plan from headers alone; write nothing")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    # The flags --check refuses parse to _UNSET when not given, so that one given at its
    # default value is still seen; the handler then puts the real defaults in.
    real = {dest: p.get_default(dest) for dest, _ in _CHECK_CONFLICTS}
    p.set_defaults(func=_cmd_upcycle_default, upcycle_defaults=real, **{dest: _UNSET for dest in real})


# UpcycleOptions names its fields in errors ("option n_experts ..."); on the command line
# they are flags.
_FLAGS = {"n_experts": "--experts", "top_k": "--top-k", "format": "--format", "layers": "--layers",
          "expert_init": "--expert-init", "noise_std": "--noise-std", "drop_ratio": "--drop-ratio",
          "granularity": "--granularity", "router_init": "--router-init", "router_std": "--router-std",
          "calibration_text": "--calibration-text", "renormalize": "--no-renormalize",
          "shared_d_ff": "--shared-d-ff", "aux_loss_coef": "--aux-loss-coef", "seed": "--seed",
          "max_shard_bytes": "--max-shard-size", "optimizer": "--no-optimizer", "verify": "--verify"}
_OPTION = re.compile(r"\boption (\w+)")
_FIELD = re.compile(r"\b(" + "|".join(k for k in _FLAGS if "_" in k) + r")\b")


def _as_flags(message: str) -> str:
    message = message.replace("option renormalize=False", "renormalize=False (--no-renormalize)")
    message = _OPTION.sub(lambda m: _FLAGS.get(m.group(1), m.group(0)), message)
    return _FIELD.sub(lambda m: _FLAGS[m.group(1)], message)


def _cmd_upcycle_default(args: argparse.Namespace) -> int:
    given = [flag for dest, flag in _CHECK_CONFLICTS if getattr(args, dest, _UNSET) is not _UNSET]
    for dest, default in args.upcycle_defaults.items():
        if getattr(args, dest, _UNSET) is _UNSET:
            setattr(args, dest, default)
    try:
        return _cmd_check(args, given) if args.check else _run_upcycle(args)
    except ValueError as exc:
        raise ValueError(_as_flags(str(exc))) from None


def _run_upcycle(args: argparse.Namespace) -> int:
    if args.format is None:
        try:
            with open(os.path.join(args.src, "config.json")) as f:
                cfg = json.load(f)
            model_type = cfg.get("model_type") if isinstance(cfg, dict) else None
            is_hf = not isinstance(cfg, dict) or "model_type" in cfg
        except (OSError, ValueError):
            is_hf, model_type = True, None  # the library reports the real problem
        args.format = "flopwise" if not is_hf else "qwen3_moe" if model_type == "qwen3" else "mixtral"
    return _cmd_upcycle(args)
