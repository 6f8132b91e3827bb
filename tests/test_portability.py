"""What Windows and macOS lack, taken away on Linux: the package must import and work without it.

This is a simulation, not a run on those systems (see docs/portability.md): POSIX-only modules are
hidden (sys.modules[name] = None makes `import name` fail) and POSIX-only functions deleted.
"""
from __future__ import annotations

import json
import os
import sys

import pytest

from pipeline import rows, store
from pipeline.extract import extract
from pipeline.store import FeatureStore
from conftest import default_splits, write_split_files
from helpers import python_lines

# Modules that exist on POSIX only, and os functions missing on Windows (posix_fallocate on macOS too).
POSIX_MODULES = ("fcntl", "resource", "termios", "pwd", "grp")
POSIX_FUNCTIONS = ("posix_fallocate", "wait4", "sysconf", "getuid", "fork")

IMPORT_ALL = """
import importlib, json, os, pkgutil, sys
for name in {modules!r}:
    sys.modules[name] = None
for name in {functions!r}:
    if hasattr(os, name):
        delattr(os, name)
import pipeline
result = {{}}
for m in pkgutil.iter_modules(pipeline.__path__):
    if m.name == "__main__":
        continue
    try:
        importlib.import_module("pipeline." + m.name)
        result[m.name] = "ok"
    except ImportError as e:
        result[m.name] = "hidden " + e.name if e.name in {modules!r} else "optional " + str(e.name)
print(json.dumps(result))
"""


@pytest.mark.slow
def test_every_module_imports_without_posix_only_modules():
    code = IMPORT_ALL.format(modules=POSIX_MODULES, functions=POSIX_FUNCTIONS)
    result = json.loads(python_lines(code)[-1])
    assert {"cli", "store", "rows", "extract", "train", "predict", "estimator"} <= set(result)
    assert not [name for name, how in result.items() if how.startswith("hidden")], result
    assert result["store"] == result["rows"] == result["cli"] == "ok"


def test_available_memory_without_proc_sysconf_or_psutil(monkeypatch):
    def no_proc(path, *args, **kwargs):
        raise FileNotFoundError(path)

    monkeypatch.setattr(rows, "open", no_proc, raising=False)
    monkeypatch.setitem(sys.modules, "psutil", None)
    real = os.sysconf

    def macos_sysconf(name):  # macOS has no SC_AVPHYS_PAGES
        if name == "SC_AVPHYS_PAGES":
            raise ValueError("unrecognized configuration name")
        return real(name)

    monkeypatch.setattr(os, "sysconf", macos_sysconf)
    assert rows.available_memory() == real("SC_PHYS_PAGES") * real("SC_PAGE_SIZE") // 2
    monkeypatch.delattr(os, "sysconf")  # Windows has no os.sysconf (and there asks the kernel, via ctypes)
    if os.name != "nt":
        assert rows.available_memory() == rows.FALLBACK_MEMORY
    assert rows.memory_budget() > 0


@pytest.mark.usefixtures("one_thread")
def test_extract_without_fallocate_or_file_size_limits(tiny_model, tmp_path, monkeypatch):
    monkeypatch.delattr(os, "posix_fallocate", raising=False)
    monkeypatch.setattr(store, "resource", None)
    data = write_split_files(str(tmp_path / "data"), "jsonl", default_splits(n_train=40, n_val=10, n_test=10))
    path = extract(tiny_model, data, str(tmp_path / "f.h5"), precision="fp32", progress=False)
    with FeatureStore(path) as f:
        assert f.rows("train") == 40 and f.features("test", ["cls"])["cls"].shape[0] == 10
