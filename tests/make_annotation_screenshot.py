"""Regenerates docs/annotation.png, the annotation page as an annotator sees it.

Serves a three-item study (hand-written answers to prompts like the bundled test prompts) with
`lima-annotate`, opens it in headless Chromium (Debian's chromium + chromium-driver), signs in,
labels one item (with the keyboard) and takes the screenshot on the second, a multi-turn conversation:

    python tests/make_annotation_screenshot.py [--output docs/annotation.png]

It lives beside the tests for their study helpers (tests/annotation_study.py), which Python finds
in the script's own directory; pytest does not collect it.
"""

import argparse
import pathlib
import tempfile

from selenium.webdriver.common import action_chains
from selenium.webdriver.support import ui

import annotation_study
from lima_jax.annotate import assignment

ROOT = pathlib.Path(__file__).resolve().parent.parent

ANNOTATOR = "alice"
CONVERSATION = ["How do I iron a dress shirt?",
                "Set the iron to the fabric on the care label (cotton is usually the hottest setting) and "
                "iron the shirt while it is slightly damp: collar, cuffs, sleeves, then the body.",
                "And if I don't have an ironing board?"]
ANSWER_A = ("A table or the top of a chest of drawers works well. Protect it first:\n\n"
            "1. Fold a thick bath towel in half and lay it flat, with a cotton sheet or pillowcase on top "
            "so no towel lint gets onto the shirt.\n"
            "2. Work in the same order as on a board: collar, cuffs, sleeves, back, then the front panels. "
            "Lay each part flat on the towel instead of sliding the shirt over a board's narrow end.\n"
            "3. Keep the iron moving and lift it rather than pushing it around the buttons.\n\n"
            "Avoid glass or varnished tops, which heat can mark, and hang the shirt up as soon as you "
            "finish so it cools without new creases.")
ANSWER_B = ("You can iron on any flat surface such as a bed or the floor. Just put something under the shirt "
            "and iron it as you normally would. A travel steamer is another option if you do this often.")
OTHERS = [(["What is the difference between a process and a thread?"],
           "A process has its own memory; threads share the memory of the process they belong to.",
           "Threads are lighter than processes."),
          (["Why do we have leap years?"],
           "The Earth takes about 365.24 days to orbit the Sun, so a day is added almost every four years.",
           "To keep the calendar in line with the seasons.")]


def write_files(directory: pathlib.Path) -> tuple[str, str]:
  """A and B answer files whose multi-turn item is the annotator's second."""
  ids = ["q1", "q2", "q3"]
  order = assignment.order(ids, ANNOTATOR, seed=0)
  items = {order[1]: (CONVERSATION, ANSWER_A, ANSWER_B)}
  items.update(zip([order[0], order[2]], OTHERS))
  files = []
  for side, index in (("A", 1), ("B", 2)):
    lines = [{"id": pid, "conversation": items[pid][0], "response": items[pid][index], "generator": side}
             for pid in ids]
    files.append(annotation_study.write_jsonl(directory / f"{side}.jsonl", lines))
  return files[0], files[1]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--output", default=str(ROOT / "docs" / "annotation.png"))
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    a, b = write_files(pathlib.Path(tmp))
    server = annotation_study.AnnotateServer("--a", a, "--b", b, "--output", f"{tmp}/J.jsonl")
    browser = annotation_study.chrome(1400, 980)
    try:
      browser.get(server.url)
      page_js = "return document.getElementById('{}').offsetParent !== null"
      wait = ui.WebDriverWait(browser, 10)
      wait.until(lambda d: d.execute_script(page_js.format("login")))
      browser.find_element("id", "name-input").send_keys(ANNOTATOR + "\n")
      wait.until(lambda d: d.execute_script(page_js.format("task")))
      action_chains.ActionChains(browser).send_keys("a").perform()  # Keys leave no hover on a button.
      wait.until(lambda d: d.execute_script("return document.querySelectorAll('#conversation .turn').length") == 3)
      browser.save_screenshot(args.output)
    finally:
      browser.quit()
      server.stop()
  print(f"wrote {args.output}")


if __name__ == "__main__":
  main()
