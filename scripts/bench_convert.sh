#!/bin/sh
# Import and export time and peak host memory of a random checkpoint of each open family at
# its published widths (the first LAYERS layers), written locally (nothing is downloaded).
#   sh scripts/bench_convert.sh [OUT_DIR]      # needs ~4x the largest checkpoint on disk
set -e
OUT=${1:-/tmp/moejax_bench_convert}
for spec in olmoe.py:1b-7b:16 qwen3_moe.py:30b-a3b:6 mixtral.py:8x7b:2 qwen2_moe.py:a2.7b:8 gpt_oss.py:20b:6; do
  config=${spec%:*}; layers=${spec##*:}; name=${config%%.py*}
  rm -rf "$OUT"; mkdir -p "$OUT"
  python -m moejax.perf.random_hf --config=configs/$config --layers=$layers --out=$OUT/hf
  python -m moejax.cli.convert import --hf_dir=$OUT/hf --workdir=$OUT/run
  python -m moejax.cli.convert export --workdir=$OUT/run --hf_dir=$OUT/out
  for f in "$OUT"/hf/*.safetensors; do cmp "$f" "$OUT/out/$(basename "$f")"; done
  echo "$name: $layers layers, $(du -sh "$OUT/hf" | cut -f1) in, export byte-identical"
done
rm -rf "$OUT"
