"""flopwise.scaling: scaling-law fits and compute-optimal allocation (numpy only).

* :mod:`.laws`: L(N, D) = E + A/N^alpha + B/D^beta, presets (Hoffmann Eq. 10, Epoch),
  compute-optimal frontier, loss decomposition.
* :mod:`.data`: validated run data and a CSV loader.
* :mod:`.fit`: Approach 3 (Huber fit from Hoffmann's 4,500-start grid; Epoch's
  Huber likelihood with a free scale), all starts optimised together.
* :mod:`.bootstrap`: resampling uncertainty, vectorised across resamples.
* :mod:`.isoflop`: Approach 2 (IsoFLOP profiles).
* :mod:`.inference`: training + inference compute-optimal allocation.
* :mod:`.plot`: matplotlib figures (optional extra).

>>> from flopwise.scaling import ScalingLaw
>>> n, d = ScalingLaw.epoch().optimal(5.88e23)
>>> round(d / n)
18
"""

from .bootstrap import CHINCHILLA_COMPUTE, BootstrapResult, bootstrap, grid_check
from .data import EPOCH_COLUMNS, ScalingData, drop_highest_loss, from_arrays, load_csv
from .fit import OBJECTIVES, FitResult, FitWarning, fit, hoffmann_grid, huber_nll, huber_sum
from .inference import InferenceOptimal, inference_optimal, training_optimal_for_loss
from .isoflop import IsoFlopResult, isoflop_fit
from .laws import KNOWN_MODELS, PRESETS, LossTerms, ScalingLaw, decompose, get_law

__all__ = [
    "ScalingLaw",
    "LossTerms",
    "PRESETS",
    "KNOWN_MODELS",
    "get_law",
    "decompose",
    "ScalingData",
    "from_arrays",
    "load_csv",
    "drop_highest_loss",
    "EPOCH_COLUMNS",
    "fit",
    "FitResult",
    "FitWarning",
    "OBJECTIVES",
    "hoffmann_grid",
    "huber_sum",
    "huber_nll",
    "bootstrap",
    "BootstrapResult",
    "grid_check",
    "CHINCHILLA_COMPUTE",
    "isoflop_fit",
    "IsoFlopResult",
    "inference_optimal",
    "training_optimal_for_loss",
    "InferenceOptimal",
]
