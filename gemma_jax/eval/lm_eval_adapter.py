"""An lm-evaluation-harness model (`lm_eval.api.model.LM`) registered as `gemma_jax`.

  python -m gemma_jax.eval.lm_eval_cli --model gemma_jax \
      --model_args checkpoint=DIR,dtype=float32,max_length=2048,mesh=1x8x1 --tasks ...

(lm_eval 0.4 finds models only in modules that were imported; lm_eval_cli imports this one
and runs the harness's own command line.) model_args: checkpoint (a model directory),
dtype, max_length (default: the model's max_seq_len), mesh as DATAxFSDPxTENSOR (one size may
be -1) and max_gen_toks (256); --batch_size N sets the rows per forward pass.

It subclasses the harness's TemplateLM, so the context/continuation encoding (trailing
spaces, BOS, the token boundary) and the rolling windows are the harness's own code, and
gemma_jax.eval's independent implementation of them is checked against it in the tests.
Scoring runs on gemma_jax.eval.scorer (packed, batched, on the mesh); generation on the
KV-cache sampler, greedy.
"""

from __future__ import annotations

from lm_eval import utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

from gemma_jax import sharding
from gemma_jax.eval.progress import Progress
from gemma_jax.eval.scorer import Scorer
from gemma_jax.model_dir import load_model_dir
from gemma_jax.sampler import Sampler, SamplingParams
from gemma_jax.tokenizer import Tokenizer


def parse_mesh(text: str) -> dict[str, int]:
  """'1x8x1' -> {'data': 1, 'fsdp': 8, 'tensor': 1} (model_args split on commas)."""
  sizes = str(text).split("x")
  if len(sizes) != len(sharding.MESH_AXES[:3]):
    raise ValueError(f"mesh={text!r}: give DATAxFSDPxTENSOR, e.g. 1x8x1")
  try:
    return {**dict.fromkeys(sharding.MESH_AXES, 1),
            **dict(zip(("data", "fsdp", "tensor"), map(int, sizes)))}
  except ValueError:
    raise ValueError(f"mesh={text!r}: sizes must be integers") from None


@register_model("gemma_jax")
class GemmaJaxLM(TemplateLM):
  def __init__(self, checkpoint: str, dtype: str | None = None, batch_size: int | str = 8,
               max_length: int | None = None, mesh: str | None = None,
               max_gen_toks: int = 256, **unused):
    super().__init__()
    self.mesh = sharding.make_mesh(parse_mesh(mesh)) if mesh else None
    cfg, self.model, tokenizer = load_model_dir(checkpoint, self.mesh,
                                                **({"dtype": dtype} if dtype else {}))
    if tokenizer is None:
      raise ValueError(f"{checkpoint}: no tokenizer.model in the model directory")
    self.tok = Tokenizer(tokenizer)
    self.max_length = int(max_length or cfg.max_seq_len)
    self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
    self.max_gen_toks = int(max_gen_toks)
    self.scorer = Scorer(self.model, self.mesh, max_length=self.max_length,
                         batch_rows=self.batch_size)

  @property
  def eot_token_id(self) -> int:
    return self.tok.eos_id

  @property
  def prefix_token_id(self) -> int:
    return self.tok.bos_id  # Gemma scores from BOS, as HF's Gemma tokenizer adds it

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs):
    return self.tok.encode(string, add_bos=add_special_tokens is not False)

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
    return self._score([(ctx, cont) for _, ctx, cont in requests], disable_tqdm)

  def _score(self, pairs, disable_tqdm: bool = False):
    bar = Progress(len(pairs), "gemma_jax scoring", not disable_tqdm)
    try:
      return self.scorer.score(pairs, bar.update)
    finally:
      bar.close()

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    docs = []
    for (text,) in [r.args for r in requests]:
      windows = utils.get_rolling_token_windows(
          token_list=self.tok_encode(text, add_special_tokens=False),
          prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)
      docs.append([utils.make_disjoint_window(w) for w in windows])
    scores = iter(self._score([w for d in docs for w in d], disable_tqdm))
    return [sum(next(scores)[0] for _ in d) for d in docs]

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Greedy (or sampled) continuations, batch_size prompts per sampler call, each cut at
    its first stop string (EOS's text among them, as the harness adds it)."""
    sampler = Sampler(self.model, self.tok, mesh=self.mesh)
    rows = [self._generation_row(context, kw) for context, kw in [r.args for r in requests]]
    out: list[str | None] = [None] * len(rows)
    for start in range(0, len(rows), self.batch_size):
      batch = rows[start:start + self.batch_size]
      done = sampler.generate([ids for ids, _ in batch], [p for _, p in batch])
      out[start:start + len(batch)] = [c.text for c in done]
    return out

  def _generation_row(self, context: str, gen_kwargs: dict):
    kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
    until = handle_stop_sequences(kwargs.get("until"), self.tok.decode([self.eot_token_id]))
    new = int(kwargs["max_gen_toks"])
    params = SamplingParams(max_new_tokens=new, temperature=float(kwargs["temperature"]),
                            stop=tuple(s for s in until if s))
    return self.tok_encode(context)[-(self.max_length - new):], params
