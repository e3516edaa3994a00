"""The live page in headless Chromium: typed text comes back shaded with `engram inspect`'s gates.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them) and ``selenium``
(the dev extra); skipped, with the reason, where they are missing. Loopback only.
Set ``ENGRAM_SCREENSHOT_DIR`` to also copy the screenshot there.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from engram.cli.main import main
from engram.data.tokenizer import load_tokenizer
from engram.inspect.heatmap import gate_rgb, scale_values
from engram.inspect.server import InspectService, make_server, serve_in_thread
from engram.model.checkpoint import load_model

TEXT = "the Prince of Wales rode to the Tower"


def _browser_or_skip():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[dev]')")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("headless Chromium unavailable: install Debian's chromium and chromium-driver "
                    "(apt-get install -y chromium chromium-driver)")
    profile = tempfile.mkdtemp(prefix="engram-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--disable-extensions", f"--user-data-dir={profile}",
                "--window-size=1200,820"):
        opts.add_argument(arg)
    try:
        drv = webdriver.Chrome(service=Service(executable_path=driver), options=opts)
    except Exception as e:  # e.g. a driver/browser version mismatch
        shutil.rmtree(profile, ignore_errors=True)
        pytest.skip(f"headless Chromium did not start: {str(e).splitlines()[0]}")
    return drv, profile


@pytest.fixture(scope="module")
def run_dir(inspect_run) -> Path:
    return inspect_run[0]


@pytest.fixture(scope="module")
def live(run_dir):
    model, _ = load_model(run_dir)
    srv = make_server(InspectService(model, load_tokenizer(run_dir)), "127.0.0.1", 0, quiet=True)
    thread = serve_in_thread(srv)
    yield f"http://127.0.0.1:{srv.server_address[1]}/"
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


@pytest.fixture(scope="module")
def browser():
    drv, profile = _browser_or_skip()
    drv.set_page_load_timeout(15)
    yield drv
    drv.quit()
    shutil.rmtree(profile, ignore_errors=True)


def test_typed_text_is_shaded_with_inspect_gates(run_dir, live, browser, tmp_path) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    out = tmp_path / "inspect.json"
    assert main(["inspect", "--ckpt", str(run_dir), "--text", TEXT, "--json", str(out), "--quiet"]) == 0
    expected = json.loads(out.read_text())
    n = len(expected["tokens"])

    browser.get(live)
    box = browser.find_element(By.ID, "text")
    box.send_keys(TEXT)  # key by key: the page re-inspects as the user types

    def settled(d):
        spans = d.find_elements(By.CSS_SELECTOR, "#tokens .tok")
        return spans if len(spans) == n and d.execute_script(
            "return [...document.querySelectorAll('#tokens .tok')].map(s => s.textContent).join('')"
        ) == TEXT else False

    spans = WebDriverWait(browser, 10, poll_frequency=0.05).until(settled)
    views = Select(browser.find_element(By.ID, "view"))
    assert [o.text for o in views.options] == [f"layer {l} \u00b7 branch {m}" for l in (0, 1) for m in (0, 1)]
    for value, (li, m) in (("0:0", (0, 0)), ("1:1", (1, 1))):
        views.select_by_value(value)
        gates = browser.execute_script(
            "return [...document.querySelectorAll('#tokens .tok')].map(s => Number(s.dataset.gate))")
        want = [row[m] for row in expected["layers"][li]["gates"]]
        assert gates == want  # bit-equal: same checkpoint, same forward pass, float64 round trip
        colours = browser.execute_script(
            "return [...document.querySelectorAll('#tokens .tok')].map(s => s.style.backgroundColor)")
        assert colours == ["rgb({}, {}, {})".format(*gate_rgb(v)) for v in scale_values(want, "rank")]
        assert len(set(colours)) > 1  # actually shaded, not one flat colour

    spans = browser.find_elements(By.CSS_SELECTOR, "#tokens .tok")
    ActionChains(browser).move_to_element(spans[4]).perform()
    tip = browser.find_element(By.ID, "tip")
    WebDriverWait(browser, 5).until(lambda d: tip.is_displayed())
    hits = expected["layers"][1]["heads"][4]
    assert "hash" in tip.text and str(hits[0]["row"]) in tip.text and "Wales" in tip.text

    shot = tmp_path / "engram-serve.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    if os.environ.get("ENGRAM_SCREENSHOT_DIR"):
        dest = Path(os.environ["ENGRAM_SCREENSHOT_DIR"])
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, dest / shot.name)

    box.clear()  # an error from the server is shown, the page stays usable
    box.send_keys("x!" * 40)
    WebDriverWait(browser, 10).until(
        lambda d: "max_seq_len" in d.find_element(By.ID, "status").text)
