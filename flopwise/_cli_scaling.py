"""Argument parsing for ``flopwise scaling ...`` (kept apart from cli.py so each command family has one file).

Handlers only parse, call ``flopwise.scaling`` and print.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path

from flopwise._cli_types import positive_float as _positive_float, python_names_as_flags


def _fmt(v: float) -> str:
    if not math.isfinite(v):
        return str(v)
    return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"


def _fixed(v: float, decimals: int) -> str:
    """``decimals`` places where that reads well; 4 significant digits for a number so
    large or small that fixed point would print a long run of digits or only zeros."""
    if v == 0 or (math.isfinite(v) and 10.0**-decimals <= abs(v) < 1e6):
        return f"{v:.{decimals}f}"
    return f"{v:.4g}"


def _finite_or_none(obj):
    """obj with every non-finite float replaced by None: JSON has no NaN or Infinity."""
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _print_json(obj) -> None:
    # allow_nan=False: a stray NaN fails here instead of producing invalid JSON.
    print(json.dumps(_finite_or_none(obj), indent=2, allow_nan=False))


# load_csv names its keyword arguments in errors; on the command line they are flags.
_FLAG_NAMES = {name: "--" + name.replace("_", "-") for name in ("n_col", "d_col", "c_col", "loss_col", "drop_highest")}


def _as_flags(message: str) -> str:
    return python_names_as_flags(message, _FLAG_NAMES)


def _bootstrap_path(plot: str) -> str:
    """fig.png -> fig_bootstrap.png (the suffix of the file name only). Without a suffix
    none is added here: like the main figure, it gets matplotlib's default format."""
    p = Path(plot)
    return str(p.with_name(p.stem + "_bootstrap" + p.suffix))


# Exit status of ``fit`` when the results were printed but --plot could not be written
# at the end (disk full, folder removed meanwhile): not 1, which says the fit is not
# to be relied on, and not 2, which says nothing ran.
EXIT_PLOT_FAILED = 3


def _cmd_fit(args: argparse.Namespace) -> int:
    from flopwise import scaling

    cols = dict(scaling.EPOCH_COLUMNS) if args.epoch else {"n_col": "N", "loss_col": "loss"}
    if args.n_col:
        cols["n_col"] = args.n_col
    if args.loss_col:
        cols["loss_col"] = args.loss_col
    if args.d_col or args.c_col:
        cols.pop("c_col", None)
        cols["d_col" if args.d_col else "c_col"] = args.d_col or args.c_col
    drop = args.drop_highest if args.drop_highest is not None else (5 if args.epoch else 0)
    objective = args.objective or ("huber_likelihood" if args.epoch else "huber")
    if args.bootstrap < 0 or args.bootstrap == 1:
        raise ValueError(f"--bootstrap must be 0 (off) or >= 2 resamples, got {args.bootstrap}")
    if drop < 0:
        raise ValueError(f"--drop-highest must be >= 0, got {drop}")
    if args.seed is not None and args.seed < 0:
        raise ValueError(f"--seed must be an integer >= 0, got {args.seed}")
    if args.level is not None and not 0.0 < args.level < 1.0:
        raise ValueError(f"--level must be in (0, 1), e.g. 0.95, got {args.level}")
    if args.bootstrap:
        from flopwise.scaling.bootstrap import check_resample_count

        check_resample_count(args.bootstrap, "--bootstrap")  # before minutes of fitting
    else:
        # Like --d-col with --c-col: an option that would do nothing is an error, not ignored.
        unused = [flag for flag, value in (("--seed", args.seed), ("--level", args.level),
                                           ("--bootstrap-objective", args.bootstrap_objective)) if value is not None]
        if unused:
            flags = ", ".join(unused)
            raise ValueError(f"{flags} only appl{'ies' if len(unused) == 1 else 'y'} to the bootstrap: "
                             f"add --bootstrap N (e.g. 4000) or leave out {flags}")
    seed = 0 if args.seed is None else args.seed
    level = 0.95 if args.level is None else args.level
    if args.plot:
        # Before the fit: a missing matplotlib or an unwritable path should not cost
        # a full fit and bootstrap.
        from flopwise.scaling import plot as splot

        try:
            splot.output_path(args.plot)
            if args.bootstrap:
                splot.output_path(_bootstrap_path(args.plot))
        except ImportError as exc:
            raise ValueError(f"--plot: {exc}") from None
        except ValueError as exc:
            raise ValueError(f"--plot: {exc}") from None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            data = scaling.load_csv(args.file, k=args.k, drop_highest=drop, **cols)
    except ValueError as exc:
        raise ValueError(_as_flags(str(exc))) from None
    except FileNotFoundError:  # exit 2, naming the argument as typed
        raise FileNotFoundError(f"FILE: no such file {args.file!r}") from None
    except OSError as exc:  # e.g. no permission: bad input (exit 2), not an unreliable fit (exit 1)
        raise ValueError(f"{args.file}: cannot read the file ({exc.strerror or exc})") from None
    for w in caught:
        if issubclass(w.category, UserWarning):  # e.g. --drop-highest dropping more runs because of ties
            print(f"flopwise: warning: {_as_flags(str(w.message))}", file=sys.stderr)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", scaling.FitWarning)
        result = scaling.fit(data, objective=objective, delta=args.delta)
    for w in caught:
        if not issubclass(w.category, scaling.FitWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    boot = None
    if args.bootstrap:
        # Epoch's published standard errors refit the Huber sum; --epoch does the same.
        b_obj = args.bootstrap_objective or ("huber" if args.epoch else objective)
        boot = scaling.bootstrap(
            data, result, n=args.bootstrap, seed=seed, objective=b_obj, compute=args.compute, level=level
        )
    law = result.law
    tpp = law.tokens_per_parameter(args.compute, data.k)
    if args.json:
        params = {k: law.as_dict()[k] for k in ("E", "A", "B", "alpha", "beta")}
        out = {
            "params": params,
            "a": law.a,
            "b": law.b,
            "tokens_per_parameter": tpp,
            "compute": args.compute,
            "objective": objective,
            "value": result.value,
            "scale": result.scale,
            "converged": result.converged,  # the returned optimum's own convergence
            "warnings": list(result.warnings),
            "n_converged": result.n_converged,  # starts whose first (loose) pass converged
            "n_runs": result.n_runs,
            "n_starts": result.n_starts,
            "n_at_best": result.n_at_best,
            "seconds": result.seconds,
        }
        if boot is not None:
            summary = boot.as_dict()
            out["params"] = {k: {"estimate": params[k], "se": summary[k]["se"], "interval": summary[k]["interval"]} for k in params}
            out["bootstrap"] = {
                "n": boot.n_resamples,
                "n_failed": boot.n_failed,
                "seed": boot.seed,
                "level": boot.level,
                "objective": boot.objective,
                "seconds": boot.seconds,
                "derived": {k: summary[k] for k in ("a", "b", "tokens_per_parameter")},
            }
        _print_json(out)
    else:
        status = "converged" if result.converged else "NOT converged"
        print(f"{result.n_runs} runs, objective {objective}, {result.n_starts} starts "
              f"({result.n_at_best} at the best), {status}, {result.seconds:.2f} s")
        names = ("E", "A", "B", "alpha", "beta", "a", "b", "tokens_per_parameter")
        vals = {**law.as_dict(), "a": law.a, "b": law.b, "tokens_per_parameter": tpp}
        for name in names:
            line = f"  {name:>22} {_fmt(vals[name])}"
            if boot is not None:
                lo, hi = boot.interval[name]
                line += f"  se {_fmt(boot.se[name])}  {100 * boot.level:.0f}% [{_fmt(lo)}, {_fmt(hi)}]"
            print(line)
        print(f"  (tokens_per_parameter at C = {args.compute:.3g} FLOPs)")
        if boot is not None:
            print(f"bootstrap: {boot.n_resamples} resamples ({boot.objective}), {boot.n_failed} without a valid law "
                  f"(left out), {boot.seconds:.2f} s")
    sys.stdout.flush()
    for msg in result.warnings:
        print(f"flopwise: warning: {msg}", file=sys.stderr)
    if args.plot:
        # After the numbers are printed: a plotting failure loses no results.
        from flopwise.scaling import plot as splot

        try:
            splot.plot_fit(data, law, path=args.plot)
            print(f"figure: {splot.output_path(args.plot)[0]}", file=sys.stderr)
            if boot is not None:
                splot.plot_bootstrap(boot, path=_bootstrap_path(args.plot))
                print(f"figure: {splot.output_path(_bootstrap_path(args.plot))[0]}", file=sys.stderr)
        except (OSError, ValueError) as exc:  # e.g. disk full, or the folder removed during the fit
            print(f"flopwise: error: --plot: the results above were printed, but a figure could not be written: {exc}",
                  file=sys.stderr)
            return EXIT_PLOT_FAILED
    # 1: results printed, but the fit is not one to rely on (see the warnings).
    return 1 if result.warnings else 0


def _cmd_optimal(args: argparse.Namespace) -> int:
    from flopwise import scaling

    law = scaling.get_law(args.law)
    n, d = law.optimal(args.compute, args.k)
    row = {"law": law.name, "compute": args.compute, "N_opt": n, "D_opt": d, "tokens_per_parameter": d / n,
           "loss": law.loss(n, d), "a": law.a, "b": law.b}
    if args.inference_tokens is not None:
        if not (math.isfinite(args.inference_tokens) and args.inference_tokens >= 0):
            raise ValueError(f"--inference-tokens must be a finite number >= 0, got {args.inference_tokens}")
        if not row["loss"] - law.E > 1e-9 * law.E:
            # The allocation is defined by the loss reached at --compute; when that is E to
            # float precision, every model reaching it is infinitely large.
            raise ValueError(
                f"--compute {args.compute:.3g}: the predicted loss there ({row['loss']:.6g}) is within rounding "
                f"of the irreducible loss E = {law.E:.6g}, so --inference-tokens has no finite allocation; "
                "use a smaller --compute"
            )
        io = scaling.inference_optimal(law, row["loss"], args.inference_tokens, k=args.k)
        row["inference_aware"] = io.as_dict()
    if args.json:
        _print_json(row)
        return 0
    print(f"law {law.name}: C = {args.compute:.3g} FLOPs -> N_opt = {n:.3e}, D_opt = {d:.3e}, "
          f"D/N = {d / n:.4g}, loss {_fixed(row['loss'], 4)}  (N ∝ C^{law.a:.3f}, D ∝ C^{law.b:.3f})")
    if args.inference_tokens is not None:
        io = row["inference_aware"]
        print(f"serving {args.inference_tokens:.3g} tokens at the same loss: N = {io['N']:.3e} "
              f"({_fixed(io['n_ratio'], 2)}x), D = {io['D']:.3e} ({_fixed(io['d_ratio'], 2)}x), "
              f"total compute {io['total_flops']:.3e} ({round(100 * io['savings'], 1) + 0.0:.1f}% less)")  # + 0.0: no "-0.0"
    return 0


def _cmd_decompose(args: argparse.Namespace) -> int:
    from flopwise import scaling

    law = scaling.get_law(args.law)
    rows = scaling.decompose(law, args.models, k=args.k)
    if args.json:
        _print_json({"law": law.name, "params": law.as_dict(), "rows": rows})
        return 0
    print(f"law {law.name}: E={law.E:.4g} A={law.A:.4g} B={law.B:.4g} alpha={law.alpha:.4g} beta={law.beta:.4g}")
    print(f"{'model':>12} {'N':>9} {'D':>9} {'C':>9} {'E':>6} {'A/N^a':>7} {'B/D^b':>7} {'loss':>7} {'opt.loss':>8}")
    for r in rows:
        print(f"{r['model']:>12} {r['N']:9.3g} {r['D']:9.3g} {r['C']:9.3g} {_fixed(r['irreducible'], 3):>6} "
              f"{_fixed(r['model_term'], 4):>7} {_fixed(r['data_term'], 4):>7} {_fixed(r['loss'], 4):>7} "
              f"{_fixed(r['optimal_loss'], 4):>8}")
    return 0


def add_parser(sub) -> None:
    from flopwise.scaling.bootstrap import CHINCHILLA_COMPUTE

    p = sub.add_parser("scaling", help="scaling-law fits and compute-optimal allocation")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    ssub = p.add_subparsers(dest="scaling_command", metavar="SUBCOMMAND")

    f = ssub.add_parser("fit", help="Approach-3 fit of L = E + A/N^alpha + B/D^beta to a CSV of runs")
    f.add_argument("file", help="CSV with a header row")
    f.add_argument("--epoch", action="store_true",
                   help="Epoch AI's conventions for svg_extracted_data.csv: columns 'Model Size', "
                        "'Training FLOP', 'loss'; D = C/(6N); drop the 5 highest-loss runs; Huber likelihood")
    f.add_argument("--n-col", help="parameter-count column (default N, or 'Model Size' with --epoch)")
    dc = f.add_mutually_exclusive_group()
    dc.add_argument("--d-col", help="training-token column")
    dc.add_argument("--c-col", help="training-FLOP column (D = C / (k N))")
    f.add_argument("--loss-col", help="loss column (default loss)")
    f.add_argument("--k", type=_positive_float, default=6.0, help="FLOPs per parameter per token (default 6)")
    f.add_argument("--drop-highest", type=int, metavar="K",
                   help="drop the K highest-loss runs (default 0, 5 with --epoch), as Epoch AI do: every run with a "
                        "loss >= the K-th highest goes, so with ties more than K go (a warning says how many)")
    f.add_argument("--objective", choices=("huber", "huber_likelihood"), help="default huber (huber_likelihood with --epoch)")
    f.add_argument("--delta", type=_positive_float, default=1e-3, help="Huber delta (default 1e-3)")
    f.add_argument("--bootstrap", type=int, default=0, metavar="N", help="bootstrap resamples (e.g. 4000)")
    f.add_argument("--bootstrap-objective", choices=("huber", "huber_likelihood"),
                   help="objective refitted per resample (default: the fit's; huber with --epoch, as Epoch did); "
                        "needs --bootstrap")
    f.add_argument("--seed", type=int, help="bootstrap seed (default 0); needs --bootstrap")
    f.add_argument("--level", type=float, help="percentile-interval level (default 0.95); needs --bootstrap")
    f.add_argument("--compute", type=_positive_float, default=CHINCHILLA_COMPUTE,
                   help="FLOPs at which to report tokens per parameter (default Chinchilla's 5.88e23)")
    f.add_argument("--plot", metavar="OUT.png", help="write the data/isoloss/frontier figure (needs matplotlib)")
    f.add_argument("--json", action="store_true", help="print a JSON object (non-finite values as null)")
    f.set_defaults(func=_cmd_fit)
    f.epilog = ("exit status 0: fitted; 1: results printed but not to rely on (the optimiser did not converge "
                "or the law is on a boundary, e.g. beta ~ 0; see the warnings on stderr); 2: bad input; "
                f"{EXIT_PLOT_FAILED}: results printed, but a --plot figure could not be written")

    o = ssub.add_parser("optimal", help="compute-optimal N and D for a compute budget")
    o.add_argument("--compute", type=_positive_float, required=True, help="training FLOPs")
    o.add_argument("--law", default="epoch", help="preset: epoch (default) or hoffmann")
    o.add_argument("--k", type=_positive_float, default=6.0, help="FLOPs per parameter per token (default 6)")
    o.add_argument("--inference-tokens", type=float, metavar="T",
                   help="also give the allocation reaching the same loss that minimises training + 2 N T inference FLOPs")
    o.add_argument("--json", action="store_true", help="print a JSON object")
    o.set_defaults(func=_cmd_optimal)

    d = ssub.add_parser("decompose", help="split predicted loss into irreducible, model and data terms")
    d.add_argument("--law", default="hoffmann", help="preset: hoffmann (default) or epoch")
    d.add_argument("--models", default="gpt3,gopher,chinchilla",
                   help="comma list of gpt3, gopher, chinchilla or label:N:D (default: all three)")
    d.add_argument("--k", type=_positive_float, default=6.0, help="FLOPs per parameter per token (default 6)")
    d.add_argument("--json", action="store_true", help="print a JSON object")
    d.set_defaults(func=_cmd_decompose)
