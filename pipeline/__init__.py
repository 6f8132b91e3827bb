"""bertcache: train classifier heads on a frozen encoder over cached features.

Stages, one module each: data -> encoder -> store (extract) -> heads (train) -> checkpoint -> predict.
"""
__version__ = "0.1.0"

from .errors import UserError  # noqa: E402


def __getattr__(name):
    # The public API, imported lazily so `import pipeline` stays cheap (no torch until it is needed).
    lazy = {"extract": (".extract", "extract"), "fit_head": (".train", "fit_head"),
            "evaluate": (".predict", "evaluate"), "Predictor": (".predict", "Predictor"),
            "Encoder": (".encoder", "Encoder"), "FeatureStore": (".store", "FeatureStore"),
            "load_corpus": (".data", "load_corpus")}
    if name in lazy:
        import importlib
        module, attr = lazy[name]
        return getattr(importlib.import_module(module, __name__), attr)
    raise AttributeError(name)


__all__ = ["UserError", "extract", "fit_head", "evaluate", "Predictor", "Encoder", "FeatureStore", "load_corpus"]
