"""The Flax MoE transformer."""
