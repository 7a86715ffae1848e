"""Headless Chromium for the report tests, driven over the DevTools protocol on a pipe
(``--remote-debugging-pipe``: JSON messages ended by NUL on file descriptors 3 and 4), so a test
can load a page, move and click the mouse, and read what the page shows, with the standard library
only."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import time

import pytest


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("no headless Chromium here (apt-get install chromium; .ci/run installs it)")


class Browser:
    def __init__(self, exe: str, width: int = 1100, height: int = 900):
        to_chrome_r, self._w = os.pipe()
        self._r, from_chrome_w = os.pipe()
        # Moved above 9 first, so that placing them at 3 and 4 in the child cannot clobber either; the
        # copies at 3 and 4 (dup2) are the only ones that survive the exec.
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_chrome_r, from_chrome_w)]
        os.close(to_chrome_r)
        os.close(from_chrome_w)

        def child():
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
                 "--remote-debugging-pipe", f"--window-size={width},{height}"]  # fmt: skip
        self.proc = subprocess.Popen([exe, *flags], close_fds=False, preexec_fn=child,  # close_fds would close 3 and 4
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        for fd in high:
            os.close(fd)
        self._buf, self._id, self._events = b"", 0, []
        self.session = None
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Page.enable")
        self.resize(width, height)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _read(self, timeout: float) -> dict:
        end = time.monotonic() + timeout
        while b"\0" not in self._buf:
            left = end - time.monotonic()
            if left <= 0 or not select.select([self._r], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer")
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise EOFError("Chromium closed its pipe")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method: str, timeout: float = 60, **params) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if self.session and not method.startswith(("Target.", "Browser.")):
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        while True:
            m = self._read(timeout)
            if m.get("id") == self._id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self._events.append(m)

    def _wait(self, *names: str, timeout: float = 60) -> dict:
        while True:
            for i, m in enumerate(self._events):
                if m.get("method") in names:
                    return self._events.pop(i)
            self._events.append(self._read(timeout))

    def resize(self, width: int, height: int) -> None:
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def goto(self, url: str) -> None:
        self._events.clear()
        self.call("Page.navigate", url=url)
        self._wait("Page.loadEventFired", "Page.navigatedWithinDocument")  # the latter: only the #fragment changed

    def js(self, expression: str, context: int | None = None):
        params = {"expression": expression, "returnByValue": True, "awaitPromise": True}
        if context is not None:
            params["contextId"] = context
        r = self.call("Runtime.evaluate", **params)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def frames(self) -> list[dict]:
        """The page's subframes (an <object> SVG is one), depth first."""
        out = []

        def walk(tree):
            for child in tree.get("childFrames", []):
                out.append(child["frame"])
                walk(child)

        walk(self.call("Page.getFrameTree")["frameTree"])
        return out

    def frame_context(self, frame_id: str) -> int:
        """A JavaScript context in a subframe (its DOM, whatever its origin)."""
        return self.call("Page.createIsolatedWorld", frameId=frame_id, worldName="test")["executionContextId"]

    def mouse(self, kind: str, x: float, y: float) -> None:
        extra = {} if kind == "mouseMoved" else {"button": "left", "clickCount": 1}
        self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, **extra)

    def click(self, x: float, y: float) -> None:
        self.mouse("mouseMoved", x, y)
        self.mouse("mousePressed", x, y)
        self.mouse("mouseReleased", x, y)

    def screenshot(self, x: float, y: float, width: float, height: float):
        """RGB pixels (floats in [0, 1]) of a region of the viewport (x, y: as getBoundingClientRect)."""
        import io

        import matplotlib.image as mpimg

        sx, sy = self.js("[window.scrollX, window.scrollY]")  # the clip is in page coordinates
        clip = {"x": x + sx, "y": y + sy, "width": width, "height": height, "scale": 1}
        data = self.call("Page.captureScreenshot", format="png", clip=clip)["data"]
        return mpimg.imread(io.BytesIO(base64.b64decode(data)), format="png")[..., :3]

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except (OSError, EOFError, TimeoutError, RuntimeError):
            pass
        for fd in (self._w, self._r):
            os.close(fd)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
