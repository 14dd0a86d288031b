"""The HTTP server end to end over real sockets on 127.0.0.1, with a tiny model."""

import concurrent.futures
import contextlib
import http.client
import json
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import uvicorn

from gemma_jax.checkpoint import save_model_dir
from gemma_jax.config import get_config
from gemma_jax.model import init_model
from gemma_jax.sampler import SamplingParams
from gemma_jax.serve import build_app
from gemma_jax.serving.api import create_app
from gemma_jax.serving.engine import Engine
from gemma_jax.tokenizer import train_sentencepiece

CORPUS = Path(__file__).parent / "data" / "tokenizer_corpus.txt"
TIMEOUT = 60
# Prompts of 9-16 tokens and budgets up to 8 share one compiled shape (see sampler.bucket).
LONG_PROMPT = "The baker kneads the dough"
BODY_LIMIT = 8192  # the test server's max_body_bytes
SEED_BODY = {"input_data": {"input_string": ["how does brain work?"], "parameters": {
    "temperature": 0.5, "top_p": 0.5, "max_new_tokens": 100, "do_sample": True}}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("serve")
  spm = train_sentencepiece([CORPUS], tmp / "spm", 512)
  cfg = get_config("tiny_gemma1", dtype="float32")  # max_seq_len 256
  return save_model_dir(tmp / "model", cfg, init_model(cfg, seed=2), tokenizer_model=spm)


@contextlib.contextmanager
def serving(app, engine):
  """Run app with uvicorn on a free 127.0.0.1 port in a thread; yields the base URL."""
  server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
  thread = threading.Thread(target=server.run, daemon=True)
  engine.start()
  thread.start()
  deadline = time.monotonic() + TIMEOUT
  while not server.started:
    assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
    time.sleep(0.02)
  port = server.servers[0].sockets[0].getsockname()[1]
  try:
    yield f"http://127.0.0.1:{port}"
  finally:
    server.should_exit = True
    thread.join(TIMEOUT)
    engine.stop()


@pytest.fixture(scope="module")
def server(model_dir):
  app, engine = build_app(str(model_dir), max_batch=16, batch_wait_ms=50,
                          max_new_tokens_limit=200, max_body_bytes=BODY_LIMIT)
  with serving(app, engine) as url:
    yield url, engine


def request(url, body=None, raw: bytes | None = None):
  """(status, parsed JSON) of a GET (no body) or POST."""
  data = raw if raw is not None else None if body is None else json.dumps(body).encode()
  req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
  try:
    with urllib.request.urlopen(req, timeout=TIMEOUT) as response:
      return response.status, json.loads(response.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def events(url, body):
  """The parsed `data:` events of a streamed POST; the last must be [DONE]."""
  req = urllib.request.Request(url, data=json.dumps(body).encode(),
                               headers={"Content-Type": "application/json"})
  with urllib.request.urlopen(req, timeout=TIMEOUT) as response:
    assert response.headers["Content-Type"].startswith("text/event-stream")
    data = [line[6:] for line in response.read().decode().splitlines()
            if line.startswith("data: ")]
  assert data[-1] == "[DONE]"
  return [json.loads(d) for d in data[:-1]]


def greedy(engine, prompt, n):
  """What the sampler itself generates greedily for a prompt (text or token ids)."""
  return engine.sampler.generate([prompt], SamplingParams(max_new_tokens=n))[0]


def test_health(server):
  url, _ = server
  status, body = request(f"{url}/health")
  assert status == 200 and body["status"] == "ok" and body["model"] == "tiny_gemma1"
  assert body["engine"] == "ContinuousEngine" and body["active"] == 0


def test_score_seed_format(server):
  url, engine = server
  status, body = request(f"{url}/score", SEED_BODY)
  assert status == 200
  (text,), (detail,) = body["output"], body["details"]
  assert text == "how does brain work?" + detail["generated_text"]
  assert detail["finish_reason"] in ("stop", "length") and 0 < detail["completion_tokens"] <= 100
  greedy_body = {"input_data": {"input_string": ["how does brain work?", "bread"],
                                "parameters": {"max_new_tokens": 7, "do_sample": False}}}
  status, body = request(f"{url}/score", greedy_body)
  assert status == 200
  assert body["output"] == [s + greedy(engine, s, 7).text for s in ("how does brain work?",
                                                                     "bread")]


def test_openai_completions(server):
  url, engine = server
  status, body = request(f"{url}/v1/completions",
                         {"prompt": [LONG_PROMPT, "Yeast"], "max_tokens": 6, "temperature": 0})
  assert status == 200 and body["object"] == "text_completion"
  assert [c["text"] for c in body["choices"]] == [greedy(engine, LONG_PROMPT, 6).text,
                                                  greedy(engine, "Yeast", 6).text]
  assert body["usage"]["total_tokens"] == (body["usage"]["prompt_tokens"]
                                           + body["usage"]["completion_tokens"])
  hot = {"prompt": LONG_PROMPT, "max_tokens": 6, "seed": 11, "top_k": 40}
  texts = [request(f"{url}/v1/completions", hot)[1]["choices"][0]["text"] for _ in range(2)]
  assert texts[0] == texts[1]


def test_openai_chat_completions(server):
  url, engine = server
  messages = [{"role": "user", "content": "Hi"}]
  status, body = request(f"{url}/v1/chat/completions",
                         {"messages": messages, "max_tokens": 6, "temperature": 0})
  assert status == 200 and body["object"] == "chat.completion"
  want = greedy(engine, engine.sampler.tokenizer.encode_chat(messages), 6)
  assert body["choices"][0]["message"] == {"role": "assistant", "content": want.text}
  assert body["choices"][0]["finish_reason"] == want.finish_reason


@pytest.mark.parametrize("route,body", [
    ("/v1/completions", {"prompt": LONG_PROMPT, "max_tokens": 7, "seed": 5}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                              "max_tokens": 7, "seed": 5}),
])
def test_streaming_adds_up_to_the_plain_response(server, route, body):
  url, _ = server
  chunks = events(f"{url}{route}", {**body, "stream": True})
  status, plain = request(f"{url}{route}", body)
  assert status == 200 and len(chunks) >= 2
  pieces = [c["choices"][0].get("text", c["choices"][0].get("delta", {}).get("content"))
            for c in chunks]
  whole = plain["choices"][0].get("text", plain["choices"][0].get("message", {}).get("content"))
  assert "".join(pieces) == whole
  assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == plain["choices"][0][
      "finish_reason"]
  assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


LONG = "bread " * 300  # well over the 256-token context
SCORE = lambda **p: {"input_data": {"input_string": ["hi"], "parameters": p}}


@pytest.mark.parametrize("route,body,param", [
    ("/score", {}, "input_data"),
    ("/score", {"input_data": {"parameters": {}}}, "input_data.input_string"),
    ("/score", {"input_data": {"input_string": "hi"}}, "input_data.input_string"),
    ("/score", SCORE(temperature=-0.5), "input_data.parameters.temperature"),
    ("/score", SCORE(temperature="hot"), "input_data.parameters.temperature"),
    ("/score", SCORE(top_p=0), "input_data.parameters.top_p"),
    ("/score", SCORE(top_p=1.5), "input_data.parameters.top_p"),
    ("/score", SCORE(max_new_tokens=0), "input_data.parameters.max_new_tokens"),
    ("/score", SCORE(max_new_tokens=201), "input_data.parameters.max_new_tokens"),
    ("/score", SCORE(do_sample="yes"), "input_data.parameters.do_sample"),
    ("/score", {"input_data": {"input_string": [LONG]}}, "input_data.input_string.0"),
    ("/score", {"input_data": {"input_string": ["hi"] * 17}}, "input_data.input_string"),
    ("/v1/completions", {"max_tokens": 5}, "prompt"),
    ("/v1/completions", {"prompt": 7}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -1}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "n": 2}, "n"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {}}, "logit_bias"),
    ("/v1/completions", {"prompt": "hi " * 60, "max_tokens": 200}, "max_tokens"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stream": 1},
     "stream"),
])
def test_bad_requests_name_the_field(server, route, body, param):
  url, _ = server
  status, error = request(f"{url}{route}", body)
  assert status == 400, error
  assert error["error"]["param"] == param and error["error"]["message"].startswith(param)


@pytest.mark.parametrize("raw", [b"{not json", b'{"input_data": {\n  "input_string": ["a",]}}',
                                 b'{"input_data": {}}\n\n  x'])
def test_malformed_json_names_line_and_column(server, raw):
  url, _ = server
  with pytest.raises(json.JSONDecodeError) as want:
    json.loads(raw)
  status, error = request(f"{url}/score", raw=raw)
  assert status == 400 and error["error"]["type"] == "invalid_request_error"
  assert error["error"]["param"] == "body"
  assert error["error"]["message"] == (f"body: invalid JSON at line {want.value.lineno} column "
                                       f"{want.value.colno}: {want.value.msg}")


def exchange(url: str, head: dict[str, str], body: bytes = b"") -> tuple[int, dict, dict]:
  """(status, headers, JSON) of a POST /score whose head and body bytes are sent as given.

  Nothing more is sent, so a chunked body without its final chunk never ends: an answer to it
  was given without reading it whole.
  """
  host, port = url.removeprefix("http://").split(":")
  with socket.create_connection((host, int(port)), timeout=TIMEOUT) as sock:
    lines = ["POST /score HTTP/1.1", f"Host: {host}", "Content-Type: application/json",
             *(f"{k}: {v}" for k, v in head.items())]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response.status, dict(response.headers), json.loads(response.read())


def chunked(data: bytes, size: int = 1000, final: bool = True) -> bytes:
  """data in HTTP/1.1 chunks of `size` bytes, with or without the closing empty chunk."""
  pieces = [data[i:i + size] for i in range(0, len(data), size)]
  return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + (b"0\r\n\r\n" if final
                                                                      else b"")


def padded(size: int) -> bytes:
  """A JSON body of exactly `size` bytes that fails validation fast (no input_string)."""
  body = b'{"input_data": {}}'
  return body + b" " * (size - len(body))


def assert_too_large(status, headers, error):
  assert status == 413, error
  assert error == {"error": {"message": f"body: larger than the server's limit of {BODY_LIMIT} "
                             "bytes", "type": "invalid_request_error", "param": "body"}}
  assert headers["connection"] == "close"


def test_declared_body_over_the_limit_gets_413_before_it_is_sent(server):
  url, _ = server
  assert_too_large(*exchange(url, {"Content-Length": str(20 * 2**20)}))  # no body byte sent
  assert_too_large(*exchange(url, {"Content-Length": str(BODY_LIMIT + 1)}))
  status, _, error = exchange(url, {"Content-Length": str(BODY_LIMIT)}, padded(BODY_LIMIT))
  assert status == 400 and error["error"]["param"] == "input_data.input_string"


def test_chunked_body_over_the_limit_gets_413_unread(server):
  url, _ = server
  head = {"Transfer-Encoding": "chunked"}
  over = b"[" + b" " * (2 * BODY_LIMIT)  # would be invalid JSON, were it ever parsed
  assert_too_large(*exchange(url, head, chunked(over[:BODY_LIMIT + 1], final=False)))
  status, _, error = exchange(url, head, chunked(padded(BODY_LIMIT)))
  assert status == 400 and error["error"]["param"] == "input_data.input_string"


@pytest.mark.parametrize("method,route,status,message", [
    ("GET", "/nowhere", 404, "no route GET /nowhere"),
    ("POST", "/v1/nowhere", 404, "no route POST /v1/nowhere"),
    ("GET", "/score", 405, "GET /score: method not allowed (allowed: POST)"),
    ("POST", "/health", 405, "POST /health: method not allowed (allowed: GET)"),
])
def test_unknown_route_and_method_use_the_error_shape(server, method, route, status, message):
  url, _ = server
  req = urllib.request.Request(f"{url}{route}", method=method,
                               data=b"{}" if method == "POST" else None)
  with pytest.raises(urllib.error.HTTPError) as answer:
    urllib.request.urlopen(req, timeout=TIMEOUT)
  assert answer.value.code == status
  assert json.loads(answer.value.read()) == {"error": {
      "message": message, "type": "invalid_request_error", "param": None}}


@pytest.fixture(scope="module")
def static_server(model_dir):
  app, engine = build_app(str(model_dir), engine="static", max_batch=16, batch_wait_ms=50,
                          max_new_tokens_limit=200, max_body_bytes=BODY_LIMIT)
  with serving(app, engine) as url:
    yield url, engine


def test_16_concurrent_clients_are_batched_and_answered(static_server):
  """The static batcher (--engine static) gathers requests that arrive together."""
  url, engine = static_server
  batches = []
  stream = engine.sampler.stream

  def counting_stream(prompts, params):
    batches.append(len(prompts))
    return stream(prompts, params)

  engine.sampler.stream = counting_stream
  prompts = [f"Client {i} asks" for i in range(16)]
  start = threading.Barrier(16)

  def client(prompt):
    start.wait(TIMEOUT)
    return request(f"{url}/v1/completions", {"prompt": prompt, "max_tokens": 5,
                                             "temperature": 0})

  try:
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
      results = list(pool.map(client, prompts, timeout=3 * TIMEOUT))
  finally:
    del engine.sampler.stream
  assert [status for status, _ in results] == [200] * 16
  assert [body["choices"][0]["text"] for _, body in results] == [
      c.text for c in engine.sampler.generate(prompts, SamplingParams(max_new_tokens=5))]
  assert sum(batches) == 16 and max(batches) > 1


class GatedSampler:
  """The real sampler, but each generation waits until the test opens the gate."""

  def __init__(self, sampler):
    self.sampler, self.entered, self.gate = sampler, threading.Event(), threading.Event()

  def __getattr__(self, name):
    return getattr(self.sampler, name)

  def stream(self, prompts, params):
    self.entered.set()
    assert self.gate.wait(TIMEOUT)
    yield from self.sampler.stream(prompts, params)


def test_full_queue_gets_503(server):
  _, shared = server
  gated = GatedSampler(shared.sampler)
  engine = Engine(gated, max_batch=1, max_queue=1, batch_wait_s=0)
  app = create_app(engine, model_name="tiny", max_new_tokens_limit=16)
  body = {"prompt": LONG_PROMPT, "max_tokens": 3, "temperature": 0}
  with serving(app, engine) as url, concurrent.futures.ThreadPoolExecutor(2) as pool:
    try:
      running = pool.submit(request, f"{url}/v1/completions", body)
      assert gated.entered.wait(TIMEOUT)  # the worker holds the first request
      waiting = pool.submit(request, f"{url}/v1/completions", body)
      deadline = time.monotonic() + TIMEOUT
      while request(f"{url}/health")[1]["waiting"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
      for route, full in [("/v1/completions", body),
                          ("/v1/completions", {**body, "stream": True}),
                          ("/score", {"input_data": {"input_string": ["hi"]}})]:
        status, error = request(f"{url}{route}", full)
        assert status == 503 and error["error"]["type"] == "server_busy", error
    finally:
      gated.gate.set()
    assert running.result(TIMEOUT)[0] == 200 and waiting.result(TIMEOUT)[0] == 200


def test_serve_command_binds_loopback_by_default(model_dir):
  """`python -m gemma_jax.serve` on a model directory: warms up when asked, serves on
  127.0.0.1, answers /health and a completion."""
  proc = subprocess.Popen([sys.executable, "-m", "gemma_jax.serve", "--checkpoint",
                           str(model_dir), "--port", "0", "--max_body_bytes", "100",
                           "--warm_up", "--cache_len", "32"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  lines = []
  threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
  try:
    deadline = time.monotonic() + TIMEOUT
    while not (match := re.search(r"Uvicorn running on http://([\d.]+):(\d+)", "".join(lines))):
      assert time.monotonic() < deadline and proc.poll() is None, "".join(lines)
      time.sleep(0.05)
    assert match[1] == "127.0.0.1"
    assert re.search(r"warmed up: \d+ prefill shapes and the decode step compiled",
                     "".join(lines)), "".join(lines)
    status, body = request(f"http://127.0.0.1:{match[2]}/health")
    assert status == 200 and body["status"] == "ok"
    status, body = request(f"http://127.0.0.1:{match[2]}/v1/completions",
                           {"prompt": "bread", "max_tokens": 4, "temperature": 0})
    assert status == 200 and body["usage"]["completion_tokens"] >= 1, body
    status, error = request(f"http://127.0.0.1:{match[2]}/score", raw=b" " * 101)
    assert status == 413 and error["error"]["param"] == "body"
  finally:
    proc.terminate()
    proc.wait(TIMEOUT)
