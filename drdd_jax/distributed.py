"""Multi-process start-up: call `initialize()` before any other JAX call.

One code path serves a laptop, a local multi-process run, a SLURM/Open MPI GPU
cluster and a TPU pod slice. The run is distributed when, in this order:

1. `coordinator_address/num_processes/process_id` are passed (main.py flags);
2. `DRDD_COORDINATOR_ADDRESS`, `DRDD_NUM_PROCESSES`, `DRDD_PROCESS_ID` are set;
3. a multi-task SLURM or Open MPI job, a multi-host TPU (`TPU_WORKER_HOSTNAMES`
   with several hosts, `MEGASCALE_*`) or `DRDD_DISTRIBUTED=auto` (set by
   `launch/tpu_pod.sh`, as TPU VMs only expose their topology through the GCE
   metadata server) is found: JAX then detects the parameters itself.

Otherwise the run is single-process and nothing is done. Heartbeat and
initialization timeouts are explicit so that a dead or missing peer makes the
survivors fail with an error in bounded time instead of hanging in a
collective forever.
"""
import os

from absl import logging
import jax


def _env_int(name: str, default: int = 0) -> int:
  value = os.environ.get(name, '')
  return int(value) if value.strip() else default


def cluster_detected() -> bool:
  """Whether the environment is a multi-process cluster JAX can auto-detect."""
  env = os.environ
  if env.get('DRDD_DISTRIBUTED', '').lower() == 'auto':
    return True
  if 'SLURM_JOB_ID' in env and _env_int('SLURM_NTASKS', 1) > 1:
    return True
  if _env_int('OMPI_COMM_WORLD_SIZE', 1) > 1:
    return True
  hosts = env.get('TPU_PROCESS_ADDRESSES') or env.get('TPU_WORKER_HOSTNAMES')
  return ',' in (hosts or '') or any(k.startswith('MEGASCALE_') for k in env)


def initialize(coordinator_address: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None,
               *,
               heartbeat_timeout_s: int = 60,
               init_timeout_s: int = 300) -> None:
  """Initializes `jax.distributed` if the run has several processes.

  Idempotent; must run before anything that creates a JAX backend.

  Args:
    coordinator_address: `host:port` of process 0; falls back to
      `$DRDD_COORDINATOR_ADDRESS`.
    num_processes: number of processes; falls back to `$DRDD_NUM_PROCESSES`.
    process_id: this process's index; falls back to `$DRDD_PROCESS_ID`.
    heartbeat_timeout_s: seconds without a heartbeat after which a process is
      declared dead and every other process is terminated with an error.
    init_timeout_s: seconds to wait for all processes to connect.

  Raises:
    ValueError: if the coordinator address is given without the process
      count and index (or the reverse).
  """
  if jax.distributed.is_initialized():
    return
  env = os.environ
  coordinator_address = (coordinator_address
                         or env.get('DRDD_COORDINATOR_ADDRESS') or None)
  if num_processes is None and env.get('DRDD_NUM_PROCESSES'):
    num_processes = int(env['DRDD_NUM_PROCESSES'])
  if process_id is None and env.get('DRDD_PROCESS_ID'):
    process_id = int(env['DRDD_PROCESS_ID'])

  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise ValueError(
          'coordinator_address, num_processes and process_id go together; got '
          f'{coordinator_address=}, {num_processes=}, {process_id=}.')
    if num_processes == 1:
      return
  elif not cluster_detected():
    return

  # Cross-process collectives on the CPU backend need gloo; the option only
  # affects the CPU client, so it is harmless on GPU and TPU hosts.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  logging.info('Initializing jax.distributed: coordinator=%s processes=%s '
               'id=%s (None: auto-detected).', *explicit)
  jax.distributed.initialize(
      coordinator_address, num_processes, process_id,
      initialization_timeout=init_timeout_s,
      heartbeat_timeout_seconds=heartbeat_timeout_s)


def log_topology() -> None:
  """Logs this process's place among all processes and devices."""
  logging.info(
      'JAX process %d/%d, backend %s: %d local devices, %d global devices '
      '(%s).', jax.process_index(), jax.process_count(),
      jax.default_backend(), jax.local_device_count(), jax.device_count(),
      jax.devices()[0].device_kind)


def barrier(name: str, timeout_s: int = 1800) -> None:
  """Waits until every process gets here (no-op for one process).

  A coordination-service barrier, not a collective: on CPU, gloo gives peers
  only 30 s to meet at their first collective, less than one process may
  spend compiling while another already runs. Train and evaluate steps wait
  here after compiling so that they start their collectives together.

  Args:
    name: a name unique to this barrier.
    timeout_s: fail after this long.
  """
  if jax.process_count() == 1:
    return
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  ocp.multihost.get_jax_distributed_client().wait_at_barrier(
      name, timeout_in_ms=timeout_s * 1000)
