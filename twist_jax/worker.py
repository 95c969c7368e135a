"""One worker's R local optimizer steps, as a `lax.scan`; plus the optimizer itself.

A step's gradient may be accumulated over sequential microbatches (`microbatch`): the same
update as the whole batch, with one microbatch's activations alive at a time.
The learning rate is a function of the *global* step passed in, so resetting the optimizer
state between rounds (`twist.opt_state = reset`) never restarts the schedule.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from twist_jax.config import OptConfig


def make_optimizer(opt: OptConfig) -> optax.GradientTransformation:
  """Clip, then Adam (+ decoupled weight decay on matrices) or plain SGD; lr applied outside."""
  parts = [optax.clip_by_global_norm(opt.grad_clip)] if opt.grad_clip > 0 else []
  if opt.name == "adamw":
    parts.append(optax.scale_by_adam(opt.b1, opt.b2, opt.eps))
    if opt.weight_decay > 0:
      parts.append(optax.add_decayed_weights(
          opt.weight_decay, mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)))
  return optax.chain(*parts) if parts else optax.identity()


def map_param_trees(fn, state, params, *others, other_fn: Callable | None = None):
  """Applies `fn` to every params-shaped subtree of `state` (e.g. Adam's mu and nu).

  `others` are trees with the same structure as `state`, passed alongside. Leaves outside such
  subtrees (Adam's step count) go through `other_fn` (same arguments), or without it are
  returned from `state` unchanged.
  """
  treedef = jax.tree.structure(params)
  is_p = lambda x: isinstance(x, dict) and jax.tree.structure(x) == treedef
  other_fn = other_fn or (lambda s, *o: s)
  return jax.tree.map(lambda s, *o: fn(s, *o) if is_p(s) else other_fn(s, *o), state, *others,
                      is_leaf=is_p)


def freeze(new_tree, old_tree, hold):
  """Entries with hold == 0 keep their old value (Masked variant: unheld units do not move)."""
  return jax.tree.map(lambda n, o, h: jnp.where(h > 0, n, o), new_tree, old_tree, hold)


def accumulated_value_and_grad(loss_fn: Callable, microbatch: int = 0, batch_axis: int = 0):
  """`jax.value_and_grad(loss_fn)` over sequential microbatches of `microbatch` rows of the
  batch axis (0 = the whole batch at once): the mean of their losses and gradients.

  Equal to the whole batch's value and gradient when `loss_fn` is a mean over that axis (the
  microbatches are equal-sized); a `lax.scan` keeps one microbatch's activations alive at a time.
  """
  grad_fn = jax.value_and_grad(loss_fn)
  if not microbatch:
    return grad_fn

  def fn(p, batch, *args):
    b = batch.shape[batch_axis]
    if b % microbatch:
      raise ValueError(f"microbatch {microbatch} does not divide the batch of {b}")
    k = b // microbatch
    if k == 1:
      return grad_fn(p, batch, *args)
    shape = batch.shape[:batch_axis] + (k, microbatch) + batch.shape[batch_axis + 1:]
    micro_kx = jnp.moveaxis(batch.reshape(shape), batch_axis, 0)
    add = lambda acc, mb: (jax.tree.map(jnp.add, acc, grad_fn(p, mb, *args)), None)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         jax.eval_shape(grad_fn, p, micro_kx[0], *args))
    total = jax.lax.scan(add, zeros, micro_kx)[0]
    return jax.tree.map(lambda x: x / k, total)
  return fn


def local_steps(loss_fn: Callable, tx: optax.GradientTransformation, lr_fn: Callable,
                params, opt_state, batches_RxBxLp1, step0, masks=None, hold=None,
                grad_reduce: Callable = lambda g: g, microbatch: int = 0, batch_axis: int = 0):
  """R steps of `loss_fn(params, batch, masks)`; returns (params, opt_state, losses (R,)).

  `hold` (params-shaped 0/1) freezes the unheld entries of params and optimizer moments, so
  weight decay and Adam momentum cannot move units the worker does not own. `grad_reduce`
  combines gradients across workers before the update (DDP: a mean over the mesh).
  `microbatch` > 0 accumulates each step's gradient over microbatches of that many rows of
  the batch's `batch_axis` (`accumulated_value_and_grad`), then makes one update.
  """
  value_and_grad = accumulated_value_and_grad(loss_fn, microbatch, batch_axis)

  def step(carry, batch):
    p, s, t = carry
    loss, grads = value_and_grad(p, batch, masks)
    grads = grad_reduce(grads)
    updates, s_new = tx.update(grads, s, p)
    lr = lr_fn(t)
    updates = jax.tree.map(lambda u: -lr * u, updates)
    if hold is not None:
      updates = jax.tree.map(lambda u, h: u * h, updates, hold)
      s_new = map_param_trees(lambda n, o: freeze(n, o, hold), s_new, p, s)
    return (optax.apply_updates(p, updates), s_new, t + 1), loss

  (params, opt_state, _), losses_R = jax.lax.scan(step, (params, opt_state, step0),
                                                  batches_RxBxLp1)
  return params, opt_state, losses_R
