"""The continuous-batching engine: joins and leaves at every step, per-request determinism,
stop strings, budgets, cancellation, queue full, timeouts, /metrics and a 48-client load."""

import concurrent.futures
import contextlib
import json
import re
import socket
import threading
import time
import urllib.request

import jax
import numpy as np
import pytest
from flax import nnx
from test_serve import CORPUS, TIMEOUT, events, request, serving

from gemma_jax.config import get_config
from gemma_jax.model import init_model
from gemma_jax.sampler import Sampler, SamplingParams
from gemma_jax.serving import metrics
from gemma_jax.serving.api import create_app
from gemma_jax.serving.continuous import ContinuousEngine, _generate
from gemma_jax.serving.engine import Job
from gemma_jax.tokenizer import Tokenizer, train_sentencepiece

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@pytest.fixture(scope="module")
def sampler(tmp_path_factory):
  spm = train_sentencepiece([CORPUS], tmp_path_factory.mktemp("engine") / "spm", 512)
  cfg = get_config("tiny_gemma2", dtype="float32")  # sliding window 8: local layers exercised
  return Sampler(init_model(cfg, seed=3), Tokenizer(spm))


class Recording(ContinuousEngine):
  """Counts decode steps and notes the step at which each row joined and left a slot."""

  def __init__(self, *args, delay_s: float = 0.0, **kw):
    super().__init__(*args, **kw)
    self.steps, self.joins, self.leaves, self.delay_s = 0, [], [], delay_s
    self.groups = []  # rows per prefill group

  def _step(self):
    time.sleep(self.delay_s)
    super()._step()
    self.steps += 1

  def _insert(self, group):
    self.joins.extend([self.steps] * len(group.rows))
    self.groups.append(len(group.rows))
    super()._insert(group)

  def _release(self, slot):
    self.leaves.append(self.steps)
    super()._release(slot)


@pytest.fixture
def engine(sampler):
  engine = Recording(sampler, max_batch=4, max_queue=64, cache_len=96, prefill_chunk=16)
  engine.start()
  yield engine
  engine.stop()


def submit(engine, prompt, params) -> concurrent.futures.Future:
  """A one-row job; the future gets its Completion (or the engine's error)."""
  future = concurrent.futures.Future()
  engine.submit(Job([prompt], [params], on_delta=lambda d: d.completion and
                    future.set_result(d.completion), on_error=future.set_exception))
  return future


def workload(n, seed=0):
  """Prompts of 1-40 tokens (some read in several 16-token chunks), budgets of 1-24."""
  rng = np.random.default_rng(seed)
  prompts = [rng.integers(4, 512, rng.integers(1, 41)).tolist() for _ in range(n)]
  return prompts, [SamplingParams(max_new_tokens=int(rng.integers(1, 25))) for _ in range(n)]


def test_rows_join_and_leave_at_every_step_with_the_tokens_they_get_alone(engine, sampler):
  prompts, params = workload(14)
  params[3] = SamplingParams(max_new_tokens=20, temperature=0.9, top_k=50, seed=7)  # sampled
  params[5] = SamplingParams(max_new_tokens=20, temperature=1.0, top_p=0.8, seed=8)
  alone = [submit(engine, p, sp).result(TIMEOUT) for p, sp in zip(prompts, params)]
  engine.joins.clear()
  engine.leaves.clear()
  together = [f.result(TIMEOUT) for f in [submit(engine, p, sp)
                                          for p, sp in zip(prompts, params)]]
  assert [c.tokens for c in together] == [c.tokens for c in alone]
  for c, a in zip(together, alone):  # a prefill group's shape may round the last bit apart
    np.testing.assert_allclose(c.logprobs, a.logprobs, rtol=1e-5, atol=1e-6)
  assert [c.finish_reason for c in together] == [c.finish_reason for c in alone]
  for c, sp in zip(together, params):  # budgets hold; "length" exactly at the budget
    assert len(c.tokens) <= sp.max_new_tokens
    assert (c.finish_reason == "length") == (len(c.tokens) == sp.max_new_tokens)
  # The greedy rows are what the Sampler generates for them on its own.
  greedy = [i for i, sp in enumerate(params) if sp.temperature == 0]
  want = sampler.generate([prompts[i] for i in greedy], [params[i] for i in greedy])
  assert [together[i].tokens for i in greedy] == [c.tokens for c in want]
  # 14 rows through 4 slots: rows joined at many different steps, often at the very step
  # another left (its slot reused before the next decode step).
  assert len(engine.joins) == 14 and len(set(engine.joins)) >= 5
  assert len(set(engine.joins[4:]) & set(engine.leaves)) >= 3


def test_short_prompts_waiting_together_are_prefilled_as_one_group(sampler):
  engine = Recording(sampler, max_batch=4, max_queue=8, cache_len=64, prefill_chunk=64)
  prompts = [[2, 5, 9], [2, 7, 7, 7, 8], list(range(2, 10)), list(range(2, 13))]
  params = [SamplingParams(max_new_tokens=6), SamplingParams(max_new_tokens=9),
            SamplingParams(max_new_tokens=7, temperature=0.9, top_k=40, seed=3),
            SamplingParams(max_new_tokens=5)]  # widths 8, 8, 8, 16
  together = [submit(engine, p, sp) for p, sp in zip(prompts, params)]  # before it starts
  engine.start()
  try:
    together = [f.result(TIMEOUT) for f in together]
    alone = [submit(engine, p, sp).result(TIMEOUT) for p, sp in zip(prompts, params)]
  finally:
    engine.stop()
  # Three rows of width 8 in one group padded to four (the last row twice: its slot is
  # written twice with the same values), the wider row apart, then one group each.
  assert engine.groups == [3, 1, 1, 1, 1, 1]
  assert [c.tokens for c in together] == [c.tokens for c in alone]
  for c, a in zip(together, alone):
    np.testing.assert_allclose(c.logprobs, a.logprobs, rtol=1e-5, atol=1e-6)
  want = sampler.generate(prompts[:2], params[:2])
  assert [c.tokens for c in together[:2]] == [c.tokens for c in want]


def test_prompt_widths_are_quarter_octaves_up_to_the_chunk(sampler):
  widths = lambda **kw: ContinuousEngine(sampler, max_batch=2, **kw).widths
  assert widths(cache_len=256) == [8, 16, 24, 32, 48, 64, 96, 128, 192, 256]
  assert widths(cache_len=200, prefill_chunk=32) == [8, 16, 24, 32, 64, 128, 200]


def test_warm_up_compiles_every_shape_a_load_meets(sampler):
  # Weights placed on the device, as a loaded checkpoint's are (their outputs are then
  # committed to it, the engine's fresh state not unless it says so), and a shape no other
  # test's engine has (3 slots of 80), so nothing is compiled beforehand.
  placed = jax.device_put(sampler.params, jax.devices()[0])
  sampler = Sampler(nnx.merge(sampler.graphdef, placed), sampler.tokenizer)
  engine = ContinuousEngine(sampler, max_batch=3, max_queue=64, cache_len=80, prefill_chunk=16)
  # Widths 8 to 80 (the slots' length); short groups within 16 tokens: two rows of 8 at most.
  assert engine.group_shapes() == [(1, 8), (2, 8), (1, 16), (1, 32), (1, 64), (1, 80)]
  assert engine.warm_up() == 6
  compiles = []
  listen = lambda event, _secs, **_: event == COMPILE_EVENT and compiles.append(event)
  jax.monitoring.register_event_duration_secs_listener(listen)
  engine.start()
  try:
    prompts, params = workload(12, seed=1)
    futures = [submit(engine, p, sp) for p, sp in zip(prompts, params)]
    futures.append(submit(engine, list(range(2, 70)), SamplingParams(max_new_tokens=3)))
    assert all(f.result(TIMEOUT).tokens for f in futures)
  finally:
    engine.stop()
    jax.monitoring.unregister_event_duration_listener(listen)
  assert compiles == []  # (the prefill, insert and decode of every group shape were warm)


def test_decode_writes_each_cache_stack_in_place(sampler):
  # Every slot writes its own position: one scatter per stack, updated in place. Through the
  # layer's slice, the compiled step copied the slice out and back in every layer
  # (dynamic-update-slices of the whole stack), and a copy of a stack is a copy of it all.
  engine = ContinuousEngine(sampler, max_batch=4, cache_len=96)
  cache = engine._cache
  hlo = _generate.lower(sampler.graphdef, sampler.params, cache, engine._state,
                        np.zeros(4, bool), engine._stop_ids, np.int32(2), np.bool_(False),
                        steps=2).compile().as_text()
  stacks = {"k": cache.k, "ring_k": cache.ring_k}  # (v and ring_v have the same shapes)
  assert cache.ring and cache.k.shape != cache.ring_k.shape
  for name, stack in stacks.items():
    shape = f"f32[{','.join(map(str, stack.shape))}]"
    ops = re.findall(re.escape(shape) + r"\{[^}]*\} ([\w-]+)\(", hlo)
    assert ops.count("scatter") == 2, (name, ops)
    assert "dynamic-update-slice" not in ops and "copy" not in ops, (name, ops)


def test_stop_strings_cut_the_text_as_in_the_sampler(engine, sampler):
  prompt = sampler.encode("The baker kneads the dough")
  full = sampler.generate([prompt], SamplingParams(max_new_tokens=24))[0]
  stop = full.text[len(full.text) // 2:][:3]
  assert stop.strip(), full.text
  params = SamplingParams(max_new_tokens=24, stop=(stop,))
  want = sampler.generate([prompt], params)[0]
  got = submit(engine, prompt, params).result(TIMEOUT)
  assert (got.tokens, got.text, got.finish_reason) == (want.tokens, want.text, "stop")
  assert stop not in got.text and full.text.startswith(got.text + stop)
  assert engine.active == 0  # the slot was freed by the host-side stop


def test_a_full_context_budget_fits_the_slot(engine):
  got = submit(engine, [2, 10, 11], SamplingParams(max_new_tokens=93)).result(TIMEOUT)
  assert len(got.tokens) <= 93
  with pytest.raises(ValueError, match="do not fit the engine's 96 positions"):
    submit(engine, [2, 10, 11], SamplingParams(max_new_tokens=94))


@contextlib.contextmanager
def slow_serving(sampler, timeout_s: float | None):
  """A server whose engine sleeps 20 ms per step and never meets a stop token: requests are
  still running when tested."""
  endless = Sampler(nnx.merge(sampler.graphdef, sampler.params), sampler.tokenizer,
                    stop_token_ids=[-1])
  engine = Recording(endless, max_batch=2, max_queue=1, cache_len=256, delay_s=0.02,
                     steps_per_dispatch=1)
  app = create_app(engine, model_name="tiny", max_new_tokens_limit=200, timeout_s=timeout_s)
  with serving(app, engine) as url:
    # Compile prefill, insert and decode first, straight on the engine (over HTTP a compile
    # can pass the 1.5 s timeout and the retries meet a full queue): the tests time requests
    # against it.
    prompt = endless.tokenizer.encode(LONG_BODY["prompt"], add_bos=True)
    submit(engine, prompt, SamplingParams(max_new_tokens=2, temperature=0.8, seed=1)
           ).result(TIMEOUT)
    warm = lambda: request(f"{url}/v1/completions", {**LONG_BODY, "max_tokens": 2})[0]
    wait_until(lambda: warm() == 200, "the warmed server did not answer within its timeout")
    yield url, engine


@pytest.fixture
def slow_server(sampler):
  """A slow server with a 1.5 s request timeout."""
  with slow_serving(sampler, timeout_s=1.5) as served:
    yield served


@pytest.fixture
def untimed_slow_server(sampler):
  """A slow server without a request timeout, which on a loaded machine could otherwise end a
  request before the event under test."""
  with slow_serving(sampler, timeout_s=None) as served:
    yield served


LONG_BODY = {"prompt": "The baker kneads the dough", "max_tokens": 200, "temperature": 0.8,
             "seed": 1}


def wait_until(condition, what: str):
  deadline = time.monotonic() + TIMEOUT
  while not condition():
    assert time.monotonic() < deadline, what
    time.sleep(0.02)


def metric(url: str, name: str) -> float:
  with urllib.request.urlopen(f"{url}/metrics", timeout=TIMEOUT) as response:
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = response.read().decode()
  return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def post(url: str, body: dict) -> socket.socket:
  """Send a POST to /v1/completions on a raw socket (so the test can drop it)."""
  host, port = url.removeprefix("http://").split(":")
  sock = socket.create_connection((host, int(port)), timeout=TIMEOUT)
  data = json.dumps(body).encode()
  sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
               b"\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
  return sock


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_frees_its_slot(untimed_slow_server, stream):
  url, engine = untimed_slow_server
  cancelled = metric(url, 'gemma_requests_total{outcome="cancelled"}')
  sock = post(url, {**LONG_BODY, "stream": stream})
  wait_until(lambda: engine.active == 1, "the request did not start")
  if stream:
    assert sock.recv(4096).startswith(b"HTTP/1.1 200")  # its first events
  sock.close()
  wait_until(lambda: engine.active == 0, "the slot was not freed")
  steps = engine.steps
  assert steps < 150  # far from the 200-token budget: it really stopped
  wait_until(lambda: metric(url, 'gemma_requests_total{outcome="cancelled"}') == cancelled + 1,
             "the cancel was not counted")


def test_a_request_over_the_timeout_gets_504_and_frees_its_slot(slow_server):
  url, engine = slow_server
  status, error = request(f"{url}/v1/completions", LONG_BODY)
  assert status == 504 and error["error"]["type"] == "timeout"
  assert "1.5 s" in error["error"]["message"] and "--request_timeout_s" in error["error"][
      "message"]
  wait_until(lambda: engine.active == 0, "the slot was not freed")
  assert metric(url, 'gemma_requests_total{outcome="timeout"}') >= 1


def test_a_full_queue_gets_503_with_retry_after(slow_server):
  url, engine = slow_server
  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    running = []
    for n in (1, 2):  # one at a time: two at once can both meet the one-place queue
      running.append(pool.submit(request, f"{url}/v1/completions", LONG_BODY))
      wait_until(lambda: engine.active == n, f"request {n} did not start")
    waiting = pool.submit(request, f"{url}/v1/completions", {**LONG_BODY, "max_tokens": 2})
    wait_until(lambda: engine.waiting == 1, "the third did not queue")
    req = urllib.request.Request(f"{url}/v1/completions", data=json.dumps(LONG_BODY).encode(),
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as full:
      urllib.request.urlopen(req, timeout=TIMEOUT)
    assert full.value.code == 503 and full.value.headers["Retry-After"] == "1"
    assert json.loads(full.value.read())["error"]["type"] == "server_busy"
    assert [f.result(TIMEOUT)[0] for f in running] == [504, 504]  # the 1.5 s timeout
    assert waiting.result(TIMEOUT)[0] in (200, 504)
  assert metric(url, 'gemma_requests_total{outcome="rejected"}') >= 1


def test_48_clients_get_their_own_answers_while_health_answers(sampler):
  engine = ContinuousEngine(sampler, max_batch=8, max_queue=64, cache_len=128)
  app = create_app(engine, model_name="tiny", max_new_tokens_limit=72)
  prompts, params = workload(48, seed=1)
  texts = [sampler.tokenizer.decode(p[:12]) or "bread" for p in prompts]
  budgets = [sp.max_new_tokens * (3 if i % 8 == 0 else 1) for i, sp in enumerate(params)]
  want = [c.text for c in sampler.generate(texts, [SamplingParams(max_new_tokens=n)
                                                    for n in budgets])]
  health, done = [], threading.Event()

  def poll_health(url):
    while not done.is_set():
      start = time.monotonic()
      status, body = request(f"{url}/health")
      health.append((status, time.monotonic() - start, body["active"]))
      time.sleep(0.05)

  with serving(app, engine) as url, concurrent.futures.ThreadPoolExecutor(49) as pool:
    poller = pool.submit(poll_health, url)
    start = threading.Barrier(48)

    def client(i):  # every fourth client streams
      body = {"prompt": texts[i], "max_tokens": budgets[i], "temperature": 0}
      start.wait(TIMEOUT)
      if i % 4:
        status, answer = request(f"{url}/v1/completions", body)
        return status, answer["choices"][0]["text"], answer["usage"]["completion_tokens"]
      chunks = events(f"{url}/v1/completions", {**body, "stream": True})
      return 200, "".join(c["choices"][0]["text"] for c in chunks), None

    try:
      results = list(pool.map(client, range(48), timeout=5 * TIMEOUT))
    finally:
      done.set()
    poller.result(TIMEOUT)
    generated = metric(url, "gemma_generation_tokens_total")
    ok = metric(url, 'gemma_requests_total{outcome="ok"}')
  assert [status for status, _, _ in results] == [200] * 48
  assert [text for _, text, _ in results] == want
  assert ok == 48 and generated >= sum(n for _, _, n in results if n is not None)
  assert health and all(status == 200 and took < 5 for status, took, _ in health)
  assert max(active for _, _, active in health) > 1


def test_metrics_are_prometheus_text():
  stats = metrics.Metrics({"gemma_queue_depth": ("Waiting.", lambda: 3)})
  stats.started(7)
  stats.first_token(0.02)
  stats.tokens(5)
  stats.finished("ok", 0.5, 0.02, 5)
  stats.rejected()
  lines = stats.render().splitlines()
  for family, kind in [("gemma_requests_total", "counter"), ("gemma_queue_depth", "gauge"),
                       ("gemma_time_to_first_token_seconds", "histogram")]:
    assert f"# TYPE {family} {kind}" in lines
  assert {'gemma_requests_total{outcome="ok"} 1', 'gemma_requests_total{outcome="rejected"} 1',
          "gemma_prompt_tokens_total 7", "gemma_generation_tokens_total 5",
          "gemma_queue_depth 3", 'gemma_time_to_first_token_seconds_bucket{le="0.01"} 0',
          'gemma_time_to_first_token_seconds_bucket{le="0.025"} 1',
          'gemma_time_to_first_token_seconds_bucket{le="+Inf"} 1',
          "gemma_time_to_first_token_seconds_count 1",
          "gemma_time_per_output_token_seconds_sum 0.12"} <= set(lines)
