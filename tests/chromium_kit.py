"""Headless Chromium driven through the Chrome DevTools Protocol over a pipe (``--remote-debugging-pipe``: no port,
no package beyond the standard library), for the tests of the HTML reports and for ``make docs``' screenshot.

Chromium reads commands on its fd 3 and writes answers and events on its fd 4, each a JSON document ended by a NUL
byte; a shell gives it our pipes as those fds.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

#: flags that work in a container as root, offline: no sandbox (root), no GPU, nothing fetched or synced
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
]


def find_chromium() -> str | None:
    """Debian's ``chromium`` (or $LORATOOLS_CHROMIUM, or another Chromium-based browser on the path)."""
    named = os.environ.get("LORATOOLS_CHROMIUM")
    if named:
        return shutil.which(named)
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def screenshot(exe: str, url: str, png: Path, width: int = 1280, height: int = 2000) -> None:
    """``chromium --screenshot`` of ``url`` into ``png``."""
    with tempfile.TemporaryDirectory(prefix="loratools-chromium-", ignore_cleanup_errors=True) as profile:
        subprocess.run(
            [exe, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}", f"--screenshot={png}", url],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=120,
        )


class Page:
    """One page of a headless Chromium: :meth:`open` a URL, :meth:`eval` JavaScript, read :attr:`errors` (uncaught
    exceptions, console errors, and the browser's own error log: a script blocked by the page's policy, a failed
    request)."""

    def __init__(self, exe: str, timeout: float = 60.0) -> None:
        self.timeout = timeout
        self.profile = tempfile.TemporaryDirectory(prefix="loratools-chromium-", ignore_cleanup_errors=True)
        argv = [exe, *FLAGS, f"--user-data-dir={self.profile.name}", "--remote-debugging-pipe", "about:blank"]
        self.proc = subprocess.Popen(
            ["sh", "-c", 'exec "$0" "$@" 3<&0 4>&1 0</dev/null 1>/dev/null', *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: closing ends the renderers too
        )
        self.next_id = 0
        self.answers: dict[int, dict[str, Any]] = {}
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.errors: list[str] = []
        self.lock = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            self.send(f"{domain}.enable", session=self.session)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        buf = b""
        while True:
            chunk = self.proc.stdout.read1(65536)  # type: ignore[attr-defined]
            if not chunk:
                with self.lock:
                    self.lock.notify_all()
                return
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                msg = json.loads(raw)
                if "id" in msg:
                    with self.lock:
                        self.answers[msg["id"]] = msg
                        self.lock.notify_all()
                else:
                    self._event(msg)

    def _event(self, msg: dict[str, Any]) -> None:
        method, params = msg.get("method"), msg.get("params", {})
        if method == "Runtime.exceptionThrown":
            d = params["exceptionDetails"]
            self.errors.append(f"exception: {d.get('exception', {}).get('description') or d.get('text')}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert", "warning"):
            self.errors.append(f"console.{params['type']}: {[a.get('value') for a in params.get('args', [])]}")
        elif method == "Log.entryAdded" and params["entry"].get("level") in ("error", "warning"):
            self.errors.append(f"log: {params['entry'].get('text')}")
        self.events.put(msg)

    def send(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        msg: dict[str, Any] = {"id": self.next_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(msg).encode() + b"\0")
        self.proc.stdin.flush()
        deadline = time.monotonic() + self.timeout
        with self.lock:
            while self.next_id not in self.answers:
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise RuntimeError(f"chromium gave no answer to {method}")
                self.lock.wait(min(left, 1.0))
            answer = self.answers.pop(self.next_id)
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        result: dict[str, Any] = answer.get("result", {})
        return result

    def open(self, url: str) -> None:
        """Navigate and wait for the load event (the page's own script has run by then)."""
        self.send("Page.navigate", session=self.session, url=url)
        deadline = time.monotonic() + self.timeout
        while True:
            msg = self.events.get(timeout=max(0.1, deadline - time.monotonic()))
            if msg.get("method") == "Page.loadEventFired":
                return

    def eval(self, expression: str) -> Any:
        """The value of a JavaScript expression (JSON-serialisable), evaluated in the page."""
        r = self.send("Runtime.evaluate", session=self.session, expression=expression, returnByValue=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression[:60]}...: {r['exceptionDetails']}")
        return r["result"].get("value")

    def close(self) -> None:
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            with contextlib.suppress(OSError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.profile.cleanup()

    def __enter__(self) -> Page:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
