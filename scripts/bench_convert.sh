#!/bin/sh
# Import and export time and peak host memory of a random checkpoint of each open family at
# its published widths (the first LAYERS layers), written locally (nothing is downloaded).
#   sh scripts/bench_convert.sh [OUT_DIR] [FAMILY...]    # needs ~4x the largest checkpoint on disk
# DeepSeek-V3's published layers (22 GB each in bfloat16) do not fit this script's budget: its
# entry is DeepSeek-V3's block at a 2048 width (64 experts of 1408, 2 shared, MLA with a 512
# latent, one dense layer first, one MTP layer), from a config.json written here.
set -e
OUT=${1:-/tmp/moejax_bench_convert}
shift 2>/dev/null || true
SPECS=${*:-olmoe.py:1b-7b:16 qwen3_moe.py:30b-a3b:6 mixtral.py:8x7b:2 qwen2_moe.py:a2.7b:8 gpt_oss.py:20b:6 deepseek_v3.py:2k:6}
for spec in $SPECS; do
  config=${spec%:*}; layers=${spec##*:}; name=${config%%.py*}
  rm -rf "$OUT"; mkdir -p "$OUT"
  if [ "$config" = "deepseek_v3.py:2k" ]; then
    python - "$OUT/cfg" <<'PY'
import json, os, sys
from configs import deepseek_v3
hf = dict(deepseek_v3.VARIANTS['671b'], model_type='deepseek_v3', hidden_size=2048,
          num_attention_heads=16, n_routed_experts=64, n_shared_experts=2,
          moe_intermediate_size=1408, num_experts_per_tok=6, n_group=1, topk_group=1,
          q_lora_rank=None, first_k_dense_replace=1, intermediate_size=11264,
          vocab_size=163840, num_nextn_predict_layers=1)
os.makedirs(sys.argv[1])
json.dump(hf, open(os.path.join(sys.argv[1], 'config.json'), 'w'))
PY
    config="deepseek_v3.py:$OUT/cfg"
  fi
  python -m moejax.perf.random_hf --config=configs/$config --layers=$layers --out=$OUT/hf
  python -m moejax.cli.convert import --hf_dir=$OUT/hf --workdir=$OUT/run
  python -m moejax.cli.convert export --workdir=$OUT/run --hf_dir=$OUT/out
  for f in "$OUT"/hf/*.safetensors; do cmp "$f" "$OUT/out/$(basename "$f")"; done
  echo "$name: $layers layers, $(du -sh "$OUT/hf" | cut -f1) in, export byte-identical"
done
rm -rf "$OUT"
