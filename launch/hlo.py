"""Audit a compiled XLA program: its collectives and FLOPs, with loop bodies counted per trip.

  from launch.hlo import audit
  a = audit(compiled.as_text())   # the optimized HLO of a jit(...).lower(...).compile()
  print(a.table())

XLA's own cost analysis counts a while-loop body once, so for a scanned model it says little
about a step. This module reads the HLO text instead: it parses the computations, walks the
call graph from ENTRY (while bodies and conditions, fusions, calls, conditional branches,
async wrappers) and multiplies every collective and every dot/convolution by the trip counts
of the while loops around it. That shows what a sharded step really moves (e.g. whether a
ZeRO-3 step moves about the bytes its parameters predict, or all-reduces a [tokens, vocab]
tensor on every trip of a loss loop).

Trip counts come from the while's backend_config ("known_trip_count", which XLA:CPU sets);
otherwise (XLA:TPU does not set it) from the loop itself: the condition compares a tuple
element against a constant (or a loop-invariant element), the body adds a constant step to
it, and the while's operand tuple gives its start. Anything else is reported as unknown
(None) rather than guessed; unknown loops count once in FLOPs and step totals.

Per-chip ICI traffic of one execution, with n the replica group size and ring-algorithm
factors:
  all-gather:          result_bytes  * (n-1)/n
  reduce-scatter:      operand_bytes * (n-1)/n
  all-reduce:          2 * operand_bytes * (n-1)/n   (a reduce-scatter plus an all-gather)
  all-to-all:          operand_bytes * (n-1)/n       (ragged-all-to-all likewise, an upper bound)
  collective-permute:  operand_bytes                 (collective-broadcast: result_bytes)
Tuple-shaped (combined) collectives sum their arrays. When n is unknown the factor (n-1)/n
is taken as 1.

What counts as one collective:
- async pairs (all-gather-start/done, all-reduce-start/done, collective-permute-start/done,
  async-start/done wrapping e.g. a reduce-scatter) count once, at the start;
- XLA:TPU's async collective fusions split one collective over a chain of fusions (the same
  channel_id and chain_id, each fusion progressing it while computing); a chain counts once;
- XLA:TPU's all-reduce-scatter fusion (a fusion whose computation all-reduces and returns a
  dynamic-slice of the result) is reported as the reduce-scatter it runs;
- a collective in a conditional branch is listed once per branch (the branch taken is not
  known), so its totals are an upper bound.

FLOPs: 2 * prod(result dims) * prod(contracting dims) for dots; for convolutions 2 * output
batch * output features * kernel input features * the (output, kernel) position pairs that
read input rather than padding (XLA:TPU writes dots as padded convolutions); inside fusions
too. Elementwise ops, reductions and custom calls are ignored. A conditional counts its most
expensive branch. Like the traffic, FLOPs are per chip: an SPMD program is one chip's part.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Collection, Iterator
from typing import NamedTuple

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "ragged-all-to-all",
               "collective-permute", "collective-broadcast")
# Attributes that name the computations an instruction runs.
_CALL_ATTRS = ("calls", "to_apply", "body", "condition", "branch_computations",
               "true_computation", "false_computation", "called_computations")


# ----------------------------------------------------------------------------- shapes

@dataclasses.dataclass(frozen=True)
class Array:
  """One array of a shape: dtype and dimensions (layout dropped)."""
  dtype: str
  dims: tuple[int, ...]

  @property
  def elements(self) -> int:
    return math.prod(self.dims)

  @property
  def bytes(self) -> int:
    return self.elements * _dtype_bits(self.dtype) // 8

  def __str__(self) -> str:
    return f"{self.dtype}[{','.join(map(str, self.dims))}]"


def _dtype_bits(dtype: str) -> int:
  """Bits per element: the number in the name (s32, bf16, f8e4m3fn, c64, s4); pred is a byte."""
  if dtype == "pred":
    return 8
  m = re.search(r"\d+", dtype)
  return int(m.group()) if m else 0  # token[], opaque: no data


_ARRAY = re.compile(r"([a-z][a-z0-9]*)\[([^\]]*)\]")


def arrays(shape: str) -> tuple[Array, ...]:
  """The arrays of a shape text, tuples flattened: '(f32[2]{0}, s32[])' -> f32[2], s32[]."""
  out = []
  for dtype, dims in _ARRAY.findall(shape):
    out.append(Array(dtype, tuple(int(d.lstrip("<=")) for d in dims.split(",") if d)))
  return tuple(out)


def tuple_elements(shape: str) -> list[str]:
  """Top-level elements of a tuple shape text; [shape] if it is not a tuple."""
  shape = shape.strip()
  if not shape.startswith("("):
    return [shape]
  return _split_top(shape[1:_closing(shape, 0)])


def _closing(text: str, start: int) -> int:
  """Index of the bracket closing the one at text[start] (any of (), {}, [] nest)."""
  depth = 0
  for i in range(start, len(text)):
    if text[i] in "({[":
      depth += 1
    elif text[i] in ")}]":
      depth -= 1
      if depth == 0:
        return i
  raise ValueError(f"unbalanced brackets: {text[start:start + 80]!r}")


def _split_top(text: str) -> list[str]:
  """Split on commas outside brackets."""
  parts, depth, start = [], 0, 0
  for i, ch in enumerate(text):
    if ch in "({[":
      depth += 1
    elif ch in ")}]":
      depth -= 1
    elif ch == "," and depth == 0:
      parts.append(text[start:i].strip())
      start = i + 1
  tail = text[start:].strip()
  return parts + [tail] if tail else parts


# ----------------------------------------------------------------------------- parsing

@dataclasses.dataclass(frozen=True)
class Instruction:
  name: str
  shape: str                 # shape text, layouts included
  opcode: str
  operands: tuple[str, ...]  # operand names (or a constant's literal)
  attrs: str                 # the text after the operands: channel_id=..., calls=..., ...


@dataclasses.dataclass(frozen=True)
class Computation:
  name: str
  instructions: dict[str, Instruction]
  root: str

  def __getitem__(self, name: str) -> Instruction:
    return self.instructions[name]


@dataclasses.dataclass(frozen=True)
class Module:
  computations: dict[str, Computation]
  entry: str
  num_devices: int  # replica_count * num_partitions: what replica_groups={} spans


_HEADER = re.compile(r"^(ENTRY\s+)?%?(\S+)\s+\(.*\)\s*->\s*.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT\s+)?%?([^\s=]+)\s*=\s*(.*)$")
_SCALAR_SHAPE = re.compile(r"[a-z][a-z0-9]*\[[^\]]*\](\{[^}]*\})?")
_COMMENT = re.compile(r"/\*.*?\*/")


def parse_module(text: str) -> Module:
  """All computations of an HLO module text, and which is ENTRY."""
  comps, entry, name = {}, None, None  # name: the computation being read
  for line in text.splitlines():
    line = _COMMENT.sub("", line)  # /*index=5*/ markers inside long tuples
    if name is None:
      m = _HEADER.match(line)
      if m and not line.startswith("HloModule"):
        name, instructions, root = m.group(2), {}, None
        entry = name if m.group(1) else entry
    elif line.strip() == "}":
      comps[name] = Computation(name, instructions, root or next(reversed(instructions)))
      name = None
    elif (ins := parse_instruction(line)) is not None:
      instructions[ins.name] = ins
      root = ins.name if line.lstrip().startswith("ROOT ") else root
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  header = text.split("\n", 1)[0]
  devices = _int_attr(header, "replica_count") * _int_attr(header, "num_partitions")
  return Module(comps, entry, devices)


def _int_attr(header: str, key: str) -> int:
  m = re.search(rf"\b{key}=(\d+)", header)
  return int(m.group(1)) if m else 1


def parse_instruction(line: str) -> Instruction | None:
  """'%name = SHAPE opcode(operands), attrs' -> Instruction; None for other lines."""
  m = _INSTRUCTION.match(line)
  if not m:
    return None
  name, rest = m.groups()
  if rest.startswith("("):
    end = _closing(rest, 0) + 1
  else:
    s = _SCALAR_SHAPE.match(rest)
    if not s:
      return None
    end = s.end()
  shape, rest = rest[:end], rest[end:]
  m = re.match(r"\s*([\w\-]+)\(", rest)
  if not m:
    return None
  open_at = m.end() - 1
  close_at = _closing(rest, open_at)
  operands = tuple(op.split()[-1].lstrip("%") for op in _split_top(rest[open_at + 1:close_at]))
  return Instruction(name, shape, m.group(1), operands, rest[close_at + 1:].lstrip(", "))


def _unquoted(attrs: str) -> str:
  """attrs without the contents of quoted strings (op names, JSON strings)."""
  return re.sub(r'"(?:[^"\\]|\\.)*"', '""', attrs)


def called(ins: Instruction) -> list[tuple[str, str]]:
  """(attribute, computation name) for each computation `ins` runs."""
  out = []
  for key, value in re.findall(rf"\b({'|'.join(_CALL_ATTRS)})=(\{{[^}}]*\}}|%?[\w.\-]+)",
                               _unquoted(ins.attrs)):
    out += [(key, name.lstrip("%")) for name in re.findall(r"%?([\w.\-]+)", value)]
  return out


def _attr(ins: Instruction, key: str) -> str | None:
  m = re.search(rf"\b{key}=(\S+?)(?:,\s|$)", _unquoted(ins.attrs))
  return m.group(1) if m else None


# ----------------------------------------------------------------------------- trip counts

def trip_count(module: Module, caller: Computation, loop: Instruction) -> int | None:
  """Trips of a while loop: its known_trip_count, else read off the loop; None if neither."""
  m = re.search(r'"known_trip_count":\{"n":"(\d+)"', loop.attrs)
  if m:
    return int(m.group(1))
  try:
    return _trips_from_loop(module, caller, loop)
  except (KeyError, IndexError, ValueError):  # a loop of another form: unknown, not a crash
    return None


def _trips_from_loop(module: Module, caller: Computation, loop: Instruction) -> int | None:
  """Count trips of `while i <op> limit: i += step` from the condition, body and init tuple."""
  calls = dict(called(loop))
  cond, body = module.computations[calls["condition"]], module.computations[calls["body"]]
  compare = _binary(module, cond, cond.root, "compare")
  init = caller[loop.operands[0]]
  if compare is None or init.opcode != "tuple":
    return None
  direction, lhs, rhs = compare
  if lhs[0] == "const":  # limit <op> i  ->  i <op'> limit
    direction, lhs, rhs = _FLIPPED[direction], rhs, lhs
  if lhs[0] != "elem":
    return None
  index = lhs[1]
  step = _step(module, body, index)
  start = _scalar(module, caller, init.operands[index])
  limit = rhs
  if rhs[0] == "elem" and _scalar(module, body, body[body.root].operands[rhs[1]]) == rhs:
    limit = _scalar(module, caller, init.operands[rhs[1]])  # a loop-invariant limit
  if step is None or start is None or limit is None or start[0] != "const" or limit[0] != "const":
    return None
  return _count(start[1], limit[1], step, direction)


_FLIPPED = {"LT": "GT", "GT": "LT", "LE": "GE", "GE": "LE", "EQ": "EQ", "NE": "NE"}


def _count(start: int, limit: int, step: int, direction: str) -> int | None:
  span = limit - start
  if direction == "LT" and step > 0:
    return max(0, -(-span // step))
  if direction == "LE" and step > 0:
    return max(0, span // step + 1)
  if direction == "GT" and step < 0:
    return max(0, -(span // -step))
  if direction == "GE" and step < 0:
    return max(0, -span // -step + 1)
  if direction == "NE" and step and span % step == 0 and span // step >= 0:
    return span // step
  return None


def _step(module: Module, body: Computation, index: int) -> int | None:
  """The constant the body adds to tuple element `index`, or None."""
  root = body[body.root]
  if root.opcode != "tuple":
    return None
  add = _binary(module, body, root.operands[index], "add")
  if add is None:
    return None
  values = add[1:]
  if ("elem", index) in values:
    other = values[1] if values[0] == ("elem", index) else values[0]
    return other[1] if other[0] == "const" else None
  return None


def _binary(module: Module, comp: Computation, name: str, opcode: str):
  """(direction, lhs, rhs) for an `opcode` instruction, or a fusion whose root is one, with
  each operand resolved by _scalar; None when `name` is neither."""
  ins = comp[name]
  if ins.opcode == opcode:
    return (_attr(ins, "direction"),) + tuple(_scalar(module, comp, o) for o in ins.operands[:2])
  if ins.opcode == "fusion":
    fused = module.computations[dict(called(ins))["calls"]]
    args = [_scalar(module, comp, o) for o in ins.operands]
    inner = fused[fused.root]
    if inner.opcode == opcode:
      return (_attr(inner, "direction"),) + tuple(
          _scalar(module, fused, o, args) for o in inner.operands[:2])
  return None


def _scalar(module: Module, comp: Computation, name: str, args=None):
  """What a scalar is in terms of the loop: ('const', value) or ('elem', i) for element i of
  the computation's tuple parameter; None otherwise. Sees through copies and converts;
  `args` resolves the parameters of a fused computation."""
  ins = comp[name]
  while ins.opcode in ("copy", "bitcast", "convert", "reshape"):
    ins = comp[ins.operands[0]]
  if ins.opcode == "constant":
    m = re.fullmatch(r"-?\d+", ins.operands[0]) if ins.operands else None
    return ("const", int(m.group())) if m else None
  if ins.opcode == "get-tuple-element" and comp[ins.operands[0]].opcode == "parameter":
    return ("elem", int(_attr(ins, "index")))
  if ins.opcode == "parameter" and args is not None:
    return args[int(ins.operands[0])]
  return None


# ----------------------------------------------------------------------------- collectives

@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective site on one call path from ENTRY."""
  kind: str                     # all-gather, all-reduce, reduce-scatter, all-to-all, ...
  name: str                     # the HLO instruction
  result: tuple[Array, ...]
  operands: tuple[Array, ...]
  group_size: int | None        # replica group size n (None: not known, e.g. permutes)
  computation: str              # the computation it sits in
  loops: tuple[str, ...]        # enclosing while instructions, outermost first
  trips: int | None             # product of their trip counts (None: one is unknown)
  traffic_bytes: float          # per chip, one execution (module docstring)
  source: str = ""              # its op_name, else "operand: " + its first operand's
  known_trips: int = 1          # product of the trip counts that are known (unknown: once)

  @property
  def dtype(self) -> str:
    return ",".join(sorted({a.dtype for a in self.result}))

  @property
  def result_bytes(self) -> int:
    return sum(a.bytes for a in self.result)

  @property
  def operand_bytes(self) -> int:
    return sum(a.bytes for a in self.operands)

  @property
  def step_traffic_bytes(self) -> float:
    """traffic_bytes times the trips (an unknown trip count counts once, as in FLOPs: a loop
    of unknown length inside, e.g. the sampler's decode loop, is reported per trip)."""
    return self.traffic_bytes * self.executions

  @property
  def executions(self) -> int:
    return self.known_trips

  @property
  def elements(self) -> int:
    """Elements of its largest array (result or operand)."""
    return max((a.elements for a in self.result + self.operands), default=0)

  def has_dim(self, size: int) -> bool:
    """Whether one of its arrays (result or operand) has a dimension of `size`."""
    return any(size in a.dims for a in self.result + self.operands)


def moves_tensor_with_dims(c: Collective, sizes: Collection[int], min_elements: int) -> bool:
  """Whether `c` moves an array with a dimension in `sizes` (e.g. {vocab, vocab // tensor})
  and at least `min_elements` elements (e.g. tokens per chip x vocab / tensor)."""
  return any(a.elements >= min_elements and any(d in sizes for d in a.dims)
             for a in c.result + c.operands)


def group_size(ins: Instruction, num_devices: int) -> int | None:
  """Devices per replica group, from any of the forms XLA prints:
  {{0,1},{2,3}} (explicit), [4,2]<=[8] or [2,4]<=[4,2]T(1,0) (iota: groups x size), {} (all),
  mesh['a'=2,'b'=4] {'b'} (mesh axes; a sub-axis prints as 'b':(1)2)."""
  attrs = _unquoted(ins.attrs)
  m = re.search(r"replica_groups=(mesh\[[^\]]*\][^{]*\{[^}]*\})", attrs)
  if m:
    return _mesh_group_size(m.group(1))
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attrs)
  if m:
    return int(m.group(2))
  m = re.search(r"replica_groups=\{(\{[^}]*\})?", attrs)
  if m:
    if m.group(1) is None:  # {}: one group of every device
      return num_devices
    return len(re.findall(r"\d+", m.group(1)))
  return None


def _mesh_group_size(text: str) -> int:
  """mesh['axis_0'=4,'axis_1'=2], device_ids=(...) {'axis_0'} -> 4 (product of the listed axes)."""
  sizes = {k: int(v) for k, v in re.findall(r"'([^']+)'=(\d+)", text[:text.index("]")])}
  selected = text[text.rindex("{") + 1:-1]
  n = 1
  for axis, sub in re.findall(r"'([^']+)'(?::\(\d+\)(\d+))?", selected):
    n *= int(sub) if sub else sizes[axis]
  return n


def traffic(kind: str, operand_bytes: int, result_bytes: int, n: int | None) -> float:
  """Per-chip bytes of one execution (ring factors, module docstring)."""
  f = 1.0 if n is None else (n - 1) / n
  return {"all-gather": result_bytes * f, "reduce-scatter": operand_bytes * f,
          "all-reduce": 2 * operand_bytes * f, "all-to-all": operand_bytes * f,
          "ragged-all-to-all": operand_bytes * f, "collective-permute": operand_bytes,
          "collective-broadcast": result_bytes}[kind]


def collective_kind(ins: Instruction) -> str | None:
  """The collective an instruction starts (all-gather-start -> all-gather); None otherwise."""
  kind = ins.opcode.removesuffix("-start")
  return kind if kind in COLLECTIVES else None


def _collective(comp: Computation, ins: Instruction, kind: str,
                in_fusion: bool) -> tuple[str, tuple[Array, ...], tuple[Array, ...]]:
  """(kind, result arrays, operand arrays) of a collective instruction."""
  operand_names = ins.operands[:1] if kind == "collective-permute" else ins.operands
  operands = tuple(a for o in operand_names for a in arrays(comp[o].shape))
  if ins.opcode in ("all-gather-start", "collective-permute-start"):
    result = arrays(tuple_elements(ins.shape)[1])  # (operands, results[, contexts])
  else:
    result = arrays(ins.shape)
  root = comp[comp.root]
  if (kind == "all-reduce" and in_fusion and root.opcode == "dynamic-slice"
      and root.operands[0] == ins.name):  # XLA:TPU all-reduce-scatter fusion
    return "reduce-scatter", arrays(root.shape), operands
  return kind, result, operands


# ----------------------------------------------------------------------------- the audit

class Total(NamedTuple):
  count: int            # executions per step
  traffic_bytes: float  # per chip per step


@dataclasses.dataclass(frozen=True)
class Audit:
  collectives: tuple[Collective, ...]
  flops: float                         # per chip per step, loop trips included
  loops: dict[str, int | None]         # while instruction -> trip count

  def totals(self) -> dict[str, Total]:
    """Per kind: executions and per-chip traffic bytes per step."""
    out: dict[str, Total] = {}
    for c in self.collectives:
      count, nbytes = out.get(c.kind, (0, 0.0))
      out[c.kind] = Total(count + c.executions, nbytes + c.step_traffic_bytes)
    return dict(sorted(out.items()))

  @property
  def traffic_bytes(self) -> float:
    """All collectives' per-chip traffic per step."""
    return sum(c.step_traffic_bytes for c in self.collectives)

  def largest(self, n: int = 10) -> list[Collective]:
    """The n collective sites with the most traffic per step."""
    return sorted(self.collectives, key=lambda c: -c.step_traffic_bytes)[:n]

  def table(self, n: int | None = None) -> str:
    """One row per collective site, most traffic first, then the totals per kind."""
    rows = [("kind", "result", "n", "MB/exec", "loops [trips]", "trips", "GB/step", "source")]
    for c in self.largest(len(self.collectives) if n is None else n):
      loops = " > ".join(f"{w}[{_fmt_trips(self.loops.get(w))}]" for w in c.loops) or "-"
      rows.append((c.kind, _fmt_arrays(c.result), str(c.group_size or "-"),
                   f"{c.traffic_bytes / 1e6:.2f}", loops, _fmt_trips(c.trips),
                   f"{c.step_traffic_bytes / 1e9:.3f}", _fmt_source(c.source)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)) + "  " + r[-1] for r in rows]
    if len(rows) - 1 < len(self.collectives):
      lines.append(f"... {len(self.collectives) - len(rows) + 1} more sites")
    lines.append("")
    for kind, t in self.totals().items():
      lines.append(f"{kind:<20} {t.count:>8} per step  {t.traffic_bytes / 1e9:10.3f} GB/step/chip")
    lines.append(f"{'total':<20} {sum(t.count for t in self.totals().values()):>8} per step  "
                 f"{self.traffic_bytes / 1e9:10.3f} GB/step/chip")
    lines.append(f"dot/convolution FLOPs per chip per step: {self.flops:.4g}")
    unknown = [w for w, t in self.loops.items() if t is None]
    if unknown:
      lines.append(f"unknown trip counts (counted once): {', '.join(unknown)}")
    return "\n".join(lines)


def _fmt_trips(trips: int | None) -> str:
  return "?" if trips is None else str(trips)


def _fmt_source(source: str, width: int = 60) -> str:
  """The tail of an op name (its innermost ops say most), keeping an 'operand: ' mark."""
  mark = "operand: " if source.startswith("operand: ") else ""
  tail = source[len(mark):]
  return mark + (tail if len(tail) <= width else "..." + tail[-width + 3:])


def _fmt_arrays(result: tuple[Array, ...]) -> str:
  if len(result) == 1:
    return str(result[0])
  return f"({len(result)}) {result[0]} +{len(result) - 1}"  # combined: the first and a count


def audit(hlo_text: str) -> Audit:
  """Collectives and FLOPs of an optimized HLO module text (compiled.as_text())."""
  module = parse_module(hlo_text)
  walker = _Walker(module)
  collectives = tuple(walker.collectives(module.entry, (), 1, in_fusion=False))
  return Audit(collectives, walker.flops(module.entry), walker.trips)


class _Walker:
  """Walks the call graph from ENTRY, keeping the while loops on the path."""

  def __init__(self, module: Module):
    self.module = module
    self.trips: dict[str, int | None] = {}
    self._flops: dict[str, float] = {}

  def _trip(self, comp: Computation, ins: Instruction) -> int | None:
    if ins.name not in self.trips:
      self.trips[ins.name] = trip_count(self.module, comp, ins)
    return self.trips[ins.name]

  def collectives(self, name: str, loops: tuple[str, ...], trips: int | None,
                  in_fusion: bool, seen: set | None = None,
                  known: int = 1) -> Iterator[Collective]:
    comp = self.module.computations[name]
    seen = set() if seen is None else seen  # async-fusion chains already counted
    for ins in comp.instructions.values():
      kind = collective_kind(ins)
      if kind is not None:
        chain = _chain(ins)
        if chain is None or (loops, chain) not in seen:
          seen.add((loops, chain))
          yield self._site(comp, ins, kind, loops, trips, in_fusion, known)
      for callee in _callees(ins):
        if ins.opcode == "while":
          trip = self._trip(comp, ins)
          inner = None if trips is None or trip is None else trips * trip
          yield from self.collectives(callee, loops + (ins.name,), inner, False, seen,
                                      known * (trip or 1))
        else:
          yield from self.collectives(callee, loops, trips, ins.opcode == "fusion", seen, known)

  def _site(self, comp, ins, kind, loops, trips, in_fusion, known) -> Collective:
    kind, result, operands = _collective(comp, ins, kind, in_fusion)
    n = None if kind == "collective-permute" else group_size(ins, self.module.num_devices)
    op_bytes, res_bytes = sum(a.bytes for a in operands), sum(a.bytes for a in result)
    source = _op_name(ins)
    if not source and ins.operands and _op_name(comp[ins.operands[0]]):
      source = "operand: " + _op_name(comp[ins.operands[0]])
    return Collective(kind, ins.name, result, operands, n, comp.name, loops, trips,
                      traffic(kind, op_bytes, res_bytes, n), source, known)

  def flops(self, name: str) -> float:
    """Dot/convolution FLOPs of one run of a computation and all it calls (memoized)."""
    if name not in self._flops:
      comp = self.module.computations[name]
      total = 0.0
      for ins in comp.instructions.values():
        total += instruction_flops(comp, ins)
        callees = _callees(ins)
        if ins.opcode == "while":
          total += (self._trip(comp, ins) or 1) * sum(self.flops(c) for c in callees)
        elif ins.opcode == "conditional":
          total += max((self.flops(c) for c in callees), default=0.0)
        else:
          total += sum(self.flops(c) for c in callees)
      self._flops[name] = total
    return self._flops[name]


def _callees(ins: Instruction) -> list[str]:
  """The computations that run as part of `ins`: not the reducers of all-reduce, reduce,
  sort, ... (to_apply, except for a call), and nothing for an async -done or -update (its
  -start ran the computation)."""
  if ins.opcode.endswith(("-done", "-update")):
    return []
  return [c for key, c in called(ins) if key != "to_apply" or ins.opcode == "call"]


def _op_name(ins: Instruction) -> str:
  """The JAX op behind an instruction (its metadata op_name), or ''."""
  m = re.search(r'op_name="([^"]*)"', ins.attrs)
  return m.group(1) if m else ""


def _chain(ins: Instruction) -> tuple[str, str] | None:
  """(channel_id, chain_id) of a collective that XLA:TPU split over a chain of async
  collective fusions; None for an ordinary collective."""
  m = re.search(r'chain_id=\\?"?(\d+)', ins.attrs)
  if m is None and "async_collective_fusion_config" not in ins.attrs:
    return None
  return (_attr(ins, "channel_id") or ins.name, m.group(1) if m else "")


def instruction_flops(comp: Computation, ins: Instruction) -> float:
  """2 * output elements * contraction size for a dot or convolution; 0 for anything else."""
  if ins.opcode == "dot":
    lhs = arrays(comp[ins.operands[0]].shape)[0]
    dims = _attr(ins, "lhs_contracting_dims")
    contracting = [int(d) for d in re.findall(r"\d+", dims or "")]
    return 2.0 * arrays(ins.shape)[0].elements * math.prod(lhs.dims[d] for d in contracting)
  if ins.opcode == "convolution":
    return _convolution_flops(comp, ins)
  return 0.0


def _convolution_flops(comp: Computation, ins: Instruction) -> float:
  """2 * output batch * output features * kernel input features * the (output, kernel)
  position pairs of each spatial dimension that land on input, not on padding or holes:
  XLA:TPU writes some dots as convolutions padded so that one kernel position in 8 is real."""
  lhs_labels, rest = (_attr(ins, "dim_labels") or "bf_io->bf").split("_")
  rhs_labels, out_labels = rest.split("->")
  lhs, rhs = (arrays(comp[o].shape)[0].dims for o in ins.operands[:2])
  out = arrays(ins.shape)[0].dims
  window = _window(ins)
  flops = 2.0 * rhs[rhs_labels.index("i")]
  flops *= out[out_labels.index("b")] * out[out_labels.index("f")]
  for d in range(len(out_labels) - 2):  # spatial dimensions are labelled 0, 1, ...
    get = lambda key, default: window.get(key, [default] * (d + 1))[d]
    pad_lo = int(get("pad", "0_0").split("_")[0])
    flops *= _window_pairs(lhs[lhs_labels.index(str(d))], rhs[rhs_labels.index(str(d))],
                           out[out_labels.index(str(d))], int(get("stride", 1)), pad_lo,
                           int(get("lhs_dilate", 1)), int(get("rhs_dilate", 1)))
  return flops


def _window(ins: Instruction) -> dict[str, list[str]]:
  """window={size=2x8 pad=0_0x7_7 lhs_dilate=2x1} -> {'size': ['2','8'], 'pad': [...], ...}."""
  m = re.search(r"window=\{([^}]*)\}", ins.attrs)
  return {k: v.split("x") for k, v in re.findall(r"(\w+)=(\S+)", m.group(1))} if m else {}


def _window_pairs(size: int, kernel: int, out: int, stride: int, pad_lo: int,
                  lhs_dilate: int, rhs_dilate: int) -> int:
  """Number of (output position, kernel position) pairs of one spatial dimension that read
  an input element: position o * stride + k * rhs_dilate - pad_lo of the lhs-dilated input
  must lie in it and not in a dilation hole."""
  extent = (size - 1) * lhs_dilate + 1
  pairs = 0
  for k in range(kernel):
    offset = k * rhs_dilate - pad_lo
    if lhs_dilate == 1:  # o in [ceil(-offset / stride), floor((extent - 1 - offset) / stride)]
      lo, hi = max(0, -(offset // stride)), min(out - 1, (extent - 1 - offset) // stride)
      pairs += max(0, hi - lo + 1)
    else:
      pairs += sum(1 for o in range(out) if 0 <= (p := o * stride + offset) < extent
                   and p % lhs_dilate == 0)
  return pairs
