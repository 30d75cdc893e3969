"""moejax: a JAX/Flax trainer for Mixture-of-Experts language models on a (tp, pp) device mesh."""
