"""The tiny tp4pp4 model trained on a prepared text dataset (byte-level by default).

On one device by default, the quickest way to train on a CPU; the seed's layout is
--config.mesh.tp=4 --config.mesh.pp=4 (simulated on CPU, same numbers, much slower: a routing
group then spans 64 parts on 4 shards, each with the whole group's capacity buffers).

  python -m moejax.cli.prepare --input=book.txt --out=/tmp/moejax_data
  python main.py --config=configs/text.py:/tmp/moejax_data --workdir=/tmp/moejax_text

The argument is the dataset directory. For a BPE dataset also set --config.model.vocab_size to
the tokenizer's vocabulary (prepare prints it).
"""
import ml_collections

from moejax import config_files

tp4pp4 = config_files.sibling(__file__, 'tp4pp4')


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = tp4pp4.get_config('tiny')
  c.mesh.tp = c.mesh.pp = 1
  c.model.vocab_size = 257            # byte-level tokenizer: 256 bytes + <eos>
  c.data.source = 'tokens'
  c.data.path = arg or '/tmp/moejax_data'
  c.model.max_len = 128
  c.data.update(seq_len=128, micro_batch_size=8, num_micro_batches=4)  # 4,096 tokens per step
  # Routing groups of a whole micro-batch (8 sequences, 1,024 tokens: 71 slots per expert at
  # capacity factor 1.1), each group's choices balanced in-group (Sinkhorn) on top of the
  # selection bias and the aux loss: on the walkthrough text about 2% of assignments drop at
  # step 150 (16-token groups with the aux loss alone: about 18%; BENCHMARKS.md).
  c.moe.update(group_size=1024, bias_update_rate=0.03, bias_update_rule='relative',
               sinkhorn_iters=20)
  c.optim.update(lr=3e-3, warmup_steps=15, decay_steps=150)
  c.num_steps = 150                   # about two minutes on 2 CPU cores
  c.log_every = 10
  c.eval_every = 50                   # validation loss and perplexity
  c.eval_batches = 4
  c.checkpoint_every = 50
  return c
