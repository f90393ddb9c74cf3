"""Headless Chromium for the explorer's tests, driven with selenium (Debian's chromium + chromium-driver).

Where the browser is missing the tests skip, saying how to install it — except where an install could have worked
and was asked for (.ci/run exports MINIVAR_REQUIRE_BROWSER=1 after it ran apt-get as root; or CI=true as root
with apt-get): there a missing browser fails the tests, so CI cannot pass them by skipping."""
import json
import os
import shutil
import tempfile
import time

import pytest

INSTALL = "apt-get install -y chromium chromium-driver && pip install selenium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1400,1100"]
NETWORK = ("http:", "https:", "ws:", "wss:", "ftp:")


def browser_required() -> bool:
    if os.environ.get("MINIVAR_REQUIRE_BROWSER") == "1":
        return True
    return (os.environ.get("CI") == "true" and hasattr(os, "geteuid") and os.geteuid() == 0
            and shutil.which("apt-get") is not None)


def _binary(*names):
    for n in names:
        path = shutil.which(n)
        if path:
            return path
    return None


def missing_browser() -> str | None:
    """Why no browser can run here (None: it can)."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed"
    if _binary("chromium", "chromium-browser", "google-chrome") is None:
        return "no chromium binary"
    if _binary("chromedriver") is None:
        return "no chromedriver"
    return None


class Browser:
    """One headless Chromium with its console and network logs."""

    def __init__(self):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
        self.profile = tempfile.mkdtemp(prefix="minivar-chromium-")
        opts = webdriver.ChromeOptions()
        opts.binary_location = _binary("chromium", "chromium-browser", "google-chrome")
        for f in FLAGS + [f"--user-data-dir={self.profile}"]:
            opts.add_argument(f)
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
        self.driver = webdriver.Chrome(service=Service(_binary("chromedriver")), options=opts)
        self.driver.set_script_timeout(60)

    def open(self, url: str, timeout: float = 60.0) -> float:
        """Load `url` and wait for the explorer to have drawn; returns the seconds it took."""
        self.logs()                                           # drop what came before
        t = time.perf_counter()
        self.driver.get(url)
        self.wait("return !!(window.explorer && window.explorer.ready)", timeout)
        return time.perf_counter() - t

    def wait(self, script: str, timeout: float = 60.0):
        end = time.monotonic() + timeout
        while True:
            value = self.driver.execute_script(script)
            if value:
                return value
            if time.monotonic() > end:
                raise AssertionError(f"timed out waiting for: {script}")
            time.sleep(0.05)

    def js(self, script: str, *args):
        return self.driver.execute_script(script, *args)

    def logs(self) -> tuple[list[dict], list[str]]:
        """(console errors, URLs the page requested over a network) since the last call."""
        console = [e for e in self.driver.get_log("browser") if e["level"] == "SEVERE"]
        urls = []
        for e in self.driver.get_log("performance"):
            m = json.loads(e["message"])["message"]
            if m["method"] == "Network.requestWillBeSent":
                urls.append(m["params"]["request"]["url"])
        return console, [u for u in urls if u.startswith(NETWORK)]

    def close(self):
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)


def browser_fixture():
    """A module-scoped Browser, or a skip (a failure where the browser is required) when it cannot start."""
    why = missing_browser()
    if why is not None:
        message = f"needs headless Chromium and selenium ({why}); install them with: {INSTALL}"
        if browser_required():
            pytest.fail(message + " — required here (MINIVAR_REQUIRE_BROWSER / CI as root with apt-get)")
        pytest.skip(message)
    browser = Browser()
    try:
        yield browser
    finally:
        browser.close()
