"""Prompt-tuning and meta-learning steps (PT, MTL, MAML, first-order MAML, Reptile) as pure functions."""
