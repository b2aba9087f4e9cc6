"""The annotation page in a real browser: headless Chromium driven by Selenium, a real server.

One annotator labels items with the mouse and the keyboard, reloads, goes back and changes an
answer, sees a hostile answer as text (its script never runs), survives two server restarts
(one with a reload, one without) and finishes; a second annotator on the same browser gets their own order. The output file is
checked against what the page showed. Set LIMA_ANNOTATE_SCREENSHOT=FILE.png to keep a
screenshot of the page.
"""

import json
import os

import pytest

import annotation_study
from lima_jax.annotate import assignment

pytestmark = pytest.mark.slow

SEED = 0
N = 5


@pytest.fixture(scope="module")
def browser():
  binary, driver = annotation_study.browser_paths()
  if binary is None or driver is None:
    pytest.skip("no Chromium or chromedriver on PATH (Debian: apt-get install chromium chromium-driver)")
  pytest.importorskip("selenium")
  chrome = annotation_study.chrome()
  yield chrome
  chrome.quit()


class Page:
  """What an annotator sees and does, through the DOM."""

  def __init__(self, driver):
    from selenium.webdriver.support import ui  # pylint: disable=g-import-not-at-top
    self.driver = driver
    self.wait = ui.WebDriverWait(driver, 20, poll_frequency=0.05)

  def element(self, element_id):
    from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
    return self.driver.find_element(By.ID, element_id)

  def visible(self, element_id):
    return self.element(element_id).is_displayed()

  def text(self, element_id):
    return self.element(element_id).text

  def sign_in(self, name):
    self.wait.until(lambda d: self.visible("login"))
    self.element("name-input").send_keys(name + "\n")

  def idle(self):
    """An item on screen and no choice being saved."""
    return self.visible("task") and self.driver.execute_script("return !document.querySelector('.choice:disabled')")

  def current(self):
    """(prompt, left, right) on screen now."""
    return self.prompt(), self.element("answer-left").text, self.element("answer-right").text

  def item(self):
    """(prompt, left, right) of the item on screen, once it is there and the page is idle."""
    self.wait.until(lambda d: self.idle())
    return self.current()

  def prompt(self):
    return self.driver.execute_script(
        "const t = document.querySelectorAll('#conversation .turn .text'); return t[t.length - 1].textContent")

  def next_after(self, previous, action):
    """Does `action` and waits for another item (or the end) than `previous`."""
    action()
    self.wait.until(lambda d: self.visible("done") or (self.idle() and self.current() != previous))

  def key(self, keys):
    from selenium.webdriver.common.action_chains import ActionChains  # pylint: disable=g-import-not-at-top
    ActionChains(self.driver).send_keys(keys).perform()

  def click(self, choice):
    from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
    self.driver.find_element(By.CSS_SELECTOR, f'.choice[data-choice="{choice}"]').click()


def prompt_of(item_id):
  conversation = annotation_study.conversations(N)[int(item_id[1:])]
  return conversation[-1]


def read_output(path):
  return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_annotate_in_the_browser(tmp_path, browser):
  from selenium.webdriver.common.keys import Keys  # pylint: disable=g-import-not-at-top
  ids = [f"p{i}" for i in range(N)]
  alice_order, bob_order = assignment.order(ids, "alice", SEED), assignment.order(ids, "bob", SEED)
  assert alice_order != bob_order and "p1" in alice_order  # p1 is the multi-turn conversation.
  hostile = alice_order[1]
  a, b = annotation_study.write_study(tmp_path, N, hostile_id=hostile)
  output = str(tmp_path / "J.jsonl")
  args = ("--a", a, "--b", b, "--output", output, "--overlap", "2", "--seed", str(SEED))
  server = annotation_study.AnnotateServer(*args)
  page = Page(browser)
  try:
    browser.get(server.url)
    title = browser.title
    page.sign_in("alice")
    shown = {}  # prompt -> (left system, right system), as the page showed them.

    def record():
      prompt, left, right = page.item()
      shown[prompt] = (annotation_study.system_of(left), annotation_study.system_of(right))
      turns = browser.execute_script(
          "return [...document.querySelectorAll('#conversation .turn')].map(t => t.innerText)")
      conversation = next(c for c in annotation_study.conversations(N) if c[-1] == prompt)
      assert [t.split("\n", 1) for t in turns] == [[role, text] for role, text in
                                                   zip(["User", "Assistant"] * 2, conversation)]
      return prompt, left, right

    first = record()
    assert first[0] == prompt_of(alice_order[0]) and page.text("progress-text") == f"1 of {N}"
    page.next_after(first, lambda: page.click("left"))  # Mouse.
    second = record()
    assert second[0] == prompt_of(hostile)
    # The hostile answer is shown as text: no element made from it, no script run.
    assert annotation_study.HOSTILE in second[1] and annotation_study.HOSTILE in second[2]
    assert not browser.find_elements("css selector", ".answer script, .answer img, .answer b")
    assert browser.execute_script("return window.pwned") is None and browser.title == title
    page.next_after(second, lambda: page.key("b"))  # Keyboard: B is significantly better.
    third = record()
    assert third[0] == prompt_of(alice_order[2]) and page.text("progress-text") == f"3 of {N}"
    page.next_after(third, lambda: page.key(Keys.ARROW_LEFT))
    fourth = record()

    browser.refresh()  # The name is remembered, the same item comes back.
    assert page.item() == fourth and page.text("who-name") == "alice"

    page.key(Keys.BACKSPACE)  # Back to the last answer (third, "A" by the left arrow): change it.
    page.wait.until(lambda d: page.visible("review-banner") and page.prompt() == third[0])
    chosen = browser.find_elements("css selector", ".choice.chosen")
    assert [c.get_attribute("data-choice") for c in chosen] == ["left"]
    page.next_after(third, lambda: page.key("n"))
    assert page.item() == fourth and not page.visible("review-banner")

    server.stop()  # A restart on the same port: the page picks up where it was.
    server = annotation_study.AnnotateServer(*args, port=server.port)
    browser.refresh()
    assert page.item() == fourth
    page.next_after(fourth, lambda: page.key("3"))
    fifth = record()
    if os.environ.get("LIMA_ANNOTATE_SCREENSHOT"):
      browser.save_screenshot(os.environ["LIMA_ANNOTATE_SCREENSHOT"])
    server.stop()  # Another restart, the page left open on its item: the next click still saves.
    server = annotation_study.AnnotateServer(*args, port=server.port)
    page.next_after(fifth, lambda: page.click("neither"))
    page.wait.until(lambda d: page.visible("done"))

    lines = {r["id"]: r for r in read_output(output)}
    choices = {alice_order[0]: "left", hostile: "right", alice_order[2]: "neither", alice_order[3]: "right",
               alice_order[4]: "neither"}
    for item_id, choice in choices.items():
      line = lines[item_id]
      sides = shown[prompt_of(item_id)]
      assert (line["annotator"], line["choice"], tuple(line["shown"])) == ("alice", choice, sides)
      assert line["winner"] == {"left": sides[0], "right": sides[1], "neither": "tie"}[choice]
      assert line["seconds"] >= 0
    assert lines[alice_order[2]]["revision"] == 2

    page.element("switch").click()  # Another annotator on this browser: their own order.
    page.sign_in("bob")
    assert page.item()[0] == prompt_of(bob_order[0]) and page.text("progress-text") == f"1 of {N}"
  finally:
    server.stop()


def test_the_page_asks_for_the_access_token(tmp_path, browser):
  a, b = annotation_study.write_study(tmp_path, 2)
  server = annotation_study.AnnotateServer("--a", a, "--b", b, "--output", str(tmp_path / "J.jsonl"),
                                           env={"LIMA_ANNOTATE_TOKEN": "open-sesame"})
  page = Page(browser)
  try:
    browser.get(server.url)
    browser.execute_script("localStorage.clear()")
    browser.refresh()
    page.wait.until(lambda d: page.visible("token-form"))
    page.element("token-input").send_keys("wrong\n")  # Stored, refused (401), forgotten again.
    page.wait.until(lambda d: d.execute_script("return localStorage.getItem('lima-annotate-token')") is None)
    assert page.visible("token-form") and not page.visible("login")
    browser.get(server.url + "?token=open-sesame")  # The link lima-annotate prints.
    page.sign_in("carol")
    page.item()
    assert "token" not in browser.current_url
  finally:
    server.stop()
