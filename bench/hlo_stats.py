"""What a compiled program does, read from XLA itself: collective bytes from the optimized HLO
text and per-device memory from `compiled.memory_analysis()`.

Collective bytes are the result sizes of all-reduce, all-gather, reduce-scatter, all-to-all and
collective-permute ops (async `-start` forms included, `-done` forms not), each multiplied by the
trip counts of the while loops around it (XLA's `known_trip_count`; a loop without one counts
`default_trip` times). Per device: the optimized module is the per-device SPMD program.
"""

import re

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{$")
_OP = re.compile(r"^\s*(?:ROOT )?%[\w.\-]+ = (.*?) ([a-z\-]+)\(")
_SHAPE = re.compile(r"\b(pred|bf16|[subfc]\d+)\[([\d,]*)\]")
_CALLS = re.compile(r"\b(?:body|condition|calls|to_apply|branch_computations)=(\{[^}]*\}|%[\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def shape_bytes(type_text: str) -> int:
  """Bytes of an HLO result type such as `f32[8,16]{1,0}` or a tuple of them."""
  total = 0
  for dtype, dims in _SHAPE.findall(type_text):
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    total += n * _BYTES[dtype]
  return total


def _computations(hlo_text: str) -> dict[str, list[str]]:
  comps, name = {}, None
  for line in hlo_text.splitlines():
    m = _COMPUTATION.match(line)
    if m:
      name = m.group(1)
      comps[name] = []
    elif name is not None and line.strip() not in ("", "}"):
      comps[name].append(line)
  return comps


def _multiplicities(comps: dict[str, list[str]], default_trip: int) -> dict[str, int]:
  """How many times each computation runs per call of the entry (while bodies x trip count)."""
  entry = next(n for n in comps if n.startswith("main"))
  mult = {entry: 1}
  stack = [entry]
  while stack:
    name = stack.pop()
    for line in comps[name]:
      trip = 1
      if " while(" in line:
        found = _TRIP.search(line)
        trip = int(found.group(1)) if found else default_trip
      for group in _CALLS.findall(line):
        for callee in (c.strip(" %{}") for c in group.split(",")):
          if callee in comps and callee not in mult:
            mult[callee] = mult[name] * trip
            stack.append(callee)
  return mult


def collective_bytes(hlo_text: str, default_trip: int = 1) -> dict:
  """{'total': bytes per call per device, 'by_op': {op: bytes}, 'ops': count}."""
  comps = _computations(hlo_text)
  mult = _multiplicities(comps, default_trip)
  by_op, ops = {}, 0
  for name, lines in comps.items():
    for line in lines:
      m = _OP.match(line)
      if not m:
        continue
      op = m.group(2)
      base = op[:-len("-start")] if op.endswith("-start") else op
      if base not in COLLECTIVES:
        continue
      size = shape_bytes(m.group(1))
      if op.endswith("-start") and m.group(1).startswith("("):
        size //= 2  # async start results carry (operand, result): count the result once
      by_op[base] = by_op.get(base, 0) + size * mult.get(name, 1)
      ops += 1
  return {"total": sum(by_op.values()), "by_op": by_op, "ops": ops}


def memory_bytes(compiled) -> dict:
  """Per-device bytes from XLA's memory analysis: argument + output + temp - alias."""
  m = compiled.memory_analysis()
  if m is None:
    return {"total": None}
  parts = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp",
                                                               "alias")}
  return {"total": parts["argument"] + parts["output"] + parts["temp"] - parts["alias"], **parts}
