"""Test set-up shared by every test module.

* Without CUDA, Triton kernels run under Triton's interpreter on CPU tensors; the
  variable must be set before any ``@triton.jit`` decorator runs, hence here, first.
* TF32 off, so float32 comparisons against the reference are tight.
* ``gpu`` marker: skipped without CUDA, run by ``scripts/gpu_check.sh``.
* ``FLOPWISE_POISON=1``: kernel outputs start as NaN (ints: INT_MIN), so an element a
  kernel never wrote fails; ``poison`` does the same for buffers a test passes in.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Every kernel output allocated through kernels._dispatch.new_output starts as NaN / INT_MIN.
os.environ.setdefault("FLOPWISE_POISON", "1")
# Private compiler caches: a test run never loads a kernel another process is still writing.
# The folders this process creates are removed when it exits (the Triton one grows by several
# MiB per run); caches the user set are left alone.
for _var, _prefix in (("TORCHINDUCTOR_CACHE_DIR", "flopwise-inductor-"), ("TRITON_CACHE_DIR", "flopwise-triton-")):
    if _var not in os.environ:
        os.environ[_var] = tempfile.mkdtemp(prefix=_prefix)
        atexit.register(shutil.rmtree, os.environ[_var], ignore_errors=True)

import random  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# One intra-op thread, set once before any parallel work: the test tensors are tiny, and
# changing the pool size while a process runs is what the tests must never do.
torch.set_num_threads(1)
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; scripts/gpu_check.sh runs these")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def device() -> str:
    return DEVICE


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` in place with NaN (floats) or an out-of-range sentinel (ints)."""
    if t.is_floating_point():
        t.fill_(float("nan"))
    else:
        t.fill_(torch.iinfo(t.dtype).min)
    return t


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64 (bf16/fp16 comparisons)."""
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def load_script(name: str):
    """``scripts/<name>.py`` as a module (scripts are not part of the package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
