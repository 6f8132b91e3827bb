"""bertcache: train classifier heads on a frozen encoder over cached features.

Stages, data flowing one way: data -> encoder -> store (extract) -> rows -> training (fit_head, sweep)
-> checkpoint -> predict. Importing the package is cheap: the names below load their module (and
torch) on first use (PEP 562).
"""
import sys
import types

from ._version import __version__
from .errors import UserError

# public name -> module that defines it
_EXPORTS = {
    "load_corpus": "data", "Encoder": "encoder", "FeatureStore": "store", "extract": "extract",
    "fit_head": "train", "sweep": "sweep", "Predictor": "predict", "evaluate": "predict",
    "TextClassifier": "estimator",
}
__all__ = ["UserError", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # binds the function over a submodule of the same name (extract, sweep)
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """`pipeline.extract` / `pipeline.sweep` stay the functions when their submodules are imported later
    (the import system binds a submodule on its package under the same name)."""

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
