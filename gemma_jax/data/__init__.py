"""grain input pipelines for pretraining, chat SFT, preference pairs and RL prompts.

Entry points:
  default_config() -> ConfigDict        the `config.data` schema with defaults (see config.py)
  make_iterator(config.data, tokenizer, mesh, process_index=None, process_count=None)
      -> DataIterator                   global batches (jax.Array, batch dim over (data, fsdp));
                                        get_state() / set_state() for the checkpoint, and
                                        skipped_records for the metrics
  make_dataset(config.data, tokenizer, process_index=0, process_count=1)
      -> grain.IterDataset              this process's batches as numpy (batch_size /
                                        process_count rows), e.g. for tests and benchmarks
  python -m gemma_jax.data.to_array_record   JSONL / text files -> ArrayRecord
  python -m gemma_jax.data.pretokenize       text sources -> token shards (kind "tokens")

Batches (B rows of T = seq_len; every array int32 unless noted):
  tokens, positions, segment_ids   packed rows: segment ids 1, 2, ... per document in a row,
                                   0 on padding; positions restart at 0 in each segment
  targets                          the next token of the same segment; 0 at each segment's
                                   last token and on padding (trainers need not shift)
  loss_weights (float32)           the weight of targets[t], i.e. of predicting tokens[t+1]
                                   from position t: pretrain 1 for every target; chat 1 only
                                   where the target is a model-turn token (<end_of_turn>
                                   included); 0 wherever targets is 0
Preference batches carry these five keys twice, prefixed `chosen_` and `rejected_`; a row's
segment k of both is the same pair (same prompt), so per-pair sums group by segment id.
RL batches: tokens, positions, segment_ids [B, T] holding one prompt per row, left-padded by
default (data.rl_padding), lengths [B], and `reference`: a host-local list of dicts, the
record's other fields for this process's rows (in the order of its share of the batch).

A document longer than seq_len is split (each piece its own segment, positions from 0) or,
with data.truncate_long, truncated. Bad records raise BadRecordError naming file and line, or
are skipped and counted with data.skip_bad_records. Source kinds, fields and formats are
described in config.py, sources.py and formats.py.
"""

from gemma_jax.data.config import default_config
from gemma_jax.data.pipeline import BadRecordError, DataIterator, make_dataset, make_iterator

__all__ = ["BadRecordError", "DataIterator", "default_config", "make_dataset", "make_iterator"]
