"""Rematerialisation policies by name (ModelConfig.remat_policy), and the name that weight
products carry so that the policies can see them.

Its own module, below both config.py (which validates the name) and the model (which applies
the policy), so the names are written once.
"""

from __future__ import annotations

import jax

# The name of every weight_einsum output (model/layers.py). weight_einsum is a custom_vjp
# that dot policies cannot see into, so policies that save matmul outputs save this name too.
WEIGHT_DOT = "weight_dot"
# The names attention gives its q/k/v projections (saved by "save_qkv_proj").
QUERY_PROJ, KEY_PROJ, VALUE_PROJ = "query_proj", "key_proj", "value_proj"
_policies = jax.checkpoint_policies
_SAVE_WEIGHT_DOTS = _policies.save_only_these_names(WEIGHT_DOT)

# "none": keep every activation; "full": keep only the block input; "dots": keep matmul
# outputs; "dots_with_no_batch_dims": keep matmul outputs without batch dims (weights-only
# products); "save_qkv_proj": keep the q/k/v projections and nothing else;
# "offload_qkv_proj": the same, kept in host memory (TPU: frees HBM, costs host transfers).
POLICIES = {
    "none": None,
    "full": _policies.nothing_saveable,
    "dots": _policies.save_from_both_policies(_policies.checkpoint_dots, _SAVE_WEIGHT_DOTS),
    "dots_with_no_batch_dims": _policies.save_from_both_policies(
        _policies.dots_with_no_batch_dims_saveable, _SAVE_WEIGHT_DOTS),
    "save_qkv_proj": _policies.save_only_these_names(QUERY_PROJ, KEY_PROJ, VALUE_PROJ),
    "offload_qkv_proj": _policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=[QUERY_PROJ, KEY_PROJ, VALUE_PROJ],
        offload_src="device", offload_dst="pinned_host"),
}
