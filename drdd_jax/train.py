"""Training: the sharded state, the pure jitted train step, and the loop.

Sections: config checks, mesh and shardings, model and optimizer, the train
step, state creation, and `train_and_evaluate` (input, checkpoint, logging,
loop). One `Mesh`; the batch is sharded over its batch axes (`data`, and
`fsdp` if present), parameters are replicated, or sharded over `fsdp` when
that axis has more than one device.
"""
import functools
import math
import signal
from typing import Any, Optional

from absl import logging
from clu import metrics as clu_metrics
from clu import periodic_actions
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from drdd_jax import bf16_conv
from drdd_jax import checkpoints
from drdd_jax import data as data_lib
from drdd_jax import distributed
from drdd_jax import host_memory
from drdd_jax import losses
from drdd_jax import schedules
from drdd_jax import unet
from drdd_jax import writers

BATCH_AXES = ('data', 'fsdp')  # Mesh axes the batch is split over.


# ---------------------------------------------------------------- config ---
def check_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Fails early, naming the field, on values that cannot work."""
  t, s, d = config.training, config.sampling, config.diffusion

  def need(ok, field, value, why):
    if not ok:
      raise ValueError(f'{field}={value!r}: {why}')

  need(t.num_steps >= 0, 'training.num_steps', t.num_steps, 'must be >= 0.')
  need(t.batch_size > 0, 'training.batch_size', t.batch_size, 'must be > 0.')
  need(t.noise_batch_size >= 0, 'training.noise_batch_size',
       t.noise_batch_size, 'must be >= 0 (0 = training.batch_size).')
  need(t.microbatches >= 1, 'training.microbatches', t.microbatches,
       'must be >= 1.')
  for field, value in (('training.batch_size', t.batch_size),
                       ('training.noise_batch_size', noise_batch_size(config))):
    times = (f' times training.microbatches={t.microbatches}'
             if t.microbatches > 1 else '')
    need(value % (num_devices * t.microbatches) == 0, field, value,
         f'must be divisible by the {num_devices} devices of the batch '
         f'axes{times}.')
    need(value % jax.process_count() == 0, field, value,
         f'must be divisible by the {jax.process_count()} processes.')
  need(t.steps_per_dispatch >= 1, 'training.steps_per_dispatch',
       t.steps_per_dispatch, 'must be >= 1.')
  need(t.compute_dtype in ('auto', 'float32', 'bfloat16'),
       'training.compute_dtype', t.compute_dtype,
       "must be 'auto', 'float32' or 'bfloat16'.")
  need(t.conv_precision in ('auto', 'default', 'bfloat16'),
       'training.conv_precision', t.conv_precision,
       "must be 'auto', 'default' or 'bfloat16'.")
  need(d.method in ('drdd', 'rddm'), 'diffusion.method', d.method,
       "must be 'drdd' or 'rddm'.")
  need(d.noise_condition in ('null', 'input'), 'diffusion.noise_condition',
       d.noise_condition, "must be 'null' or 'input'.")
  need(d.sigma_h > 0, 'diffusion.sigma_h', d.sigma_h, 'must be > 0.')
  need(s.n_res >= 1, 'sampling.n_res', s.n_res, 'must be >= 1.')
  need(s.n_noise >= 1, 'sampling.n_noise', s.n_noise, 'must be >= 1.')
  need(s.eta >= 0, 'sampling.eta', s.eta, 'must be >= 0.')
  need(0 < config.data.paired_fraction <= 1, 'data.paired_fraction',
       config.data.paired_fraction, 'must be in (0, 1].')
  data_lib.task_names(config.data)  # Names unknown tasks.


def noise_batch_size(config) -> int:
  return config.training.noise_batch_size or config.training.batch_size


def compute_dtype(config):
  """`training.compute_dtype`; 'auto' is bfloat16 on TPU and GPU, float32 on
  CPU (XLA:CPU runs bfloat16 elementwise work 2-4x slower than float32)."""
  name = config.training.compute_dtype
  if name == 'auto':
    name = 'float32' if jax.default_backend() == 'cpu' else 'bfloat16'
  return jnp.dtype(name)


def conv_precision(config):
  """`training.conv_precision` as `unet.conv`'s precision: None (the
  compute dtype's), or bfloat16 (the convolutions of a float32 network
  computed in bfloat16).

  'auto' is bfloat16 for float32 compute where `bf16_conv`'s kernels run
  (CPUs with AVX512-BF16, one device: twice the convolutions' speed, and
  the elementwise work stays float32, which XLA:CPU runs 2-4x faster than
  bfloat16), else None.
  """
  name = config.training.conv_precision
  if name == 'auto':
    fast = compute_dtype(config) == jnp.float32 and bf16_conv.enabled()
    name = 'bfloat16' if fast else 'default'
  return None if name == 'default' else jnp.dtype(name)


# ------------------------------------------------------- mesh & sharding ---
def make_mesh(mesh_config, devices=None) -> jax.sharding.Mesh:
  """The mesh of `config.mesh` over `devices` (default: all); -1 = the rest."""
  axes, shape = tuple(mesh_config.axes), list(mesh_config.shape)
  if len(axes) != len(shape):
    raise ValueError(f'mesh.axes {axes} and mesh.shape {tuple(shape)} differ '
                     'in length.')
  devices = jax.devices() if devices is None else devices
  n = len(devices)
  if -1 in shape:
    rest = math.prod(x for x in shape if x != -1)
    shape[shape.index(-1)] = n // rest
  if math.prod(shape) != n:
    raise ValueError(f'mesh.shape {tuple(shape)} does not use the {n} devices.')
  return jax.make_mesh(tuple(shape), axes, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(axes))


def batch_axes(mesh) -> tuple:
  return tuple(a for a in mesh.axis_names if a in BATCH_AXES)


def batch_sharding(mesh, leading: int = 0) -> NamedSharding:
  """Splits dimension `leading` (the batch) over the batch axes."""
  return NamedSharding(mesh, P(*([None] * leading), batch_axes(mesh)))


def param_sharding(mesh, x) -> NamedSharding:
  """Replicated; split over 'fsdp' (largest divisible dim) when it exists."""
  n = dict(zip(mesh.axis_names, mesh.devices.shape)).get('fsdp', 1)
  if n > 1 and x.ndim:
    dims = sorted(range(x.ndim), key=lambda i: -x.shape[i])
    for i in dims:
      if x.shape[i] % n == 0:
        spec = [None] * x.ndim
        spec[i] = 'fsdp'
        return NamedSharding(mesh, P(*spec))
  return NamedSharding(mesh, P())


# ------------------------------------------------- model, optimizer, state ---
@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  # First step whose loss or gradient norm was not finite (-1: none). That
  # step's update is skipped, so the state stays the last good one.
  nonfinite_step: jax.Array


@flax.struct.dataclass
class TrainMetrics(clu_metrics.Collection):
  loss: clu_metrics.Average.from_output('loss')
  loss_noise: clu_metrics.Average.from_output('loss_noise')
  loss_residual: clu_metrics.Average.from_output('loss_residual')
  grad_norm: clu_metrics.Average.from_output('grad_norm')


def learning_rate(config):
  """The learning rate: a schedule of the update count, or a constant."""
  o = config.optim
  if o.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(
        0.0, o.learning_rate, o.warmup_steps, max(config.training.num_steps,
                                                  o.warmup_steps + 1))
  if o.schedule == 'constant':
    # linear_schedule holds its end value after the warm-up.
    return (optax.linear_schedule(0.0, o.learning_rate, o.warmup_steps)
            if o.warmup_steps else o.learning_rate)
  raise ValueError(f"optim.schedule={o.schedule!r}: must be 'constant' or "
                   "'cosine'.")


def make_optimizer(config) -> optax.GradientTransformation:
  """Adam after global-norm clipping (`optim.grad_clip`; 0 = none).

  The train step initializes and checkpoints optax's state of this chain,
  and computes its `update` itself, fused with the EMA (`apply_gradients`).
  """
  o = config.optim
  clip = (optax.clip_by_global_norm(o.grad_clip) if o.grad_clip > 0
          else optax.identity())
  return optax.chain(clip, optax.adam(learning_rate(config), b1=o.b1,
                                      b2=o.b2, eps=o.eps))


def apply_gradients(config, state: TrainState, grads, grad_norm,
                    ok) -> TrainState:
  """One step of `make_optimizer(config)` and the EMA, or none where not `ok`.

  The arithmetic of optax's `update`, `optax.apply_updates` and the EMA,
  written out per parameter, with the new values kept only where `ok`
  (otherwise the old ones). Computed through optax and then guarded by a
  `where` over the whole state, the donated moments were read by several
  fusions while being overwritten, and XLA:CPU copied them first: 0.29 s
  against 0.15 s per step for aio5's 35.7 M parameters (docs/performance.md).
  Equal to optax's result (tests/test_train_step.py).

  Args:
    config: the config (its `optim` group).
    state: the state before the step.
    grads: the gradient, a pytree like `state.params`.
    grad_norm: its global norm.
    ok: whether to apply the step (a boolean scalar).

  Returns:
    The state after the step; `step` advances either way.
  """
  o = config.optim
  clip_state, (adam, lr_state) = state.opt_state
  lr = learning_rate(config)
  neg_lr = -(lr(adam.count) if callable(lr) else lr)
  count = optax.safe_increment(adam.count)
  bias1, bias2 = 1 - o.b1**count, 1 - o.b2**count
  step = state.step + 1
  decay = jnp.where(step % o.ema_every == 0, o.ema_decay, 1.0)

  def one(p, g, mu, nu, ema):
    # Each new value is computed from the kept ones before it, so each output
    # reads only its own old value: updated in place, without copies.
    keep = lambda new, old: jnp.where(ok, new, old)
    if o.grad_clip > 0:
      g = jnp.where(grad_norm < o.grad_clip, g, g / grad_norm * o.grad_clip)
    mu = keep((1 - o.b1) * g + o.b1 * mu, mu)
    nu = keep((1 - o.b2) * (g * g) + o.b2 * nu, nu)
    p = keep(p + neg_lr * ((mu / bias1) / (jnp.sqrt(nu / bias2) + o.eps)), p)
    return p, mu, nu, keep(decay * ema + (1 - decay) * p, ema)

  out = jax.tree.map(one, state.params, grads, adam.mu, adam.nu,
                     state.ema_params)
  params, mu, nu, ema = (
      jax.tree.map(lambda t, i=i: t[i], out,
                   is_leaf=lambda t: isinstance(t, tuple)) for i in range(4))
  count = jnp.where(ok, count, adam.count)
  if isinstance(lr_state, optax.ScaleByScheduleState):  # Counts in step.
    lr_state = lr_state._replace(count=count)
  return state.replace(
      step=step, params=params, ema_params=ema,
      opt_state=(clip_state, (adam._replace(count=count, mu=mu, nu=nu),
                              lr_state)),
      nonfinite_step=jnp.where(ok | (state.nonfinite_step >= 0),
                               state.nonfinite_step, state.step))


def create_model(config):
  return unet.create_model(config.model, config.diffusion.method,
                           compute_dtype(config), conv_precision(config))


def make_schedule(config) -> schedules.Schedule:
  d = config.diffusion
  return schedules.make_schedule(d.num_timesteps, d.sigma_h, d.beta_start,
                                 d.beta_end)


def init_state(config, model, tx, rng) -> TrainState:
  params = unet.init_params(model, rng)
  return TrainState(step=jnp.int32(0), params=params,
                    ema_params=jax.tree.map(jnp.copy, params),
                    opt_state=tx.init(params), nonfinite_step=jnp.int32(-1))


def create_train_state(config, model, tx, mesh):
  """The initial state, created directly with its shardings.

  Returns:
    (state, state_shardings).
  """
  init = functools.partial(init_state, config, model, tx)
  rng = jax.random.key(config.training.seed)
  shardings = jax.tree.map(lambda x: x.sharding,
                           abstract_state(config, model, tx, mesh))
  # Initialization runs once: skip XLA's slow optimization passes for it.
  compiled = jax.jit(init, out_shardings=shardings).lower(rng).compile(
      {'xla_backend_optimization_level': 0}
      if jax.default_backend() == 'cpu' else None)
  return compiled(rng), shardings


def abstract_state(config, model, tx, mesh):
  """`ShapeDtypeStruct`s (with shardings) of the train state."""
  init = functools.partial(init_state, config, model, tx)
  shapes = jax.eval_shape(init, jax.random.key(0))
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=param_sharding(mesh, x)), shapes)


def load_ema_params(config, workdir: str, step: Optional[int] = None):
  """The EMA params of a checkpoint in `workdir`; returns (params, step)."""
  mesh = make_mesh(config.mesh)
  manager = checkpoints.create_manager(workdir, config.training)
  state = checkpoints.restore_latest(
      manager, abstract_state(config, create_model(config),
                              make_optimizer(config), mesh), None, step)
  if state is None:
    raise FileNotFoundError(f'No checkpoint in {manager.directory}: train '
                            'first (--mode=train).')
  return state.ema_params, int(jax.device_get(state.step))


# ------------------------------------------------------------ train step ---
def to_float(images):
  return images.astype(jnp.float32) / 127.5 - 1.0


def accumulate_gradients(grad_fn, params, batch, microbatches: int):
  """The mean of `grad_fn(params, *batch)` over `microbatches` slices of `batch`.

  The slices run one after another in a `lax.scan`, so only one slice's
  activations are alive at a time. With per-example losses averaged over
  equal slices, the result is `grad_fn(params, *batch)` up to summation
  order. Slice i holds rows i, i + m, i + 2m, ...: a batch split over devices
  by rows keeps every device's share of each slice on that device.

  Args:
    grad_fn: `grad_fn(params, *batch) -> pytree` (e.g. `value_and_grad`'s).
    params: its first argument.
    batch: a tuple of pytrees whose leaves share a leading batch axis.
    microbatches: the number of slices; divides the batch axis.
  """
  if microbatches == 1:
    return grad_fn(params, *batch)
  m = microbatches
  slices = jax.tree.map(
      lambda x: jnp.swapaxes(x.reshape(x.shape[0] // m, m, *x.shape[1:]), 0, 1),
      batch)
  first = jax.tree.map(lambda x: x[0], slices)
  total = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                       jax.eval_shape(grad_fn, params, *first))

  def add_slice(total, part):
    return jax.tree.map(jnp.add, total, grad_fn(params, *part)), None

  total, _ = jax.lax.scan(add_slice, total, slices)
  return jax.tree.map(lambda x: x / m, total)


def global_norm(tree):
  """`optax.tree.norm(tree)`: the L2 norm of all of `tree`'s leaves.

  On CPU as one `vdot` per leaf (float32 sums): XLA:CPU runs a sum of
  squares over a whole leaf as a chain of `reduce-window`s, slower than a
  dot (`benchmarks/ab.py --change=global_norm`: 1.5-2 % off the aio5 train
  step, docs/performance.md).
  """
  if jax.default_backend() != 'cpu':
    return optax.tree.norm(tree)
  return jnp.sqrt(sum(jnp.vdot(x, x, preferred_element_type=jnp.float32)
                      for x in jax.tree.leaves(tree)))


def make_train_step(config, model, sched):
  """Returns the pure `train_step(state, batch, rng) -> (state, metrics)`.

  `batch` holds uint8 images (`data.create_train_iterator`'s layout); they
  are converted to [-1, 1] on the device. `steps_per_dispatch > 1` stacks that
  many batches on a leading axis and runs the steps in a `lax.scan`;
  `microbatches > 1` accumulates the gradient over that many slices of each
  batch (`accumulate_gradients`). Both loops compile their body once; on CPU
  they run at the speed of straight-line code because `unet.conv` writes its
  gradient in the layout XLA:CPU hands to Eigen inside loops too.
  """
  model_fn = lambda p, x, c, t, ph: model.apply({'params': p}, x, c, t, ph)
  loss_fn = losses.make_loss_fn(model_fn, sched, config.diffusion,
                                shared=config.model.shared)
  draws_fn = losses.make_draws_fn(sched, config.diffusion)
  grad_fn = jax.value_and_grad(
      lambda params, batch, draws: loss_fn(params, batch, draws=draws),
      has_aux=True)

  def one_step(state: TrainState, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    images = jax.tree.map(
        lambda x: to_float(x) if x.dtype == jnp.uint8 else x, batch)
    # Drawn for the whole batch: microbatches change the memory, not the maths.
    draws = draws_fn(images, rng)
    (loss, metrics), grads = accumulate_gradients(
        grad_fn, state.params, (images, draws), config.training.microbatches)
    grad_norm = global_norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    state = apply_gradients(config, state, grads, grad_norm, ok)
    return state, dict(metrics, grad_norm=grad_norm)

  if config.training.steps_per_dispatch == 1:
    return one_step

  def multi_step(state, batches, rng):
    state, metrics = jax.lax.scan(lambda s, b: one_step(s, b, rng), state,
                                  batches)
    return state, jax.tree.map(jnp.mean, metrics)

  return multi_step


def jit_train_step(train_step, state_shardings, mesh, leading: int):
  replicated = NamedSharding(mesh, P())
  return jax.jit(train_step, donate_argnums=0,
                 in_shardings=(state_shardings, batch_sharding(mesh, leading),
                               replicated),
                 out_shardings=(state_shardings, replicated),
                 compiler_options=unet.compiler_options(
                     mesh.devices.flat[0].platform))


def global_batch(local_batch, mesh, leading: int = 0):
  """Process-local numpy arrays -> global arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh, leading)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)


def next_batch(data_iter, k: int):
  """One batch, or k batches stacked on a new leading axis."""
  if k == 1:
    return next(data_iter)
  batches = [next(data_iter) for _ in range(k)]
  return jax.tree.map(lambda *xs: np.stack(xs), *batches)


# ------------------------------------------------------------------ loop ---
class _Preemption:
  """Turns SIGTERM into a flag the loop checks, to save before exiting."""

  def __init__(self):
    self.requested = False
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not the main thread (e.g. some test runners).
      self._previous = None

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: saving a checkpoint and stopping.')
    self.requested = True

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class NonFiniteError(FloatingPointError):
  pass


def _check_finite(state, last_saved: Optional[int]):
  bad = int(jax.device_get(state.nonfinite_step))
  if bad >= 0:
    raise NonFiniteError(
        f'Non-finite loss or gradient norm at step {bad + 1}: training '
        f'stopped; the update of that step was not applied. The last good '
        f'checkpoint (step {last_saved}) is intact. Lower optim.learning_rate '
        'or check the data.')


def _flat_hparams(config) -> dict:
  out = {}

  def walk(d, prefix):
    for k, v in d.items():
      if isinstance(v, dict):
        walk(v, prefix + k + '.')
      else:
        out[prefix + k] = v if isinstance(v, (int, float, str, bool)) else str(v)

  walk(config.to_dict(), '')
  return out


def wait_each_step() -> bool:
  """Whether the training loop waits for each step before dispatching the next.

  On CPU: the host and the "device" share the cores, so running ahead buys
  little, and a step dispatched before the last one ends gets fresh
  temporaries, while after a wait the block cache (host_memory.py) hands it
  the last step's, already faulted in. Elsewhere the host runs ahead.
  """
  return jax.default_backend() == 'cpu'


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str):
  """Trains (resuming from `workdir`), then evaluates; returns the state."""
  mesh = make_mesh(config.mesh)
  num_batch_devices = math.prod(mesh.shape[a] for a in batch_axes(mesh))
  check_config(config, num_batch_devices)
  t = config.training
  k = t.steps_per_dispatch
  if t.num_steps % k:
    raise ValueError(f'training.num_steps={t.num_steps} must be a multiple of '
                     f'training.steps_per_dispatch={k}.')

  # Input.
  data_iter = data_lib.create_train_iterator(config.data, t.batch_size,
                                             noise_batch_size(config))

  # Model, optimizer, state.
  model = create_model(config)
  tx = make_optimizer(config)
  sched = make_schedule(config)
  state, shardings = create_train_state(config, model, tx, mesh)
  logging.info('Model: %s parameters (%s network%s), compute dtype %s%s.',
               f'{unet.count_params(state.params):,}',
               'one shared' if config.model.shared else 'two',
               '' if config.model.shared else 's', compute_dtype(config).name,
               ', convolutions in bfloat16' if conv_precision(config) else '')

  # Checkpoint.
  manager = checkpoints.create_manager(workdir, t)
  restored = checkpoints.restore_latest(
      manager, abstract_state(config, model, tx, mesh), data_iter)
  if restored is not None:
    state = restored
  start = int(jax.device_get(state.step))
  last_saved = manager.latest_step()

  # Logging.
  writer = writers.create_writer(workdir, just_logging=jax.process_index() > 0)
  if start == 0:
    writer.write_hparams(_flat_hparams(config))
  report = periodic_actions.ReportProgress(num_train_steps=t.num_steps,
                                           writer=writer,
                                           every_steps=t.log_every)
  step_fn = jit_train_step(make_train_step(config, model, sched),
                           shardings, mesh, leading=1 if k > 1 else 0)
  rng = jax.random.key(t.seed + 1)

  from drdd_jax import evaluate  # pylint: disable=g-import-not-at-top
  preemption = _Preemption()
  logging.info('Training from step %d to %d (global batch %d pairs + %d '
               'targets, %d per dispatch).', start, t.num_steps, t.batch_size,
               noise_batch_size(config), k)
  train_metrics = None
  step = start
  wait = wait_each_step()
  try:
    while step < t.num_steps:
      batch = global_batch(next_batch(data_iter, k), mesh,
                           leading=1 if k > 1 else 0)
      if step == start:  # Compile, then start the collectives together.
        step_fn = step_fn.lower(state, batch, rng).compile()
        host_memory.release_freed()
        distributed.barrier(f'train_step_compiled_{start}')
      state, metrics = step_fn(state, batch, rng)
      if wait:
        jax.block_until_ready(state)
      step += k
      update = TrainMetrics.single_from_model_output(**metrics)
      train_metrics = update if train_metrics is None else train_metrics.merge(
          update)
      report(step)
      final = step >= t.num_steps
      if step % t.log_every < k or final:
        _check_finite(state, last_saved)
        values = jax.device_get(train_metrics.compute())
        writer.write_scalars(step, values)
        logging.info('step %d/%d  %s', step, t.num_steps, '  '.join(
            f'{n}={v:.4g}' for n, v in values.items()))
        train_metrics = None
      run_eval = t.eval_every and step % t.eval_every < k and not final
      write_grid = t.sample_every and step % t.sample_every < k
      save = step % t.checkpoint_every < k or final or preemption.requested
      if run_eval or write_grid or save:
        # Other work follows: once the step is done, hand back the blocks
        # kept for the next one (host_memory.py).
        jax.block_until_ready(state)
        host_memory.release_freed()
      if run_eval:
        evaluate.evaluate(config, workdir, state.ema_params, step,
                          writer=writer)
      if write_grid:
        evaluate.write_sample_grid(config, model, sched, state.ema_params,
                                   writer, step)
      if save:
        _check_finite(state, last_saved)
        checkpoints.save(manager, step, state, data_iter, force=True)
        last_saved = step
      if preemption.requested:
        logging.warning('Stopped at step %d after SIGTERM; rerun the same '
                        'command to resume.', step)
        break
  finally:
    manager.wait_until_finished()
    preemption.restore()
    writer.flush()

  if not preemption.requested and config.eval.at_end:
    evaluate.evaluate(config, workdir, state.ema_params, step, writer=writer)
  writer.close()
  return state
