"""Optimizer, train state, the jitted train/eval steps and the training loop."""
