"""One worker's R local optimizer steps, as a `lax.scan`; plus the optimizer itself.

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


def map_param_trees(fn, state, params, *others):
  """Applies `fn` to every params-shaped subtree of `state` (e.g. Adam's mu and nu).

  `others` are trees with the same structure as `state`, passed alongside. Leaves outside such
  subtrees (Adam's step count) are returned from `state` unchanged.
  """
  treedef = jax.tree.structure(params)
  is_p = lambda x: isinstance(x, dict) and jax.tree.structure(x) == treedef
  return jax.tree.map(lambda s, *o: fn(s, *o) if is_p(s) else s, state, *others, is_leaf=is_p)


def freeze(new_tree, old_tree, hold):
  """Entries with hold == 0 keep their old value (Masked variant: unheld units do not move)."""
  return jax.tree.map(lambda n, o, h: jnp.where(h > 0, n, o), new_tree, old_tree, hold)


def local_steps(loss_fn: Callable, tx: optax.GradientTransformation, lr_fn: Callable,
                params, opt_state, batches_RxBxLp1, step0, masks=None, hold=None,
                grad_reduce: Callable = lambda g: g):
  """R steps of `loss_fn(params, batch, masks)`; returns (params, opt_state, losses (R,)).

  `hold` (params-shaped 0/1) freezes the unheld entries of params and optimizer moments, so
  weight decay and Adam momentum cannot move units the worker does not own. `grad_reduce`
  combines gradients across workers before the update (DDP: a mean over the mesh).
  """
  def step(carry, batch):
    p, s, t = carry
    loss, grads = jax.value_and_grad(loss_fn)(p, batch, masks)
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
