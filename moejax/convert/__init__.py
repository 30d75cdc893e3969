"""Hugging Face checkpoints in and out: the open MoE families (families.py), the weight-name
table (mapping.py), safetensors shards (safetensors_io.py) and the two conversions (hf.py)."""
