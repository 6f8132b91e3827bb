"""What the test files share: running the CLI (in this process or as `python -m pipeline`) and the
one-line error check. Fixtures (tiny model, tiny cache, corpora) live in conftest.py."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import urllib.request

from click.testing import CliRunner

from pipeline.cli import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, input=None):
    """`bertcache ARGS` in this process (click's CliRunner); arguments may be paths or numbers."""
    return CliRunner().invoke(cli, [str(a) for a in args], input=input)


def ok(*args, input=None):
    """`run`, asserting exit 0."""
    result = run(*args, input=input)
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def one_line_error(result, *words, exit_code: int | None = None, ignore_case: bool = False) -> str:
    """A refusal as users see it: exit non-zero (`exit_code` when given), exactly one `error:` line on
    stderr holding every word, no traceback anywhere. Returns the line."""
    if exit_code is None:
        assert result.exit_code != 0, result.output
    else:
        assert result.exit_code == exit_code, (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output and "Traceback" not in result.stderr
    fold = str.lower if ignore_case else str
    for w in words:
        assert fold(w) in fold(lines[0]), (w, lines[0])
    return lines[0]


def record_threads(obj, name: str) -> set:
    """Wrap the method `name` of `obj` so that every call adds its thread's name to the set returned (which
    threads enter the encoder under serve)."""
    threads, method = set(), getattr(obj, name)

    def recorded(*args, **kwargs):
        threads.add(threading.current_thread().name)
        return method(*args, **kwargs)

    setattr(obj, name, recorded)
    return threads


def child_env(**extra: str) -> dict:
    """The environment for a `python -m pipeline` child: this checkout first on PYTHONPATH (keeping the
    caller's entries: optional packages may live there), plus `extra`."""
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def python_lines(code: str, timeout: float = 300, **env: str) -> list[str]:
    """Run `python -c CODE` in a child process with `child_env(**env)`; assert it exits 0 (showing the end of
    its stderr if not) and return its stdout's lines: for what only a fresh process shows (imports, start-up)."""
    out = subprocess.run([sys.executable, "-c", code], env=child_env(**env), capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()


def run_module(*args, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """`python -m pipeline ARGS` in a child process (text output captured), with `child_env(**env)`."""
    return subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], env=child_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def start_server(checkpoint: str, *args: str):
    """`bertcache serve CHECKPOINT` on a free port in a child process, returned once /health answers, as
    (process, url, stderr) where stderr(timeout) waits for the process's later stderr and returns it."""
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", "--checkpoint", checkpoint, "--port", "0",
                             "--device", "cpu", *args], stderr=subprocess.PIPE, text=True, env=child_env())
    url, deadline = None, time.time() + 120
    while url is None and time.time() < deadline:
        line = proc.stderr.readline()
        assert line or proc.poll() is None, "the server exited before it listened"
        if " on http://127.0.0.1:" in line:
            url = line.split(" on ")[1].split()[0]
    assert url, "the server did not listen within 120 s"
    rest = []  # keep the pipe drained
    drain = threading.Thread(target=lambda: rest.append(proc.stderr.read()), daemon=True)
    drain.start()
    for _ in range(200):
        try:
            urllib.request.urlopen(url + "/health", timeout=5)
            break
        except OSError:
            time.sleep(0.1)

    def stderr(timeout: float = 10) -> str:
        drain.join(timeout=timeout)
        return "".join(rest)
    return proc, url, stderr
