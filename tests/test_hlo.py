"""launch.hlo: collectives and FLOPs of compiled programs.

Programs whose collectives are known by construction (shard_map, or one sharded weight in a
scan) are compiled on 8 CPU devices and, when libtpu is there, for a v5e:2x2 topology; the
expected kinds, shapes, trip counts and bytes are worked out here from the program's sizes.
TPU-only forms (async start/done pairs, async collective fusion chains, iota replica groups)
come as hand-written HLO text.
"""

from __future__ import annotations

import importlib.util
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from launch import hlo

B, K, TRIPS = 32, 256, 5  # rows of the carried activation, its width, scan length
F32 = 4


def _scan_step(trips=TRIPS, outer=None):
  """Per shard: `trips` times all-gather a weight shard over fsdp, matmul, psum over fsdp
  (inside an outer scan of `outer` trips, with one more psum, if given); then psum_scatter."""
  def inner(h, ws):
    def body(h, w):
      w = jax.lax.all_gather(w, "fsdp", axis=0, tiled=True)
      return jax.lax.psum(jnp.tanh(h @ w), "fsdp"), None
    return jax.lax.scan(body, h, ws)[0]

  def step(x, ws):
    if outer is None:
      h = inner(x, ws)
    else:
      h = jax.lax.scan(lambda h, ws: (jax.lax.psum(inner(h, ws), "fsdp"), None), x, ws)[0]
    return jax.lax.psum_scatter(h, "fsdp", scatter_dimension=0, tiled=True)

  leading = (trips,) if outer is None else (outer, trips)
  weights = jax.ShapeDtypeStruct(leading + (K, K), jnp.float32)
  spec = P(*([None] * len(leading)), "fsdp")
  return step, spec, (jax.ShapeDtypeStruct((B, K), jnp.float32), weights)


def _compile_shard_map(devices, trips=TRIPS, outer=None) -> str:
  step, spec, args = _scan_step(trips, outer)
  mesh = Mesh(np.array(devices).reshape(-1, 4), ("data", "fsdp"))
  f = jax.shard_map(step, mesh=mesh, in_specs=(P(), spec), out_specs=P("fsdp"),
                    check_vma=False)
  return jax.jit(f).lower(*args).compile().as_text()


def _by_kind(a: hlo.Audit) -> dict[str, list[hlo.Collective]]:
  out: dict[str, list[hlo.Collective]] = {}
  for c in a.collectives:
    out.setdefault(c.kind, []).append(c)
  return out


@pytest.fixture(scope="module")
def shard_map_hlo() -> str:
  return _compile_shard_map(jax.devices()[:8])


def test_shard_map_collectives_by_construction(shard_map_hlo):
  a = hlo.audit(shard_map_hlo)
  kinds = _by_kind(a)
  assert sorted(kinds) == ["all-gather", "all-reduce", "reduce-scatter"]
  assert all(len(v) == 1 for v in kinds.values())
  (gather,), (psum,), (scatter,) = kinds["all-gather"], kinds["all-reduce"], kinds["reduce-scatter"]

  # all_gather of a [K/4, K] shard over the 4-chip fsdp axis, once per trip.
  assert gather.result == (hlo.Array("f32", (K, K)),)
  assert gather.operands == (hlo.Array("f32", (K // 4, K)),)
  assert gather.group_size == 4 and gather.trips == TRIPS and len(gather.loops) == 1
  assert gather.traffic_bytes == K * K * F32 * 3 / 4
  assert gather.step_traffic_bytes == TRIPS * K * K * F32 * 3 / 4

  # psum of the [B, K] activation, once per trip: ring all-reduce moves twice (n-1)/n.
  assert psum.result == (hlo.Array("f32", (B, K)),) and psum.operand_bytes == B * K * F32
  assert psum.group_size == 4 and psum.trips == TRIPS and psum.loops == gather.loops
  assert psum.traffic_bytes == 2 * B * K * F32 * 3 / 4

  # psum_scatter after the loop: [B, K] in, [B/4, K] out, once.
  assert scatter.result == (hlo.Array("f32", (B // 4, K)),) and scatter.operand_bytes == B * K * F32
  assert scatter.loops == () and scatter.trips == 1
  assert scatter.traffic_bytes == B * K * F32 * 3 / 4

  totals = a.totals()
  assert totals["all-gather"] == (TRIPS, TRIPS * K * K * F32 * 3 / 4)
  assert totals["all-reduce"] == (TRIPS, TRIPS * 2 * B * K * F32 * 3 / 4)
  assert totals["reduce-scatter"] == (1, B * K * F32 * 3 / 4)
  assert a.largest(1) == [gather]
  assert a.flops == 2 * B * K * K * TRIPS  # one [B,K] x [K,K] matmul per trip


def test_trip_count_read_off_the_loop_matches_xla(shard_map_hlo):
  """XLA:TPU sets no known_trip_count: without it the trips come from the loop itself."""
  stripped, n = re.subn(r'"known_trip_count":\{"n":"\d+"\},?', "", shard_map_hlo)
  assert n == 1 and f'"known_trip_count":{{"n":"{TRIPS}"}}' in shard_map_hlo
  a = hlo.audit(stripped)
  assert list(a.loops.values()) == [TRIPS]
  assert a.totals() == hlo.audit(shard_map_hlo).totals()


def test_nested_scans_multiply_trip_counts():
  outer = 3
  a = hlo.audit(_compile_shard_map(jax.devices()[:8], trips=4, outer=outer))
  assert sorted(a.loops.values()) == sorted([4, outer])
  kinds = _by_kind(a)
  (gather,) = kinds["all-gather"]
  assert len(gather.loops) == 2 and gather.trips == 4 * outer
  assert a.loops[gather.loops[0]] == outer and a.loops[gather.loops[1]] == 4
  psums = sorted(kinds["all-reduce"], key=lambda c: c.trips)
  assert [c.trips for c in psums] == [outer, 4 * outer]  # outer body's psum, inner body's
  assert psums[0].loops == gather.loops[:1]
  assert a.totals()["all-gather"].count == 4 * outer
  assert a.flops == 2 * B * K * K * 4 * outer


def test_sharded_weight_in_scan_is_gathered_every_trip():
  """jit + shardings (no shard_map): GSPMD inserts the all-gather of an fsdp-sharded weight."""
  mesh = Mesh(np.array(jax.devices()[:8]), ("fsdp",))
  rows = 64

  def f(x, ws):
    def body(h, w):
      w = jax.lax.with_sharding_constraint(w, NamedSharding(mesh, P()))
      return jnp.tanh(h @ w), None
    return jax.lax.scan(body, x, ws)[0]

  x = jax.ShapeDtypeStruct((rows, K), jnp.float32, sharding=NamedSharding(mesh, P("fsdp")))
  ws = jax.ShapeDtypeStruct((TRIPS, K, K), jnp.float32,
                            sharding=NamedSharding(mesh, P(None, "fsdp")))
  a = hlo.audit(jax.jit(f).lower(x, ws).compile().as_text())
  (gather,) = a.collectives
  assert gather.kind == "all-gather" and gather.group_size == 8 and gather.trips == TRIPS
  assert [d for d in gather.result[0].dims if d != 1] == [K, K]
  assert gather.step_traffic_bytes == TRIPS * K * K * F32 * 7 / 8
  assert a.flops == 2 * (rows // 8) * K * K * TRIPS


def test_moves_tensor_with_dims_finds_logits():
  """x @ table.T with the embedding dimension sharded all-reduces [tokens, vocab] logits;
  with the tokens sharded instead only the scalar loss is reduced."""
  mesh = Mesh(np.array(jax.devices()[:8]), ("fsdp",))
  tokens, dim, vocab = 64, 128, 1000

  def loss(x, table):
    return jax.nn.logsumexp(x @ table.T, axis=-1).sum()

  def flagged(x_spec, table_spec):
    x = jax.ShapeDtypeStruct((tokens, dim), jnp.float32, sharding=NamedSharding(mesh, x_spec))
    t = jax.ShapeDtypeStruct((vocab, dim), jnp.float32, sharding=NamedSharding(mesh, table_spec))
    a = hlo.audit(jax.jit(loss).lower(x, t).compile().as_text())
    assert a.collectives
    return [c for c in a.collectives
            if hlo.moves_tensor_with_dims(c, {vocab}, min_elements=tokens * vocab)]

  (logits,) = flagged(P(), P(None, "fsdp"))
  assert logits.has_dim(vocab) and logits.elements == tokens * vocab
  assert logits.traffic_bytes == 2 * tokens * vocab * F32 * 7 / 8
  assert flagged(P("fsdp"), P()) == []


@pytest.mark.parametrize("width, kernel, kw", [
    (10, 5, dict(window_strides=(1,), padding=((2, 2),))),
    (10, 5, dict(window_strides=(2,), padding=((4, 1),), lhs_dilation=(2,))),
    (10, 5, dict(window_strides=(1,), padding=((0, 0),), rhs_dilation=(2,))),
    (1, 8, dict(window_strides=(1,), padding=((7, 7),))),  # how XLA:TPU broadcasts heads
])
def test_convolution_flops_count_window_positions_that_read_input(width, kernel, kw):
  def f(x, w):
    return jax.lax.conv_general_dilated(x, w, **kw)

  x, w = jnp.ones((2, 3, width)), jnp.ones((4, 3, kernel))
  macs = float(f(x, w).sum())  # with ones, each multiply-add that reads input adds 1
  assert hlo.audit(jax.jit(f).lower(x, w).compile().as_text()).flops == 2 * macs


@pytest.mark.parametrize("attrs, expected", [
    ("replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}", 4),
    ("replica_groups={}, to_apply=%add", 8),  # every device of the module
    ("replica_groups=[32,8]<=[256], dimensions={0}", 8),
    ("replica_groups=[8,32]<=[32,8]T(1,0), dimensions={0}", 32),
    ("replica_groups=mesh['axis_0'=256,'axis_1'=1] {'axis_0'}, dimensions={1}", 256),
    ("replica_groups=mesh['axis_0'=4,'axis_1'=1,'axis_2'=2], device_ids=([2,4]T(1,0)) "
     "{'axis_2'}, use_global_device_ids=true", 2),
    ("replica_groups=mesh['a'=4,'b'=8] {'a','b':(2)2}, dimensions={0}", 8),  # a sub-axis of b
])
def test_replica_group_forms(attrs, expected):
  ins = hlo.Instruction("ag", "f32[8]", "all-gather", ("x",), attrs)
  assert hlo.group_size(ins, num_devices=8) == expected


# Hand-written in the forms XLA:TPU prints: no known_trip_count on the while; async
# all-gather / all-reduce / collective-permute pairs in its body; one all-gather split over a
# chain of two async collective fusions (same channel and chain id); an async-wrapped
# reduce-scatter and an all-reduce-scatter fusion in ENTRY. 32 partitions.
TPU_HLO = """\
HloModule tpu_style, is_scheduled=true, num_partitions=32

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(%x, %y)
}

%gather_chain (p0: bf16[512,128], p1: bf16[4,128], p2: bf16[128,128]) -> (bf16[512,128], bf16[128,128]) {
  %p0 = bf16[512,128]{1,0:T(8,128)(2,1)} parameter(0)
  %p1 = bf16[4,128]{1,0:T(8,128)(2,1)} parameter(1)
  %p2 = bf16[128,128]{1,0:T(8,128)(2,1)} parameter(2)
  %chain_ag = bf16[128,128]{1,0:T(8,128)(2,1)} all-gather(%p1), channel_id=6, replica_groups=[1,32]<=[32], dimensions={0}, use_global_device_ids=true, frontend_attributes={chain_id="0"}, backend_config={"async_collective_fusion_config":{"flag_start":"-1","flag_end":"-1"}}
  %conv = bf16[512,128]{1,0:T(8,128)(2,1)} convolution(%p0, %p2), dim_labels=bf_io->bf
  ROOT %out = (bf16[512,128]{1,0:T(8,128)(2,1)}, bf16[128,128]{1,0:T(8,128)(2,1)}) tuple(%conv, %chain_ag)
}

%gather_chain.1 (p0.1: bf16[512,128], p1.1: bf16[4,128], p2.1: bf16[128,128]) -> (bf16[512,128], bf16[128,128]) {
  %p0.1 = bf16[512,128]{1,0:T(8,128)(2,1)} parameter(0)
  %p1.1 = bf16[4,128]{1,0:T(8,128)(2,1)} parameter(1)
  %p2.1 = bf16[128,128]{1,0:T(8,128)(2,1)} parameter(2)
  %chain_ag.1 = bf16[128,128]{1,0:T(8,128)(2,1)} all-gather(%p1.1), channel_id=6, replica_groups=[1,32]<=[32], dimensions={0}, use_global_device_ids=true, frontend_attributes={chain_id="0"}, backend_config={"async_collective_fusion_config":{"flag_start":"2","flag_end":"8"}}
  %conv.1 = bf16[512,128]{1,0:T(8,128)(2,1)} convolution(%p0.1, %p2.1), dim_labels=bf_io->bf
  ROOT %out.1 = (bf16[512,128]{1,0:T(8,128)(2,1)}, bf16[128,128]{1,0:T(8,128)(2,1)}) tuple(%conv.1, %chain_ag.1)
}

%body (param: (s32[], bf16[512,128], bf16[16,128], f32[1024], f32[256,8], /*index=5*/bf16[4,128])) -> (s32[], bf16[512,128], bf16[16,128], f32[1024], f32[256,8], /*index=5*/bf16[4,128]) {
  %param = (s32[]{:T(128)}, bf16[512,128]{1,0:T(8,128)(2,1)}, bf16[16,128]{1,0:T(8,128)(2,1)}, f32[1024]{0:T(1024)}, f32[256,8]{1,0:T(8,128)}, /*index=5*/bf16[4,128]{1,0:T(8,128)(2,1)}) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%param), index=0
  %one = s32[]{:T(128)} constant(1)
  %next = s32[]{:T(128)} add(%i, %one)
  %x = bf16[512,128]{1,0:T(8,128)(2,1)} get-tuple-element(%param), index=1
  %w = bf16[16,128]{1,0:T(8,128)(2,1)} get-tuple-element(%param), index=2
  %g = f32[1024]{0:T(1024)} get-tuple-element(%param), index=3
  %h = f32[256,8]{1,0:T(8,128)} get-tuple-element(%param), index=4
  %v = bf16[4,128]{1,0:T(8,128)(2,1)} get-tuple-element(%param), index=5
  %ag-start = (bf16[16,128]{1,0:T(8,128)(2,1)}, bf16[128,128]{1,0:T(8,128)(2,1)}) all-gather-start(%w), channel_id=1, replica_groups=[4,8]<=[32], dimensions={0}, use_global_device_ids=true, metadata={op_name="jit(step)/while/body/all_gather"}
  %ag-done = bf16[128,128]{1,0:T(8,128)(2,1)} all-gather-done(%ag-start)
  %ar-start = (f32[1024]{0:T(1024)}, f32[256,8]{1,0:T(8,128)}) all-reduce-start(%g, %h), channel_id=2, replica_groups=[8,4]<=[4,8]T(1,0), use_global_device_ids=true, to_apply=%add
  %ar-done = (f32[1024]{0:T(1024)}, f32[256,8]{1,0:T(8,128)}) all-reduce-done(%ar-start)
  %g2 = f32[1024]{0:T(1024)} get-tuple-element(%ar-done), index=0
  %h2 = f32[256,8]{1,0:T(8,128)} get-tuple-element(%ar-done), index=1
  %cp-start = (bf16[512,128]{1,0:T(8,128)(2,1)}, bf16[512,128]{1,0:T(8,128)(2,1)}, u32[]{:S(2)}, u32[]{:S(2)}) collective-permute-start(%x), channel_id=3, source_target_pairs={{0,1},{1,0}}
  %cp-done = bf16[512,128]{1,0:T(8,128)(2,1)} collective-permute-done(%cp-start)
  %chain.0 = (bf16[512,128]{1,0:T(8,128)(2,1)}, bf16[128,128]{1,0:T(8,128)(2,1)}) fusion(%cp-done, %v, %ag-done), kind=kOutput, calls=%gather_chain
  %chain.1 = (bf16[512,128]{1,0:T(8,128)(2,1)}, bf16[128,128]{1,0:T(8,128)(2,1)}) fusion(%cp-done, %v, %ag-done), kind=kOutput, calls=%gather_chain.1
  %y = bf16[512,128]{1,0:T(8,128)(2,1)} get-tuple-element(%chain.1), index=0
  %dot = bf16[512,128]{1,0:T(8,128)(2,1)} dot(%y, %ag-done), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %tuple = (s32[]{:T(128)}, bf16[512,128]{1,0:T(8,128)(2,1)}, bf16[16,128]{1,0:T(8,128)(2,1)}, f32[1024]{0:T(1024)}, f32[256,8]{1,0:T(8,128)}, /*index=5*/bf16[4,128]{1,0:T(8,128)(2,1)}) tuple(%next, %dot, %w, %g2, %h2, /*index=5*/%v)
}

%cond (param.1: (s32[], bf16[512,128], bf16[16,128], f32[1024], f32[256,8], /*index=5*/bf16[4,128])) -> pred[] {
  %param.1 = (s32[]{:T(128)}, bf16[512,128]{1,0:T(8,128)(2,1)}, bf16[16,128]{1,0:T(8,128)(2,1)}, f32[1024]{0:T(1024)}, f32[256,8]{1,0:T(8,128)}, /*index=5*/bf16[4,128]{1,0:T(8,128)(2,1)}) parameter(0)
  %limit = s32[]{:T(128)} constant(7)
  %i.1 = s32[]{:T(128)} get-tuple-element(%param.1), index=0
  ROOT %lt = pred[]{:T(512)} compare(%i.1, %limit), direction=LT
}

%wrapped_reduce_scatter (p.rs: bf16[64,128]) -> bf16[8,128] {
  %p.rs = bf16[64,128]{1,0:T(8,128)(2,1)} parameter(0)
  ROOT %rs = bf16[8,128]{1,0:T(8,128)(2,1)} reduce-scatter(%p.rs), channel_id=4, replica_groups={{0,1,2,3,4,5,6,7},{8,9,10,11,12,13,14,15},{16,17,18,19,20,21,22,23},{24,25,26,27,28,29,30,31}}, use_global_device_ids=true, dimensions={0}, to_apply=%add
}

%all-reduce-scatter (input: f32[1024,64]) -> f32[32,64] {
  %input = f32[1024,64]{1,0:T(8,128)} parameter(0)
  %ar = f32[1024,64]{1,0:T(8,128)} all-reduce(%input), channel_id=5, replica_groups=[1,32]<=[32], use_global_device_ids=true, to_apply=%add
  %pid = u32[] partition-id()
  %c32 = u32[] constant(32)
  %offset = u32[]{:T(128)} multiply(%pid, %c32)
  %zero.1 = u32[] constant(0)
  ROOT %ds = f32[32,64]{1,0:T(8,128)} dynamic-slice(%ar, %offset, %zero.1), dynamic_slice_sizes={32,64}
}

ENTRY %main (a: bf16[512,128], b: bf16[16,128], c: f32[1024], d: f32[256,8], e: bf16[64,128], f: f32[1024,64], v: bf16[4,128]) -> (bf16[512,128], bf16[8,128], f32[32,64]) {
  %a = bf16[512,128]{1,0:T(8,128)(2,1)} parameter(0)
  %b = bf16[16,128]{1,0:T(8,128)(2,1)} parameter(1)
  %c = f32[1024]{0:T(1024)} parameter(2)
  %d = f32[256,8]{1,0:T(8,128)} parameter(3)
  %e = bf16[64,128]{1,0:T(8,128)(2,1)} parameter(4)
  %f = f32[1024,64]{1,0:T(8,128)} parameter(5)
  %v.0 = bf16[4,128]{1,0:T(8,128)(2,1)} parameter(6)
  %zero = s32[]{:T(128)} constant(0)
  %start = s32[]{:T(128)} copy(%zero)
  %init = (s32[]{:T(128)}, bf16[512,128]{1,0:T(8,128)(2,1)}, bf16[16,128]{1,0:T(8,128)(2,1)}, f32[1024]{0:T(1024)}, f32[256,8]{1,0:T(8,128)}, /*index=5*/bf16[4,128]{1,0:T(8,128)(2,1)}) tuple(%start, %a, %b, %c, %d, /*index=5*/%v.0)
  %loop = (s32[]{:T(128)}, bf16[512,128]{1,0:T(8,128)(2,1)}, bf16[16,128]{1,0:T(8,128)(2,1)}, f32[1024]{0:T(1024)}, f32[256,8]{1,0:T(8,128)}, /*index=5*/bf16[4,128]{1,0:T(8,128)(2,1)}) while(%init), condition=%cond, body=%body, metadata={op_name="jit(step)/while"}
  %out = bf16[512,128]{1,0:T(8,128)(2,1)} get-tuple-element(%loop), index=1
  %rs-start = ((bf16[64,128]{1,0:T(8,128)(2,1)}), bf16[8,128]{1,0:T(8,128)(2,1)}) async-start(%e), calls=%wrapped_reduce_scatter
  %rs-done = bf16[8,128]{1,0:T(8,128)(2,1)} async-done(%rs-start), calls=%wrapped_reduce_scatter
  %ars = f32[32,64]{1,0:T(8,128)} fusion(%f), kind=kCustom, calls=%all-reduce-scatter
  ROOT %result = (bf16[512,128]{1,0:T(8,128)(2,1)}, bf16[8,128]{1,0:T(8,128)(2,1)}, f32[32,64]{1,0:T(8,128)}) tuple(%out, %rs-done, %ars)
}
"""
BF16 = 2


def test_tpu_style_hlo():
  a = hlo.audit(TPU_HLO)
  assert a.loops == {"loop": 7}  # 0 up to 7 in steps of 1, read off cond, body and init
  sites = {c.name: c for c in a.collectives}
  assert sorted(sites) == ["ag-start", "ar", "ar-start", "chain_ag", "cp-start", "rs"]

  gather = sites["ag-start"]  # async pair: counted once, result is the second tuple element
  assert (gather.kind, gather.result, gather.group_size) == (
      "all-gather", (hlo.Array("bf16", (128, 128)),), 8)
  assert gather.loops == ("loop",) and gather.trips == 7
  assert gather.traffic_bytes == 128 * 128 * BF16 * 7 / 8
  assert gather.source == "jit(step)/while/body/all_gather"

  combined = sites["ar-start"]  # tuple all-reduce: both arrays, groups of 4 (transposed iota)
  assert combined.kind == "all-reduce" and combined.group_size == 4
  assert combined.operand_bytes == (1024 + 256 * 8) * F32
  assert combined.traffic_bytes == 2 * (1024 + 256 * 8) * F32 * 3 / 4

  permute = sites["cp-start"]
  assert permute.kind == "collective-permute" and permute.group_size is None
  assert permute.result == (hlo.Array("bf16", (512, 128)),)
  assert permute.traffic_bytes == 512 * 128 * BF16

  chain = sites["chain_ag"]  # one all-gather run over two fusions
  assert chain.kind == "all-gather" and chain.trips == 7 and chain.group_size == 32
  assert chain.traffic_bytes == 128 * 128 * BF16 * 31 / 32

  wrapped = sites["rs"]  # inside async-start/async-done: once, outside the loop
  assert wrapped.kind == "reduce-scatter" and wrapped.loops == () and wrapped.trips == 1
  assert wrapped.traffic_bytes == 64 * 128 * BF16 * 7 / 8

  fused = sites["ar"]  # all-reduce-scatter fusion: runs as a reduce-scatter
  assert fused.kind == "reduce-scatter" and fused.result == (hlo.Array("f32", (32, 64)),)
  assert fused.traffic_bytes == 1024 * 64 * F32 * 31 / 32

  assert {k: t.count for k, t in a.totals().items()} == {
      "all-gather": 14, "all-reduce": 7, "collective-permute": 7, "reduce-scatter": 2}
  # per trip: the dot and one convolution in each chain fusion, all [512,128] x [128,128]
  assert a.flops == 7 * 3 * 2 * 512 * 128 * 128
  table = a.table()
  assert "loop[7]" in table and "bf16[128,128]" in table


def test_unknown_trip_count_is_reported_not_guessed():
  text = TPU_HLO.replace("%limit = s32[]{:T(128)} constant(7)",
                         "%limit = s32[]{:T(128)} get-tuple-element(%param.1), index=3")
  a = hlo.audit(text)  # compared against a loop-carried value the body changes: unknown
  assert a.loops == {"loop": None}
  assert all(c.trips is None for c in a.collectives if c.loops)
  assert a.totals()["all-gather"].count == 2  # unknown loops count once
  assert "unknown trip counts" in a.table()


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu not installed (pip install 'jax[tpu]'): no TPU topology")
def test_aot_for_tpu_topology():
  from launch.compile_step import topology_devices

  text = _compile_shard_map(topology_devices("v5e:2x2"))
  assert "known_trip_count" not in text  # XLA:TPU leaves the trips to be read off the loop
  a = hlo.audit(text)
  assert list(a.loops.values()) == [TRIPS]
  gather, psum = sorted((c for c in a.collectives if c.loops), key=lambda c: c.kind)
  assert (gather.kind, psum.kind) == ("all-gather", "all-reduce")
  assert gather.trips == psum.trips == TRIPS and gather.group_size == psum.group_size == 4
  assert gather.result[0].elements == K * K  # XLA:TPU may gather it as bfloat16
  assert gather.traffic_bytes == K * K * {"f32": F32, "bf16": BF16}[gather.dtype] * 3 / 4
  assert psum.traffic_bytes == 2 * B * K * F32 * 3 / 4
  after = [c for c in a.collectives if not c.loops]  # the psum_scatter (maybe all-reduce+slice)
  assert len(after) == 1 and after[0].operand_bytes == B * K * F32
  assert a.flops == 2 * B * K * K * TRIPS
