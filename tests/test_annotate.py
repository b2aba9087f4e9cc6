"""lima-annotate without a browser: the answer files, the assignment, and the API over real HTTP.

The server runs in this process under uvicorn on 127.0.0.1 (a free port) and is called with
httpx; a restart is a new service opened on the same output file. The page itself is tested in
headless Chromium by tests/test_annotate_browser.py.
"""

import json
import re
import subprocess
import sys
import threading

import httpx
import pytest
import uvicorn

import annotation_study
from lima_jax import errors
from lima_jax.annotate import assignment
from lima_jax.annotate import server
from lima_jax.annotate import study as study_lib
from lima_jax.cli import compare


class RunningApp:
  """The app under uvicorn in a thread, for one test."""

  def __init__(self, service, token=None):
    config = uvicorn.Config(server.create_app(service, token), host="127.0.0.1", port=0, log_level="warning")
    self.server = uvicorn.Server(config)
    self.thread = threading.Thread(target=self.server.run, daemon=True)
    self.thread.start()
    while not self.server.started:
      self.thread.join(0.02)
      assert self.thread.is_alive(), "uvicorn did not start"
    port = self.server.servers[0].sockets[0].getsockname()[1]
    self.client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)

  def stop(self):
    self.client.close()
    self.server.should_exit = True
    self.thread.join(10)


@pytest.fixture
def running():
  apps = []

  def start(service, token=None):
    apps.append(RunningApp(service, token))
    return apps[-1].client

  yield start
  for app in apps:
    app.stop()


def label(client, annotator, payload, choice, seconds=1.5):
  response = client.post("/api/label", json={"annotator": annotator, "id": payload["item"]["id"],
                                             "choice": choice, "seconds": seconds})
  assert response.status_code == 200, response.text
  return response.json()


def read_output(path):
  return [json.loads(line) for line in open(path, encoding="utf-8")]


# -- The answer files ---------------------------------------------------------------------------


@pytest.mark.parametrize("edit,message", [
    (lambda a, b: b.pop(), "A.jsonl:6: id 'p5' is not in"),
    (lambda a, b: b.append(dict(b[0], id="new")), "B.jsonl:7: id 'new' is not in"),
    (lambda a, b: a.append(dict(a[0])), "A.jsonl:7: duplicate id 'p0' (first on line 1)"),
    (lambda a, b: b[2].update(conversation=["Another question"]), "B.jsonl:3: id 'p2' has another conversation"),
    (lambda a, b: a[3].pop("response"), "A.jsonl:4: no 'response' field"),
])
def test_answer_files_must_answer_the_same_prompts(tmp_path, edit, message):
  a, b = annotation_study.answer_lines("A", 6), annotation_study.answer_lines("B", 6)
  edit(a, b)
  with pytest.raises(errors.InputError, match=re.escape(message)):
    study_lib.load(annotation_study.write_jsonl(tmp_path / "A.jsonl", a),
                   annotation_study.write_jsonl(tmp_path / "B.jsonl", b))


@pytest.mark.parametrize("flags,message", [
    ([], "B.jsonl:7: invalid JSON"),
    (["--host", "0.0.0.0"], "--host 0.0.0.0: serving beyond this machine needs --token"),
    (["--output", "/no/such/dir/J.jsonl"], "--output /no/such/dir/J.jsonl: the directory does not exist"),
])
def test_command_line_errors_exit_2_in_one_line(tmp_path, flags, message):
  a, b = annotation_study.write_study(tmp_path)
  with open(b, "a") as f:
    f.write('{"id": "p9", "conversation": \n')
  proc = subprocess.run([sys.executable, str(annotation_study.ROOT / "tools" / "annotate.py"), "--a", a,
                         "--b", b, "--output", str(tmp_path / "J.jsonl"), "--port", "1", *flags],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# -- Who sees what ------------------------------------------------------------------------------


def test_orders_and_sides_are_seeded_per_annotator():
  ids = [f"p{i}" for i in range(40)]
  alice = assignment.order(ids, "alice", seed=0)
  assert alice == assignment.order(ids, "alice", seed=0) and sorted(alice) == sorted(ids)
  assert alice != assignment.order(ids, "bob", seed=0) and alice != assignment.order(ids, "alice", seed=1)
  sides = [assignment.shown(pid, "alice", 0) for pid in ids]
  assert set(sides) == {("a", "b"), ("b", "a")}
  assert sides != [assignment.shown(pid, "bob", 0) for pid in ids]


def test_overlap_gives_each_item_to_k_annotators(tmp_path):
  a, b = annotation_study.write_study(tmp_path, n=9)
  service = server.open_study(a, b, str(tmp_path / "J.jsonl"), overlap=2, seed=0)
  names = ["ann", "ben", "cat"]
  while True:  # Three annotators taking turns, each labelling what they are given.
    given = [(name, service.next(name)) for name in names]
    if all(p["item"] is None for _, p in given):
      break
    for name, payload in given:
      if payload["item"]:
        service.label(server.LabelRequest(annotator=name, id=payload["item"]["id"], choice="left", seconds=1))
  lines = read_output(tmp_path / "J.jsonl")
  per_item = {}
  for line in lines:
    per_item.setdefault(line["id"], []).append(line["annotator"])
  assert sorted(per_item) == [f"p{i}" for i in range(9)]
  assert all(len(v) == len(set(v)) == 2 for v in per_item.values())
  assert service.assigner.progress("ann")["study_done"] == 18


# -- The API ------------------------------------------------------------------------------------


def test_labels_map_back_to_the_files_and_a_restart_resumes(tmp_path, running):
  a, b = annotation_study.write_study(tmp_path)
  output = str(tmp_path / "J.jsonl")
  client = running(server.open_study(a, b, output, overlap=1, seed=0))
  study = client.get("/api/study").json()
  assert study["options"]["neither"] == "Neither is significantly better." and study["items"] == 6
  payload = client.get("/api/next", params={"annotator": "alice"}).json()
  assert payload["progress"] == {"done": 0, "total": 6, "study_done": 0, "study_total": 6}
  expected = []
  for choice in ("left", "right", "neither"):
    item = payload["item"]
    sides = {"left": annotation_study.system_of(item["left"]), "right": annotation_study.system_of(item["right"])}
    expected.append((item["id"], sides.get(choice, "tie"), [sides["left"], sides["right"]]))
    payload = label(client, "alice", payload, choice)
  lines = read_output(output)
  assert [(r["id"], r["winner"], r["shown"]) for r in lines] == expected
  assert all(r["annotator"] == "alice" and r["seconds"] == 1.5 and r["time"].endswith("Z") for r in lines)
  current = payload["item"]["id"]
  assert client.get("/api/next", params={"annotator": "alice"}).json()["item"]["id"] == current  # A reload.

  # Back to the last answer, and change it: its line is replaced, not added.
  last = client.get("/api/previous", params={"annotator": "alice", "back": 1}).json()["item"]
  assert (last["id"], last["choice"]) == (expected[-1][0], "neither")
  label(client, "alice", {"item": last}, "left")
  lines = read_output(output)
  assert len(lines) == 3 and lines[-1]["revision"] == 2 and lines[-1]["winner"] == lines[-1]["shown"][0]

  # A restart (a new service on the same output) gives alice the item she was on.
  again = running(server.open_study(a, b, output, overlap=1, seed=0))
  resumed = again.get("/api/next", params={"annotator": "alice"}).json()
  assert resumed["item"]["id"] == current and resumed["progress"]["done"] == 3


def test_bad_requests_and_the_access_token(tmp_path, running):
  a, b = annotation_study.write_study(tmp_path)
  client = running(server.open_study(a, b, str(tmp_path / "J.jsonl"), overlap=1, seed=0), token="s3cret")
  assert client.get("/api/study").status_code == 401
  assert client.get("/api/study", headers={"Authorization": "Bearer wrong"}).status_code == 401
  client.headers["Authorization"] = "Bearer s3cret"
  page = client.get("/")
  assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
  assert client.get("/static/app.js").status_code == 200
  payload = client.get("/api/next", params={"annotator": "bob"}).json()
  held_by_alice = client.get("/api/next", params={"annotator": "alice"}).json()["item"]["id"]
  assert held_by_alice != payload["item"]["id"]
  cases = [({"id": held_by_alice, "choice": "left"}, 409), ({"id": "nope", "choice": "left"}, 404),
           ({"id": payload["item"]["id"], "choice": "maybe"}, 400), ({"annotator": " ", "choice": "left"}, 400)]
  for fields, status in cases:
    body = {"annotator": "bob", "id": payload["item"]["id"], "seconds": 1, **fields}
    assert client.post("/api/label", json=body).status_code == status, fields
  assert client.get("/api/next", params={"annotator": "x" * 65}).status_code == 400
  assert not (tmp_path / "J.jsonl").exists()


def test_output_of_another_study_is_refused(tmp_path):
  a, b = annotation_study.write_study(tmp_path)
  output = str(tmp_path / "J.jsonl")
  service = server.open_study(a, b, output, overlap=1, seed=0)
  first = service.next("alice")["item"]["id"]
  service.label(server.LabelRequest(annotator="alice", id=first, choice="left", seconds=2))
  with pytest.raises(errors.InputError, match=r"J.jsonl:1: written with seed=0, this run has 1"):
    server.open_study(a, b, output, overlap=1, seed=1)
  with pytest.raises(errors.InputError, match=r"J.jsonl:1: written with study="):
    server.open_study(b, a, output, overlap=1, seed=0)


def test_annotations_are_what_lima_compare_reads(tmp_path, capsys):
  a, b = annotation_study.write_study(tmp_path, n=4)
  output = str(tmp_path / "J.jsonl")
  service = server.open_study(a, b, output, overlap=2, seed=0)
  for name in ("alice", "bob"):
    while (payload := service.next(name))["item"]:
      item = payload["item"]
      choice = "left" if annotation_study.system_of(item["left"]) == "a" else "right"  # Always A.
      service.label(server.LabelRequest(annotator=name, id=item["id"], choice=choice, seconds=1))
  assert compare.main(["pairwise", output, "--a_name", "A", "--json"]) == 0
  figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert figures["n"] == 4 and figures["shares"]["A wins"]["share"] == 1.0
  assert figures["shares"]["A wins"]["count"] == 8
  assert compare.main(["agreement", output, "--json"]) == 0
  pair = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["pairs"][0]
  assert pair["raters"] == ["alice", "bob"] and pair["items"] == 4 and pair["accuracy"] == 1.0


def test_gcs_output_resumes(tmp_path, gcs):
  a, b = annotation_study.write_study(tmp_path)
  output = gcs.uri("annotate", "J.jsonl")
  service = server.open_study(a, b, output, overlap=1, seed=0)
  for _ in range(2):
    item = service.next("alice")["item"]
    service.label(server.LabelRequest(annotator="alice", id=item["id"], choice="neither", seconds=3))
  resumed = server.open_study(a, b, output, overlap=1, seed=0)
  assert resumed.next("alice")["progress"]["done"] == 2
  assert compare.read_votes(output, "pairwise") == {r["id"]: ["tie"] for r in resumed.annotations.records.values()}


def test_a_hold_expires(tmp_path):
  a, b = annotation_study.write_study(tmp_path, n=2)
  now = [0.0]
  service = server.open_study(a, b, str(tmp_path / "J.jsonl"), overlap=1, seed=0, hold_seconds=60)
  service.assigner.clock = lambda: now[0]
  held = service.next("alice")["item"]["id"]
  other = service.next("bob")["item"]["id"]
  assert other != held  # Alice holds hers: Bob gets the other one, and labels it.
  service.label(server.LabelRequest(annotator="bob", id=other, choice="left", seconds=1))
  assert service.next("carol")["item"] is None  # Nothing open: Alice still holds hers.
  now[0] = 61.0  # Alice walked away: her item goes to the next annotator who asks.
  assert service.next("carol")["item"]["id"] == held
  service.label(server.LabelRequest(annotator="carol", id=held, choice="right", seconds=1))
  assert not service.assigner.may_label("alice", held)  # Alice's late click: 409, then her next item.
  assert service.next("alice")["item"] is None
