"""sppscl: SPP-SCL image-text sentiment analysis as a two-stage, feature-caching pipeline.

The Python API (docs/api.md)::

    import sppscl
    model = sppscl.load("runs/my-run")                      # a run folder or a checkpoint file
    (p,) = model.predict([("photo.jpg", "what a day")])    # image: str, Path, bytes or a PIL image
    p.pred, p.probs                                          # "positive", {"positive": 0.91, "neutral": 0.06, ...}

and the stages the ``sppscl`` command runs: ``extract``, ``train``, ``evaluate``, ``probe``, ``sweep``, ``cv``.
Names are imported on first use, so ``import sppscl`` loads neither torch nor the encoders.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "load": "api",
    "Model": "api",
    "extract": "api",
    "train": "api",
    "evaluate": "api",
    "probe": "api",
    "sweep": "api",
    "cv": "api",
    "Prediction": "stage2.predict",
    "PredictError": "stage2.predict",
    "RunFolder": "stage2.runs",
    "RunError": "stage2.runs",
    "Config": "config",
    "SppsclError": "errors",
}
__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:
    from .api import Model, cv, evaluate, extract, load, probe, sweep, train
    from .config import Config
    from .errors import SppsclError
    from .stage2.predict import PredictError, Prediction
    from .stage2.runs import RunError, RunFolder


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sppscl' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
