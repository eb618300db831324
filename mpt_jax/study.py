"""The study's fixed facts, defined once: its methods (in the order of its tables), seeds and lengths.

Every module that needs one imports it from here: the config defaults, the CrossFit reader and the gyms
(seeds), tokenization (lengths), the method table (mpt_jax/methods.py checks it holds the study's methods).
"""

from __future__ import annotations

# The study's methods, in the column order of its tables (PT first: the others report their gain over it).
# What each is (upstream or not, its hyperparameters, its step) is its entry in mpt_jax/methods.py.
METHODS = ("pt", "mtl", "maml", "fomaml", "reptile")

# CrossFit's data seeds: every task has one few-shot train/dev/test sample per seed.
SEEDS = (100, 13, 21, 42, 87)

PROMPT_LENGTH = 100  # soft-prompt rows
MAX_INPUT_LEN = 512  # input tokens (EOS included)
UPSTREAM_TARGET_LEN = 64  # answer tokens of the meta-learners' source tasks
DOWNSTREAM_TARGET_LEN = 128  # answer tokens of MTL and of every downstream run
