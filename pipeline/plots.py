"""Pictures: training curves and confusion matrices as PNG, with matplotlib (the optional extra `plots`).

Without matplotlib the commands still run; they say how to get the pictures (`HINT`).
"""
from __future__ import annotations

import os
import sys

HINT = "pictures need matplotlib: pip install 'bertcache[plots]' (or pip install matplotlib)"
# Fonts with CJK glyphs, tried in order for label names matplotlib's default font cannot draw.
CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans CJK JP", "Source Han Sans SC", "WenQuanYi Zen Hei", "WenQuanYi Micro Hei",
             "SimHei", "Microsoft YaHei", "PingFang SC", "Heiti SC", "AR PL UMing CN", "Droid Sans Fallback")


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str) -> None:
    """Write under a temporary name in the same folder, then rename: never a half-written PNG."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.partial")
    try:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        _pyplot().close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)


def curves_png(history: list[dict], best_epoch: int, path: str, score: str = "val_accuracy") -> str:
    """Train and validation loss (left) and the validation score (right: accuracy, with train's too;
    micro-F1; Spearman) per epoch; the kept epoch marked. A logreg head's rows are its fits, one per C:
    plotted against C (log scale), the kept C marked."""
    plt = _pyplot()
    by_c = all(h.get("C") is not None for h in history)  # logreg: `epoch` only numbers the C grid
    xs = [h["C"] if by_c else h["epoch"] for h in history]
    best = next(h["C"] for h in history if h["epoch"] == best_epoch) if by_c else best_epoch
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, what in zip(axes, ("loss", score[4:])):
        if f"train_{what}" in history[-1]:
            ax.plot(xs, [h.get(f"train_{what}", float("nan")) for h in history], label="train",
                    marker="o" if by_c else None)
        ax.plot(xs, [h[f"val_{what}"] for h in history], label="validation", marker="o" if by_c else None)
        ax.axvline(best, color="grey", linestyle=":", label=f"best C {best:g}" if by_c else f"best epoch {best}")
        if by_c:
            ax.set_xscale("log")
        ax.set_xlabel("C (inverse L2 strength)" if by_c else "epoch")
        ax.set_title({"micro_f1": "micro-F1"}.get(what, what))
        ax.grid(alpha=0.3)
        ax.legend()
    _save(fig, path)
    return path


def confusion_png(report: dict, path: str) -> str:
    """The confusion matrix of an evaluation report (rows: truth), counts and row shares, as a PNG; returns
    `path`. Needs matplotlib (the extra `plots`; `available()`).

    Args:
        report: a classification report of `evaluate` (confusion_matrix, label_names, accuracy, n; split
            in the title when it has one).
        path: the PNG file to write (its folder is made if missing).

        >>> import tempfile
        >>> report = {"confusion_matrix": [[3, 1], [0, 4]], "label_names": ["neg", "pos"], "accuracy": 0.875,
        ...           "n": 8, "split": "test"}
        >>> path = os.path.join(tempfile.mkdtemp(), "confusion.png")
        >>> if available():  # matplotlib is installed
        ...     assert confusion_png(report, path) == path and os.path.getsize(path) > 0
    """
    import numpy as np
    plt = _pyplot()
    cm = np.asarray(report["confusion_matrix"])
    names = _drawable(report["label_names"], path)
    k = len(names)
    share = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    size = max(3.5, 0.6 * k + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set_xticks(range(k), names, rotation=45 if k > 4 else 0, ha="right" if k > 4 else "center")
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 20:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                        color="white" if share[i, j] > 0.5 else "black", fontsize=9)
    ax.set_title(f"{report.get('split', '')} accuracy {report['accuracy']:.4f} (n {report['n']})".strip())
    _save(fig, path)
    return path


def _drawable(names: list[str], path: str = "confusion.png") -> list[str]:
    """The label names, with a CJK font when they need one; `class i` when no installed font can draw them."""
    if all(n.isascii() for n in names):
        return names
    import matplotlib
    from matplotlib import font_manager
    manager = font_manager.fontManager
    for attempt in range(2):
        installed = {f.name for f in manager.ttflist}
        for font in CJK_FONTS:
            if font in installed:
                matplotlib.rcParams["font.sans-serif"] = [font] + list(matplotlib.rcParams["font.sans-serif"])
                return names
        if attempt == 0:  # matplotlib's font cache predates fonts installed since (e.g. after the hint below)
            known = {f.fname for f in manager.ttflist}
            for fname in font_manager.findSystemFonts():
                if fname not in known:
                    try:
                        manager.addfont(fname)
                    except Exception:  # a font file matplotlib cannot read: not one to draw with
                        pass
    print(f"{path}: no installed font draws the label names; they are drawn as class 0 to class {len(names) - 1}, "
          "in the order evaluate lists them (install a CJK font, e.g. fonts-noto-cjk)", file=sys.stderr)
    return [f"class {i}" for i in range(len(names))]
