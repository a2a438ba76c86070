"""All-in-One-5 (AiO5) at the paper's scale; `configs/aio5.py:tiny` is CPU-sized.

  python -m drdd_jax.main --config=configs/aio5.py --workdir=DIR \
      --config.data.root=/data/aio5
  python -m drdd_jax.main --config=configs/aio5.py:tiny --workdir=/tmp/t
"""
import ml_collections


def get_config(variant: str = '') -> ml_collections.ConfigDict:
  """Returns the AiO5 config; `variant='tiny'` shrinks it for CPU tests."""
  c = ml_collections.ConfigDict()

  c.data = ml_collections.ConfigDict(dict(
      # 'aio5': the standard paired folders under `root` (layout in README);
      # 'embedded': the offline dataset built from photos shipped in packages.
      source='aio5',
      root='',
      cache_dir='',  # '' -> ~/.cache/drdd_jax (or $DRDD_JAX_CACHE).
      tasks='lowlight,derain,denoise,deblur,dehaze',
      # Per-task shares of the residual batch (the release: haze 4 : light 4 :
      # rain 2 : blur 4 : noise 2).
      task_shares='dehaze:4,lowlight:4,derain:2,deblur:4,denoise:2',
      # Folders of clean, unpaired images for the noise objective (comma-
      # separated); the paired sets' targets always join that pool.
      unpaired_dirs='',
      paired_fraction=1.0,
      crop_size=128,
      num_workers=4,
      seed=0,
      # Embedded source only: longer image side after resizing (0 = keep).
      max_size=0,
      # Embedded source only: degraded copies of each train photo per task.
      embedded_variants=4,
  ))

  c.model = ml_collections.ConfigDict(dict(
      base_channels=64,
      channel_mults=(1, 2, 4, 8),
      num_res_blocks=2,
      groups=8,
      attn_heads=4,
      attn_head_dim=32,
      shared=True,  # one network for both objectives (phase embedding).
      remat=False,
  ))

  c.diffusion = ml_collections.ConfigDict(dict(
      method='drdd',  # 'drdd' or the coupled baseline 'rddm'.
      num_timesteps=1000,
      beta_start=1e-4,
      beta_end=0.02,
      sigma_h=1.0,
      w_noise=1.0,
      w_res=1.0,
      l2=0.0,
      noise_condition='null',  # 'null' (zeros) or 'input' (y of a pair).
  ))

  c.training = ml_collections.ConfigDict(dict(
      num_steps=300_000,
      batch_size=16,  # global residual batch (pairs).
      noise_batch_size=0,  # global noise batch (targets); 0 = batch_size.
      seed=0,
      compute_dtype='auto',  # 'auto' (bf16 on TPU/GPU, f32 on CPU) | 'float32' | 'bfloat16'.
      # 'auto': with float32 compute, the convolutions in bfloat16 where
      # drdd_jax.bf16_conv's kernels run (a CPU with AVX512-BF16, one
      # device), else 'default' (the compute dtype's) | 'bfloat16'.
      conv_precision='auto',
      steps_per_dispatch=1,
      # Gradient accumulated over this many slices of each batch, one after
      # another: the step's activation memory / microbatches, same maths.
      microbatches=1,
      log_every=100,
      checkpoint_every=5_000,
      keep_checkpoints=3,
      keep_every=50_000,  # milestones never deleted.
      sample_every=10_000,
      eval_every=0,  # evaluate every N steps during training (0 = never).
  ))

  c.optim = ml_collections.ConfigDict(dict(
      learning_rate=2e-5,
      b1=0.9,
      b2=0.99,
      eps=1e-8,
      grad_clip=1.0,
      schedule='constant',  # 'constant' | 'cosine'.
      warmup_steps=0,
      ema_decay=0.995,
      ema_every=10,
  ))

  c.sampling = ml_collections.ConfigDict(dict(
      n_res=2,
      n_noise=2,
      eta=0.0,
      seed=0,
  ))

  c.eval = ml_collections.ConfigDict(dict(
      at_end=True,  # evaluate when training finishes.
      max_images=0,  # per task; 0 = all.
      batch_size=0,  # tiles per sampler call; 0 = one per local device.
      lpips_net='alex',
      fd_vgg16=True,
      tile_size=512,
      tile_overlap=64,
      num_grid_images=4,
  ))

  c.mesh = ml_collections.ConfigDict(dict(
      # Mesh axes and sizes (-1 = all remaining devices). The batch is
      # sharded over 'data'; further axes (e.g. 'fsdp') can be added here.
      axes=('data',),
      shape=(-1,),
  ))

  if variant == 'tiny':
    c.data.source = 'embedded'
    c.data.crop_size = 32
    c.data.max_size = 96
    c.data.num_workers = 0
    c.model.base_channels = 16
    c.model.channel_mults = (1, 2)
    c.model.num_res_blocks = 1
    c.model.groups = 4
    c.model.attn_heads = 2
    c.model.attn_head_dim = 8
    c.training.num_steps = 2
    c.training.batch_size = 8
    c.training.log_every = 1
    # The tests compare float32 results; 'auto' would differ by machine.
    c.training.conv_precision = 'default'
    c.training.checkpoint_every = 2
    c.training.keep_every = 0
    c.training.sample_every = 0
    c.optim.learning_rate = 1e-3
    # Adam's first update is g / (|g| + eps), about sign(g): with eps=1e-8 a
    # gradient entry near 0 flips sign under another summation order (another
    # device count). A larger eps keeps such runs comparable (the tests).
    c.optim.eps = 1e-3
    c.optim.ema_every = 1
    c.eval.max_images = 1
    c.eval.fd_vgg16 = False
    c.eval.tile_size = 64
    c.eval.tile_overlap = 16
  elif variant:
    raise ValueError(f'Unknown variant {variant!r} of configs/aio5.py (known: tiny).')
  return c
