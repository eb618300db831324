"""Outer optimizers: Adafactor exactly as HF transformers' (as the study ran it), AdamW, SGD.

Every optimizer from `make_optimizer` carries its learning rate as a leaf of its state
(`optax.inject_hyperparams`), so one compiled step serves any learning rate and the downstream grid can
vmap over runs that differ only in their learning rate (see `set_learning_rate`).

HF `transformers.Adafactor(lr=0.5, scale_parameter=False, relative_step=False, warmup_init=False)` with
its defaults `beta1=None, decay_rate=-0.8, clip_threshold=1.0, eps=(1e-30, 1e-3)` and the study's
`weight_decay=1e-5` does, per parameter p with gradient g at step t = 1, 2, ...:

  beta2t = 1 - t**-0.8;  v = beta2t * v + (1 - beta2t) * (g**2 + 1e-30)   (factored for p.ndim >= 2:
           row and column means of g**2 + eps1, v_hat = row / mean(row) * col)
  u = g / sqrt(v_hat);   u /= max(1, rms(u) / clip_threshold)
  p -= p * weight_decay * lr;  p -= lr * u

eps[1] only enters through `scale_parameter`, which is off. The optax chain below computes the same:
  scale_by_factored_rms(decay_rate=0.8, epsilon=1e-30, min_dim_size_to_factor=1)
  -> clip_by_block_rms(1.0) -> add_decayed_weights(weight_decay) -> scale_by_learning_rate(lr)
giving p += -lr * (u + weight_decay * p), i.e. HF's two subtractions. Two deliberate differences from
`optax.adafactor`:
- Factoring: HF factors every parameter with >= 2 dims; optax only when the second-largest dim is
  >= `min_dim_size_to_factor` (default 128), so the [100, d_model] prompt would get a full, unfactored
  second moment there. `min_dim_size_to_factor=1` factors every >= 2-D parameter, as HF does.
  (optax normalizes the statistic of the larger dim by its mean and HF that of the rows; for 2-D these
  are the same number since both means equal the mean of all of g**2 + eps1.)
- Weight decay: `optax.adafactor` adds `weight_decay_rate * p` after scaling by the learning rate
  (p -= wd * p); HF decays by wd * lr. Putting `add_decayed_weights` before `scale_by_learning_rate`
  reproduces HF's p -= p * wd * lr.
For parameters of more than 2 dims HF factors the last two, optax the two largest; we refuse those
(the prompt is 2-D) rather than silently differ. tests/test_optim.py checks all this against
transformers' PyTorch Adafactor.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

# The study's outer optimizer (reference/PROTOCOL.md): HF Adafactor, lr 0.5, no momentum, decay 0.8,
# update clipping 1.0, weight decay 1e-5, eps1 1e-30, no parameter scaling, no relative step.
ADAFACTOR_DEFAULTS = dict(decay_rate=0.8, clip_threshold=1.0, weight_decay=1e-5, eps=1e-30)
ADAMW_DEFAULTS = dict(b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2)  # torch.optim.AdamW's
OPTIMIZERS = ("adafactor", "adamw", "sgd")


def _refuse_above_2d(transform: optax.GradientTransformation) -> optax.GradientTransformation:
  def init(params):
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
      if jnp.ndim(leaf) > 2:
        raise ValueError(
          f"hf_adafactor: parameter {jax.tree_util.keystr(path)} has shape {jnp.shape(leaf)}; HF "
          f"Adafactor factors the last two dims of a >2-D parameter and optax the two largest, so "
          f"they would differ. Only <= 2-D parameters (the [P, d_model] prompt) are supported."
        )
    return transform.init(params)

  return optax.GradientTransformation(init, transform.update)


def hf_adafactor(
  learning_rate: float,
  decay_rate: float = 0.8,
  clip_threshold: float = 1.0,
  weight_decay: float = 1e-5,
  eps: float = 1e-30,
) -> optax.GradientTransformation:
  """HF transformers' Adafactor with scale_parameter=False, relative_step=False, beta1=None.

  `decay_rate` is HF's `-decay_rate` (HF takes -0.8; beta2t = 1 - t**-decay_rate). `eps` is HF's eps[0].
  """
  return _refuse_above_2d(
    optax.chain(
      optax.scale_by_factored_rms(
        factored=True, decay_rate=decay_rate, step_offset=0, min_dim_size_to_factor=1, epsilon=eps
      ),
      optax.clip_by_block_rms(clip_threshold),
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_learning_rate(learning_rate),
    )
  )


def make_optimizer(name: str, learning_rate: float, **kwargs: Any) -> optax.GradientTransformation:
  """The named optimizer with its learning rate as a state leaf (`optax.inject_hyperparams`).

  name: "adafactor" (HF-matched, defaults `ADAFACTOR_DEFAULTS`), "adamw" (`ADAMW_DEFAULTS`, torch's)
  or "sgd" (plain, no momentum). kwargs override the defaults of that optimizer.
  """
  defaults = {"adafactor": ADAFACTOR_DEFAULTS, "adamw": ADAMW_DEFAULTS, "sgd": {}}
  if name not in defaults:
    raise ValueError(f"make_optimizer: unknown optimizer {name!r}; choose one of {OPTIMIZERS}")
  unknown = set(kwargs) - set(defaults[name])
  if unknown:
    raise ValueError(
      f"make_optimizer({name!r}): unknown options {sorted(unknown)}; known: {sorted(defaults[name])}"
    )
  options = {**defaults[name], **kwargs}
  if name == "adafactor":
    factory = lambda learning_rate: hf_adafactor(learning_rate, **options)
  elif name == "adamw":
    factory = lambda learning_rate: optax.adamw(learning_rate, **options)
  else:
    factory = lambda learning_rate: optax.sgd(learning_rate)
  # A fixed float32 learning rate leaf: a weakly typed one would change type after the first update
  # and make the step compile twice.
  return optax.inject_hyperparams(factory, hyperparam_dtype=jnp.float32)(learning_rate=learning_rate)


def set_learning_rate(opt_state: Any, learning_rate: jax.typing.ArrayLike) -> Any:
  """The state of a `make_optimizer` optimizer with its learning rate replaced (any shape: [R] for a grid)."""
  if not isinstance(opt_state, (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)):
    raise TypeError(
      f"set_learning_rate: expected the state of a make_optimizer optimizer "
      f"(optax.InjectHyperparamsState), got {type(opt_state).__name__}"
    )
  old = opt_state.hyperparams["learning_rate"]
  new = jnp.asarray(learning_rate, old.dtype)
  return opt_state._replace(hyperparams={**opt_state.hyperparams, "learning_rate": new})


def get_learning_rate(opt_state: Any) -> jax.Array:
  return opt_state.hyperparams["learning_rate"]
