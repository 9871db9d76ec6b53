"""Load a report page in headless Chromium with the network off, and say what went wrong on it.

`check_page(html_path, screenshot)` opens one page and returns a `PageCheck`; `Browser` keeps one
browser open for several pages (`with Browser(workdir) as b: b.check(...)`). A PageCheck lists:
- failed_requests: every request that failed (CDP Network.loadingFailed) and every request at all
  whose URL is not file:, data:, blob: or about: (the page tried to leave the machine);
- console_errors: every SEVERE browser-log message (console.error, uncaught exceptions, failed loads);
- broken_images: every <img> that did not decode (incomplete, naturalWidth 0, or img.decode() rejected);
- external_refs: every http(s) or protocol-relative URL in a URL-valued attribute (src, href,
  srcset, ...), in a CSS url(...) or @import (style attributes, <style>, computed backgrounds), in
  the DOM or the file's source text;
- n_images, title; and it writes a full-page PNG screenshot to `screenshot`.
`PageCheck.problems()` is all of the first four as lines, empty for a clean page.

Offline, in layers, so neither the page nor Chromium itself reaches the network:
1. DevTools network emulation: offline (CDP Network.emulateNetworkConditions, plus chromedriver's
   own setNetworkConditions, which it re-applies to new targets), set before any navigation.
2. Flags: every host name resolves to nothing (--host-resolver-rules="MAP * ~NOTFOUND"), and every
   request goes through a proxy at a loopback port that refuses connections (a socket bound and
   never listened on, held for the browser's life, so no one else can take the port), loopback
   included (--proxy-bypass-list=<-loopback>).
3. Chromium's own traffic off: background networking, component updates, sync, domain reliability,
   safe browsing updates, metrics upload, crash upload, field trials, translate, optimization hints.
The real binary (/usr/lib/chromium/chromium) is run, not Debian's /usr/bin/chromium launcher
script, because the launcher adds flags of its own (--enable-remote-extensions,
--enable-gpu-rasterization) and exports Google API keys (/etc/chromium.d/apikeys); the launcher is
used only where the real binary is not found. Google API keys and proxy settings are also removed
from the environment chromedriver and Chromium get.

Selenium Manager never runs (it would try to download a driver): the driver and browser paths are
given explicitly. Missing Chromium or chromedriver skips the calling test with the reason (Debian's
`chromium` and `chromium-driver` packages; `make setup` installs them); any other failure to start
is an error. Every WebDriver command has a timeout, page loads and scripts too, and the browser is
always quit (and its process group killed) in a finally, so a hung browser cannot hang the suite.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self
from urllib.parse import urlsplit

import pytest

CHROMIUM = Path("/usr/bin/chromium")  # Debian's launcher script: its presence is the install check
CHROMIUM_REAL = Path("/usr/lib/chromium/chromium")  # the binary the launcher execs
CHROMEDRIVER = Path("/usr/bin/chromedriver")
INSTALL_HINT = "install Debian's `chromium` and `chromium-driver` packages (`make setup` does it)"
WINDOW = (1280, 1024)
COMMAND_TIMEOUT_S = 60  # any one WebDriver HTTP command
PAGE_LOAD_TIMEOUT_S = 30
SCRIPT_TIMEOUT_S = 20  # the async image-decode script
MAX_SCREENSHOT_HEIGHT = 16384  # Chromium's texture limit; longer pages are cut there
LOCAL_SCHEMES = {"file", "data", "blob", "about"}
_URL_ATTRS = ("src", "href", "srcset", "poster", "action", "formaction", "data", "background",
              "xlink:href", "ping", "manifest", "cite", "longdesc", "icon", "codebase", "archive")
_EXTERNAL = re.compile(r"^\s*(?:https?:)?//", re.IGNORECASE)
_CSS_URL = re.compile(r"""(?:url\(\s*|@import\s+)["']?\s*((?:https?:)?//[^"')\s]+)""", re.IGNORECASE)
_SOURCE_ATTR = re.compile(r"\b(?:" + "|".join(re.escape(a) for a in _URL_ATTRS)
                          + r""")\s*=\s*["']?\s*((?:https?:)?//[^"'\s>]+)""", re.IGNORECASE)
_DROPPED_ENV = ("GOOGLE_API_KEY", "GOOGLE_DEFAULT_CLIENT_ID", "GOOGLE_DEFAULT_CLIENT_SECRET",
                "CHROMIUM_FLAGS", "SE_CHROMEDRIVER", "http_proxy", "https_proxy", "all_proxy", "no_proxy",
                "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")

# Run after load: lazy images are made eager (a gallery below the fold must be checked too), then
# every image is awaited with img.decode(); the callback gets one record per <img>.
_IMAGES_JS = """
const done = arguments[arguments.length - 1];
const imgs = Array.from(document.images);
for (const img of imgs) if (img.loading === 'lazy') img.loading = 'eager';
Promise.all(imgs.map(img => img.decode().then(() => null, e => String(e && e.message || e))))
  .then(errors => done(imgs.map((img, i) => ({
    src: img.currentSrc || img.getAttribute('src') || '', complete: img.complete,
    width: img.naturalWidth, height: img.naturalHeight, error: errors[i]}))));
"""

# Every URL-valued attribute, style attribute, <style> text and computed background of the DOM.
_REFS_JS = """
const attrs = new Set(arguments[0]);
const out = [];
for (const el of document.querySelectorAll('*')) {
  for (const a of el.attributes) {
    const name = a.name.toLowerCase();
    if (attrs.has(name)) {
      const values = name === 'srcset' ? a.value.split(',').map(s => s.trim().split(/\\s+/)[0]) : [a.value];
      for (const v of values) out.push(['attr', el.tagName.toLowerCase() + '[' + name + ']', v]);
    } else if (name === 'style') out.push(['css', el.tagName.toLowerCase() + '[style]', a.value]);
  }
  if (el.tagName === 'STYLE') out.push(['css', 'style', el.textContent]);
  const cs = getComputedStyle(el);
  for (const p of ['backgroundImage', 'listStyleImage', 'borderImageSource', 'content', 'cursor'])
    if (cs[p] && cs[p].includes('url('))
      out.push(['css', el.tagName.toLowerCase() + ' computed ' + p, cs[p]]);
}
return out;
"""


@dataclass
class PageCheck:
    """What one page load showed; see the module docstring for each field."""

    url: str
    title: str
    n_images: int
    failed_requests: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    broken_images: list[str] = field(default_factory=list)
    external_refs: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)  # every request URL seen, shortened
    screenshot: Path | None = None

    def problems(self) -> list[str]:
        """One line per problem found; empty when the page loaded cleanly and offline."""
        return ([f"failed request: {r}" for r in self.failed_requests]
                + [f"console error: {m}" for m in self.console_errors]
                + [f"broken image: {i}" for i in self.broken_images]
                + [f"external reference: {r}" for r in self.external_refs])


def require_chromium() -> None:
    """Skip the calling test, with the reason, when Chromium or chromedriver is not installed;
    fail instead under CI (CI=true), where `make setup` installs both, so a skip would hide a gap."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if missing:
        reason = f"{', '.join(missing)} not found: {INSTALL_HINT}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)


def _short(url: str, limit: int = 120) -> str:
    """data: URLs of embedded PNGs are megabytes long: keep messages readable."""
    return url if len(url) <= limit else f"{url[:limit]}... ({len(url)} chars)"


def _closed_loopback_port() -> socket.socket:
    """A bound, never-listening loopback socket: connecting to its port is refused while it is held."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    return s


def chromium_arguments(profile_dir: Path, proxy_port: int) -> list[str]:
    """The command-line flags: headless, root-safe, throwaway profile, no network, no phoning home."""
    return [
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        f"--user-data-dir={profile_dir}", f"--window-size={WINDOW[0]},{WINDOW[1]}", "--hide-scrollbars",
        "--no-first-run", "--no-default-browser-check", "--mute-audio", "--password-store=basic",
        # no network: nothing resolves, and everything (loopback too) goes to a proxy that refuses
        "--host-resolver-rules=MAP * ~NOTFOUND", f"--proxy-server=http://127.0.0.1:{proxy_port}",
        "--proxy-bypass-list=<-loopback>", "--dns-prefetch-disable",
        # Chromium's own traffic
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-default-apps", "--disable-extensions", "--disable-domain-reliability",
        "--disable-client-side-phishing-detection", "--safebrowsing-disable-auto-update",
        "--disable-breakpad", "--disable-crash-reporter", "--no-pings", "--metrics-recording-only",
        "--disable-field-trial-config", "--no-service-autorun", "--disable-background-timer-throttling",
        ("--disable-features=Translate,OptimizationHints,OptimizationGuideModelDownloading,MediaRouter,"
         "DialMediaRouteProvider,AutofillServerCommunication,CertificateTransparencyComponentUpdater,"
         "NetworkTimeServiceQuerying,InterestFeedContentSuggestions,PrivacySandboxSettings4,"
         "SafeBrowsingBetterTelemetryAcrossReports"),
    ]


class Browser:
    """One offline headless Chromium, for checking several pages; use as a context manager.

    Args:
        workdir: a throwaway folder (a test's tmp dir) for the profile and chromedriver.log.
    """

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.driver = None
        self._proxy_socket: socket.socket | None = None
        self._pgid: int | None = None

    def __enter__(self) -> Self:
        require_chromium()
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.workdir.mkdir(parents=True, exist_ok=True)
        self._proxy_socket = _closed_loopback_port()
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM_REAL if CHROMIUM_REAL.is_file() else CHROMIUM)
        for arg in chromium_arguments(self.workdir / "chromium-profile", self._proxy_socket.getsockname()[1]):
            options.add_argument(arg)
        options.add_experimental_option("prefs", {"net.network_prediction_options": 2,  # no preconnect
                                                  "safebrowsing.enabled": False})
        options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
        options.page_load_strategy = "normal"
        env = {k: v for k, v in os.environ.items() if k not in _DROPPED_ENV}
        # Its own process group, so that whatever chromedriver leaves behind can be killed at the end.
        service = Service(executable_path=str(CHROMEDRIVER), env=env, popen_kw={"start_new_session": True},
                          log_output=str(self.workdir / "chromedriver.log"))
        try:
            self.driver = webdriver.Chrome(options=options, service=service)
            self._pgid = service.process.pid  # start_new_session: the group id is chromedriver's pid
            self.driver.command_executor.client_config.timeout = COMMAND_TIMEOUT_S
            self.driver.set_page_load_timeout(PAGE_LOAD_TIMEOUT_S)
            self.driver.set_script_timeout(SCRIPT_TIMEOUT_S)
            self._go_offline()
        except BaseException:
            process = getattr(service, "process", None)  # started, even if the session was not
            if self._pgid is None and process is not None:
                self._pgid = process.pid
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Quit the browser and driver; then kill anything left in their process group; release the port."""
        try:
            if self.driver is not None:
                self.driver.quit()
        finally:
            self.driver = None
            if self._pgid is not None:
                try:
                    os.killpg(self._pgid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass  # already gone: the normal case
                self._pgid = None
            if self._proxy_socket is not None:
                self._proxy_socket.close()
                self._proxy_socket = None

    def _go_offline(self) -> None:
        self.driver.set_network_conditions(offline=True, latency=0, download_throughput=0,
                                           upload_throughput=0)
        self.driver.execute_cdp_cmd("Network.enable", {})
        self.driver.execute_cdp_cmd("Network.emulateNetworkConditions", {
            "offline": True, "latency": 0, "downloadThroughput": 0, "uploadThroughput": 0})

    def check(self, html_path: Path, screenshot: Path) -> PageCheck:
        """Load `html_path` by file:// URL, collect its problems, write a full-page PNG to `screenshot`."""
        html_path = Path(html_path).resolve()
        if not html_path.is_file():
            raise FileNotFoundError(f"{html_path}: no such page to check")
        d = self.driver
        d.get("about:blank")
        self._go_offline()  # again, on the tab about to navigate
        d.get_log("performance"), d.get_log("browser")  # drain what earlier pages left
        url = html_path.as_uri()
        d.get(url)
        images = d.execute_async_script(_IMAGES_JS)
        refs = d.execute_script(_REFS_JS, list(_URL_ATTRS))
        title = d.title
        _save_screenshot(d, Path(screenshot))
        check = PageCheck(url=url, title=title, n_images=len(images), screenshot=Path(screenshot))
        check.broken_images = [
            f"{_short(i['src'])}: " + (i["error"] or f"complete={i['complete']} naturalWidth={i['width']}")
            for i in images if i["error"] or not i["complete"] or i["width"] == 0]
        check.failed_requests, check.requests = _network(d.get_log("performance"))
        check.console_errors = [f"{e.get('source', '')} {e['message']}".strip()
                                for e in d.get_log("browser") if e["level"] == "SEVERE"]
        check.external_refs = _external_refs(refs, html_path.read_text(encoding="utf-8", errors="replace"))
        return check


def _network(perf_log: list[dict]) -> tuple[list[str], list[str]]:
    """(failed requests, all request URLs) from chromedriver's performance log (CDP Network events)."""
    urls: dict[str, str] = {}
    failed, seen = [], []
    for entry in perf_log:
        msg = json.loads(entry["message"])["message"]
        method, p = msg.get("method"), msg.get("params", {})
        if method == "Network.requestWillBeSent":
            u = p["request"]["url"]
            urls[p["requestId"]] = u
            seen.append(_short(u))
            if urlsplit(u).scheme.lower() not in LOCAL_SCHEMES:
                failed.append(f"{_short(u)}: not a local URL (the page tried to reach the network)")
        elif method == "Network.loadingFailed":
            u = urls.get(p["requestId"], f"request {p['requestId']}")
            blocked = f" (blocked: {p['blockedReason']})" if p.get("blockedReason") else ""
            failed.append(f"{_short(u)}: {p.get('errorText', '')}{blocked}")
    return failed, seen


def _external_refs(dom_refs: list[list[str]], source: str) -> list[str]:
    """http(s) and protocol-relative URLs in the DOM's URL attributes and CSS, and in the page source."""
    found: list[str] = []
    for kind, where, value in dom_refs:
        hits = [value.strip()] if kind == "attr" and _EXTERNAL.match(value) else (
            _CSS_URL.findall(value) if kind == "css" else [])
        found += [f"{where}: {_short(h)}" for h in hits]
    found += [f"source: {_short(h)}" for h in _SOURCE_ATTR.findall(source) + _CSS_URL.findall(source)]
    return list(dict.fromkeys(found))


def _save_screenshot(driver, path: Path) -> None:
    """The whole page, not just the window: CDP captureScreenshot beyond the viewport, clipped to content."""
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    width = max(1, int(size["width"]))
    height = max(1, min(int(size["height"]), MAX_SCREENSHOT_HEIGHT))
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True, "fromSurface": True,
        "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(shot["data"]))


def check_page(html_path: Path, screenshot: Path, *, workdir: Path | None = None) -> PageCheck:
    """Open `html_path` offline in a fresh headless Chromium and report what failed on it.

    Args:
        html_path: the page, loaded by file:// URL (images beside it load as file:// too).
        screenshot: where the full-page PNG goes.
        workdir: profile and chromedriver.log folder; default `<screenshot>.browser` beside the screenshot.
    Returns: the PageCheck; `.problems()` is empty for a clean page.
    """
    screenshot = Path(screenshot)
    with Browser(workdir or screenshot.with_name(screenshot.name + ".browser")) as b:
        return b.check(html_path, screenshot)
