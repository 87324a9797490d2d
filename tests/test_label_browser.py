"""The annotation page in headless Chromium (selenium): log in, label one item with the keyboard and one with the
mouse (a ranking), one more with a comment typed in, check the answers reached the database, export them, and
check a screenshot shows the two responses.

Needs Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver); CI installs them
(.ci/run), elsewhere the test skips."""

from __future__ import annotations

import io
import json
import re
import sqlite3
from pathlib import Path

import pytest

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    pytest.skip(f"headless browser test: {CHROMIUM} or {CHROMEDRIVER} is absent (apt-get install chromium "
                "chromium-driver)", allow_module_level=True)
pytest.importorskip("selenium", reason="selenium is not installed (the test extra has it)")
pytest.importorskip("fastapi", reason="the label extra (pip install 'forgeline[label]') is not installed")

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import (  # noqa: E402
    NoAlertPresentException,
    NoSuchElementException,
    StaleElementReferenceException,
)
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from forgeline.cli import main  # noqa: E402

from test_label_durability import LabelServer  # noqa: E402

pytestmark = pytest.mark.slow

GOOD = "Paris is the capital of France."
HOSTILE = "<script>alert(1)</script><b>not bold</b>"


@pytest.fixture()
def driver():
    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900",
                "--disable-gpu", "--disable-extensions"):
        options.add_argument(arg)
    browser = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    browser.set_page_load_timeout(60)
    try:
        yield browser
    finally:
        browser.quit()


def _wait_text(driver, css: str, text: str) -> None:
    # the page reloads after each answer: an element found just before the reload is gone just after
    WebDriverWait(driver, 30, ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)).until(
        lambda d: d.execute_script("return document.readyState") == "complete"  # its script has run
        and text in d.find_element(By.CSS_SELECTOR, css).text, f"{css} never showed {text!r}")


def _keys(driver, *keys) -> None:
    ActionChains(driver).send_keys(*keys).perform()


def test_label_in_a_real_browser(tmp_path, driver, capsys):
    candidates = tmp_path / "candidates.jsonl"
    candidates.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "What is the capital of France?",
         "responses": [{"model": "good", "text": GOOD}, {"model": "hostile", "text": HOSTILE}]},
        {"prompt": "Count.", "responses": [{"model": "x", "text": "one two"}, {"model": "y", "text": "three"},
                                           {"model": "z", "text": "four five six"}]},
        {"prompt": "Say hi.", "responses": [{"model": "good", "text": "hi"}, {"model": "hostile", "text": "bye"}]},
    ]) + "\n")
    db = tmp_path / "labels.db"
    assert main(["label", "create", str(db), "--name", "web", "--responses", str(candidates),
                 "--annotators", "alice"]) == 0
    token = re.search(r"^  alice\s+(\S+)$", capsys.readouterr().out, flags=re.M).group(1)

    with LabelServer(db, tmp_path / "server.log") as server:
        driver.get(server.url + "/")
        assert driver.current_url.endswith("/login")
        driver.find_element(By.ID, "token").send_keys(token)
        driver.find_element(By.ID, "login").click()
        _wait_text(driver, "#progress", "0 / 3 labelled")

        # item 1: both responses shown, the hostile one as text; chosen with the keyboard
        responses = [driver.find_element(By.ID, f"response-{label}") for label in "AB"]
        assert all(r.is_displayed() for r in responses)
        body_text = driver.find_element(By.TAG_NAME, "body").text
        assert GOOD in body_text and HOSTILE in body_text
        assert driver.find_elements(By.CSS_SELECTOR, ".response b") == []
        with pytest.raises(NoAlertPresentException):
            driver.switch_to.alert.text
        png = driver.get_screenshot_as_png()
        (tmp_path / "page.png").write_bytes(png)
        _check_screenshot(png)
        shown_first = driver.find_element(By.CSS_SELECTOR, "#response-A pre").text
        _keys(driver, "2")
        assert "selected" in driver.find_element(By.ID, "choose-B").get_attribute("class")
        _keys(driver, Keys.ENTER)
        _wait_text(driver, "#progress", "1 / 3 labelled")

        # item 2: three responses ranked with the mouse (C first, then A; B takes the last place by itself)
        assert driver.find_element(By.ID, "answer").get_attribute("data-mode") == "ranking"
        driver.find_element(By.CSS_SELECTOR, 'button.rank[data-label="C"]').click()
        driver.find_element(By.CSS_SELECTOR, 'button.rank[data-label="A"]').click()
        assert driver.find_element(By.ID, "ranking").text == "C > A > B"
        ranked_texts = [driver.find_element(By.CSS_SELECTOR, f"#response-{label} pre").text for label in "CAB"]
        driver.find_element(By.ID, "submit").click()
        _wait_text(driver, "#progress", "2 / 3 labelled")

        # item 3: keys typed into the comment stay text; Escape leaves the box, then "a" and Enter answer
        comment = driver.find_element(By.ID, "comment")
        comment.click()
        comment.send_keys("a tie? x marks it")
        assert not driver.find_elements(By.CSS_SELECTOR, "button.choice.selected")
        comment.send_keys(Keys.ESCAPE)
        _keys(driver, "a")
        preferred_text = driver.find_element(By.CSS_SELECTOR, "#response-A pre").text
        _keys(driver, Keys.ENTER)
        _wait_text(driver, "main", "All 3 items are labelled")

    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT a.item_id, a.kind, a.ranking, a.comment FROM answers a ORDER BY a.item_id"
                            ).fetchall()
        texts = {(item, slot): text for item, slot, text in conn.execute("SELECT item_id, slot, text FROM responses")}
    assert [(item, kind) for item, kind, _, _ in rows] == [(1, "preferred"), (2, "ranked"), (3, "preferred")]
    first, second, third = (json.loads(r[2]) for r in rows)
    assert texts[(1, first[1])] == shown_first  # B was chosen over A
    assert [texts[(2, slot)] for slot in second] == ranked_texts
    assert texts[(3, third[0])] == preferred_text and rows[2][3] == "a tie? x marks it"

    out = tmp_path / "prefs.jsonl"
    assert main(["label", "export", str(db), "--project", "web", "--out", str(out)]) == 0
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(pairs) == 1 + 3 + 1
    assert pairs[0]["rejected"] == shown_first and pairs[0]["prompt"] == "What is the capital of France?"


def _check_screenshot(png: bytes) -> None:
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    try:
        from PIL import Image
    except ImportError:  # without Pillow the header and size above are the check
        return
    image = Image.open(io.BytesIO(png)).convert("RGB")
    assert image.size[0] >= 800 and image.size[1] >= 600
    assert any(low != high for low, high in image.getextrema()), "the screenshot is a single colour"
    assert len(image.getcolors(maxcolors=1 << 16) or range(1 << 16)) > 16  # text, not a blank page
