"""The HTML reports in a real browser: headless Chromium, network off, pages loaded by file:// URL.

Each report must load with no failed request, no console error, every image decoded and no
external reference, whatever it holds (all images and requests are checked, not named ones).
The checker itself is tested on small broken pages, so a clean report means something.
See tests/browser.py for how the browser is kept offline.
"""

from __future__ import annotations

import base64
import http.server
import io
import threading

import optuna
import pytest
from PIL import Image

from tasks import curate, evaluate, ingest, train, validate
from tasks.tune_report import write_tune_report
from tests.browser import Browser, PageCheck, _network
from tests.conftest import tiny_params

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _png(size=(8, 6), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


GOOD_PNG = "data:image/png;base64," + base64.b64encode(_png()).decode()
# Valid base64 and a PNG signature, so the URL loads; the bytes after it are not a PNG, so it cannot decode.
CORRUPT_PNG = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"not a png" * 8).decode()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """One offline Chromium for the whole module (starting one takes a couple of seconds)."""
    with Browser(tmp_path_factory.mktemp("chromium")) as b:
        yield b


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real model, 1 epoch on tiny real Fashion-MNIST: ingest → validate → curate → train."""
    tmp = tmp_path_factory.mktemp("report-browser")
    params = tiny_params(tmp, ["curate.fiftyone=false"])
    ingest.run(params)
    validate.run(params)
    curate.run(params)
    train.run(params)
    return params


def _page(tmp_path, name: str, body: str) -> tuple:
    page = tmp_path / f"{name}.html"
    page.write_text(f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{name}</title></head>'
                    f"<body><h1>{name}</h1>{body}</body></html>\n")
    return page, tmp_path / f"{name}.png"


def _assert_screenshot(check: PageCheck) -> None:
    """A real PNG of a rendered page: decodable, page-sized, not one flat colour."""
    assert check.screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", check.screenshot
    with Image.open(check.screenshot) as img:
        img.load()
        assert img.width >= 200 and img.height >= 200, img.size
        low, high = img.convert("L").getextrema()
        assert high - low > 50, f"{check.screenshot}: a flat image ({low}..{high}), nothing rendered"


def _assert_clean(check: PageCheck, *, min_images: int) -> None:
    problems = "\n".join(check.problems())
    assert not problems, f"{check.url} ({check.title!r}), screenshot {check.screenshot}:\n{problems}"
    assert check.n_images >= min_images, f"{check.url}: {check.n_images} images, expected >= {min_images}"
    assert check.title, f"{check.url}: no <title>"
    _assert_screenshot(check)


# --------------------------------------------------------------------------- the project's reports


def test_evaluate_report_loads_offline(browser, trained, tmp_path):  # browser first: skip before training
    result = evaluate.run(trained)
    check = browser.check(result.report_path, tmp_path / "evaluate.png")
    _assert_clean(check, min_images=1)


def test_dvc_plots_page_renders_offline(browser, trained, tmp_path):
    """`dvc plots show` with the project's dvc.yaml plots and its offline page template: every plot
    drawn by the inlined Vega, nothing fetched (DVC's default page loads Vega from a CDN)."""
    import shutil
    import subprocess
    import sys

    import yaml

    from tests.conftest import ROOT

    evaluate.run(trained)
    repo = tmp_path / "repo"
    shutil.copytree(trained.paths.reports / "evaluate" / "plots", repo / "reports" / "evaluate" / "plots")
    plots = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"plots": plots}))
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=repo, check=True)
    shutil.copytree(ROOT / ".dvc" / "plots", repo / ".dvc" / "plots")
    subprocess.run([*dvc, "config", "plots.html_template", "plots/offline.html"], cwd=repo, check=True)
    subprocess.run([*dvc, "plots", "show", "-o", "out"], cwd=repo, check=True, capture_output=True)
    page = repo / "out" / "index.html"
    assert "cdn.jsdelivr" not in page.read_text()
    check = browser.check(page, tmp_path / "dvc-plots.png")
    _assert_clean(check, min_images=0)
    drawn = browser.driver.execute_script("return document.querySelectorAll('canvas.marks, svg.marks').length")
    assert drawn == len(plots), f"{drawn} of {len(plots)} plots drawn; screenshot {check.screenshot}"


def test_validate_report_loads_offline(browser, trained, tmp_path):
    check = browser.check(trained.paths.reports / "validate" / "index.html", tmp_path / "validate.png")
    _assert_clean(check, min_images=0)  # a table and text, no plots


def _objective(trial: optuna.Trial) -> float:
    x = trial.suggest_float("x", 0.0, 1.0)
    act = trial.suggest_categorical("act", ["relu", "gelu"])
    trial.set_user_attr("epochs_requested", 4)
    for epoch in range(4):
        trial.report(x * (epoch + 1) / 4 + (0.01 if act == "relu" else 0.0), epoch)
        if trial.should_prune():
            raise optuna.TrialPruned()
    return x


def test_tune_report_loads_offline(browser, tmp_path):
    study = optuna.create_study(study_name="browser", direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1))
    study.optimize(_objective, n_trials=12)
    out = tmp_path / "tune"
    best = {"trial": study.best_trial.number, "value": study.best_value, "params": study.best_params}
    summary = write_tune_report(study, out, epochs_requested=4, best=best, storage="sqlite:///tune.db")
    assert summary["importances"] is not None, summary["importances_reason"]  # so every plot is on the page
    check = browser.check(out / "index.html", tmp_path / "tune.png")
    _assert_clean(check, min_images=1)
    assert any(r.startswith("file://") and r.endswith(".png") for r in check.requests), check.requests


# --------------------------------------------------------------------------- the checker can fail


def test_clean_page_passes(browser, tmp_path):
    """The control for the broken pages below: one good image, nothing else."""
    page, shot = _page(tmp_path, "clean", f'<img alt="red" src="{GOOD_PNG}" width="400" height="300">')
    check = browser.check(page, shot)
    assert check.problems() == [] and check.n_images == 1
    _assert_screenshot(check)


def test_external_image_is_caught(browser, tmp_path):
    page, shot = _page(tmp_path, "external", '<img alt="x" src="https://example.invalid/x.png">')
    check = browser.check(page, shot)
    assert any("https://example.invalid/x.png" in r for r in check.failed_requests), check.failed_requests
    assert any("ERR_INTERNET_DISCONNECTED" in r for r in check.failed_requests), check.failed_requests
    assert any("https://example.invalid/x.png" in r for r in check.external_refs), check.external_refs
    assert any("example.invalid" in i for i in check.broken_images), check.broken_images
    assert check.n_images == 1


def test_external_css_and_links_are_caught(browser, tmp_path):
    body = ('<div style="width:10px;height:10px;background:url(\'https://example.invalid/bg.png\')"></div>'
            '<a href="//example.invalid/page">a link</a>'
            '<style>@import "https://example.invalid/style.css";</style>')
    check = browser.check(*_page(tmp_path, "css", body))
    refs = "\n".join(check.external_refs)
    for url in ("https://example.invalid/bg.png", "//example.invalid/page",
                "https://example.invalid/style.css"):
        assert url in refs, refs
    assert any("bg.png" in r for r in check.failed_requests), check.failed_requests


def test_corrupt_and_missing_images_are_caught(browser, tmp_path):
    body = (f'<img alt="good" src="{GOOD_PNG}"><img alt="corrupt" src="{CORRUPT_PNG}">'
            '<img alt="missing" src="missing.png">'
            '<div style="height:4000px"></div>'
            '<img alt="lazy, below the fold" loading="lazy" src="lazy-missing.png">')
    check = browser.check(*_page(tmp_path, "images", body))
    assert check.n_images == 4
    broken = "\n".join(check.broken_images)
    assert len(check.broken_images) == 3, broken
    assert CORRUPT_PNG[:60] in broken and "missing.png" in broken and "lazy-missing.png" in broken
    assert any("missing.png" in r and "ERR_FILE_NOT_FOUND" in r for r in check.failed_requests)
    assert check.external_refs == []


@pytest.mark.parametrize(("script", "expected"), [
    ('console.error("boom")', "boom"),
    ('throw new Error("kaboom")', "kaboom"),
    ("undefinedFunction()", "undefinedFunction"),
])
def test_console_errors_are_caught(browser, tmp_path, script, expected):
    check = browser.check(*_page(tmp_path, "script", f"<script>{script}</script>"))
    assert any(expected in m for m in check.console_errors), check.console_errors
    assert check.failed_requests == [] and check.broken_images == []


def test_flags_alone_keep_chromium_off_the_network(tmp_path):
    """With DevTools' offline emulation turned off, the command-line flags still stop every request:
    a page asking a live loopback server (loopback only: nothing here may leave the machine) gets a
    proxy error, and the server sees no connection."""
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # http.server's name for it
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(_png())

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        page, _ = _page(tmp_path, "loopback", f'<img alt="a" src="http://127.0.0.1:{port}/a.png">'
                                              f'<img alt="b" src="http://localhost:{port}/b.png">')
        with Browser(tmp_path / "chromium") as b:
            d = b.driver
            d.delete_network_conditions()
            d.execute_cdp_cmd("Network.emulateNetworkConditions", {
                "offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1})
            d.get(page.as_uri())
            complete = d.execute_async_script(
                "const done = arguments[arguments.length - 1];"
                "Promise.allSettled(Array.from(document.images).map(i => i.decode()))"
                ".then(() => done(Array.from(document.images).map(i => i.naturalWidth)));")
            failed, _ = _network(d.get_log("performance"))
    finally:
        server.shutdown()
        server.server_close()
    assert hits == [], f"the loopback server was reached: {hits}"
    assert complete == [0, 0]
    errors = "\n".join(failed)
    assert "ERR_INTERNET_DISCONNECTED" not in errors, errors  # emulation really was off
    assert errors.count("ERR_PROXY_CONNECTION_FAILED") == 2, errors
