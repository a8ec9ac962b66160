"""Open a report in headless Chromium and record what a reader's browser would do.

Used by the tests and the benchmark (``selenium`` is in the ``test`` extra, not a runtime
dependency). Chromium and chromedriver are the Debian packages (``apt-get install chromium
chromium-driver``); chromedriver is given by path so selenium-manager never downloads a driver.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

#: Schemes a self-contained report may load from: the disk, inline data, blank frames.
LOCAL_SCHEMES = ("file:", "data:", "about:", "blob:", "chrome-error:")
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu",
                  "--disable-background-networking", "--disable-dev-shm-usage",
                  "--disable-component-update", "--disable-default-apps", "--disable-sync",
                  "--no-first-run", "--disable-features=Translate,OptimizationHints,MediaRouter",
                  "--allow-file-access-from-files")


def find_chromium() -> tuple[str, str] | None:
    """``(chromium, chromedriver)`` executables on PATH, or None when either is missing."""
    browser = next((p for name in ("chromium", "chromium-browser", "google-chrome")
                    if (p := shutil.which(name))), None)
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@dataclass
class PageCheck:
    """What loading a page did: console errors, every URL requested, images, timing."""

    console_errors: list[str] = field(default_factory=list)
    requested_urls: list[str] = field(default_factory=list)
    images: list[dict] = field(default_factory=list)  # src (shortened), naturalWidth, complete
    frames: int = 0
    load_ms: float = float("nan")  # navigationStart -> loadEventEnd

    @property
    def remote_requests(self) -> list[str]:
        return [url for url in self.requested_urls if not url.startswith(LOCAL_SCHEMES)]

    @property
    def broken_images(self) -> list[dict]:
        return [image for image in self.images
                if not image["complete"] or image["naturalWidth"] == 0]


def check_page(page: Path, screenshot: Path | None = None, width: int = 1400,
               height: int = 1000) -> PageCheck:
    """Load ``page`` (a local HTML file) in headless Chromium and report what happened.

    Every network request of the page and of its frames is recorded from the DevTools
    performance log (``Network.requestWillBeSent``); console messages at SEVERE level are
    errors. Images of frames (the viewers) are checked too.
    """
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not Path(page).is_file():
        raise FileNotFoundError(f"{page}: no such page (Chromium would show its error page)")
    found = find_chromium()
    if found is None:
        raise RuntimeError("chromium and chromedriver not found (apt-get install chromium "
                           "chromium-driver)")
    browser, driver_path = found
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (*CHROMIUM_FLAGS, f"--window-size={width},{height}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        driver.set_page_load_timeout(60)
        driver.get(Path(page).resolve().as_uri())
        check = PageCheck()
        timing = driver.execute_script(
            "const t = performance.timing; return [t.navigationStart, t.loadEventEnd];")
        check.load_ms = float(timing[1] - timing[0])
        check.images = _images(driver)
        frames = driver.find_elements("tag name", "iframe")
        check.frames = len(frames)
        for frame in frames:
            driver.switch_to.frame(frame)
            check.images += _images(driver, hidden_ok=True)
            driver.switch_to.default_content()
        if screenshot is not None:
            driver.save_screenshot(str(screenshot))
        check.console_errors = [entry["message"] for entry in driver.get_log("browser")
                                if entry["level"] == "SEVERE"]
        for entry in driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message["method"] == "Network.requestWillBeSent":
                check.requested_urls.append(message["params"]["request"]["url"])
        return check
    finally:
        driver.quit()


def _images(driver, hidden_ok: bool = False) -> list[dict]:
    """``src`` (first 80 characters), ``naturalWidth`` and ``complete`` of every <img>."""
    return driver.execute_script(
        "return Array.from(document.images).map(i => ({src: i.src.slice(0, 80), "
        "naturalWidth: i.naturalWidth, complete: i.complete}));")
