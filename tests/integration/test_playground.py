"""The playground at ``/`` in a real headless Chromium (Debian's chromium + chromium-driver,
driven by Selenium): it asks for the API key, submits a prompt, the progress bar moves and the
preview changes while the image develops, the final image equals the API's for the same seed,
a refused value shows the server's message next to its field, and a result reproduces with one click.

The server is the in-process app (uvicorn over LocalStages), slow on purpose
(``step_delay_s``), so every step and partial image is on screen long enough to be seen.
Screenshots go to $DARKROOM_SCREENSHOTS when set (``docs/`` refreshes the README's), else to
the test's temporary folder.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from serve.api import Limits
from serve.api.http import create_app
from serve.api.local_stages import LocalStages
from serve.api.service import ImageService, ServiceConfig
from serve.imageio import decode_image
from serve.model import read_model_info
from serve.pipeline import Pipeline
from serve.storage import open_store
from tests.conftest import max_level_diff
from tests.sse import serving

pytestmark = pytest.mark.integration

KEY = "playground-key"
STEP_S = 0.25
# Flags for Chromium on these machines (/work/.library/env/machines/python.md): without the
# background-networking ones it keeps dialling Google's hosts through a closed network.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1000",
)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them with apt-get)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager look for downloads
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def app_url(tiny_model, tmp_path_factory):
    store = open_store(str(tmp_path_factory.mktemp("playground")))
    config = ServiceConfig(model_name="tiny", limits=Limits(max_steps=50), api_keys=(KEY,), job_poll_s=0.2)
    stages = LocalStages(Pipeline.load(tiny_model, device="cpu"), store, step_delay_s=STEP_S)
    with serving(create_app(ImageService(config, read_model_info(tiny_model), stages, store))) as url:
        yield url


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    target = os.environ.get("DARKROOM_SCREENSHOTS")
    path = Path(target) if target else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


def wait(driver, script: str, timeout_s: float = 60.0, what: str = ""):
    deadline = time.monotonic() + timeout_s
    while not (value := driver.execute_script(script)):
        assert time.monotonic() < deadline, f"timed out waiting for {what or script}"
        time.sleep(0.05)
    return value


def pixels_of(data_url: str) -> np.ndarray:
    return decode_image(base64.b64decode(data_url.split(",", 1)[1]))


def test_playground_develops_an_image_that_equals_the_apis(browser, app_url, shots):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(f"{app_url}/")
    # Auth is on: the page asks for the key (and says so next to the field) before anything else.
    wait(browser, "return !document.getElementById('key-field').hidden", what="the API-key field")
    key = browser.find_element(By.ID, "api-key")
    key.send_keys(KEY, Keys.TAB)
    wait(browser, "return !document.getElementById('generate').disabled", what="the model to load")
    assert "tiny" in browser.find_element(By.ID, "model").text
    labels = [b.text for b in browser.find_elements(By.CSS_SELECTOR, "#aspects button")]
    assert labels == ["1:1", "4:3", "3:4", "16:9", "9:16"]
    browser.find_element(By.CSS_SELECTOR, "#aspects button[title='72x56']").click()  # 4:3 of 64x64, snapped to 8
    assert browser.find_element(By.ID, "size-label").text == "72x56"
    browser.find_element(By.ID, "prompt").send_keys("a lighthouse on a cliff at dusk")
    browser.find_element(By.ID, "num_inference_steps").send_keys("12")
    assert [o.text for o in browser.find_elements(By.CSS_SELECTOR, "#scheduler option")][:2] == ["model's own", "ddim"]
    browser.find_element(By.ID, "generate").click()

    # Watch it develop: sample the progress bar and the preview until the result is in the gallery.
    progress, previews, shot = set(), set(), False
    deadline = time.monotonic() + 120
    while not browser.find_elements(By.CSS_SELECTOR, "#gallery .card"):
        assert time.monotonic() < deadline, "no result within 120 s"
        value, src = browser.execute_script(
            "const p = document.getElementById('progress');"
            "const img = document.querySelector('#previews img.partial');"
            "return [p.value / p.max, img ? img.src : null];"
        )
        progress.add(round(value, 3))
        if src:
            previews.add(src)
            if not shot and len(previews) >= 2:
                browser.save_screenshot(str(shots / "playground-developing.png"))
                shot = True
        time.sleep(0.03)
    assert len({v for v in progress if 0 < v < 1}) >= 3, progress  # the bar moved, step by step
    assert len(previews) >= 2, "the preview changed while it developed"
    browser.save_screenshot(str(shots / "playground.png"))

    card = browser.find_element(By.CSS_SELECTOR, "#gallery .card")
    body = json.loads(card.get_attribute("data-body"))
    assert body["seed"] >= 0 and body["size"] == "72x56" and body["num_inference_steps"] == 12
    shown = pixels_of(card.find_element(By.TAG_NAME, "img").get_attribute("src"))
    api = httpx.post(
        f"{app_url}/v1/images/generations",
        json={**body, "response_format": "b64_json"},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=120,
    )
    assert api.status_code == 200, api.text
    same = decode_image(base64.b64decode(api.json()["data"][0]["b64_json"]))
    assert shown.shape == (56, 72, 3) and max_level_diff(shown, same) <= 3

    # Copy as curl names the seed; Reproduce makes the same image again with one click.
    card.find_element(By.CSS_SELECTOR, "button[data-action='copy-curl']").click()
    snippet = card.find_element(By.TAG_NAME, "pre").text
    assert snippet.startswith("curl -s ") and f'"seed":{body["seed"]}' in snippet and "$DARKROOM_API_KEY" in snippet
    card.find_element(By.CSS_SELECTOR, "button[data-action='reproduce']").click()
    wait(browser, "return document.querySelectorAll('#gallery .card').length === 2", 120, "the reproduction")
    again = browser.find_element(By.CSS_SELECTOR, "#gallery .card")
    assert json.loads(again.get_attribute("data-body")) == body
    assert max_level_diff(pixels_of(again.find_element(By.TAG_NAME, "img").get_attribute("src")), shown) == 0


def test_playground_shows_the_servers_message_next_to_the_field(browser, app_url):
    from selenium.webdriver.common.by import By

    steps = browser.find_element(By.ID, "num_inference_steps")
    steps.clear()
    steps.send_keys("500")
    wait(browser, "return !document.getElementById('generate').disabled", what="the form to be free")
    browser.find_element(By.ID, "generate").click()
    message = wait(
        browser,
        "return document.querySelector('[data-param=\"num_inference_steps\"] .field-error').textContent",
        what="the error next to Steps",
    )
    assert "at most 50" in message
    assert "invalid" in browser.find_element(By.CSS_SELECTOR, "[data-param='num_inference_steps']").get_attribute(
        "class"
    )


def test_the_page_is_served_under_a_route_prefix_and_without_a_key(app_url):
    page = httpx.get(f"{app_url}/", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'src="/playground/playground.js"' in page.text  # the app's root: nothing in front of it
    assert httpx.get(f"{app_url}/playground/playground.js", timeout=30).status_code == 200
    assert httpx.get(f"{app_url}/v1/models", timeout=30).status_code == 401  # the API still needs the key
