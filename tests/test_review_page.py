"""The review page (`/`) and the API docs (`/docs`, `/redoc`) in a real headless browser:
Debian's chromium driven by Selenium through Debian's chromedriver, against a real server
process (default model, temporary STATE_DIR). The browser has no way out: every request that
is not to loopback goes to a dead proxy, and each test checks that every resource the page
loaded came from the server. Screenshots of each step go to docs/review-*.png."""

import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from testkit.live import ROOT, Server

pytestmark = [pytest.mark.browser, pytest.mark.server]

TOKEN = "review-page-token"
SHOTS = ROOT / "docs"
WAIT = 60  # seconds; two cores shared with whatever else runs


def need(path):
    if shutil.which(path) is None:
        pytest.fail(f"{path} is missing: install Debian's chromium and chromium-driver (`make data`, .ci/run)")
    return path


@pytest.fixture(scope="module")
def browser():
    options = Options()
    options.binary_location = need("/usr/bin/chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1500", "--force-device-scale-factor=1", "--lang=en-US",
                # no network: anything but loopback (which Chrome never proxies) goes nowhere
                "--proxy-server=http://127.0.0.1:9"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(need("/usr/bin/chromedriver")))
    # every document records what its Content-Security-Policy stopped before it left the browser
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": (
        "window.__blocked = [];"
        "document.addEventListener('securitypolicyviolation', e => window.__blocked.push(e.blockedURI));")})
    yield driver
    driver.quit()


@pytest.fixture
def server(tmp_path):
    """A server of its own, for a test that teaches (it expects feedback #1)."""
    s = Server(tmp_path, TOKEN).start()
    yield s
    if s.alive():
        s.kill(signal.SIGTERM)


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory):
    """One server for the tests that store nothing on it (they read pages, or are refused):
    what one of them does cannot change what another sees."""
    s = Server(tmp_path_factory.mktemp("review"), TOKEN).start()
    yield s
    if s.alive():
        s.kill(signal.SIGTERM)


def until(driver, condition, what):
    try:
        return WebDriverWait(driver, WAIT, poll_frequency=0.1).until(lambda d: condition(d))
    except TimeoutException:
        picture = Path(tempfile.gettempdir()) / f"review-failure-{time.time_ns()}.png"
        driver.save_screenshot(str(picture))
        raise AssertionError(f"timed out waiting for {what} (screenshot {picture}); page text:\n"
                             + driver.find_element(By.TAG_NAME, "body").text)


def shot(driver, name):
    SHOTS.mkdir(exist_ok=True)
    driver.save_screenshot(str(SHOTS / f"review-{name}.png"))


def text(driver, css, root=None):
    return (root or driver).find_element(By.CSS_SELECTOR, css).text


def open_page(driver, s, token=TOKEN):
    driver.get(s.url + "/")
    driver.execute_script("sessionStorage.clear()")
    driver.get(s.url + "/")
    until(driver, lambda d: "Model: fashion-mnist" in text(d, "#model-info"), "the model name")
    if token:
        driver.find_element(By.ID, "token").send_keys(token + Keys.ENTER)  # submits the token form by keyboard
        until(driver, lambda d: "Token set" in text(d, "#token-state"), "the token to be taken")


def upload(driver, path):
    driver.find_element(By.ID, "files").send_keys(str(path))
    return until(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#results li.card"), "a result card")[0]


def answer(driver, card):
    """(label, path badge) once the card shows an answer."""
    until(driver, lambda d: card.find_element(By.CSS_SELECTOR, ".label").text, "an answer")
    return text(driver, ".label", card), text(driver, ".path", card)


def only_local_resources(driver, s):
    """Every resource the page asked for came from the server, or was stopped by its policy."""
    urls = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    blocked = driver.execute_script("return window.__blocked")
    remote = [u for u in urls if not (u.startswith(s.url) or u.startswith("blob:" + s.url))]
    assert urls and all(any(b and u.startswith(b) for b in blocked) for u in remote), (remote, blocked)


def image_file(tmp_path, images, i):
    path = tmp_path / f"fashion-{i}.png"
    path.write_bytes(images[i][0])
    return path


def teach_new_class(driver, card, name):
    field = card.find_element(By.CSS_SELECTOR, ".correct input")
    field.send_keys(name + Keys.ENTER)  # the correction form, submitted by keyboard
    until(driver, lambda d: text(d, ".label", card) == name and text(d, ".path", card) == "from memory",
          f"the answer {name!r} from memory")


def test_an_image_gets_its_answer_and_a_new_class_name_teaches_it(browser, server, tmp_path, images):
    open_page(browser, server)
    card = upload(browser, image_file(tmp_path, images, 0))
    label, path = answer(browser, card)
    assert label == images[0][1]  # the model is right about this one
    assert path in ("from memory", "from the network")
    assert "confident" in text(browser, ".confidence", card)
    tops = card.find_elements(By.CSS_SELECTOR, ".top li")
    assert len(tops) == 5 and label in tops[0].text
    assert "similarity" in text(browser, ".nearest-text", card)
    until(browser, lambda d: "1 of 1" in text(d, "#share-tab") or "0 of 1" in text(d, "#share-tab"),
          "this tab's share")
    assert "predictions_total" in text(browser, "#share-server")
    assert text(browser, "#mem-capacity") == "10,000"
    shot(browser, "1-answer")

    teach_new_class(browser, card, "Umbrella")
    assert "a new class" in text(browser, ".card-msg", card)
    assert "taught by feedback #1" in text(browser, ".nearest-text", card)
    assert text(browser, ".confidence", card) == "100.0% confident"
    until(browser, lambda d: "Umbrella" in text(d, "#per-class"), "the new class in the memory table")
    options = browser.execute_script("return [...document.querySelectorAll('#class-names option')].map(o => o.value)")
    assert "Umbrella" in options  # offered when correcting the next answer
    shot(browser, "2-taught")
    only_local_resources(browser, server)


def test_forgetting_the_feedback_reverts_the_answer(browser, server, tmp_path, images):
    """Needs the feedback store: GET /feedback, GET /feedback/{id}/image, DELETE /feedback/{id}."""
    open_page(browser, server)
    card = upload(browser, image_file(tmp_path, images, 1))
    before, _ = answer(browser, card)
    teach_new_class(browser, card, "Umbrella")
    # the nearest stored item is the taught picture, fetched with the token
    until(browser, lambda d: card.find_element(By.CSS_SELECTOR, ".nearest-img").is_displayed(),
          "the nearest item's picture")
    item = until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#feedback-list li.fb"),
                 "the feedback list")[0]
    assert "Umbrella" in item.text and "#1" in item.text
    until(browser, lambda d: item.find_element(By.CSS_SELECTOR, "img").get_property("naturalWidth") > 0,
          "the feedback picture")
    item.find_element(By.CSS_SELECTOR, "button.forget").click()
    until(browser, lambda d: "Forgot feedback #1" in text(d, "#feedback-msg"), "the forget confirmation")
    until(browser, lambda d: text(d, ".label", card) == before, f"the answer to revert to {before!r}")
    assert "forgotten" in item.text
    shot(browser, "3-forgotten")
    only_local_resources(browser, server)


def test_a_text_file_is_refused_in_words(browser, shared_server, tmp_path):
    open_page(browser, shared_server)
    notes = tmp_path / "notes.txt"
    notes.write_text("this is not an image\n")
    card = upload(browser, notes)
    error = until(browser, lambda d: text(d, ".card-error", card), "the refusal")
    assert error == "Refused: the file is not an image Pillow can read (HTTP 422, not_an_image)"
    assert "notes.txt" in text(browser, "#status")  # announced in the live region
    shot(browser, "4-refused")


def test_a_wrong_token_is_reported_in_words(browser, shared_server, tmp_path, images):
    open_page(browser, shared_server, token="not-the-token")
    msg = until(browser, lambda d: text(d, "#feedback-msg"), "the feedback list message")
    assert msg.startswith("Feedback list unavailable: ") and "{" not in msg
    card = upload(browser, image_file(tmp_path, images, 2))
    answer(browser, card)
    card.find_element(By.CSS_SELECTOR, ".correct input").send_keys("Bag" + Keys.ENTER)
    error = until(browser, lambda d: text(d, ".card-error", card), "the refusal")
    assert error == "Token refused: the bearer token is not valid (HTTP 403, invalid_token)"


def test_controls_are_labelled_and_focus_is_visible(browser, shared_server):
    open_page(browser, shared_server, token=None)
    unnamed = browser.execute_script("""
        const named = (e) => (e.labels && e.labels.length) || e.getAttribute('aria-label')
                             || e.getAttribute('aria-labelledby') || e.textContent.trim();
        return [...document.querySelectorAll('input, button, select, textarea, progress')]
            .filter(e => !e.closest('template') && !named(e)).map(e => e.outerHTML);""")
    assert unnamed == []
    assert browser.find_element(By.ID, "status").get_attribute("aria-live") == "polite"
    assert browser.find_element(By.ID, "files").get_attribute("type") == "file"  # the keyboard path to upload
    # Tab reaches the file input, and the focused control is outlined
    body = browser.find_element(By.TAG_NAME, "body")
    for _ in range(15):
        body.send_keys(Keys.TAB) if browser.switch_to.active_element == body else \
            browser.switch_to.active_element.send_keys(Keys.TAB)
        if browser.switch_to.active_element.get_attribute("id") == "files":
            break
    focused = browser.switch_to.active_element
    assert focused.get_attribute("id") == "files"
    assert focused.value_of_css_property("outline-style") == "solid"


def test_docs_and_redoc_render_from_the_server_alone(browser, shared_server):
    browser.get(shared_server.url + "/docs")
    paths = until(browser, lambda d: [e.text for e in d.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")],
                  "Swagger UI's operations")
    assert {"/predict", "/feedback", "/memory", "/v2/models/{model_name}/infer"} <= {p.replace("\u200b", "")
                                                                                     for p in paths}
    only_local_resources(browser, shared_server)
    shot(browser, "5-docs")
    browser.get(shared_server.url + "/redoc")
    until(browser, lambda d: "/predict" in d.find_element(By.TAG_NAME, "body").text, "ReDoc's operations")
    only_local_resources(browser, shared_server)


def test_the_page_loads_nothing_but_its_own_files(browser, shared_server):
    open_page(browser, shared_server, token=None)
    time.sleep(0.5)  # the memory and metrics requests of the first render
    only_local_resources(browser, shared_server)
    names = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert any(n.endswith("/static/app.js") for n in names) and any(n.endswith("/static/style.css") for n in names)


def test_the_review_queue_lists_unsure_images_newest_first_and_one_key_teaches_or_dismisses(browser, tmp_path,
                                                                                          images):
    """REVIEW_QUEUE=on with an ood threshold every answer is over (the score is standardised: it can be
    negative): each image joins the queue."""
    import httpx

    s = Server(tmp_path / "state", TOKEN, REVIEW_QUEUE="on", OOD_THRESHOLD="-1e9").start()
    try:
        open_page(browser, s)
        until(browser, lambda d: text(d, "#queue-msg") == "Nothing to review.", "the empty queue")
        guesses = []
        for i in (3, 4):
            upload(browser, image_file(tmp_path, images, i))
            card = browser.find_elements(By.CSS_SELECTOR, "#results li.card")[0]  # the newest card
            guesses.append(answer(browser, card)[0])
        items = until(browser, lambda d: (lambda q: q if len(q) == 2 else None)(
            d.find_elements(By.CSS_SELECTOR, "#queue-list li.qi")), "two images in the review queue")
        assert [text(browser, ".qi-guess", li) for li in items] == guesses[::-1]  # newest first
        assert all("none of these?" in li.text for li in items)
        until(browser, lambda d: all(li.find_element(By.CSS_SELECTOR, ".qi-img").get_property("naturalWidth") > 0
                                     for li in items), "the queued pictures, fetched with the token")
        shot(browser, "6-queue")

        items[0].send_keys("a")  # one key on the focused item: teach its best guess
        until(browser, lambda d: text(d, "#queue-msg").startswith(f'Taught "{guesses[1]}"'), "the taught item")
        remaining = browser.find_elements(By.CSS_SELECTOR, "#queue-list li.qi")
        assert len(remaining) == 1 and browser.switch_to.active_element == remaining[0]  # focus moved on
        until(browser, lambda d: guesses[1] in text(d, "#feedback-list") and "#1" in text(d, "#feedback-list"),
              "the new feedback in the list")

        browser.switch_to.active_element.send_keys("d")  # and one key dismisses
        until(browser, lambda d: text(d, "#queue-msg").startswith("Dismissed review image"), "the dismissal")
        assert browser.find_elements(By.CSS_SELECTOR, "#queue-list li.qi") == []

        assert httpx.get(s.url + "/review", headers=s.auth).json()["items"] == []
        taught = httpx.get(s.url + "/feedback", headers=s.auth).json()["items"]
        assert [e["label"] for e in taught] == [guesses[1]]
        only_local_resources(browser, s)
    finally:
        if s.alive():
            s.kill(signal.SIGTERM)


def test_the_review_queue_says_when_it_is_off(browser, shared_server):
    open_page(browser, shared_server)
    until(browser, lambda d: "The review queue is off on this server" in text(d, "#queue-msg"), "the off notice")
