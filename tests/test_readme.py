"""The README's examples run as written, and its environment-variable table is complete.

Python blocks marked ``<!-- test: cpu -->`` on the line above their opening fence run, each
in a fresh Python process (no ``TRITON_INTERPRET``: on a CPU a user gets the PyTorch
references) in a fresh temporary working directory, with ``HOME``, the caches and
``FLOPWISE_DATA`` pointed inside it and Hugging Face set offline. A marker may name files the
block reads, ``<!-- test: cpu (svg_extracted_data.csv) -->``; they are copied into the working
directory from where the source checkout keeps them, and the block is skipped without them.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PACKAGE_DIRS = ("flopwise", "kernels", "models", "coding", "scaling")
MARKER = re.compile(r"^<!--\s*test:\s*cpu\s*(?:\(([^)]*)\))?\s*-->\s*$")
FENCE = re.compile(r"^```(\w*)\s*$")


def _data_file(name: str) -> Path | None:
    """Where a source checkout keeps a file a README block reads."""
    if name == "svg_extracted_data.csv":
        env = os.environ.get("FLOPWISE_CHINCHILLA_CSV")
        path = Path(env) if env else ROOT.parent / "shared" / "data" / "chinchilla" / name
        return path if path.is_file() else None
    raise AssertionError(f"README marker names {name!r}; tests/test_readme.py does not know where it lives")


def _blocks() -> list[tuple[int, str, tuple[str, ...]]]:
    """(README line of the opening fence, code, files) for every marked block."""
    lines = README.read_text(encoding="utf-8").splitlines()
    out, i = [], 0
    while i < len(lines):
        m = MARKER.match(lines[i])
        if not m:
            i += 1
            continue
        fence = FENCE.match(lines[i + 1]) if i + 1 < len(lines) else None
        assert fence and fence.group(1) == "python", f"README.md:{i + 1}: test marker not followed by a python block"
        end = next((j for j in range(i + 2, len(lines)) if lines[j].startswith("```")), None)
        assert end is not None, f"README.md:{i + 2}: unclosed code block"
        files = tuple(f.strip() for f in (m.group(1) or "").split(",") if f.strip())
        out.append((i + 2, "\n".join(lines[i + 2:end]) + "\n", files))
        i = end + 1
    return out


BLOCKS = _blocks()


def test_readme_has_marked_blocks():
    # a renamed marker or a reformatted README must not silently turn the tests below into none
    assert len(BLOCKS) >= 5, [line for line, _, _ in BLOCKS]


@pytest.mark.parametrize("line,code,files", BLOCKS, ids=[f"README.md:{line}" for line, _, _ in BLOCKS])
def test_readme_block_runs(line, code, files, tmp_path):
    for name in files:
        src = _data_file(name)
        if src is None:
            pytest.skip(f"README.md:{line} reads {name}, which this checkout does not have")
        shutil.copy(src, tmp_path / name)
    script = tmp_path / f"readme_line_{line}.py"
    # line numbers in a traceback are the README's
    script.write_text("\n" * line + code, encoding="utf-8")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("FLOPWISE_") and k not in ("TRITON_INTERPRET", "PYTHONSTARTUP")}
    env.update(
        HOME=str(tmp_path / "home"),
        XDG_CACHE_HOME=str(tmp_path / "cache"),
        FLOPWISE_DATA=str(tmp_path / "data"),
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
    )
    env.setdefault("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"README.md:{line}: the python block raised (exit {proc.returncode}):\n{proc.stderr[-4000:]}",
                    pytrace=False)


# ----------------------------------------------------------------------------------------
# The environment-variable table
# ----------------------------------------------------------------------------------------


def _table_vars() -> set[str]:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Environment variables", 1)[1].split("\n## ", 1)[0]
    names = set()
    for row in section.splitlines():
        m = re.match(r"^\|\s*`([A-Z][A-Z0-9_]*)`\s*\|", row)
        if m:
            names.add(m.group(1))
    return names


def _vars_read() -> set[str]:
    """String constants handed to ``os.environ`` / ``os.getenv`` in the package's sources."""
    names = set()
    for d in PACKAGE_DIRS:
        for path in (ROOT / d).rglob("*.py"):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Call):
                    target, args = ast.unparse(node.func), node.args
                elif isinstance(node, ast.Subscript):
                    target, args = ast.unparse(node.value), [node.slice]
                elif isinstance(node, ast.Compare) and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops):
                    target, args = " ".join(ast.unparse(c) for c in node.comparators), [node.left]
                else:
                    continue
                if "environ" not in target and "getenv" not in target:
                    continue
                for arg in args:
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and re.fullmatch(r"[A-Z][A-Z0-9_]+", arg.value):
                        names.add(arg.value)
    return names


def test_env_table_matches_the_package():
    table, read = _table_vars(), _vars_read()
    assert len(table) >= 5, table
    assert not table - read, f"in the README's table but read nowhere in the package: {sorted(table - read)}"
    ours = {v for v in read if v.startswith("FLOPWISE_")}
    assert not ours - table, f"read by the package but missing from the README's table: {sorted(ours - table)}"
