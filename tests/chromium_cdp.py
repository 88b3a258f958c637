"""A minimal headless-Chromium driver over the DevTools protocol (the report's and the app's browser tests).

Starts Debian's ``chromium`` with a fresh profile and no network services, opens pages,
clicks, chooses files, evaluates JavaScript and takes screenshots. Uses the ``websockets`` package (already a
dependency of the stack) and nothing else.
"""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-extensions", "--mute-audio",
         "--remote-debugging-port=0", "--remote-allow-origins=*")


def find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Chromium:
    """``with Chromium() as browser: browser.open(path); browser.evaluate("...")``."""

    def __init__(self, executable: str | None = None, *, timeout: float = 60.0) -> None:
        self.executable = executable or find_chromium()
        if self.executable is None:
            raise FileNotFoundError("chromium not found (scripts/ci-deps.sh installs Debian's package)")
        self.timeout = timeout
        self._ids = itertools.count(1)

    def __enter__(self) -> "Chromium":
        from websockets.sync.client import connect

        self.profile = tempfile.mkdtemp(prefix="fastface-chromium-")
        self.process = subprocess.Popen([self.executable, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + self.timeout
        while not (port_file.is_file() and port_file.read_text().strip()):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self._stop()
                raise RuntimeError("chromium did not start its DevTools endpoint")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        while True:
            pages = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
            pages = [p for p in pages if p.get("type") == "page"]
            if pages or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if not pages:
            self._stop()
            raise RuntimeError("chromium opened no page")
        self.socket = connect(pages[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=self.timeout)
        self.call("Page.enable")
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.socket.close()
        finally:
            self._stop()

    def _stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.profile, ignore_errors=True)

    def call(self, method: str, **params) -> dict:
        """Send one command and wait for its answer (events that arrive meanwhile are kept)."""
        ident = next(self._ids)
        self.socket.send(json.dumps({"id": ident, "method": method, "params": params}))
        self.events = getattr(self, "events", [])
        while True:
            message = json.loads(self.socket.recv(timeout=self.timeout))
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def wait_for(self, event: str) -> dict:
        self.events = getattr(self, "events", [])
        for i, message in enumerate(self.events):
            if message.get("method") == event:
                return self.events.pop(i)
        while True:
            message = json.loads(self.socket.recv(timeout=self.timeout))
            if message.get("method") == event:
                return message
            self.events.append(message)

    def open(self, path: str | Path) -> None:
        self.events = []
        self.call("Page.navigate", url=Path(path).resolve().as_uri())
        self.wait_for("Page.loadEventFired")

    def navigate(self, url: str) -> None:
        """Open ``url`` (http://...) and wait for its load event."""
        self.events = []
        self.call("Page.navigate", url=url)
        self.wait_for("Page.loadEventFired")

    def click(self, selector: str, *, wait_for_load: bool = True) -> None:
        """A real mouse click (pressed and released) at the centre of the element ``selector`` (CSS)."""
        self.evaluate(f"document.querySelector({json.dumps(selector)}).scrollIntoView({{block: 'center'}})")
        box = self.evaluate(f"(() => {{ const r = document.querySelector({json.dumps(selector)}).getBoundingClientRect();"
                            " return [r.left + r.width / 2, r.top + r.height / 2]; })()")
        self.events = []
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)
        if wait_for_load:
            self.wait_for("Page.loadEventFired")

    def set_files(self, selector: str, paths: list[str]) -> None:
        """Choose ``paths`` in the file input ``selector`` (what a user does in the file dialog)."""
        root = self.call("DOM.getDocument")["root"]["nodeId"]
        node = self.call("DOM.querySelector", nodeId=root, selector=selector)["nodeId"]
        self.call("DOM.setFileInputFiles", nodeId=node, files=[str(p) for p in paths])

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"JavaScript error: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, out: str | Path, *, width: int = 1280, height: int = 1600, from_element: str | None = None) -> Path:
        """PNG of ``width`` × ``height`` pixels of the page, from its top or from the element ``from_element`` (CSS)."""
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        top = 0
        if from_element:
            top = self.evaluate(f"document.querySelector({json.dumps(from_element)}).getBoundingClientRect().top"
                                " + window.scrollY")
        clip = {"x": 0, "y": max(0, top - 8), "width": width, "height": height, "scale": 1}
        data = self.call("Page.captureScreenshot", format="png", clip=clip, captureBeyondViewport=True)["data"]
        Path(out).write_bytes(base64.b64decode(data))
        return Path(out)


IMAGES_JS = """
(async () => {
  const images = [...document.images];
  await Promise.all(images.map(i => i.decode().catch(() => null)));
  return {
    images: images.map(i => ({alt: i.alt, naturalWidth: i.naturalWidth, naturalHeight: i.naturalHeight,
                              complete: i.complete})),
    headings: [...document.querySelectorAll('h2')].map(h => h.textContent),
    paperSection: !!document.getElementById('paper-vs-run'),
    paperRows: document.querySelectorAll('#paper-vs-run tr').length,
  };
})()
"""
