"""Structured subnets: static-size index pytrees, samplers, extract/scatter and unit masks
(the specs they follow live in subnet_spec).

A subnet of one worker is a dict of int32 index arrays, `{'h_i': {'head': (Hs,), 'unit': (Fs,)}}`
for the partitioned layers (attn / mlp / attn_mlp modes) or `{'blocks': (Ns,)}` (blocks mode).
Sizes are static (from config); index *values* are data, so resampling never recompiles.
Samplers return the same pytree with a leading worker axis W. No sharding code lives here.
"""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

from twist_jax.model import ModelConfig
from twist_jax.subnet_spec import SubnetSpec, core_count


# Where a unit lives inside a block's leaves: (leaf path, dim of the leaf that holds the
# flattened (pre, U, post) axis, pre, post-multiplier) -- post is K for heads, 1 for MLP units.
_HEAD_LEAVES = ((("attn", "c_attn", "kernel"), 1, 3), (("attn", "c_attn", "bias"), 0, 3),
                (("attn", "c_proj", "kernel"), 0, 1))
_UNIT_LEAVES = ((("mlp", "c_fc", "kernel"), 1, 1), (("mlp", "c_fc", "bias"), 0, 1),
                (("mlp", "c_proj", "kernel"), 0, 1))


# ---- samplers -----------------------------------------------------------------------------------


def _sample_group(key, sampler: str, num_units: int, keep: int, workers: int, core: int = 0):
  """(W, keep) sorted int32 unit indices for one unit group; units 0..core-1 in every row."""
  if core:
    core_WxC = jnp.broadcast_to(jnp.arange(core, dtype=jnp.int32), (workers, core))
    if keep == core:
      return core_WxC
    rest = _sample_group(key, sampler, num_units - core, keep - core, workers)
    return jnp.concatenate([core_WxC, rest + core], axis=1)  # still sorted
  k_perm, k_fill = jax.random.split(key)
  if sampler == "balanced":
    # A fixed design relabeled by a random permutation: relabeling keeps the design's holder
    # counts and distinct rows, and makes each subnet a uniformly random m-subset.
    perm_U = jax.random.permutation(k_perm, num_units).astype(jnp.int32)
    return jnp.sort(perm_U[balanced_design(num_units, keep, workers)], axis=-1)
  u_WxU = jax.random.uniform(k_fill, (workers, num_units))
  if sampler == "uniform":
    priority_WxU = u_WxU  # top-k of i.i.d. uniforms = a uniformly random subset
  else:
    # cover / partition: deal a random permutation round-robin (each subnet gets <= keep), then
    # fill each subnet's remaining quota uniformly from units it lacks (priority 2 > any fill).
    dealt = min(num_units, workers * keep)
    perm_U = jax.random.permutation(k_perm, num_units)
    owner_U = jnp.full((num_units,), -1, jnp.int32).at[perm_U[:dealt]].set(
        jnp.arange(dealt, dtype=jnp.int32) % workers)
    mine_WxU = owner_U[None, :] == jnp.arange(workers, dtype=jnp.int32)[:, None]
    priority_WxU = jnp.where(mine_WxU, 2.0, u_WxU)
  _, idx_WxM = jax.lax.top_k(priority_WxU, keep)
  return jnp.sort(idx_WxM, axis=-1).astype(jnp.int32)


@functools.lru_cache(maxsize=None)
def balanced_design(num_units: int, keep: int, workers: int) -> np.ndarray:
  """(W, m) int32 unit ids of the `balanced` sampler before relabeling (docs/method.md §3):
  holder counts per unit within one of each other, and no two rows the same set whenever
  C(U, m) >= W distinct m-subsets exist. Host-side, from static sizes only."""
  u, m, w = num_units, keep, workers
  if w <= u or m in (0, u):
    out = _arcs(u, m, w)
    out.setflags(write=False)  # cached: shared by every call
    return out
  n_all = math.comb(u, m)
  every = [list(a) for a in itertools.combinations(range(u), m)] if n_all < w else []
  # Each full copy of all C(U, m) subsets holds every unit equally often.
  rows = every * (w // n_all) + _distinct_even(u, m, w % n_all if every else w)
  out = np.asarray(rows, np.int32).reshape(w, m)
  out.setflags(write=False)  # cached: shared by every call
  return out


def _arcs(u: int, m: int, w: int) -> np.ndarray:
  """Rows of m consecutive units of the cycle 0..U-1, row i starting at i m + i // (U / g),
  g = gcd(U, m). The first U / g rows tile m / g whole passes; each further block of U / g
  starts one unit later. So starts are distinct (rows differ) for W <= U, and every unit gets
  floor(W m / U) or one more slots (whole passes plus one contiguous stretch)."""
  period = u // math.gcd(u, m)
  i_W = np.arange(w)
  start_W = i_W * m + i_W // period
  return ((start_W[:, None] + np.arange(m)[None, :]) % u).astype(np.int32)


def _distinct_even(u: int, m: int, n: int) -> list[list[int]]:
  """n <= C(U, m) distinct m-subsets (0 < m < U) with holder counts within one.

  Whole rotation orbits of subsets in lexicographic order (an orbit holds every unit equally
  often), then swaps evening out the last, partial orbit: while unit a is held twice more than
  unit b, some row holds a but not b and turning a into b gives a row not yet taken (rows with
  a and not b outnumber rows with b and not a, and the swap maps the first into the second
  injectively), and each swap lowers sum(count^2), so it ends.
  """
  rows, seen = [], set()
  for base in itertools.combinations(range(u), m):
    for t in range(u):
      row = frozenset((x + t) % u for x in base)
      if len(rows) < n and row not in seen:
        rows.append(row)
        seen.add(row)
    if len(rows) == n:
      break
  count_U = np.bincount([x for row in rows for x in row], minlength=u)
  while count_U.max() - count_U.min() > 1:
    hi, lo = int(count_U.argmax()), int(count_U.argmin())
    j, new = next((j, (row - {hi}) | {lo}) for j, row in enumerate(rows)
                  if hi in row and lo not in row and (row - {hi}) | {lo} not in seen)
    seen.remove(rows[j])
    seen.add(new)
    rows[j] = new
    count_U[hi] -= 1
    count_U[lo] += 1
  return [sorted(row) for row in rows]


def sample_subnets(key: jax.Array, spec: SubnetSpec, workers: int | None = None):
  """Index pytree with a leading W axis; deterministic in `key`."""
  w = workers or spec.workers
  if spec.mode == "blocks":
    if not spec.partitioned:
      return {"blocks": jnp.zeros((w, 0), jnp.int32)}
    n = len(spec.partitioned)
    return {"blocks": _sample_group(key, spec.sampler, n, spec.keep_blocks, w,
                                    core_count(spec.core, n))}
  out = {}
  for i in spec.partitioned:
    layer = {}
    if "head" in spec.unit_kinds:
      layer["head"] = _sample_group(jax.random.fold_in(key, 2 * i), spec.sampler, spec.n_head[i],
                                    spec.keep_head[i], w, core_count(spec.core, spec.n_head[i]))
    if "unit" in spec.unit_kinds:
      layer["unit"] = _sample_group(jax.random.fold_in(key, 2 * i + 1), spec.sampler,
                                    spec.n_inner[i], spec.keep_unit[i], w,
                                    core_count(spec.core, spec.n_inner[i]))
    out[f"h_{i}"] = layer
  return out


def first_subnet(spec: SubnetSpec):
  """The fixed-prefix subnet (deployment heuristic `first`), W = 1."""
  return from_scores(_prefix_scores(spec), spec)


def _prefix_scores(spec: SubnetSpec):
  if spec.mode == "blocks":
    return {"blocks": -np.arange(len(spec.partitioned), dtype=np.float32)}
  return {f"h_{i}": {"head": -np.arange(spec.n_head[i], dtype=np.float32),
                     "unit": -np.arange(spec.n_inner[i], dtype=np.float32)}
          for i in spec.partitioned}


def from_scores(scores, spec: SubnetSpec):
  """W = 1 subnet keeping the highest-scoring units (structured pruning by a score)."""
  def top(s, keep):
    return np.sort(np.argsort(-np.asarray(s), kind="stable")[:keep]).astype(np.int32)[None]
  if spec.mode == "blocks":
    return {"blocks": jnp.asarray(top(scores["blocks"], spec.keep_blocks))}
  out = {}
  for i in spec.partitioned:
    layer = {}
    if "head" in spec.unit_kinds:
      layer["head"] = jnp.asarray(top(scores[f"h_{i}"]["head"], spec.keep_head[i]))
    if "unit" in spec.unit_kinds:
      layer["unit"] = jnp.asarray(top(scores[f"h_{i}"]["unit"], spec.keep_unit[i]))
    out[f"h_{i}"] = layer
  return out


# ---- model configs of subnets -------------------------------------------------------------------


def correction_factor(total: int, kept: int, mode: str) -> float:
  """c = (U/m)^p: p = 1 ('mean'), 1/2 ('norm'), 0 ('none'); docs/method.md §4."""
  p = {"none": 0.0, "mean": 1.0, "norm": 0.5}[mode]
  return float((total / kept) ** p)


def _scales(spec: SubnetSpec):
  attn = tuple(correction_factor(h, hs, spec.correction) for h, hs in
               zip(spec.n_head, spec.keep_head))
  mlp = tuple(correction_factor(f, fs, spec.correction) for f, fs in
              zip(spec.n_inner, spec.keep_unit))
  return attn, mlp


def subnet_model_config(full: ModelConfig, spec: SubnetSpec) -> ModelConfig:
  """Shape of the physical (True-variant) subnet model, correction scales included."""
  attn, mlp = _scales(spec)
  if spec.mode == "blocks":
    n = spec.kept_layers()
    return full.replace(n_head=full.n_head[:1] * n, n_inner=full.n_inner[:1] * n,
                        attn_scale=(1.0,) * n, mlp_scale=(1.0,) * n)
  return full.replace(n_head=spec.keep_head, n_inner=spec.keep_unit, attn_scale=attn,
                      mlp_scale=mlp)


def masked_model_config(full: ModelConfig, spec: SubnetSpec) -> ModelConfig:
  """The full-width model with the subnet's correction scales (Masked variant)."""
  if spec.mode == "blocks":
    return full
  attn, mlp = _scales(spec)
  return full.replace(attn_scale=attn, mlp_scale=mlp)


def unit_masks(subnet, spec: SubnetSpec):
  """0/1 gates for `GPT2(masks=...)` from one worker's subnet (no W axis)."""
  if spec.mode == "blocks":
    block = jnp.ones((spec.n_layer,), jnp.float32)
    if spec.partitioned:
      part = jnp.asarray(spec.partitioned, jnp.int32)
      block = block.at[part].set(0.0).at[part[subnet["blocks"]]].set(1.0)
    return {"block": block}
  masks = {}
  for kind, sizes in (("head", spec.n_head), ("unit", spec.n_inner)):
    if kind not in spec.unit_kinds:
      continue
    rows = [jnp.ones((u,), jnp.float32) for u in sizes]
    for i in spec.partitioned:
      rows[i] = jnp.zeros((sizes[i],), jnp.float32).at[subnet[f"h_{i}"][kind]].set(1.0)
    masks[kind] = jnp.stack(rows)
  return masks


# ---- extract / scatter ---------------------------------------------------------------------------


def unit_view(x, dim: int, pre: int, units: int):
  """Reshape so that the unit axis is explicit; returns (view, unit axis)."""
  post = x.shape[dim] // (pre * units)
  return x.reshape(x.shape[:dim] + (pre, units, post) + x.shape[dim + 1:]), dim + 1


def get_path(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def set_path(tree, path, value):
  """Copy of nested dict `tree` with `path` replaced (the input is not mutated)."""
  if not path:
    return value
  out = dict(tree)
  out[path[0]] = set_path(tree[path[0]], path[1:], value)
  return out


def leaf_rules(spec: SubnetSpec, layer: int):
  """(path, dim, pre, total units, kind) for every unit-bearing leaf of a partitioned layer."""
  rules = []
  if "head" in spec.unit_kinds:
    rules += [(p, d, pre, spec.n_head[layer], "head") for p, d, pre in _HEAD_LEAVES]
  if "unit" in spec.unit_kinds:
    rules += [(p, d, pre, spec.n_inner[layer], "unit") for p, d, pre in _UNIT_LEAVES]
  return rules


def blocks_kept(subnet, spec: SubnetSpec):
  """Sorted layer ids a blocks-mode subnet keeps (shared blocks included)."""
  shared = [i for i in range(spec.n_layer) if i not in spec.partitioned]
  part = jnp.asarray(spec.partitioned, jnp.int32)[subnet["blocks"]]
  return jnp.sort(jnp.concatenate([jnp.asarray(shared, jnp.int32), part]))


def stack_blocks(tree, n):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *[tree[f"h_{i}"] for i in range(n)])


def extract_subnet(params, subnet, spec: SubnetSpec):
  """Gathers one worker's smaller dense params (any params-shaped tree, e.g. Adam moments)."""
  if spec.mode == "blocks":
    kept = blocks_kept(subnet, spec)
    stacked = jax.tree.map(lambda x: x[kept], stack_blocks(params, spec.n_layer))
    out = {k: v for k, v in params.items() if not k.startswith("h_")}
    for j in range(spec.kept_layers()):
      out[f"h_{j}"] = jax.tree.map(lambda x, j=j: x[j], stacked)
    return out
  out = params
  for i in spec.partitioned:
    for path, dim, pre, total, kind in leaf_rules(spec, i):
      full = get_path(params, (f"h_{i}",) + path)
      idx = subnet[f"h_{i}"][kind]
      view, axis = unit_view(full, dim, pre, total)
      small = jnp.take(view, idx, axis=axis)
      shape = full.shape[:dim] + (-1,) + full.shape[dim + 1:]
      out = set_path(out, (f"h_{i}",) + path, small.reshape(shape))
  return out


def scatter_subnet(small, subnet, spec: SubnetSpec, like):
  """Inverse of extract: (full-shaped values with zeros elsewhere, 0/1 holder mask).

  `like` is a full-shaped tree (only its shapes and dtypes are used).
  """
  if spec.mode == "blocks":
    kept = blocks_kept(subnet, spec)
    small_stack = stack_blocks(small, spec.kept_layers())
    full_stack = stack_blocks(like, spec.n_layer)
    vals = jax.tree.map(lambda z, s: jnp.zeros_like(z).at[kept].set(s), full_stack, small_stack)
    mask = jax.tree.map(lambda z: jnp.zeros_like(z).at[kept].set(1), full_stack)
    out_v = {k: v for k, v in small.items() if not k.startswith("h_")}
    out_m = {k: jax.tree.map(jnp.ones_like, v) for k, v in out_v.items()}
    for i in range(spec.n_layer):
      out_v[f"h_{i}"] = jax.tree.map(lambda x, i=i: x[i], vals)
      out_m[f"h_{i}"] = jax.tree.map(lambda x, i=i: x[i], mask)
    return out_v, out_m
  vals, mask = small, jax.tree.map(jnp.ones_like, small)
  for i in spec.partitioned:
    for path, dim, pre, total, kind in leaf_rules(spec, i):
      full = get_path(like, (f"h_{i}",) + path)
      idx = subnet[f"h_{i}"][kind]
      s_view, axis = unit_view(get_path(small, (f"h_{i}",) + path), dim, pre, idx.shape[0])
      where = (slice(None),) * axis + (idx,)
      z_view, _ = unit_view(jnp.zeros(full.shape, full.dtype), dim, pre, total)
      vals = set_path(vals, (f"h_{i}",) + path, z_view.at[where].set(s_view).reshape(full.shape))
      mask = set_path(mask, (f"h_{i}",) + path,
                  z_view.at[where].set(1).reshape(full.shape))
  return vals, mask


# ---- statistics ----------------------------------------------------------------------------------


def coverage(subnets_W, spec: SubnetSpec) -> dict[str, float]:
  """Min / mean holder count per unit type over all partitioned groups (host-side, NumPy)."""
  stats = {}
  if spec.mode == "blocks":
    groups = {"block": [(np.asarray(subnets_W["blocks"]), len(spec.partitioned))]}
  else:
    groups = {k: [(np.asarray(subnets_W[f"h_{i}"][k]),
                   (spec.n_head if k == "head" else spec.n_inner)[i]) for i in spec.partitioned]
              for k in spec.unit_kinds}
  for kind, items in groups.items():
    counts = [np.bincount(idx.reshape(-1), minlength=total) for idx, total in items]
    if counts:
      allc = np.concatenate(counts)
      stats[f"coverage_{kind}_min"] = float(allc.min())
      stats[f"coverage_{kind}_mean"] = float(allc.mean())
  return stats
