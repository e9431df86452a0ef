"""The page at `/` in a real headless browser (the system's chromium through chromedriver and selenium; nothing
is downloaded): it shows the server's limits, submits a toy prompt, shows live progress, plays the video, and
lists it among the recent videos. Skipped, with the reason, where the browser or its driver is missing (CI
installs Debian's chromium and chromium-driver: .ci/run).
"""
from __future__ import annotations

import shutil
import time

import pytest
from serve_support import ThreadedServer, toy_config

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="no system chromium + chromedriver (Debian: "
                                "apt-get install chromium chromium-driver)")
PROMPT = "a cyan triangle moving left"
STEPS = 60  # long enough (a few seconds) for the page to show steps in between


@pytest.fixture
def browser(tmp_path, monkeypatch):
    monkeypatch.setenv("SE_OFFLINE", "true")  # selenium's manager must not look for a browser online
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
                "--autoplay-policy=no-user-gesture-required", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def until(condition, timeout: float = 60.0, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(every)


def test_the_page_submits_shows_progress_and_plays_the_video(browser, tmp_path):
    server = ThreadedServer(toy_config(tmp_path / "results", max_steps=STEPS))
    try:
        browser.get(f"{server.url}/")
        text = lambda element_id: browser.find_element("id", element_id).text  # noqa: E731
        assert until(lambda: "toy pair" in text("limits")), text("limits")
        assert "32x32" in text("limits") and f"at most {STEPS}" in text("limits")
        browser.find_element("id", "prompt").send_keys(PROMPT)
        browser.find_element("id", "steps").send_keys(str(STEPS))
        browser.find_element("id", "submit").click()
        seen = set()

        def progress_until_done() -> bool:
            seen.add(int(browser.find_element("id", "progress").get_attribute("value")))
            return text("status").startswith(("completed", "failed", "cancelled")) or "error" in \
                browser.find_element("id", "status").get_attribute("class")

        assert until(progress_until_done, timeout=120), text("status")
        assert text("status").startswith("completed"), text("status")
        assert any(0 < v < 100 for v in seen), f"no progress shown between 0 and 100: {sorted(seen)}"
        playing = lambda: browser.execute_script(  # noqa: E731
            "const v = document.getElementById('result');"
            "return !v.hidden && v.readyState >= 2 && v.currentTime > 0 && [v.videoWidth, v.videoHeight];")
        assert until(playing, timeout=30) == [32, 32], browser.execute_script(
            "const v = document.getElementById('result'); return [v.readyState, v.error && v.error.message, v.src];")
        assert until(lambda: PROMPT in text("recent")), text("recent")
        listed = server.client.get("/v1/videos").json()["data"]
        assert listed[0]["prompt"] == PROMPT and listed[0]["steps"] == STEPS and listed[0]["status"] == "completed"
    finally:
        server.stop()


def test_the_page_shows_a_refusal_in_one_line(browser, tmp_path):
    server = ThreadedServer(toy_config(tmp_path / "results"))
    try:
        browser.get(f"{server.url}/")
        until(lambda: "toy pair" in browser.find_element("id", "limits").text)
        browser.find_element("id", "prompt").send_keys("a purple cat jumping")
        browser.find_element("id", "submit").click()
        status = browser.find_element("id", "status")
        assert until(lambda: "unknown word" in status.text), status.text
        assert status.get_attribute("class") == "error" and "purple, cat" in status.text
    finally:
        server.stop()


def test_with_an_api_key_the_page_asks_for_it_and_then_works(browser, tmp_path):
    server = ThreadedServer(toy_config(tmp_path / "results", api_key="page-key-0001"))
    try:
        browser.get(f"{server.url}/")  # the page itself needs no key
        status = browser.find_element("id", "status")
        assert until(lambda: "no API key" in status.text), status.text
        browser.find_element("id", "key").send_keys("page-key-0001")
        browser.find_element("id", "prompt").click()  # leaving the field fires its change event
        assert until(lambda: "toy pair" in browser.find_element("id", "limits").text)
        assert status.text == ""
    finally:
        server.stop()
