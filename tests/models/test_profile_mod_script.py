"""scripts/profile_mod.py --only memory replays the CUDA allocator's trace (GPU only); its
replay is a pure function, checked here on a hand-made trace."""

from __future__ import annotations
from ..conftest import load_script


def _frames(path, line, name):
    return [{"filename": "/usr/lib/python3/site-packages/torch/_tensor.py", "line": 1, "name": "__torch_function__"},
            {"filename": path, "line": line, "name": name},
            {"filename": "/repo/models/transformer.py", "line": 400, "name": "forward"}]


def test_peak_sites_finds_the_live_blocks_at_the_peak():
    mod = load_script("profile_mod")
    gather = _frames("/repo/kernels/mod_gather.py", 350, "_gather_tokens_fwd")
    mlp = _frames("/repo/models/transformer.py", 120, "mlp")
    trace = [
        {"action": "free_completed", "addr": 999, "size": 50},  # allocated before the trace: ignored
        {"action": "alloc", "addr": 1, "size": 100, "frames": gather},
        {"action": "alloc", "addr": 2, "size": 300, "frames": mlp},
        {"action": "free_requested", "addr": 2, "size": 300},
        {"action": "free_completed", "addr": 2, "size": 300},
        {"action": "alloc", "addr": 3, "size": 250, "frames": gather},
        {"action": "alloc", "addr": 4, "size": 100, "frames": mlp},  # peak: 1 + 3 + 4 = 450
        {"action": "free_completed", "addr": 1, "size": 100},
        {"action": "alloc", "addr": 5, "size": 50, "frames": mlp},
    ]
    peak, sites = mod.peak_sites(trace)
    assert peak == 450
    assert sites == {"kernels/mod_gather.py:350 _gather_tokens_fwd": [350, 2], "models/transformer.py:120 mlp": [100, 1]}
