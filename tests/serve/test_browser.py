"""The chat page (src/vlmkit/serve/static/index.html) in a real headless Chromium against the real server.

A person's path end to end: the page loads from `GET /`, names the model, takes an image through its file
input, streams the answer, and the streamed text equals the greedy ``Pipeline.chat`` answer exactly. The page
fetches nothing from another origin, a wrong API key is shown as an error, and the key is remembered.

Needs Chromium and its driver (Debian: ``apt-get install chromium chromium-driver``); skipped, saying so,
without them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import threading
import time

import pytest


def _find(name: str, debian_path: str) -> str | None:
    return debian_path if os.path.exists(debian_path) else shutil.which(name)


CHROMIUM = _find("chromium", "/usr/bin/chromium")
CHROMEDRIVER = _find("chromedriver", "/usr/bin/chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip("the browser test needs Chromium and chromedriver (Debian: apt-get install chromium "
                f"chromium-driver); found chromium={CHROMIUM}, chromedriver={CHROMEDRIVER}",
                allow_module_level=True)

import uvicorn  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

import vlmkit  # noqa: E402
from vlmkit.serve.api import create_app  # noqa: E402
from vlmkit.serve.engine import Engine  # noqa: E402

API_KEY = "test-key-123"
QUESTION = "What shape is in the image?"
MAX_TOKENS = 12
WAIT = 60  # seconds for anything the page does


@pytest.fixture(scope="module")
def checkpoint(llava_checkpoint, image_path):
    """(the API tests' tiny-llava, trained 1 + 1 steps: it answers with a dozen tokens of byte-level junk, split
    UTF-8 sequences and control characters, which every layer between the engine's incremental decoding and the
    DOM must carry exactly; a ShapesWorld PNG)."""
    return llava_checkpoint, image_path


@pytest.fixture(scope="module")
def server(checkpoint):
    """The real server (Engine + create_app, with an API key) under uvicorn in a thread: (URL, engine)."""
    engine = Engine(vlmkit.load(checkpoint[0])).start()
    with uvicorn_serving(create_app(engine, api_key=API_KEY)) as url:
        yield url, engine
    engine.stop()


@contextlib.contextmanager
def uvicorn_serving(app):
    """``app`` under uvicorn in a thread on a free port of 127.0.0.1: its URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        srv.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="module")
def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,800"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver, condition, what: str):
    return WebDriverWait(driver, WAIT).until(lambda d: condition(d), message=f"waited {WAIT} s for {what}")


def css(driver, selector: str):
    return driver.find_elements(By.CSS_SELECTOR, selector)


def set_field(driver, element_id: str, value: str) -> None:
    """Type into a settings field and leave it, as a person does (the page saves on change)."""
    if not driver.find_element(By.ID, element_id).is_displayed():
        driver.find_element(By.ID, "settings-toggle").click()
    field = driver.find_element(By.ID, element_id)
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.DELETE)
    field.send_keys(value, Keys.TAB)


def open_page(driver, base: str) -> None:
    driver.get(base + "/")
    wait(driver, lambda d: d.execute_script("return document.readyState") == "complete", "the page to load")
    # the page must be installed with the package (package data), else GET / answers a JSON 404
    assert css(driver, "#messages"), f"GET / is not the chat page: {driver.page_source[:300]}"


def test_page_streams_the_greedy_answer_exactly(server, browser, checkpoint):
    base, engine = server
    ckpt, image = checkpoint
    expected = vlmkit.load(ckpt).chat(str(image), QUESTION, max_new_tokens=MAX_TOKENS)
    assert expected.strip(), "the tiny model answers nothing: the comparison would prove little"

    open_page(browser, base)
    assert browser.title == "vlmkit chat"
    set_field(browser, "api-key", API_KEY)
    set_field(browser, "max-tokens", str(MAX_TOKENS))
    set_field(browser, "temperature", "0")
    # the model's name in the header, fetched with the key once it is typed
    wait(browser, lambda d: d.find_element(By.ID, "model").text == engine.model_name, "the model's name")

    browser.find_element(By.ID, "image-input").send_keys(str(image))
    wait(browser, lambda d: d.find_element(By.ID, "preview").is_displayed(), "the image preview")
    browser.find_element(By.ID, "prompt").send_keys(QUESTION)
    browser.find_element(By.ID, "send").click()
    wait(browser, lambda d: css(d, '.assistant[data-done="true"]'), "the end of the streamed answer")

    assert not css(browser, ".error"), [e.text for e in css(browser, ".error")]
    (answer,) = css(browser, ".assistant")
    # textContent, not Selenium's .text (which trims and folds whitespace): exact characters
    shown = browser.execute_script("return arguments[0].querySelector('.text').textContent", answer)
    assert shown == expected
    assert answer.get_attribute("data-finish") in ("stop", "length")
    # the user's turn shows its question and the image it sent
    (user,) = css(browser, ".user")
    assert QUESTION in user.text
    thumbnail = user.find_element(By.TAG_NAME, "img")
    assert thumbnail.get_attribute("src").startswith("data:image/png;base64,")
    assert browser.execute_script("return arguments[0].naturalWidth", thumbnail) == 32
    # ready for the next turn: prompt and preview cleared, Send back
    assert browser.find_element(By.ID, "prompt").get_attribute("value") == ""
    assert not browser.find_element(By.ID, "preview").is_displayed()
    assert browser.find_element(By.ID, "send").is_displayed()

    # everything the page loaded came from the server itself: no CDN, font or analytics URL
    resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert any(r.startswith(base + "/v1/chat/completions") for r in resources), resources
    foreign = [r for r in resources if not r.startswith(base + "/") and not r.startswith(("data:", "blob:"))]
    assert not foreign, foreign


def test_wrong_api_key_shows_an_error_and_the_key_is_remembered(server, browser):
    base, _ = server
    open_page(browser, base)
    set_field(browser, "api-key", "not-the-key")
    wait(browser, lambda d: d.find_element(By.ID, "model").text == "model unavailable",
         "the model lookup to fail")

    prompt = browser.find_element(By.ID, "prompt")
    prompt.send_keys("hello?", Keys.ENTER)  # Enter sends
    wait(browser, lambda d: css(d, ".error"), "an error message")
    (error,) = css(browser, ".error")
    assert error.is_displayed() and error.get_attribute("role") == "alert"
    assert "401" in error.text, error.text
    assert not css(browser, ".assistant"), "an empty assistant turn was left behind"
    # the turn that got no answer is marked, and its text is offered again
    assert "not-sent" in css(browser, ".user")[0].get_attribute("class")
    assert prompt.get_attribute("value") == "hello?"

    # the key survives a reload (local storage); the right key brings the model back
    open_page(browser, base)
    assert browser.find_element(By.ID, "api-key").get_attribute("value") == "not-the-key"
    set_field(browser, "api-key", API_KEY)
    wait(browser, lambda d: d.find_element(By.ID, "model").text != "model unavailable", "the model's name")


@pytest.fixture(scope="module")
def janus_server(janus_checkpoint):
    """A server over a model that reads and draws (an untrained tiny-janus), without an API key: URL."""
    engine = Engine(vlmkit.load(janus_checkpoint)).start()
    with uvicorn_serving(create_app(engine)) as url:
        yield url
    engine.stop()


def test_draw_shows_the_generated_images(janus_server, browser, server):
    open_page(browser, janus_server)
    set_field(browser, "api-key", "")  # the earlier tests left a key in local storage; this server needs none
    wait(browser, lambda d: d.find_element(By.ID, "draw").is_displayed(), "the Draw button of a model that draws")
    set_field(browser, "n-images", "3")
    browser.find_element(By.ID, "prompt").send_keys("a red circle")
    browser.find_element(By.ID, "draw").click()
    wait(browser, lambda d: css(d, '.drawing[data-done="true"]'), "the drawn images")
    assert not css(browser, ".error"), [e.text for e in css(browser, ".error")]
    images = css(browser, ".drawing img.generated")
    assert len(images) == 3
    for img in images:
        assert img.get_attribute("src").startswith("data:image/png;base64,")
        wait(browser, lambda d, i=img: d.execute_script("return arguments[0].complete", i), "an image to load")
        assert browser.execute_script("return arguments[0].naturalWidth", img) == 64
    assert "a red circle" in css(browser, ".user")[-1].text
    # a model that does not draw has no Draw button
    base, _ = server
    open_page(browser, base)
    set_field(browser, "api-key", API_KEY)
    wait(browser, lambda d: d.find_element(By.ID, "model").text not in ("loading model…", "model unavailable"),
         "the model's name")
    assert not browser.find_element(By.ID, "draw").is_displayed()
