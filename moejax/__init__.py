"""moejax: a JAX/Flax trainer for Mixture-of-Experts language models on a (dp, tp, pp) device mesh,
and the open MoE families (OLMoE, Qwen3-MoE, Mixtral) in and out of Hugging Face format."""
