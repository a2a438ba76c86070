"""This project's network and train step in PyTorch, timed on the same machine.

Issue 7's "ahead of torch" targets were set from torch timings taken on
another machine. This script runs the same work in torch here, so the two
frameworks can be compared on one CPU in one session: the shared DRDD train
step (the aio5 UNet on `--batch` pairs + as many noise targets, MSE losses,
gradient clipping, Adam, an EMA of the parameters every step, as
`train.apply_gradients` does), the sampler's work (n_res + n_noise = 4
forward passes of one image, no gradients) and `drdd_jax.bench`'s
calibration convolution.

The network is written the way the paper's release writes it (NCHW modules:
weight-standardized convolutions, `F.group_norm`, channel LayerNorm, linear
attention with per-head softmaxes, `F.scaled_dot_product_attention` in the
middle, pixel-unshuffle downsampling); `--memory_format=channels_last`
runs the same modules on NHWC tensors (oneDNN's preferred layout), and
`--dtype=bfloat16` runs the network under `torch.autocast` (oneDNN's
bfloat16 convolutions and matmuls, float32 parameters and optimizer).
`--check` loads the parameters of `drdd_jax.unet`'s network into it and
compares the outputs, so both programs are known to compute the same
function (it needs jax and drdd_jax importable too).

Torch is not a dependency of this project; a CPU build lives beside it, e.g.:

  python3 -m venv /tmp/tv && /tmp/tv/bin/pip install torch==2.13.0 numpy
  PYTHONPATH=.venv/lib/python3.11/site-packages:. \
      /tmp/tv/bin/python benchmarks/torch_reference.py --check
  /tmp/tv/bin/python benchmarks/torch_reference.py --json_out=torch.jsonl

Prints one JSON object per case (the keys of `drdd_jax.bench` that apply).
"""
import argparse
import contextlib
import json
import math
import resource
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def _cpu_s():
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


# `--dtype`: float32, or bfloat16 through torch's CPU autocast (bf16
# convolutions and matmuls, float32 parameters, norms and losses: what
# drdd_jax's bfloat16 compute dtype does).
DTYPE = 'float32'


def _autocast():
  if DTYPE == 'bfloat16':
    return torch.autocast('cpu', dtype=torch.bfloat16)
  return contextlib.nullcontext()


class Counter:
  """Names submodules as flax's compact modules do: `Kind_0`, `Kind_1`, ..."""

  def __init__(self, owner):
    self.owner, self.counts = owner, {}

  def __call__(self, kind, module):
    i = self.counts.get(kind, 0)
    self.counts[kind] = i + 1
    self.owner.add_module(f'{kind}_{i}', module)
    return module


class WSConv(nn.Conv2d):
  """3x3 convolution of the standardized kernel (per output channel)."""

  def __init__(self, cin, cout):
    super().__init__(cin, cout, 3, padding=1)

  def forward(self, x):
    w = self.weight
    mean = w.mean(dim=(1, 2, 3), keepdim=True)
    var = w.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
    return F.conv2d(x, (w - mean) * torch.rsqrt(var + 1e-5), self.bias,
                    padding=1)


class ChannelLayerNorm(nn.Module):
  """LayerNorm over the channel axis of NCHW, scale only (the release's)."""

  def __init__(self, c):
    super().__init__()
    self.g = nn.Parameter(torch.ones(1, c, 1, 1))

  def forward(self, x):
    var, mean = torch.var_mean(x, dim=1, unbiased=False, keepdim=True)
    return (x - mean) * torch.rsqrt(var + 1e-5) * self.g


class ResBlock(nn.Module):

  def __init__(self, cin, cout, groups, temb_dim):
    super().__init__()
    self.groups = groups
    name = Counter(self)
    self.mlp = name('Dense', nn.Linear(temb_dim, 2 * cout))
    self.conv1 = name('WSConv', WSConv(cin, cout))
    self.norm1 = name('GroupNorm', nn.GroupNorm(groups, cout))
    self.conv2 = name('WSConv', WSConv(cout, cout))
    self.norm2 = name('GroupNorm', nn.GroupNorm(groups, cout))
    self.skip = (name('Conv', nn.Conv2d(cin, cout, 1)) if cin != cout
                 else nn.Identity())

  def forward(self, x, temb):
    scale, shift = self.mlp(F.silu(temb))[:, :, None, None].chunk(2, dim=1)
    h = self.norm1(self.conv1(x))
    h = F.silu(h * (scale + 1) + shift)
    h = F.silu(self.norm2(self.conv2(h)))
    return h + self.skip(x)


class Attention(nn.Module):
  """Residual pre-norm full softmax attention (`unet.Attention`)."""

  def __init__(self, c, heads, head_dim):
    super().__init__()
    self.heads, self.head_dim = heads, head_dim
    width = heads * head_dim
    self.names = Counter(self)
    self.norm = self.names('LayerNorm', ChannelLayerNorm(c))
    self.to_qkv = self.names('Conv', nn.Conv2d(c, 3 * width, 1, bias=False))
    self.to_out = self.names('Conv', nn.Conv2d(width, c, 1))

  def qkv(self, x):
    """q, k, v of the normalized `x`, each [b, heads, head_dim, pixels]."""
    b, _, hh, ww = x.shape
    return (t.reshape(b, self.heads, self.head_dim, hh * ww)
            for t in self.to_qkv(self.norm(x)).chunk(3, dim=1))

  def forward(self, x):
    q, k, v = (t.transpose(2, 3) for t in self.qkv(x))
    out = F.scaled_dot_product_attention(q, k, v).transpose(2, 3)
    return x + self.to_out(out.reshape(x.shape[0], -1, *x.shape[2:]))


class LinearAttention(Attention):
  """`unet.LinearAttention`, written per head as the release writes it."""

  def __init__(self, c, heads, head_dim):
    super().__init__(c, heads, head_dim)
    self.out_norm = self.names('LayerNorm', ChannelLayerNorm(c))

  def forward(self, x):
    q, k, v = self.qkv(x)
    q = q.softmax(dim=-2) * self.head_dim**-0.5
    k = k.softmax(dim=-1)
    context = torch.einsum('bhdn,bhen->bhde', k, v)
    out = torch.einsum('bhde,bhdn->bhen', context, q)
    out = self.to_out(out.reshape(x.shape[0], -1, *x.shape[2:]))
    return x + self.out_norm(out)


def timestep_embedding(t, dim):
  half = dim // 2
  freqs = torch.exp(-math.log(10000) / (half - 1) * torch.arange(half))
  args = t.float()[:, None] * freqs[None]
  return torch.cat([args.sin(), args.cos()], dim=-1)


class UNet(nn.Module):
  """`drdd_jax.unet.UNet` with `num_phases=2` (the shared network)."""

  def __init__(self, base=64, mults=(1, 2, 4, 8), num_res_blocks=2, groups=8,
               heads=4, head_dim=32, out_channels=3):
    super().__init__()
    self.base = base
    name = Counter(self)
    temb_dim = 4 * base
    self.temb1 = name('Dense', nn.Linear(base, temb_dim))
    self.temb2 = name('Dense', nn.Linear(temb_dim, temb_dim))
    self.phase_embedding = nn.Embedding(2, temb_dim)
    self.stem = name('Conv', nn.Conv2d(6, base, 7, padding=3))
    dims = [base * m for m in mults]
    in_out = list(zip([base] + dims[:-1], dims))
    res = lambda cin, cout: name('ResBlock',
                                 ResBlock(cin, cout, groups, temb_dim))
    lin = lambda c: name('LinearAttention', LinearAttention(c, heads, head_dim))
    self.down = []
    for level, (d_in, d_out) in enumerate(in_out):
      blocks = [res(d_in, d_in) for _ in range(num_res_blocks)]
      attn = lin(d_in)
      last = level == len(in_out) - 1
      sample = name('Conv', nn.Conv2d(d_in if last else 4 * d_in, d_out,
                                      3 if last else 1,
                                      padding=1 if last else 0))
      self.down.append((blocks, attn, sample, last))
    self.mid = (res(dims[-1], dims[-1]),
                name('Attention', Attention(dims[-1], heads, head_dim)),
                res(dims[-1], dims[-1]))
    self.up = []
    for level, (d_in, d_out) in reversed(list(enumerate(in_out))):
      blocks = [res(d_out + d_in, d_out) for _ in range(num_res_blocks)]
      attn = lin(d_out)
      sample = name('Conv', nn.Conv2d(d_out, d_in, 3, padding=1))
      self.up.append((blocks, attn, sample, level > 0))
    self.final = res(2 * base, base)
    self.out = name('Conv', nn.Conv2d(base, out_channels, 1))

  def forward(self, x, cond, t, phase):
    temb = self.temb1(timestep_embedding(t, self.base))
    temb = self.temb2(F.gelu(temb)) + self.phase_embedding(phase)
    h = self.stem(torch.cat([x, cond], dim=1))
    stem, skips = h, []
    for blocks, attn, sample, last in self.down:
      for i, block in enumerate(blocks):
        h = block(h, temb)
        if i == len(blocks) - 1:
          h = attn(h)
        skips.append(h)
      h = sample(h if last else F.pixel_unshuffle(h, 2))
    h = self.mid[0](h, temb)
    h = self.mid[1](h)
    h = self.mid[2](h, temb)
    for blocks, attn, sample, upsample in self.up:
      for block in blocks:
        h = block(torch.cat([h, skips.pop()], dim=1), temb)
      h = attn(h)
      if upsample:
        h = F.interpolate(h, scale_factor=2, mode='nearest')
      h = sample(h)
    h = self.final(torch.cat([h, stem], dim=1), temb)
    return self.out(h)


def load_flax_params(model, params):
  """Copies the parameters of a flax `unet.UNet` into `model`."""
  def walk(module, tree, path):
    for key, value in tree.items():
      if isinstance(value, dict):
        walk(getattr(module, key), value, path + (key,))
        continue
      a = np.asarray(value)
      if key == 'kernel' and a.ndim == 4:  # HWIO -> OIHW
        if path in unshuffled:
          # F.pixel_unshuffle orders channels (c, dy, dx); the flax network
          # (dy, dx, c).
          c = a.shape[2] // 4
          a = a.reshape(1, 1, 4, c, -1).transpose(0, 1, 3, 2, 4).reshape(
              a.shape)
        a = a.transpose(3, 2, 0, 1)
        name = 'weight'
      elif key == 'kernel':
        a, name = a.T, 'weight'
      elif key == 'embedding':
        name = 'weight'
      elif key == 'scale' and isinstance(module, ChannelLayerNorm):
        a, name = a.reshape(1, -1, 1, 1), 'g'
      elif key == 'scale':
        name = 'weight'
      else:
        name = key
      target = getattr(module, name)
      if tuple(target.shape) != a.shape:
        raise ValueError(f'{path + (key,)}: {a.shape} vs {target.shape}')
      with torch.no_grad():
        target.copy_(torch.from_numpy(np.array(a)))

  names = {id(m): n for n, m in model.named_children()}
  unshuffled = {(names[id(sample)],) for _, _, sample, last in model.down
                if not last}
  walk(model, params, ())


def check(base, mults, size=32, seed=0):
  """Max |torch - flax| / max |flax| of the two networks' outputs."""
  import jax  # pylint: disable=g-import-not-at-top
  from drdd_jax import unet  # pylint: disable=g-import-not-at-top
  flax_net = unet.UNet(base_channels=base, channel_mults=mults, num_phases=2)
  rng = np.random.default_rng(seed)
  x, cond = (rng.standard_normal((2, size, size, 3)).astype(np.float32)
             for _ in range(2))
  t = np.array([3.0, 700.0], np.float32)
  phase = np.array([0, 1], np.int32)
  params = flax_net.init(jax.random.PRNGKey(seed), x, cond, t, phase)
  expected = np.asarray(flax_net.apply(params, x, cond, t, phase))
  model = UNet(base, mults)
  load_flax_params(model, params['params'])
  n_flax = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  n_torch = sum(p.numel() for p in model.parameters())
  if n_flax != n_torch:
    raise ValueError(f'{n_torch} torch parameters, {n_flax} flax parameters')
  nchw = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    got = model(nchw(x), nchw(cond), torch.from_numpy(t),
                torch.from_numpy(phase).long()).numpy().transpose(0, 2, 3, 1)
  return float(np.abs(got - expected).max() / np.abs(expected).max()), n_torch


def _time(fn, n, warmup=1):
  """Wall and CPU seconds of `n` calls of `fn` after `warmup` calls, and the
  first call's wall seconds (`compile_s`: torch.compile compiles there)."""
  t0 = time.perf_counter()
  fn()
  first = time.perf_counter() - t0
  for _ in range(warmup - 1):
    fn()
  wall, cpu = [], []
  for _ in range(n):
    t0, c0 = time.perf_counter(), _cpu_s()
    fn()
    wall.append(time.perf_counter() - t0)
    cpu.append(_cpu_s() - c0)
  return wall, cpu, first


def _flops(fn):
  with FlopCounterMode(display=False) as counter:
    fn()
  return float(counter.get_total_flops())


def _record(case, image_size, batch, wall, cpu, compile_s, flops,
            memory_format, compiled=False, **extra):
  med = statistics.median(wall)
  rec = dict(case=case, framework=f'torch {torch.__version__}',
             compiled=compiled, compute_dtype=DTYPE,
             backend='cpu', threads=torch.get_num_threads(),
             memory_format=memory_format, image_size=image_size, batch=batch,
             steps=len(wall), time_s_median=med, time_s_min=min(wall),
             time_s_max=max(wall), cpu_s_median=statistics.median(cpu),
             compile_s=compile_s, flops_per_step=flops,
             achieved_tflops=flops / med / 1e12,
             peak_rss_mib=resource.getrusage(
                 resource.RUSAGE_SELF).ru_maxrss / 1024)
  rec.update(extra)
  return rec


def bench_calibration(n, fmt):
  x = torch.randn(8, 128, 64, 64).to(memory_format=fmt)
  conv = nn.Conv2d(128, 128, 3, padding=1, bias=False).to(memory_format=fmt)
  with torch.inference_mode(), _autocast():
    return (*_time(lambda: conv(x), n, warmup=3),
            2.0 * 9 * 128 * 128 * 64 * 64 * 8)


def bench_train(eager, model, size, batch, n, fmt, lr=2e-5):
  """Times `model`'s train step; FLOPs counted on `eager` (same parameters)."""
  params = [p for p in eager.parameters()]
  ema = [p.detach().clone() for p in params]
  opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.99), eps=1e-8,
                         foreach=True)
  g = torch.Generator().manual_seed(0)
  x0 = torch.rand(2 * batch, 3, size, size, generator=g) * 2 - 1
  y = torch.rand(batch, 3, size, size, generator=g) * 2 - 1
  phase = torch.cat([torch.zeros(batch), torch.ones(batch)]).long()

  def step(model=model):
    eps = torch.randn(2 * batch, 3, size, size)
    t = torch.randint(0, 1000, (2 * batch,)).float()
    a = torch.rand(batch, 1, 1, 1)
    x_res = x0[batch:] + eps[batch:] + a * (y - x0[batch:])
    x = torch.cat([x0[:batch] + 0.1 * eps[:batch], x_res]).to(
        memory_format=fmt)
    cond = torch.cat([torch.zeros_like(y), y]).to(memory_format=fmt)
    with _autocast():
      pred = model(x, cond, t, phase).float()
    loss = (F.mse_loss(pred[:batch], eps[:batch]) +
            F.mse_loss(pred[batch:], y - x0[batch:]))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
    opt.step()
    with torch.no_grad():
      # pylint: disable-next=protected-access
      torch._foreach_lerp_(ema, params, 1 - 0.995)

  flops = _flops(lambda: step(eager))
  return (*_time(step, n, warmup=2), flops)


def bench_sample(eager, model, size, n, fmt, calls=4):
  """Times `calls` passes of `model`; FLOPs counted on `eager`."""
  x = torch.randn(1, 3, size, size).to(memory_format=fmt)
  cond = torch.randn(1, 3, size, size).to(memory_format=fmt)

  def sample(model=model):
    h = x
    for i in range(calls):
      phase = torch.tensor([1 if i < calls // 2 else 0])
      h = h - 0.5 * model(h, cond, torch.tensor([500.0]), phase)
    return h

  with torch.inference_mode(), _autocast():
    flops = _flops(lambda: sample(eager))
    return (*_time(sample, n), flops)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--cases', default='calibration,train,sample')
  parser.add_argument('--image_size', type=int, default=64)
  parser.add_argument('--batch', type=int, default=4)
  parser.add_argument('--sample_sizes', default='128,256')
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--threads', type=int, default=2)
  parser.add_argument('--memory_format', default='contiguous',
                      choices=['contiguous', 'channels_last'])
  parser.add_argument('--base_channels', type=int, default=64)
  parser.add_argument('--channel_mults', default='1,2,4,8')
  parser.add_argument('--dtype', default='float32',
                      choices=['float32', 'bfloat16'],
                      help='bfloat16: torch.autocast (bf16 convolutions and '
                      'matmuls, float32 parameters)')
  parser.add_argument('--compile', action='store_true',
                      help='torch.compile the network (inductor)')
  parser.add_argument('--check', action='store_true',
                      help='compare with drdd_jax.unet and exit')
  parser.add_argument('--json_out')
  args = parser.parse_args()
  global DTYPE
  DTYPE = args.dtype
  torch.set_num_threads(args.threads)
  mults = tuple(int(m) for m in args.channel_mults.split(','))
  if args.check:
    for base, m in ((16, (1, 2)), (args.base_channels, mults)):
      err, count = check(base, m)
      print(json.dumps(dict(check=f'base {base}, mults {m}', params=count,
                            max_rel_error=err)))
      if err > 1e-4:
        raise SystemExit(f'torch and flax networks differ: {err}')
    return
  fmt = {'contiguous': torch.contiguous_format,
         'channels_last': torch.channels_last}[args.memory_format]
  torch.manual_seed(0)
  model = UNet(args.base_channels, mults).to(memory_format=fmt)
  params = sum(p.numel() for p in model.parameters())
  run = torch.compile(model) if args.compile else model
  records = []
  for case in args.cases.split(','):
    if case == 'calibration':
      wall, cpu, compile_s, flops = bench_calibration(30, fmt)
      records.append(_record(case, 64, 8, wall, cpu, compile_s, flops,
                             args.memory_format, args.compile))
    elif case == 'train':
      wall, cpu, compile_s, flops = bench_train(
          model, run, args.image_size, args.batch, args.steps, fmt)
      records.append(_record(case, args.image_size, args.batch, wall, cpu,
                             compile_s, flops, args.memory_format, args.compile,
                             params=params,
                             noise_batch=args.batch,
                             train_step_s_median=statistics.median(wall)))
    elif case == 'sample':
      for size in (int(s) for s in args.sample_sizes.split(',')):
        wall, cpu, compile_s, flops = bench_sample(
            model, run, size, max(3, args.steps // 2), fmt)
        records.append(_record(case, size, 1, wall, cpu, compile_s, flops,
                               args.memory_format, args.compile,
                               network_calls=4,
                               sample_s_per_image=statistics.median(wall)))
    else:
      raise SystemExit(f'unknown case {case!r}')
    print(json.dumps(records[-1]), flush=True)
  if args.json_out:
    with open(args.json_out, 'a') as f:
      for r in records:
        f.write(json.dumps(r) + '\n')


if __name__ == '__main__':
  main()
