"""The package root stays cheap: `import pipeline` and every `bertcache ... --help` load no torch."""
from __future__ import annotations

import json

import pytest

import pipeline
from helpers import python_lines

HEAVY = ("torch", "transformers", "datasets", "h5py", "fastapi")
PROBE = """
import json, sys
import pipeline
from pipeline.cli import cli
helps = []
for args in [["--help"]] + [[name, "--help"] for name in cli.commands]:
    try:
        cli.main(args, prog_name="bertcache")
    except SystemExit as e:
        helps.append(e.code)
print(json.dumps({"loaded": sorted(m for m in sys.modules if m.split(".")[0] in %r), "exits": helps}))
""" % (HEAVY,)


@pytest.mark.slow
def test_import_and_every_help_load_no_torch():
    result = json.loads(python_lines(PROBE, timeout=120)[-1])
    assert result["loaded"] == []
    from pipeline.cli import cli
    assert result["exits"] == [0] * (1 + len(cli.commands))


@pytest.mark.slow
def test_python_dash_m_help_loads_no_torch():
    code = "import runpy, sys; sys.argv = ['bertcache', '--help']\ntry:\n runpy.run_module('pipeline', run_name='__main__')\n" \
           "except SystemExit:\n pass\nprint('torch' in sys.modules)"
    lines = python_lines(code, timeout=120)
    assert "Usage: bertcache" in "\n".join(lines) and lines[-1] == "False"



@pytest.mark.slow
def test_profile_extract_times_the_imports_extract_pays():
    """benchmarks/profile_extract.py's start-up phase counts torch's import, as extract pays it: timing
    `import pipeline.cli` alone (lazy since) left torch out of the profile without a word."""
    from benchmarks.profile_extract import IMPORTS

    assert python_lines(f"import sys; {IMPORTS}; print('torch' in sys.modules)", timeout=120)[-1] == "True"

def test_lazy_exports_resolve_to_the_public_objects():
    from pipeline.extract import extract
    from pipeline.predict import Predictor
    from pipeline.sweep import sweep
    assert set(pipeline.__all__) >= {"extract", "fit_head", "sweep", "Predictor", "evaluate", "Encoder",
                                     "FeatureStore", "load_corpus", "UserError"}
    assert pipeline.extract is extract and pipeline.sweep is sweep and pipeline.Predictor is Predictor
    assert all(getattr(pipeline, name) is not None for name in pipeline.__all__)
    with pytest.raises(AttributeError):
        pipeline.no_such_name


def test_version_has_one_source():
    import os
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from pipeline._version import __version__
    from helpers import ROOT
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "pipeline._version.__version__"}
    assert pipeline.__version__ == __version__
