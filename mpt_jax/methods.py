"""The methods, one table: what each is, how it trains upstream, its step and its hyperparameters.

Everything that depends on which method runs reads its `Method` entry from here: the config's defaults
and checks (mpt_jax/config.py), the upstream sampler and step (mpt_jax/pipeline.py), the data-parallel
step (mpt_jax/parallel.py), the result tables' order and names (mpt_jax/results.py) and the study
launcher's method list (mpt_jax/run_setting.py). Adding a method (iMAML, say) is a gradient function
(`grad_fn(prompt, frozen_params, batch, rng, shard_index) -> (grad, metrics)`, docs/CONTRACTS.md) and
one `register(Method(...))`; docs/ARCHITECTURE.md, "Add a method", walks through it.

`make_step(name, loss_fn, optimizer, **options)` builds any registered method's step
`step(state, frozen_params, batch, rng) -> (state, metrics)`; compile it with `algorithms.jit_step` (or
shard it with `parallel.make_sharded_step`).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import optax

from mpt_jax import study
from mpt_jax.algorithms import common, maml, pt, reptile

# How a method trains upstream on the source tasks (None: it has no upstream stage).
POOL = (
  "pool"  # batches of examples drawn from the union of the source tasks (mpt_jax.data.batching.EpochSampler)
)
EPISODES = (
  "episodes"  # meta-batches of tasks: support steps, and a query set if the method needs one (EpisodeSampler)
)
UPSTREAM_KINDS = (POOL, EPISODES)
# The config.upstream key of an upstream batch's leading size (what is split over the data axis).
LEADING_SIZE_KEY = {POOL: "batch_size", EPISODES: "tasks_per_step"}


@dataclasses.dataclass(frozen=True)
class Method:
  """One method. `grad_fn(loss_fn, **options) -> GradFn` builds its gradient function; each option is
  set from the config.upstream key `options` names for it (an option without a default is required)."""

  name: str  # --config.method
  display_name: str  # in the result tables
  grad_fn: Callable[..., common.GradFn]
  upstream: str | None = None  # None, POOL or EPISODES
  needs_query: bool = False  # EPISODES: each task also brings a query set
  options: Mapping[str, str] = dataclasses.field(default_factory=dict)  # grad_fn keyword -> upstream key
  defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # config.upstream values it changes
  prompt_tunes_sources: bool = False  # runs the downstream grid on the source tasks too (PT only)

  def __post_init__(self):
    if self.upstream not in (None, *UPSTREAM_KINDS):
      raise ValueError(
        f"method {self.name!r}: upstream={self.upstream!r}, expected None or one of {UPSTREAM_KINDS}"
      )
    if self.needs_query and self.upstream != EPISODES:
      raise ValueError(f"method {self.name!r}: needs_query applies to upstream={EPISODES!r} only")
    accepted = inspect.signature(self.grad_fn).parameters
    unknown = sorted(set(self.options) - set(accepted))
    if unknown:
      raise ValueError(f"method {self.name!r}: options {unknown} are not keywords of its grad_fn")

  @property
  def has_upstream(self) -> bool:
    return self.upstream is not None

  def required_options(self) -> tuple[str, ...]:
    """The options its grad_fn cannot do without (keywords without a default)."""
    parameters = inspect.signature(self.grad_fn).parameters
    return tuple(k for k in self.options if parameters[k].default is inspect.Parameter.empty)

  def step_options(self, upstream) -> dict[str, Any]:
    """Its options, read from `config.upstream`."""
    return {keyword: upstream[key] for keyword, key in self.options.items()}


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
  """Adds `method` to the table (a name registered twice is an error: unregister the old one first)."""
  if method.name in REGISTRY:
    raise ValueError(f"method {method.name!r} is registered already")
  REGISTRY[method.name] = method
  return method


def unregister(name: str) -> None:
  REGISTRY.pop(name, None)


def names() -> tuple[str, ...]:
  """Every registered method: the study's, in the column order of its tables, then any added ones."""
  return tuple(REGISTRY)


def get(name: str) -> Method:
  try:
    return REGISTRY[name]
  except KeyError:
    raise ValueError(f"unknown method {name!r}; choose one of {names()}") from None


def trains_upstream(config) -> bool:
  """Whether a run of `config` has an upstream stage: its method learns an initialization, the stage is
  asked for, and no initial prompt is given instead."""
  return "upstream" in config.stages and get(config.method).has_upstream and not config.init_prompt


def make_step(
  name: str,
  loss_fn: common.LossFn,
  optimizer: optax.GradientTransformation,
  *,
  axis_name: str | None = None,
  **options,
) -> common.StepFn:
  """The (unjitted) step of method `name`: `step(state, frozen_params, batch, rng) -> (state, metrics)`.

  options: the method's grad_fn keywords (e.g. `inner_lr`, `remat`); one that another method takes
  but this one does not is ignored (remat has no effect on Reptile). axis_name: build the per-device
  body of a data-parallel step (see mpt_jax.parallel).
  """
  method = get(name)
  known = {keyword for m in REGISTRY.values() for keyword in m.options}
  unknown = sorted(set(options) - known)
  if unknown:
    raise TypeError(f"make_step({name!r}): unknown options {unknown}; methods take {sorted(known)}")
  for keyword in method.required_options():
    if options.get(keyword) is None:
      raise ValueError(f"method {name!r} needs {keyword} (config.upstream.{method.options[keyword]})")
  kwargs = {keyword: options[keyword] for keyword in method.options if options.get(keyword) is not None}
  return common.make_step(method.grad_fn(loss_fn, **kwargs), optimizer, axis_name=axis_name)


# --- the study's methods (PROTOCOL.md, "Upstream": the defaults are its hyperparameters) ----------------------
_INNER_LOOP = {"inner_lr": "inner_lr"}

register(Method("pt", "PT", pt.make_pt_grad_fn, prompt_tunes_sources=True))
# MTL: PT's step on batches pooled across every source task's train+dev of all seeds.
register(
  Method(
    "mtl",
    "MTL",
    pt.make_pt_grad_fn,
    upstream=POOL,
    defaults=dict(batch_size=4, num_epochs=20, max_target_len=study.DOWNSTREAM_TARGET_LEN),
  )
)
_MAML_OPTIONS = {**_INNER_LOOP, "remat": "remat_inner"}
register(
  Method(
    "maml",
    "MAML",
    maml.make_maml_grad_fn,
    upstream=EPISODES,
    needs_query=True,
    options=_MAML_OPTIONS,
    defaults=dict(num_steps=5000, tasks_per_step=2, inner_steps=1, inner_batch_size=2, query_size=2),
  )
)
# First-order MAML: the meta-gradient does not flow through the inner steps' gradients.
register(
  Method(
    "fomaml",
    "FoMAML",
    functools.partial(maml.make_maml_grad_fn, first_order=True),
    upstream=EPISODES,
    needs_query=True,
    options=_MAML_OPTIONS,
    defaults=dict(num_steps=5000, tasks_per_step=2, inner_steps=1, inner_batch_size=4, query_size=4),
  )
)
# Reptile: 10 inner SGD steps of 4 examples = the 40 support examples of the study, no query.
register(
  Method(
    "reptile",
    "Reptile",
    reptile.make_reptile_grad_fn,
    upstream=EPISODES,
    options=_INNER_LOOP,
    defaults=dict(num_steps=5000, tasks_per_step=2, inner_steps=10, inner_batch_size=4, query_size=0),
  )
)
assert names() == study.METHODS, "the study's methods are registered in its table order"
