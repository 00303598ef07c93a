"""Timings of the scaling fits: ``python -m flopwise.scaling.bench [CSV] [--repeat 3] [--scipy 45]``.

Measures, on Epoch AI's Chinchilla file (Epoch conventions: 240 runs):
the 4,500-start grid fit (Huber sum; Huber likelihood), 4,000 bootstrap refits
(Huber sum, as Epoch; Huber likelihood), and, when scipy is installed, scipy's
L-BFGS-B one start at a time (as both papers ran it) on ``--scipy`` evenly spaced grid
starts, extrapolated to 4,500. Prints median seconds over ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from flopwise._cli_types import positive_int

from . import EPOCH_COLUMNS, bootstrap, fit, hoffmann_grid, huber_sum, load_csv

# The data sit beside a source checkout (<checkout>/../shared/data/chinchilla); an
# installed package has no such folder, so FLOPWISE_CHINCHILLA_CSV or the CSV argument
# says where the file is.
_DEFAULT_CSV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "chinchilla" / "svg_extracted_data.csv"


def _median_time(fn, repeat: int):
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m flopwise.scaling.bench", description=__doc__)
    default = os.environ.get("FLOPWISE_CHINCHILLA_CSV") or str(_DEFAULT_CSV)
    p.add_argument("csv", nargs="?", default=default,
                   help="Epoch's svg_extracted_data.csv (default: $FLOPWISE_CHINCHILLA_CSV, else beside the checkout)")
    p.add_argument("--repeat", type=positive_int, default=3)
    p.add_argument("--scipy", type=int, default=45, help="scipy starts to time (0: skip)")
    args = p.parse_args(argv)
    if args.scipy < 0:
        p.error(f"--scipy must be >= 0, got {args.scipy}")
    try:
        data = load_csv(args.csv, **EPOCH_COLUMNS, drop_highest=5)
    except (FileNotFoundError, ValueError) as exc:
        print(f"{p.prog}: error: {exc} (pass the CSV path or set FLOPWISE_CHINCHILLA_CSV)", file=sys.stderr)
        return 2
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, numpy {np.__version__}, {len(data)} runs")
    t, r = _median_time(lambda: fit(data, objective="huber"), args.repeat)
    print(f"grid fit, Huber sum, 4,500 starts:            {t:6.2f} s  (E {r.law.E:.4f} A {r.law.A:.1f} B {r.law.B:.1f} alpha {r.law.alpha:.4f} beta {r.law.beta:.4f})")
    t, rl = _median_time(lambda: fit(data, objective="huber_likelihood"), args.repeat)
    print(f"grid fit, Huber likelihood, 4,500 starts:     {t:6.2f} s  (E {rl.law.E:.4f} A {rl.law.A:.1f} B {rl.law.B:.1f} alpha {rl.law.alpha:.4f} beta {rl.law.beta:.4f})")
    t, b = _median_time(lambda: bootstrap(data, rl, n=4000, seed=0, objective="huber"), args.repeat)
    se = " ".join(f"{k} {b.se[k]:.4g}" for k in ("E", "A", "B", "alpha", "beta"))
    print(f"bootstrap, 4,000 Huber refits:                {t:6.2f} s  (se: {se})")
    t, b = _median_time(lambda: bootstrap(data, rl, n=4000, seed=0), 1)
    print(f"bootstrap, 4,000 Huber-likelihood refits:     {t:6.2f} s")
    if args.scipy:
        try:
            from scipy.optimize import minimize
        except ImportError:
            print("scipy not installed: skipping the one-start-at-a-time comparison")
            return 0
        grid = hoffmann_grid()
        pick = grid[np.linspace(0, len(grid) - 1, args.scipy).astype(int)]
        t0 = time.perf_counter()
        for s in pick:
            minimize(lambda th: huber_sum(th, data), s, method="L-BFGS-B")
        per = (time.perf_counter() - t0) / len(pick)
        print(f"scipy L-BFGS-B, one start at a time:          {per * 4500:6.1f} s for 4,500 starts (extrapolated from {len(pick)})")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
