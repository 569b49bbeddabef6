"""Headless Chromium over the DevTools protocol, and the demo page (app/demo.py) under `streamlit run`.

Streamlit draws the page in the browser from a websocket, so a page is "loaded" only once its script
has run and the browser has rendered the result: `chromium --dump-dom` or `--screenshot` with a
virtual-time budget races that. Here the browser is driven over the DevTools protocol on a pipe
(`--remote-debugging-pipe`: fds 3 and 4, JSON messages ending in NUL), which needs no port and no
websocket client, and callers wait for what they need to see (`Page.wait_for`).

    with demo_page(artifacts, "127.0.0.1:8001") as url, Chromium() as browser:
        page = browser.open(f"{url}/?user=1000042&k=12")
        ids = page.wait_for("[...document.querySelectorAll('[data-item-id]')].map(e => e.dataset.itemId)")
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from serving.launcher import LaunchError, free_port, wait_for_url
from shoprec.config import REPO_ROOT

if TYPE_CHECKING:
    from typing import Self

DEMO_SCRIPT = REPO_ROOT / "app" / "demo.py"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL_HINT = ("headless Chromium is needed: `apt-get install -y --no-install-recommends chromium` "
                "(`make setup` does it), or point $CHROMIUM at a Chrome/Chromium binary")


class BrowserError(RuntimeError):
    pass


def find_chromium() -> str:
    """The Chromium binary: $CHROMIUM, else the first of CHROMIUM_NAMES on PATH; BrowserError naming the fix."""
    explicit = os.environ.get("CHROMIUM")
    if explicit:
        if shutil.which(explicit):
            return shutil.which(explicit)
        raise BrowserError(f"$CHROMIUM={explicit!r} is not an executable; {INSTALL_HINT}")
    for name in CHROMIUM_NAMES:
        if shutil.which(name):
            return shutil.which(name)
    raise BrowserError(f"no {' / '.join(CHROMIUM_NAMES)} on PATH; {INSTALL_HINT}")


class Page:
    """One tab, addressed by its DevTools session."""

    def __init__(self, browser: Chromium, session: str):
        self.browser, self.session = browser, session

    def send(self, method: str, params: dict | None = None, timeout_s: float = 30.0) -> dict:
        return self.browser.send(method, params, self.session, timeout_s)

    def evaluate(self, expression: str):
        """The value of a JavaScript expression (JSON-serialisable), evaluated in the page."""
        reply = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in reply:
            raise BrowserError(f"{expression[:80]!r} raised in the page: {reply['exceptionDetails'].get('text')}")
        return reply["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float = 30.0, poll_s: float = 0.25):
        """Poll a JavaScript expression until it is truthy; its value. BrowserError (with the page's text) on timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                text = self.evaluate("document.body ? document.body.innerText : ''") or ""
                raise BrowserError(f"timed out after {timeout_s:.0f} s waiting for {expression[:100]!r}; "
                                   f"the page shows: {text[:1500]!r}")
            time.sleep(poll_s)

    def screenshot(self, path: str | Path) -> Path:
        """A PNG of the viewport (size it with Chromium(width, height))."""
        data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        path = Path(path)
        path.write_bytes(base64.b64decode(data))
        return path


class Chromium:
    """A headless Chromium process; `open(url)` gives a Page once the document has loaded."""

    def __init__(self, width: int = 1440, height: int = 1000, binary: str | None = None):
        self.binary = binary or find_chromium()
        self.width, self.height = width, height
        self._replies: dict[int, dict] = {}
        self._cond = threading.Condition()
        self._next_id = 0
        self._closed = False

    def __enter__(self) -> Self:
        self._profile = tempfile.TemporaryDirectory(prefix="shoprec-chromium-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # the child's ends at 10 and above, so that moving them onto 3 and 4 overwrites neither
        to_browser_r, from_browser_w = (_above(fd, 10) for fd in (to_browser_r, from_browser_w))
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--no-default-browser-check", "--disable-extensions", "--hide-scrollbars", "--mute-audio",
                 "--remote-debugging-pipe", f"--user-data-dir={self._profile.name}",
                 f"--window-size={self.width},{self.height}", "about:blank"]
        # the pipe must sit on fds 3 (read by the browser) and 4 (written by it): bash moves them there,
        # without a preexec_fn (unsafe in a process with threads, as gRPC's)
        move = f'exec "$0" "$@" 3<&{to_browser_r} 4>&{from_browser_w} {to_browser_r}<&- {from_browser_w}>&-'
        self._log = open(Path(self._profile.name) / "chromium.log", "w+b")  # a file: a full pipe would stall the browser
        self.process = subprocess.Popen(["bash", "-c", move, self.binary, *flags], pass_fds=(to_browser_r, from_browser_w),
                                        stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            self.send("Browser.getVersion", timeout_s=30)
        except BrowserError:
            self.__exit__(None, None, None)
            raise
        return self

    def _read(self) -> None:
        buffer = b""
        while True:
            try:
                chunk = os.read(self._from_browser, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                break
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for raw in messages:
                message = json.loads(raw)
                if "id" in message:  # replies; events are not needed here
                    with self._cond:
                        self._replies[message["id"]] = message
                        self._cond.notify_all()
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout_s: float = 30.0) -> dict:
        with self._cond:
            self._next_id += 1
            msg_id = self._next_id
        message = {"id": msg_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        try:
            os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        except OSError as e:
            raise BrowserError(f"chromium is gone ({e}); its stderr: {self._stderr()}") from e
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while msg_id not in self._replies:
                left = deadline - time.monotonic()
                if self._closed:
                    raise BrowserError(f"chromium exited during {method}; its stderr: {self._stderr()}")
                if left <= 0:
                    raise BrowserError(f"chromium did not answer {method} within {timeout_s:.0f} s")
                self._cond.wait(left)
            reply = self._replies.pop(msg_id)
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error'].get('message')}")
        return reply.get("result", {})

    def _stderr(self) -> str:
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-2000:]

    def open(self, url: str, timeout_s: float = 30.0) -> Page:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        page = Page(self, self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"])
        page.send("Emulation.setDeviceMetricsOverride",
                  {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False})
        page.send("Page.navigate", {"url": url}, timeout_s=timeout_s)
        page.wait_for("document.readyState === 'complete'", timeout_s)
        return page

    def __exit__(self, *exc) -> None:
        with contextlib.suppress(OSError):
            os.close(self._to_browser)  # the browser exits when its pipe closes
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        with contextlib.suppress(OSError):
            os.close(self._from_browser)
        self._log.close()
        self._profile.cleanup()


def _above(fd: int, low: int) -> int:
    """A copy of fd numbered >= low (close-on-exec, as os.pipe's); the original is closed."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, low)
    os.close(fd)
    return moved


def streamlit_command(artifacts: str | Path, server_url: str, port: int, address: str = "127.0.0.1",
                      protocol: str = "grpc") -> list[str]:
    """`streamlit run app/demo.py` headless on address:port (no usage stats: no internet here; no file watcher)."""
    return [str(Path(sys.executable).with_name("streamlit")), "run", str(DEMO_SCRIPT), "--server.headless", "true",
            "--server.port", str(port), "--server.address", address, "--browser.gatherUsageStats", "false",
            "--server.fileWatcherType", "none", "--global.developmentMode", "false", "--client.toolbarMode", "viewer",
            "--", "--artifacts", str(artifacts), "--url", server_url, "--protocol", protocol]


@contextlib.contextmanager
def demo_page(artifacts: str | Path, server_url: str, protocol: str = "grpc", log: str | Path | None = None,
              timeout_s: float = 60.0) -> Iterator[str]:
    """`streamlit run app/demo.py` on a free loopback port against a running server; yields the page's URL.
    Fails fast (with the log's tail) when streamlit exits before its health endpoint answers."""
    port = free_port()
    command = streamlit_command(artifacts, server_url, port, protocol=protocol)
    log_path = Path(log) if log else Path(tempfile.mkstemp(prefix="shoprec-demo-page-", suffix=".log")[1])
    with open(log_path, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   cwd=REPO_ROOT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_for_url(f"{url}/_stcore/health", process, timeout_s, poll_s=0.2)
        except LaunchError as exc:
            raise BrowserError(f"streamlit on {url}: {exc}; {log_path}: {log_path.read_text(errors='replace')[-2000:]}") from None
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
