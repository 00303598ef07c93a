"""Argument parsing for ``flopwise scaling ...`` (kept apart from cli.py so each command family has one file)."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("scaling", help="scaling-law fits and compute-optimal allocation")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
