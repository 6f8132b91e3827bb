"""bertcache: train classifier heads on a frozen encoder over cached features.

Stages, one module each: data -> encoder -> store (extract) -> heads (train) -> checkpoint -> predict.
"""
__version__ = "0.1.0"

from .errors import UserError  # noqa: E402
from .data import load_corpus  # noqa: E402
from .encoder import Encoder  # noqa: E402
from .store import FeatureStore  # noqa: E402
from .extract import extract  # noqa: E402  (binds the function over the submodule of the same name)
from .train import fit_head  # noqa: E402
from .predict import Predictor, evaluate  # noqa: E402

__all__ = ["UserError", "load_corpus", "Encoder", "FeatureStore", "extract", "fit_head", "Predictor", "evaluate"]
