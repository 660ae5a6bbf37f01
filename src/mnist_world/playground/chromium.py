"""Headless Chromium driven over the DevTools protocol on a pipe: the playground's browser test and the
README's screenshot, with nothing but the Debian `chromium` package and the standard library.

`--remote-debugging-pipe` makes the browser read commands on its file descriptor 3 and write replies and
events on 4, as NUL-terminated JSON: no port, no websocket client, no browser download.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

EXECUTABLES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
KEY_CODES = {"ArrowLeft": 37, "ArrowUp": 38, "ArrowRight": 39, "ArrowDown": 40, " ": 32}


class ChromiumError(RuntimeError):
    """The browser refused a command, died, or a page did not do what was waited for."""


def find_chromium() -> str | None:
    """The browser to drive: $CHROMIUM when set, else the first of the usual names on the PATH."""
    explicit = os.environ.get("CHROMIUM")
    if explicit:
        return shutil.which(explicit)
    return next((path for name in EXECUTABLES if (path := shutil.which(name))), None)


class Chromium:
    """One headless browser process; `open` gives a page (a tab) to drive."""

    def __init__(self, executable: str, width: int = 1280, height: int = 900) -> None:
        self._profile = tempfile.mkdtemp(prefix="mnist-world-chromium-")
        browser_reads, self._commands = os.pipe()
        self._replies, browser_writes = os.pipe()
        arguments = [
            executable,
            "--headless",
            "--remote-debugging-pipe",
            "--no-sandbox",  # CI runs as root, where the sandbox refuses to start
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--hide-scrollbars",
            "--mute-audio",
            f"--user-data-dir={self._profile}",
            f"--window-size={width},{height}",
            "about:blank",
        ]
        # bash puts the pipe ends on the descriptors the browser expects (any number works with bash).
        script = f'exec "$0" "$@" 3<&{browser_reads} 4>&{browser_writes}'
        self.process = subprocess.Popen(
            ["bash", "-c", script, *arguments],
            pass_fds=(browser_reads, browser_writes),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(browser_reads)
        os.close(browser_writes)
        self._ids = itertools.count(1)
        self._waiting: dict[int, queue.Queue] = {}
        self._lock = threading.Lock()
        self.events: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        buffer = b""
        while chunk := os.read(self._replies, 1 << 16):
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for raw in messages:
                message = json.loads(raw)
                with self._lock:
                    slot = self._waiting.pop(message["id"], None) if "id" in message else None
                    if slot is None:
                        self.events.append(message)
                if slot is not None:
                    slot.put(message)
        with self._lock:  # the browser is gone: wake everyone still waiting
            for slot in self._waiting.values():
                slot.put({"error": {"message": "the browser exited"}})
            self._waiting.clear()

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> Any:
        """Run one DevTools command and return its result; ChromiumError when it fails."""
        identifier = next(self._ids)
        slot: queue.Queue = queue.Queue(maxsize=1)
        message: dict[str, Any] = {"id": identifier, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        with self._lock:
            self._waiting[identifier] = slot
        data = json.dumps(message).encode() + b"\0"
        while data:
            data = data[os.write(self._commands, data) :]
        try:
            reply = slot.get(timeout=60)
        except queue.Empty:
            raise ChromiumError(f"{method}: no reply within 60 s") from None
        if "error" in reply:
            raise ChromiumError(f"{method}: {reply['error'].get('message')}")
        return reply.get("result", {})

    def open(self, url: str) -> Page:
        """A new tab showing `url`, loaded."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session)
        for domain in ("Page", "Runtime", "Log"):
            page.send(f"{domain}.enable")
        page.goto(url)
        return page

    def close(self) -> None:
        with contextlib.suppress(ChromiumError):  # already gone
            self.send("Browser.close")
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._commands)
        self._reader.join(timeout=5)
        os.close(self._replies)
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Page:
    """One tab: navigate, run JavaScript, press keys, click, take screenshots, collect console errors."""

    def __init__(self, browser: Chromium, session: str) -> None:
        self.browser, self.session = browser, session

    def send(self, method: str, params: dict[str, Any] | None = None) -> Any:
        return self.browser.send(method, params, self.session)

    def _events(self) -> list[dict[str, Any]]:
        with self.browser._lock:
            return [event for event in self.browser.events if event.get("sessionId") == self.session]

    def goto(self, url: str, timeout: float = 30) -> None:
        loads = sum(event["method"] == "Page.loadEventFired" for event in self._events())
        self.send("Page.navigate", {"url": url})
        deadline = time.monotonic() + timeout
        while sum(event["method"] == "Page.loadEventFired" for event in self._events()) == loads:
            if time.monotonic() > deadline:
                raise ChromiumError(f"{url} did not load within {timeout} s")
            time.sleep(0.05)

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression (a promise is awaited); ChromiumError when it throws."""
        reply = self.send(
            "Runtime.evaluate", {"expression": expression, "awaitPromise": True, "returnByValue": True}
        )
        if "exceptionDetails" in reply:
            details = reply["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise ChromiumError(f"{expression!r} threw {text}")
        return reply["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30) -> Any:
        """Poll a JavaScript expression until it is truthy; its value."""
        deadline = time.monotonic() + timeout
        while not (value := self.evaluate(expression)):
            if time.monotonic() > deadline:
                raise ChromiumError(f"{expression!r} still false after {timeout} s")
            time.sleep(0.05)
        return value

    def key(self, key: str, down: bool) -> None:
        """Press (down) or release a key, as the keyboard would."""
        code = KEY_CODES[key]
        self.send(
            "Input.dispatchKeyEvent",
            {
                "type": "keyDown" if down else "keyUp",
                "key": key,
                "code": "Space" if key == " " else key,
                "windowsVirtualKeyCode": code,
                "nativeVirtualKeyCode": code,
            },
        )

    def click(self, selector: str) -> None:
        """A real mouse click at the middle of the element `selector` names."""
        box = self.evaluate(
            f"(() => {{ const r = document.querySelector({json.dumps(selector)}).getBoundingClientRect();"
            f" return [r.x + r.width / 2, r.y + r.height / 2]; }})()"
        )
        for kind in ("mousePressed", "mouseReleased"):
            self.send(
                "Input.dispatchMouseEvent",
                {"type": kind, "x": box[0], "y": box[1], "button": "left", "clickCount": 1},
            )

    def screenshot(self, path: str | Path) -> None:
        data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        Path(path).write_bytes(base64.b64decode(data))

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and failed loads the page has logged so far."""
        found = []
        for event in self._events():
            method, params = event["method"], event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                found.append(
                    " ".join(str(arg.get("value", arg.get("description"))) for arg in params["args"])
                )
            elif method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                found.append(details.get("exception", {}).get("description") or details.get("text", ""))
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                found.append(params["entry"].get("text", ""))
        return found


def screenshot(url: str, path: str | Path, frames: int, hold: str | None, truth: bool) -> list[str]:
    """A picture of the playground at `url` once `frames` frames are on it, `hold` pressed meanwhile and the
    true future shown when `truth`; returns the page's console errors."""
    executable = find_chromium()
    if executable is None:
        raise ChromiumError("no Chromium found (apt-get install chromium)")
    with Chromium(executable, width=1180, height=900) as browser:
        page = browser.open(url)
        page.wait_for("window.playground.session", timeout=120)
        if truth:
            page.click("#show-truth")
        if hold:
            page.key(hold, down=True)
        page.wait_for(f"window.playground.frames.length >= {frames}", timeout=600)
        page.evaluate("window.playground.playing = false")  # hold the picture still
        page.screenshot(path)
        return page.errors()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Screenshot of a running playground (the README's).")
    parser.add_argument("url")
    parser.add_argument("output")
    parser.add_argument("--frames", type=int, default=16, help="frames on the page before the picture")
    parser.add_argument("--hold", choices=sorted(KEY_CODES), help="a key held while the frames arrive")
    parser.add_argument("--truth", action="store_true", help="show the true future beside the dream")
    arguments = parser.parse_args()
    errors = screenshot(arguments.url, arguments.output, arguments.frames, arguments.hold, arguments.truth)
    print(f"{arguments.output}: {len(errors)} console errors", *errors, sep="\n")
