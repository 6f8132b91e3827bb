"""A headless Chromium driven over the DevTools protocol (CDP), for the demo page's browser test.

No browser-automation dependency: Chromium is started with --remote-debugging-port=0, the page's
target is found through its /json endpoint, and commands go over one websocket (`websockets`).
"""
from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """The Chromium binary ($CHROMIUM, else the first on PATH), or None."""
    path = os.environ.get("CHROMIUM")
    if path:
        return path if os.path.exists(path) else shutil.which(path)
    return next((p for p in map(shutil.which, CANDIDATES) if p), None)


class Browser:
    """One headless Chromium with one page. `evaluate(js)` returns the value, `click(selector)` clicks with the
    mouse at the element's centre, `type(text)` inserts text as the keyboard would, `screenshot(path)`."""

    def __init__(self, binary: str, width: int = 1000, height: int = 900):
        from websockets.sync.client import connect

        self.profile = tempfile.mkdtemp(prefix="bertcache-chromium-")
        args = [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
                "--remote-debugging-port=0", f"--user-data-dir={self.profile}", f"--window-size={width},{height}",
                "about:blank"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        port, deadline = None, time.time() + 60
        while port is None and time.time() < deadline:
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode} before listening")
            m = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
            port = int(m.group(1)) if m else None
        if port is None:
            self.close()
            raise RuntimeError("chromium did not print its DevTools port within 60 s")
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
        page = next(t for t in targets if t.get("type") == "page")
        self._connection = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30)
        self.ws = self._connection.__enter__()
        self._ids = itertools.count(1)
        self.events: list[dict] = []
        for domain in ("Page", "Runtime", "DOM", "CSS"):
            self.send(f"{domain}.enable")

    def send(self, method: str, timeout: float = 60, **params) -> dict:
        msg_id = next(self._ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        deadline = time.time() + timeout
        while True:
            msg = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.time())))
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def goto(self, url: str, timeout: float = 60) -> None:
        self.send("Page.navigate", url=url)
        deadline = time.time() + timeout
        while self.evaluate("document.readyState") != "complete":
            if time.time() > deadline:
                raise TimeoutError(f"{url} did not load within {timeout} s")
            time.sleep(0.05)

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r:.80} threw: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60):
        deadline = time.time() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.time() > deadline:
                raise TimeoutError(f"{expression!r} stayed false for {timeout} s")
            time.sleep(0.05)

    def click(self, selector: str) -> None:
        box = self.evaluate(f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
                            ".getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    def type(self, text: str) -> None:
        self.send("Input.insertText", text=text)

    def fonts_for(self, selector: str) -> list[dict]:
        """The platform fonts Chromium used to draw the text of the first element matching `selector`."""
        root = self.send("DOM.getDocument")["root"]["nodeId"]
        node = self.send("DOM.querySelector", nodeId=root, selector=selector)["nodeId"]
        return self.send("CSS.getPlatformFontsForNode", nodeId=node)["fonts"]

    def screenshot(self, path: str) -> str:
        data = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            if getattr(self, "ws", None) is not None:
                self._connection.__exit__(None, None, None)
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)
            shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def contrast_ratio(fg: tuple[float, ...], bg: tuple[float, ...]) -> float:
    """WCAG 2 contrast ratio of two sRGB colours given as 0-255 channels."""
    def luminance(rgb):
        c = [v / 255 for v in rgb[:3]]
        c = [v / 12.92 if v <= 0.03928 else ((v + 0.055) / 1.055) ** 2.4 for v in c]
        return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2]
    hi, lo = sorted((luminance(fg), luminance(bg)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


# Every element that draws text of its own: its colour, and the first opaque background behind it (its own or
# an ancestor's; the page itself is white when nothing is set). Colours come back as "rgb(r, g, b[, a])".
TEXT_COLOURS_JS = """
(() => {
  const out = [];
  const parse = (c) => (c.match(/[\\d.]+/g) || []).map(Number);
  for (const el of document.querySelectorAll('body *')) {
    if (el.closest('[hidden]') || getComputedStyle(el).display === 'none') continue;
    const own = [...el.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim())
                || (el.matches('input, textarea, button') && (el.value || el.textContent || el.placeholder));
    if (!own) continue;
    let bg = [255, 255, 255], node = el;
    while (node) {
      const c = parse(getComputedStyle(node).backgroundColor);
      if (c.length === 3 || (c.length === 4 && c[3] > 0.5)) { bg = c.slice(0, 3); break; }
      node = node.parentElement;
    }
    const fg = parse(getComputedStyle(el).color);
    const text = (el.textContent || el.value || el.placeholder || '').trim().slice(0, 30);
    out.push({tag: el.tagName.toLowerCase(), id: el.id, text, fg: fg.slice(0, 3), bg});
    if (el.matches('textarea, input') && el.placeholder) {
      out.push({tag: el.tagName.toLowerCase() + '::placeholder', id: el.id, text: el.placeholder,
                fg: parse(getComputedStyle(el, '::placeholder').color).slice(0, 3), bg});
    }
  }
  return out;
})()
"""

# Inputs (text areas, inputs, selects) without a label: no <label for>, no wrapping <label>, no aria-label(ledby).
UNLABELLED_JS = """
[...document.querySelectorAll('input:not([type=hidden]), textarea, select')]
  .filter((el) => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
                  && !el.getAttribute('aria-labelledby'))
  .map((el) => el.id || el.name || el.tagName)
"""
