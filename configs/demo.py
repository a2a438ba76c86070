"""The README's first command: ~10 minutes of CPU training on the embedded set.

  python -m drdd_jax.main --config=configs/demo.py --workdir=workdir/demo

Trains a small shared DRDD UNet on the offline All-in-One set (real photos
shipped inside installed packages, degraded synthetically), then evaluates on
the held-out test photos and writes tables and image grids to
`workdir/demo/eval/`.
"""
from configs import aio5


def get_config():
  c = aio5.get_config()
  c.data.source = 'embedded'
  c.data.max_size = 192
  c.data.crop_size = 48
  c.data.num_workers = 0
  c.model.base_channels = 32
  c.model.channel_mults = (1, 2, 2)
  c.model.num_res_blocks = 1
  c.model.attn_heads = 2
  c.model.attn_head_dim = 16
  c.training.num_steps = 400
  c.training.batch_size = 8
  c.training.log_every = 25
  c.training.checkpoint_every = 100
  c.training.keep_every = 0
  c.training.sample_every = 0
  c.optim.learning_rate = 1e-3
  c.optim.schedule = 'cosine'
  c.optim.warmup_steps = 40
  c.optim.ema_decay = 0.98
  c.optim.ema_every = 1
  c.eval.fd_vgg16 = False  # 3 test photos per task: too few for a distance.
  c.eval.tile_size = 256
  c.eval.tile_overlap = 32
  return c
