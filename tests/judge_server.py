"""A real HTTP server playing an OpenAI-compatible judge for tests: 127.0.0.1, a free port, scripted.

`ScriptedJudge(reply)` serves `POST /v1/chat/completions`; `reply(request_body, n)` (n counts the
requests from 0) returns the reply text, or a `Response` for a status, headers, a delay or a
hang. Every request body is kept in `requests`, so a test counts what the client asked.
"""

import dataclasses
import http.server
import json
import threading
import time


@dataclasses.dataclass
class Response:
  status: int = 200
  text: str = ""
  headers: dict = dataclasses.field(default_factory=dict)
  delay: float = 0.0  # Seconds before answering (a client timeout shorter than this times out).
  hang: bool = False  # Never answer, until the server stops.


class ScriptedJudge:
  def __init__(self, reply):
    self.reply = reply
    self.requests: list[dict] = []
    self.answered: list[dict] = []  # Bodies of the requests answered 200.
    self.lock = threading.Lock()
    self.stopping = threading.Event()
    judge = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def log_message(self, *args):
        pass

      def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with judge.lock:
          n = len(judge.requests)
          judge.requests.append(body)
        out = judge.reply(body, n)
        out = out if isinstance(out, Response) else Response(text=out)
        if out.hang:
          judge.stopping.wait()
          return
        time.sleep(out.delay)
        payload = {"id": f"chatcmpl-{n}", "object": "chat.completion", "model": body["model"],
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text},
                                "finish_reason": "stop"}],
                   "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}}
        data = json.dumps(payload if out.status == 200 else {"error": {"message": "scripted"}}).encode()
        try:
          self.send_response(out.status)
          for k, v in out.headers.items():
            self.send_header(k, v)
          self.send_header("Content-Type", "application/json")
          self.send_header("Content-Length", str(len(data)))
          self.end_headers()
          self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
          return  # The client timed out and left.
        if out.status == 200:
          with judge.lock:
            judge.answered.append(body)

    self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.server.daemon_threads = True
    self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
    self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
    self.thread.start()

  def stop(self):
    self.stopping.set()
    self.server.shutdown()
    self.server.server_close()
    self.thread.join()
