"""mpt-jax: Meta Prompt Tuning (MAML, first-order MAML, Reptile, MTL) for a frozen T5 in JAX/Flax."""

__version__ = "0.1.0"
