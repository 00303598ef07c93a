"""``flopwise`` command line: parses arguments and calls library functions, nothing more."""

from __future__ import annotations

import argparse
import os
import re
import sys


def _prepare_bench(argv: list[str]) -> None:
    """For ``flopwise bench`` without CUDA, set ``TRITON_INTERPRET=1`` (unless the user set
    it), so that the Triton kernels run under the interpreter on CPU tensors. It must be set
    before anything imports ``flopwise.kernels``: ``kernels._dispatch`` reads it once at
    import, and Triton decides at decoration time. ``build_parser`` imports the other
    commands' modules, which reach the kernels, so ``main`` calls this before it. Other
    commands are left alone (the interpreter is far slower than the reference), and so is a
    machine with CUDA. ``bench.run`` refuses to start if the kernels would still not run."""
    if next((a for a in argv if not a.startswith("-")), None) != "bench":
        return
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def _cmd_bench(args: argparse.Namespace) -> int:
    from flopwise.kernels import bench

    bench.run(args.ops, json_path=args.json, budget_ms=args.budget_ms, progress=args.progress)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse takes ``-5`` and ``-.5`` as values but, before Python 3.13, ``-1e23`` as an
    option, so ``--compute -1e23`` failed with "expected one argument" instead of the
    option's own check. Numbers in exponent form are values here too (no option of ours
    looks like a number). Subparsers inherit the class."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def build_parser() -> argparse.ArgumentParser:
    from flopwise import __version__
    from flopwise._cli_types import positive_float

    parser = _Parser(prog="flopwise", description=__doc__)
    parser.add_argument("--version", action="version", version=f"flopwise {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("bench", help="benchmark kernels against torch (GPU numbers need a GPU)")
    p.add_argument("ops", nargs="*", help="suites to run (default: all): routing, mod, moe, mod_step, coding, train")
    p.add_argument("--json", metavar="PATH", help="write the rows as JSON to PATH")
    p.add_argument("--budget-ms", type=positive_float, default=100.0, help="timing budget per provider in ms (default 100; a case may set its own, "
                        "e.g. the train suite's 1500 ms on GPU)")
    p.add_argument("--progress", action="store_true",
                   help="print each case's rows as soon as they are measured (the tables still follow)")
    p.set_defaults(func=_cmd_bench)

    from flopwise import _cli_coding, _cli_models, _cli_scaling, _cli_upcycle

    _cli_models.add_parser(sub)
    _cli_scaling.add_parser(sub)
    _cli_coding.add_parser(sub)
    _cli_upcycle.add_parser(sub)
    return parser


def _cli_warning(message, category, filename, lineno, line=None) -> str:
    return f"flopwise: warning: {message}\n"


class _Terminated(BaseException):
    """SIGTERM (a batch scheduler's time limit, ``kill``) raised as an exception, so that the
    clean-up of partly written outputs runs as it does for Ctrl-C; Python's default for
    SIGTERM ends the process at once and leaves temporary folders behind."""


def _raise_terminated(signum, frame):
    raise _Terminated()


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the command itself (not a caller passing argv): warnings as one line, no source
        import signal
        import threading
        import warnings

        warnings.formatwarning = _cli_warning
        # only over Python's default (a parent may have chosen to ignore SIGTERM), and put back after
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _raise_terminated)
            try:
                return _main(argv)
            finally:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return _main(argv)


def _main(argv: list[str] | None) -> int:
    _prepare_bench(sys.argv[1:] if argv is None else list(argv))
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as exc:
        print(f"flopwise: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # permissions, full disk, read-only filesystem: not a bug, no traceback
        print(f"flopwise: error: {exc}", file=sys.stderr)
        return 1
    except FloatingPointError as exc:  # a diverged training run: not a bug either (other arithmetic errors are)
        print(f"flopwise: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: outputs are written atomically, so nothing half-written is left
        print("flopwise: interrupted", file=sys.stderr)
        return 130
    except _Terminated:  # as Ctrl-C; 128 + SIGTERM, as a shell reports a process the signal ended
        print("flopwise: terminated", file=sys.stderr)
        return 143


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
