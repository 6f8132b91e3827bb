"""The docs stay true to the code: docs/cli.md is what scripts/cli_docs.py generates from the click
commands (the cog pattern), no option is missing from it, the README stays short, no relative link
in README.md or docs/ points at a file or heading that is not there, every `>>>` example in the
package's docstrings runs and prints what it says, and the public API's docstrings state their arguments
and show such an example."""
from __future__ import annotations

import doctest
import importlib
import importlib.util
import re
import tempfile
from pathlib import Path

import click
import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_LINES = 150


def _cli_docs():
    spec = importlib.util.spec_from_file_location("cli_docs", ROOT / "scripts" / "cli_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cli_docs():
    return _cli_docs()


def test_cli_md_is_what_the_script_generates(cli_docs):
    written = (DOCS / "cli.md").read_text(encoding="utf-8")
    assert written == cli_docs.render(), "docs/cli.md is stale: run `python scripts/cli_docs.py` and commit it"


def test_the_generated_text_does_not_depend_on_the_terminal(cli_docs, monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")
    narrow = cli_docs.render()
    monkeypatch.setenv("COLUMNS", "300")
    assert cli_docs.render() == narrow


def _sections(text: str) -> dict[str, str]:
    """docs/cli.md cut at its `## <command path>` headings."""
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


def test_every_command_and_option_is_in_cli_md(cli_docs):
    cli = cli_docs.load_cli()
    sections = _sections((DOCS / "cli.md").read_text(encoding="utf-8"))
    root = cli_docs.root_context(cli)
    seen = 0
    for ctx, cmd in cli_docs.walk(cli, root):
        path = ctx.command_path
        assert path in sections, f"docs/cli.md has no section for `{path}`"
        for param in cmd.get_params(ctx):
            if isinstance(param, click.Option):
                for opt in param.opts + param.secondary_opts:
                    assert re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", sections[path]), \
                        f"`{path}` option {opt} is missing from docs/cli.md"
                    seen += 1
            elif isinstance(param, click.Argument):
                assert param.make_metavar(ctx) in sections[path]
    assert seen > 50  # the walk reached the subcommands' options, not only the group's


def test_every_shown_option_says_what_it_does(cli_docs):
    """--help gives each option's meaning, not only its default (`--lr FLOAT [default: 0.001]` alone
    leaves open which optimizer's, and `--class-weights balanced` what balanced is)."""
    cli = cli_docs.load_cli()
    bare = [f"{ctx.command_path} {param.opts[-1]}" for ctx, cmd in cli_docs.walk(cli, cli_docs.root_context(cli))
            for param in cmd.get_params(ctx)
            if isinstance(param, click.Option) and not param.hidden and not (param.help or "").strip()]
    assert not bare, f"options without a help text: {', '.join(bare)}"


def test_check_mode_fails_on_a_stale_file(cli_docs, tmp_path, monkeypatch):
    out = tmp_path / "cli.md"
    monkeypatch.setattr(cli_docs, "OUT", out)
    monkeypatch.setattr(cli_docs, "ROOT", tmp_path)
    out.write_text("stale\n", encoding="utf-8")
    assert cli_docs.main(["--check"]) == 1
    assert cli_docs.main([]) == 0
    assert cli_docs.main(["--check"]) == 0


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail to docs/ (limit {README_MAX_LINES})"


def test_readme_gives_the_two_commands_ci_and_newcomers_run():
    text = README.read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "bash scripts/test.sh" in ci  # CI runs exactly the README's test command
    for command in ("bash scripts/quickstart.sh", "bash scripts/test.sh", "source .venv/bin/activate"):
        assert command in text, f"README.md no longer shows `{command}`"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.M | re.S)
    return {_slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def _links(path: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.M | re.S)
    return re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r'(?:src|href)="([^"]+)"', text)


def test_every_relative_link_points_at_something_that_exists():
    pages = [README, *sorted(DOCS.glob("*.md")), ROOT / "benchmarks" / "RESULTS.md"]
    broken, checked = [], 0
    for page in pages:
        for link in _links(page):
            if re.match(r"[a-z][a-z0-9+.-]*:", link):  # http:, https:, mailto:
                continue
            target, _, anchor = link.partition("#")
            dest = (page.parent / target).resolve() if target else page
            checked += 1
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {link} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: {link} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)
    assert checked > 20


def _code_spans(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    return re.findall(r"`([^`\n]+)`", text) + re.findall(r"^```\w*\n(.*?)^```", text, flags=re.M | re.S)


FILE_ENDINGS = {"json", "png", "txt", "h5", "safetensors", "bin", "py", "md", "whl", "csv", "tsv", "jsonl",
                "parquet", "partial", "new", "pt", "pth", "pkl", "pickle", "ckpt", "sh", "charsmap"}


def test_code_the_docs_name_still_exists():
    """Files, test functions and `module.name`s the docs cite: a moved module or renamed test shows here."""
    import importlib

    import pipeline

    tests_source = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "tests").rglob("*.py"))
    places = [ROOT / d for d in ("pipeline", "tests", "benchmarks", "scripts")]
    missing = []
    for page in [README, *sorted(DOCS.glob("*.md"))]:
        for span in _code_spans(page):
            for name in re.findall(r"(?<![\w/.])((?:[\w-]+/)*[\w-]+\.py)\b", span):
                found = (ROOT / name).exists() if "/" in name else any(next(p.rglob(name), None) for p in places)
                if not found:
                    missing.append(f"{page.name}: file {name}")
            for test in re.findall(r"\b(test_\w+)\b", span):
                if not test.endswith("_py") and not re.search(rf"^\s*def {test}\(", tests_source, flags=re.M) \
                        and not (ROOT / "tests" / f"{test}.py").exists():
                    missing.append(f"{page.name}: test {test}")
            for mod, attr in re.findall(r"^(?:pipeline\.)?([a-z_0-9]+)\.([A-Za-z_]\w*)", span):
                if attr in FILE_ENDINGS or not (ROOT / "pipeline" / f"{mod}.py").exists():
                    continue
                if not hasattr(importlib.import_module(f"pipeline.{mod}"), attr):
                    missing.append(f"{page.name}: {mod}.{attr}")
            for cls, attr in re.findall(r"^([A-Z]\w+)\.([a-z_]\w*)", span):
                if hasattr(pipeline, cls) and not hasattr(getattr(pipeline, cls), attr):
                    missing.append(f"{page.name}: {cls}.{attr}")
    assert not missing, "the docs name code that is not there (update the docs):\n" + "\n".join(missing)


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "pipeline").glob("*.py") if p.stem != "__main__"))
def test_docstring_examples_run(name, one_thread, tmp_path, monkeypatch):
    try:
        module = importlib.import_module(f"pipeline.{name}" if name != "__init__" else "pipeline")
    except ModuleNotFoundError as e:  # a module of an optional extra
        pytest.skip(f"pipeline.{name} needs {e.name}")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the examples' mkdtemp() folders land here
    failed, attempted = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert failed == 0, f"{failed} of {attempted} examples in pipeline/{name}.py failed (printed above)"


def test_api_md_names_the_sweep_argument_of_every_sweep_option():
    """docs/api.md: "an option of a command is a keyword argument of the same name", save the exceptions it
    names; every fit-head --sweep-X is sweep's X= or an exception written out (--sweep-select is selection=)."""
    import inspect

    from pipeline.cli import cli
    from pipeline.sweep import sweep

    text = (ROOT / "docs" / "api.md").read_text()
    arguments = inspect.signature(sweep).parameters
    for param in cli.commands["fit-head"].params:
        if param.name.startswith("sweep_"):
            option, name = param.opts[0], param.name[len("sweep_"):]
            assert name in arguments or re.search(rf"`{option}` is `(\w+)=`", text), option
            found = re.search(rf"`{option}` is `(\w+)=`", text)
            assert not found or found.group(1) in arguments, option


# The public API: what `pipeline` exports, and the functions of other modules docs/api.md names beside them.
API_MD_NAMES = ("tuned.fit_tuned", "onnx_runner.load_predictor", "plots.confusion_png", "toy.toy_model", "toy.toy_data")
# Public methods whose docstring needs no runnable example, and why.
NO_EXAMPLE = {
    "FeatureStore.close": "what leaving `with FeatureStore(path) as store:` does, which the class's example shows",
}


def _public_api() -> list[tuple[str, object]]:
    """(name, object) of every public function and class, and of every public method and property of those
    classes: defined in them or in their bases within the package (scikit-learn's get_params etc. are its own)."""
    import inspect

    import pipeline

    api = []
    for name in pipeline.__all__:
        try:
            api.append((name, getattr(pipeline, name)))
        except ImportError as e:  # a module of an optional extra (estimator: scikit-learn)
            print(f"skipped {name}: {e}")
    for spec in API_MD_NAMES:
        module, attr = spec.split(".")
        api.append((spec, getattr(importlib.import_module(f"pipeline.{module}"), attr)))
    for name, cls in [entry for entry in api if inspect.isclass(entry[1])]:
        seen = set()
        for klass in cls.__mro__:
            if not klass.__module__.startswith("pipeline."):
                continue
            for attr, value in vars(klass).items():
                if attr.startswith("_") or attr in seen:
                    continue
                if isinstance(value, (staticmethod, classmethod)):
                    value = value.__func__
                if inspect.isfunction(value) or isinstance(value, property):
                    seen.add(attr)
                    api.append((f"{name}.{attr}", value))
    return api


def _named(parameter: str, doc: str) -> bool:
    """Whether a docstring states `parameter`: an entry of its argument list (`name:`, `a, name:`, `name (...):`,
    `**name:`), or the name in backticks or as `name=` in its text."""
    entry = rf"^\s*(\*{{0,2}}\w+, )*\*{{0,2}}{parameter}(, \*{{0,2}}\w+)*( \([^)\n]*\))?:"
    return bool(re.search(entry, doc, flags=re.M) or re.search(rf"`\*{{0,2}}{parameter}`|\b{parameter}=", doc))


def test_the_public_api_states_its_arguments_and_shows_a_runnable_example():
    """The package's standard (as embetter's): every public function, class, method and property of the API
    (api.md) has a docstring that names each of its arguments and shows a `>>>` example (not all +SKIP), which
    test_docstring_examples_run runs. A class names its constructor's arguments (or its package base class
    that defines the constructor does, as TextClassifier's refers to _TextEstimator's)."""
    import inspect

    text = (DOCS / "api.md").read_text(encoding="utf-8")
    for spec in API_MD_NAMES:
        assert re.search(rf"\b{spec.split('.')[1]}\b", text), f"docs/api.md no longer names {spec}: update API_MD_NAMES"
    api = _public_api()
    names = {name for name, _ in api}
    assert not set(NO_EXAMPLE) - names, f"NO_EXAMPLE names what is not in the API: {set(NO_EXAMPLE) - names}"
    problems = []
    for name, obj in api:
        doc = inspect.cleandoc(obj.__doc__ or "")  # its own: getdoc would take a base class's
        function = obj.fget if isinstance(obj, property) else obj
        if inspect.isclass(obj):
            owner = next(k for k in obj.__mro__ if "__init__" in vars(k))
            function = owner.__init__ if owner.__module__.startswith("pipeline.") else None
            if function is not None and owner is not obj:
                doc += "\n" + inspect.cleandoc(owner.__doc__ or "")
        if not doc.strip():
            problems.append(f"{name}: no docstring")
            continue
        parameters = [p for p in inspect.signature(function).parameters if p not in ("self", "cls")] if function else []
        unnamed = [p for p in parameters if not _named(p, doc)]
        if unnamed:
            problems.append(f"{name}: the docstring does not state {', '.join(unnamed)}")
        runnable = [line for line in doc.splitlines() if line.lstrip().startswith(">>>") and "+SKIP" not in line]
        if not runnable and name not in NO_EXAMPLE:
            problems.append(f"{name}: no runnable (>>>) example")
    assert not problems, f"{len(problems)} gaps in the API's docstrings:\n" + "\n".join(problems)
