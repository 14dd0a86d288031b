"""FastAPI routes: the seed `/score` format, OpenAI-style completions and chat, health.

Every error is JSON `{"error": {"message", "type", "param"}}` where `param` names the bad
field as a dotted path (e.g. `input_data.parameters.top_p`): 400 for a bad request (invalid
JSON names its line and column), 404 and 405 for an unknown route or method, 413 for a body
over `max_body_bytes`, 503 (with Retry-After) when the queue is full, 504 when a request waits
and runs longer than the server's `timeout_s`, 500 if generation itself fails. A streamed
response has sent its headers already: its errors come in-band as a last `data: {"error": ...}`
event before `data: [DONE]`. A client that disconnects cancels its request (a non-streamed
one is checked every DISCONNECT_POLL_S seconds).

POST /score takes `{"input_data": {"input_string": [...], "parameters": {...}}}` and returns
`{"output": [prompt + continuation, ...], "details": [{"generated_text", "finish_reason",
"prompt_tokens", "completion_tokens"}, ...]}`, one entry per input string, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.types import Message as AsgiMessage

from gemma_jax.sampler import Completion, Delta, SamplingParams
from gemma_jax.serving import metrics
from gemma_jax.serving.engine import BaseEngine, Job, QueueFull

# Ample for a batch of long prompts; a body is parsed and tokenized whole, so it is bounded.
DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_TIMEOUT_S = 600.0
DISCONNECT_POLL_S = 0.25


class RequestTimeout(Exception):
  """A request waited and ran longer than the server's timeout."""


class ClientGone(Exception):
  """The client disconnected before its answer was ready."""


class BadRequest(Exception):

  def __init__(self, param: str, message: str):
    super().__init__(message)
    self.param = param


def _string_list(value: Any) -> Any:
  """A string or a list of strings, as a list (anything else fails the list[str] check)."""
  return [value] if isinstance(value, str) else value


def _stop_list(value: Any) -> Any:
  return [] if value is None else _string_list(value)


Strings = Annotated[list[str], BeforeValidator(_string_list)]
StopStrings = Annotated[list[Annotated[str, Field(min_length=1)]], BeforeValidator(_stop_list),
                        Field(max_length=8)]
Temperature = Annotated[float, Field(ge=0)]
TopP = Annotated[float, Field(gt=0, le=1)]
TopK = Annotated[int, Field(ge=0)]
NewTokens = Annotated[int, Field(gt=0)]
Seed = Annotated[int | None, Field(ge=0, lt=2**32)]


class Strict(BaseModel):
  model_config = ConfigDict(extra="forbid", strict=True)


class ScoreParameters(Strict):
  temperature: Temperature = 1.0
  top_p: TopP = 1.0
  top_k: TopK = 0
  max_new_tokens: NewTokens = 64
  do_sample: bool = False  # False: greedy whatever the temperature (as in transformers)
  seed: Seed = None
  stop: StopStrings = []


class ScoreInput(Strict):
  input_string: Annotated[list[str], Field(min_length=1)]
  parameters: ScoreParameters = ScoreParameters()


class ScoreRequest(Strict):
  input_data: ScoreInput


class OpenAIParams(Strict):
  model: str | None = None
  max_tokens: NewTokens = 16
  temperature: Temperature = 1.0
  top_p: TopP = 1.0
  top_k: TopK = 0
  n: Annotated[int, Field(ge=1, le=1)] = 1
  stream: bool = False
  stop: StopStrings = []
  seed: Seed = None
  user: str | None = None


class CompletionRequest(OpenAIParams):
  prompt: Annotated[Strings, Field(min_length=1)]


class Message(Strict):
  role: str
  content: str


class ChatRequest(OpenAIParams):
  messages: Annotated[list[Message], Field(min_length=1)]


class Generation:
  """Request checks and generation for the routes: sampling params, prompts, the engine."""

  def __init__(self, engine: BaseEngine, max_new_tokens_limit: int, timeout_s: float | None,
               stats: metrics.Metrics):
    self.engine, self.limit, self.timeout_s, self.stats = (engine, max_new_tokens_limit,
                                                           timeout_s, stats)
    self.tokenizer = engine.sampler.tokenizer
    if self.tokenizer is None:
      raise ValueError("the server needs a tokenizer: the model directory has no "
                       "tokenizer.model")
    self.context = engine.context

  def max_new(self, body: BaseModel, field: str) -> int:
    """The requested budget; a default never exceeds the server's limit."""
    value = getattr(body, field)
    return value if field in body.model_fields_set else min(value, self.limit)

  def sampling(self, rows: int, max_new: int, temperature: float, top_k: int, top_p: float,
               seed: int | None, stop: list[str], max_new_field: str) -> list[SamplingParams]:
    """One SamplingParams per row; rows get consecutive seeds (random when none is given)."""
    if max_new > self.limit:
      raise BadRequest(max_new_field, f"must be at most {self.limit}, got {max_new}")
    seed = secrets.randbelow(2**32) if seed is None else seed
    return [SamplingParams(max_new_tokens=max_new, temperature=temperature, top_k=top_k,
                           top_p=top_p, seed=(seed + i) % 2**32, stop=tuple(stop))
            for i in range(rows)]

  def openai_sampling(self, body: OpenAIParams, rows: int) -> list[SamplingParams]:
    return self.sampling(rows, self.max_new(body, "max_tokens"), body.temperature, body.top_k,
                         body.top_p, body.seed, body.stop, "max_tokens")

  def encode_all(self, texts: list[str], max_new: int, field: str, max_new_field: str
                 ) -> list[list[int]]:
    if len(texts) > self.engine.max_batch:
      raise BadRequest(field, f"at most {self.engine.max_batch} prompts per request, "
                       f"got {len(texts)}")
    prompts = [self.tokenizer.encode(text, add_bos=True) for text in texts]
    for i, ids in enumerate(prompts):
      self.check_fits(ids, max_new, f"{field}.{i}", max_new_field)
    return prompts

  def encode_chat(self, messages: list[Message], max_new: int) -> list[int]:
    try:
      prompt = self.tokenizer.encode_chat([m.model_dump() for m in messages])
    except ValueError as e:
      raise BadRequest("messages", str(e)) from None
    self.check_fits(prompt, max_new, "messages", "max_tokens")
    return prompt

  def check_fits(self, prompt: list[int], max_new: int, prompt_field: str,
                 max_new_field: str) -> None:
    if len(prompt) >= self.context:
      raise BadRequest(prompt_field, f"{len(prompt)} tokens: longer than the context of "
                       f"{self.context} tokens")
    if len(prompt) + max_new > self.context:
      raise BadRequest(max_new_field, f"{len(prompt)} prompt tokens + {max_new} new tokens "
                       f"exceed the context of {self.context} tokens")

  def submit(self, prompts: list[list[int]], params: list[SamplingParams]) -> Deltas:
    """Queue the request now (so a full queue is a 503, not a broken stream); its deltas."""
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[Delta | Exception] = asyncio.Queue()
    put = lambda item: loop.call_soon_threadsafe(inbox.put_nowait, item)
    job = Job(prompts, params, on_delta=put, on_error=put)
    try:
      self.engine.submit(job)
    except QueueFull:
      self.stats.rejected()
      raise
    self.stats.started(sum(map(len, prompts)))
    return Deltas(job, self._drain(job, inbox))

  async def _drain(self, job: Job, inbox: asyncio.Queue) -> AsyncIterator[Delta]:
    """The job's deltas until every row has finished; cancels the job if it ends early
    (timeout, error, or the consumer gone: a cancelled task or a closed generator)."""
    start, rows, first, tokens, outcome = time.monotonic(), len(job.prompts), None, 0, "error"
    deadline = None if not self.timeout_s else start + self.timeout_s
    try:
      while rows:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
          item = await asyncio.wait_for(inbox.get(), left)
        except TimeoutError:
          outcome = "timeout"
          raise RequestTimeout(f"request timed out: not finished within {self.timeout_s:g} s "
                               "of waiting and generating (the server's "
                               "--request_timeout_s)") from None
        if isinstance(item, Exception):
          raise item
        if item.tokens:
          if first is None:
            first = time.monotonic() - start
            self.stats.first_token(first)
          tokens += len(item.tokens)
          self.stats.tokens(len(item.tokens))
        rows -= item.completion is not None
        yield item
      outcome = "ok"
    except (asyncio.CancelledError, GeneratorExit, ClientGone):
      outcome = "cancelled"
      raise
    finally:
      if rows:
        job.cancel()
      self.stats.finished(outcome, time.monotonic() - start, first, tokens)

  async def complete(self, request: Request, prompts: list[list[int]],
                     params: list[SamplingParams]) -> list[Completion]:
    """Every row's Completion; ClientGone (the job cancelled) if the client disconnects."""
    done: list[Completion | None] = [None] * len(prompts)
    deltas = self.submit(prompts, params)

    async def collect() -> list[Completion]:
      async for delta in deltas:
        done[delta.row] = delta.completion or done[delta.row]
      return done

    task = asyncio.ensure_future(collect())
    while not (await asyncio.wait({task}, timeout=DISCONNECT_POLL_S))[0]:
      if await request.is_disconnected():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
          await task
        await deltas.close()
        raise ClientGone("the client disconnected")
    return task.result()


@dataclasses.dataclass
class Deltas:
  """A submitted request's deltas (an async iterator); `close()` cancels it if unfinished,
  even when it was never iterated (a stream whose client left before its first event)."""

  job: Job
  stream: AsyncIterator[Delta]

  def __aiter__(self) -> AsyncIterator[Delta]:
    return self.stream

  async def close(self) -> None:
    self.job.cancel()  # nothing for the engine to drop once every row has finished
    await self.stream.aclose()


def create_app(engine: BaseEngine, *, model_name: str, max_new_tokens_limit: int,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               timeout_s: float | None = DEFAULT_TIMEOUT_S) -> FastAPI:
  """The app serving `engine`'s sampler (which must have a tokenizer); timeout_s None or 0:
  requests never time out."""
  stats = metrics.Metrics({
      "gemma_queue_depth": ("Requests waiting to start.", lambda: engine.waiting),
      "gemma_active_slots": ("Rows being generated.", lambda: engine.active),
      "gemma_max_slots": ("Rows the engine generates at once.", lambda: engine.max_batch)})
  gen = Generation(engine, max_new_tokens_limit, timeout_s, stats)
  app = FastAPI(title="gemma-jax", version="0.1.0")
  app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
  _add_error_handlers(app)

  @app.get("/health")
  async def health() -> dict:
    return {"status": "ok", "model": model_name, "engine": type(engine).__name__,
            "waiting": engine.waiting, "active": engine.active, "max_batch": engine.max_batch}

  @app.get("/metrics")
  async def metrics_text() -> PlainTextResponse:
    return PlainTextResponse(stats.render(), media_type=metrics.CONTENT_TYPE)

  @app.post("/score")
  async def score(body: ScoreRequest, request: Request) -> dict:
    p, texts = body.input_data.parameters, body.input_data.input_string
    max_new, field = gen.max_new(p, "max_new_tokens"), "input_data.parameters.max_new_tokens"
    params = gen.sampling(len(texts), max_new, p.temperature if p.do_sample else 0.0, p.top_k,
                          p.top_p, p.seed, p.stop, field)
    rows = await gen.complete(request, gen.encode_all(texts, max_new, "input_data.input_string",
                                                      field), params)
    return {"output": [s + c.text for s, c in zip(texts, rows)],
            "details": [{"generated_text": c.text, "finish_reason": c.finish_reason,
                         "prompt_tokens": len(c.prompt_tokens),
                         "completion_tokens": len(c.tokens)} for c in rows]}

  @app.post("/v1/completions")
  async def completions(body: CompletionRequest, request: Request):
    params = gen.openai_sampling(body, len(body.prompt))
    prompts = gen.encode_all(body.prompt, params[0].max_new_tokens, "prompt", "max_tokens")
    head = _head("cmpl", "text_completion", model_name)
    if body.stream:
      chunk = lambda d: {**head, "choices": [{"index": d.row, "text": d.text, "logprobs": None,
                                              "finish_reason": _reason(d)}]}
      return _sse(gen.submit(prompts, params), chunk)
    rows = await gen.complete(request, prompts, params)
    return {**head, "choices": [{"index": i, "text": c.text, "logprobs": None,
                                 "finish_reason": c.finish_reason} for i, c in enumerate(rows)],
            "usage": _usage(rows)}

  @app.post("/v1/chat/completions")
  async def chat(body: ChatRequest, request: Request):
    params = gen.openai_sampling(body, 1)
    prompt = gen.encode_chat(body.messages, params[0].max_new_tokens)
    if body.stream:
      head = _head("chatcmpl", "chat.completion.chunk", model_name)
      chunk = lambda d: {**head, "choices": [{
          "index": 0, "delta": {"role": "assistant", "content": d.text},
          "finish_reason": _reason(d)}]}
      return _sse(gen.submit([prompt], params), chunk)
    rows = await gen.complete(request, [prompt], params)
    return {**_head("chatcmpl", "chat.completion", model_name),
            "choices": [{"index": 0, "finish_reason": rows[0].finish_reason,
                         "message": {"role": "assistant", "content": rows[0].text}}],
            "usage": _usage(rows)}

  return app


class BodyLimit:
  """ASGI middleware: a request body over max_bytes gets a 413 and never reaches the app.

  A Content-Length over the limit is refused before any of the body is read; a body without
  one (chunked) is read only until it passes the limit. A body within the limit is read here
  (the route would read it whole to parse it anyway) and replayed to the app.
  """

  def __init__(self, app: ASGIApp, max_bytes: int):
    self.app, self.max_bytes = app, max_bytes

  async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    declared = Headers(scope=scope).get("content-length", "")
    refused = declared.isdigit() and int(declared) > self.max_bytes
    messages = None if refused else await self.read(receive)
    if messages is None:
      too_large = _error(413, "invalid_request_error",
                         f"body: larger than the server's limit of {self.max_bytes} bytes",
                         "body", {"Connection": "close"})  # the unread rest is not wanted
      return await too_large(scope, receive, send)
    pending = iter(messages)

    async def replay() -> AsgiMessage:
      return next(pending, None) or await receive()

    await self.app(scope, replay, send)

  async def read(self, receive: Receive) -> list[AsgiMessage] | None:
    """The body's messages, or None as soon as their bytes pass the limit."""
    messages, size = [], 0
    while True:
      message = await receive()
      messages.append(message)
      if message["type"] != "http.request":  # the client went away
        return messages
      size += len(message.get("body", b""))
      if size > self.max_bytes:
        return None
      if not message.get("more_body", False):
        return messages


def _add_error_handlers(app: FastAPI) -> None:

  @app.exception_handler(RequestValidationError)
  async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    error = exc.errors()[0]
    if error["type"] == "json_invalid":
      line, column = _line_column(exc.body, error["loc"][-1])
      return _error(400, "invalid_request_error", f"body: invalid JSON at line {line} column "
                    f"{column}: {error['ctx']['error']}", "body")
    param = ".".join(str(p) for p in error["loc"] if p != "body") or "body"
    return _error(400, "invalid_request_error", f"{param}: {error['msg']}", param)

  @app.exception_handler(HTTPException)
  async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Routing's own errors (404, 405, ...) in the same shape as every other error."""
    route = f"{request.method} {request.url.path}"
    message = {404: f"no route {route}",
               405: f"{route}: method not allowed (allowed: {(exc.headers or {}).get('Allow')})"
               }.get(exc.status_code, f"{route}: {exc.detail}")
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return _error(exc.status_code, kind, message, None, exc.headers)

  @app.exception_handler(BadRequest)
  async def bad(_: Request, exc: BadRequest) -> JSONResponse:
    return _error(400, "invalid_request_error", f"{exc.param}: {exc}", exc.param)

  @app.exception_handler(QueueFull)
  async def busy(_: Request, exc: QueueFull) -> JSONResponse:
    return _error(503, "server_busy", f"server busy: {exc}; retry later", None,
                  {"Retry-After": "1"})

  @app.exception_handler(RequestTimeout)
  async def timed_out(_: Request, exc: RequestTimeout) -> JSONResponse:
    return _error(504, "timeout", str(exc), None)

  @app.exception_handler(ClientGone)
  async def gone(_: Request, exc: ClientGone) -> JSONResponse:
    return _error(499, "cancelled", str(exc), None)  # nobody reads it; nginx's code

  @app.exception_handler(Exception)
  async def failed(_: Request, exc: Exception) -> JSONResponse:
    return _error(500, "server_error", f"generation failed: {exc}", None)


def _line_column(doc: str, offset: int) -> tuple[int, int]:
  """The 1-based line and column of a character offset in doc, as json counts them."""
  return doc.count("\n", 0, offset) + 1, offset - doc.rfind("\n", 0, offset)


def _head(prefix: str, kind: str, model_name: str) -> dict:
  return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
          "model": model_name}


def _reason(delta: Delta) -> str | None:
  return None if delta.completion is None else delta.completion.finish_reason


def _usage(rows: list[Completion]) -> dict:
  prompt = sum(len(c.prompt_tokens) for c in rows)
  completion = sum(len(c.tokens) for c in rows)
  return {"prompt_tokens": prompt, "completion_tokens": completion,
          "total_tokens": prompt + completion}


def _sse(deltas: Deltas, chunk) -> StreamingResponse:
  """Server-sent events: one `data: {json}` per delta, then `data: [DONE]`."""

  async def events() -> AsyncIterator[str]:
    try:
      async for delta in deltas:
        yield f"data: {json.dumps(chunk(delta))}\n\n"
    except Exception as e:  # noqa: BLE001 -- headers are sent: report any failure in-band
      kind = "timeout" if isinstance(e, RequestTimeout) else "server_error"
      yield f"data: {json.dumps({'error': {'message': str(e), 'type': kind}})}\n\n"
    finally:
      await deltas.close()
    yield "data: [DONE]\n\n"

  return StreamingResponse(events(), media_type="text/event-stream")


def _error(status: int, kind: str, message: str, param: str | None,
           headers: dict | None = None) -> JSONResponse:
  return JSONResponse({"error": {"message": message, "type": kind, "param": param}},
                      status_code=status, headers=headers)
