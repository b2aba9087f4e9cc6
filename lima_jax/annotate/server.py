"""The annotation web app: the static page and the JSON API it calls (FastAPI).

The page holds no data of its own: the server decides each annotator's next item, side order
and progress, and writes every choice to the output before answering, so a reload, another
browser or a server restart resumes where the annotator stopped. With a token, every API call
must carry `Authorization: Bearer TOKEN` (compared in constant time); the page itself is static.
"""

import hmac
import importlib.resources
import threading
import unicodedata

import fastapi
from fastapi import responses
from fastapi import staticfiles
import pydantic

from lima_jax.annotate import assignment
from lima_jax.annotate import log as log_lib
from lima_jax.annotate import study as study_lib

MAX_NAME = 64
# The page runs only its own script: even markup that reached the DOM could not run or load anything.
PAGE_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
                "Content-Security-Policy": "default-src 'self'; img-src 'none'; object-src 'none'; "
                                           "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"}


class LabelRequest(pydantic.BaseModel):
  annotator: str
  id: str
  choice: str
  seconds: float = pydantic.Field(ge=0.0)


def _annotator(name: str) -> str:
  """The name as stored; 400 if empty, too long or holding control characters."""
  name = " ".join(name.split())
  if not name or len(name) > MAX_NAME or any(unicodedata.category(c).startswith("C") for c in name):
    raise fastapi.HTTPException(400, f"annotator: expected a name of 1 to {MAX_NAME} printable characters")
  return name


class AnnotationService:
  """The study's state behind one lock: FastAPI runs plain endpoints on a thread pool."""

  def __init__(self, study: study_lib.Study, annotations: log_lib.AnnotationLog, assigner: assignment.Assigner):
    self.study = study
    self.annotations = annotations
    self.assigner = assigner
    self.lock = threading.Lock()

  def _payload(self, annotator: str, item_id: str | None) -> dict:
    item = None
    if item_id is not None:
      found = self.study.by_id[item_id]
      left, right = assignment.shown(item_id, annotator, self.assigner.seed)
      previous = self.annotations.get(annotator, item_id)
      item = {"id": item_id, "conversation": list(found.conversation), "left": found.answers[left],
              "right": found.answers[right], "choice": previous["choice"] if previous else None}
    return {"item": item, "progress": self.assigner.progress(annotator)}

  def next(self, annotator: str) -> dict:
    with self.lock:
      return self._payload(annotator, self.assigner.next_item(annotator))

  def previous(self, annotator: str, back: int) -> dict:
    """The annotator's `back`-th last item in the order first labelled (1 = the last), with their
    choice: going back and changing an answer leaves that order as it was."""
    with self.lock:
      done = self.annotations.done(annotator)
      return self._payload(annotator, done[-back] if back <= len(done) else None)

  def label(self, request: LabelRequest) -> dict:
    annotator = _annotator(request.annotator)
    if request.choice not in log_lib.CHOICES:
      raise fastapi.HTTPException(400, f"choice: expected one of {', '.join(log_lib.CHOICES)}")
    with self.lock:
      if request.id not in self.study.by_id:
        raise fastapi.HTTPException(404, f"id {request.id!r}: no such item")
      if not self.assigner.may_label(annotator, request.id):
        raise fastapi.HTTPException(409, f"id {request.id!r} has its {self.assigner.overlap} annotator(s) "
                                         f"already (done or looking at it)")
      shown = assignment.shown(request.id, annotator, self.assigner.seed)
      self.annotations.add(log_lib.Choice(annotator, request.id, request.choice, shown, request.seconds))
    return self.next(annotator)


def _static_dir() -> str:
  return str(importlib.resources.files("lima_jax.annotate") / "static")


def create_app(service: AnnotationService, token: str | None = None) -> fastapi.FastAPI:
  """The app: `/` (the page), `/static/*`, and the API under `/api/`."""
  app = fastapi.FastAPI(title="lima-annotate", docs_url=None, redoc_url=None, openapi_url=None)
  expected = f"Bearer {token}".encode("utf-8") if token else None

  def authorized(authorization: str = fastapi.Header(default="")) -> None:
    if expected is not None and not hmac.compare_digest(authorization.encode("utf-8"), expected):
      raise fastapi.HTTPException(401, "a valid access token is needed (Authorization: Bearer TOKEN)")

  api = fastapi.APIRouter(prefix="/api", dependencies=[fastapi.Depends(authorized)])

  @api.get("/study")
  def study_info():
    return {"question": study_lib.QUESTION, "options": study_lib.OPTIONS,
            "items": len(service.study.items), "overlap": service.assigner.overlap}

  @api.get("/next")
  def next_item(annotator: str):
    return service.next(_annotator(annotator))

  @api.get("/previous")
  def previous_item(annotator: str, back: int = fastapi.Query(1, ge=1)):
    return service.previous(_annotator(annotator), back)

  @api.post("/label")
  def label(request: LabelRequest):
    return service.label(request)

  app.include_router(api)
  static = _static_dir()
  app.mount("/static", staticfiles.StaticFiles(directory=static), name="static")

  @app.get("/", include_in_schema=False)
  def page():
    return responses.FileResponse(f"{static}/index.html", headers=PAGE_HEADERS)

  return app


def open_study(a_path: str, b_path: str, output: str, *, overlap: int, seed: int,
               hold_seconds: float = 1800.0) -> AnnotationService:
  """The service for answer files A and B writing to `output`, resumed from it if it exists."""
  study = study_lib.load(a_path, b_path)
  annotations = log_lib.AnnotationLog(output, study.digest, seed, study.by_id)
  assigner = assignment.Assigner([item.id for item in study.items], annotations, overlap=overlap, seed=seed,
                                 hold_seconds=hold_seconds)
  return AnnotationService(study, annotations, assigner)
