"""Evaluation: perplexity, multiple-choice log-likelihood and generation tasks on local JSONL
files (`python -m gemma_jax.eval`), and an lm-evaluation-harness adapter (lm_eval_adapter).

tasks.py reads and checks task files; requests.py builds what is scored as the harness does
(prompts, few-shot examples, token boundaries, windows); scorer.py packs and scores token
pairs on a mesh; evaluate.py turns scores into each kind's metrics.
"""

from gemma_jax.eval.evaluate import Evaluator, run_tasks
from gemma_jax.eval.tasks import Task, load_task, shipped

__all__ = ["Evaluator", "Task", "load_task", "run_tasks", "shipped"]
