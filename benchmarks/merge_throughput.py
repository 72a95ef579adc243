"""Merge throughput and continual-merge memory on a 50M-parameter float32 model, as ratios.

  python benchmarks/merge_throughput.py                 # T = 8 models of ~50M parameters
  python benchmarks/merge_throughput.py --params=5e6    # a quick run

The model is a pytree shaped like a small transformer (d_model 768, MLP 3072, no embedding: as
many layers of q, k, v, o (768 x 768), up (768 x 3072) and down (3072 x 768) kernels, with their
biases and layer-norm scales, as reach ``--params``). T finetuned models are base + 1e-3 noise.

Throughput. Merging is memory-bound: its floor is reading every input once. We define

  effective bandwidth (GB/s) = bytes of the input models read / wall time of the merge,

with bytes = (T + 1) x 4 x P for the static merges (base and T models of P float32 parameters),
and T x 4 x P for the continual OPCM (T models arrive; the base is in the state). The wall time
is that of the public API call, checks included (the static merges are eager functions that
validate their inputs), after one warm-up call that compiles; best of ``--repeats``. OPCM is timed
once (it is bound by one SVD per 2-D leaf per update, seconds per model at this size) as T
jitted updates with the state donated (``jax.jit(merge.update, donate_argnums=0)``, compiled
ahead of time; each finetuned model checked for NaN/Inf on the host first, as
`cljax.merging.continual` documents) and the final ``params``. The reference is the machine's copy bandwidth measured in the same
run: ``np.copyto`` of a float32 array of P parameters into a preallocated one (bytes copied per
second, best of ``--repeats``; a fresh ``a.copy()`` is printed too: it also pays the page faults
of new memory, as a merge's fresh output does). Targets (issue 5): task arithmetic >= 40% of the
copy bandwidth; TIES within 3x the time of task arithmetic. TIES is timed twice: with the exact
trim threshold (two radix-histogram passes over the model per task vector) and with the threshold
estimated from 2^16 sampled entries per task vector (``threshold='sampled'``, kept fraction
0.2 +- 0.0016), which leaves the fused trim-elect-merge pass as the only full read.

Memory. A fresh subprocess per cell builds the base, compiles the donated update, then merges
n models one at a time, each generated just before its update and dropped after (a continual
merge never holds more than one finetuned model), for n = 4 and n = 16. Its peak resident set
size during the merges is VmHWM of /proc/self/status, reset just before the first update (the
base and compiled code already resident); the peak before the merges (importing JAX,
building the base, compiling) is printed too. Target: the merge peak at 16 <= 1.1 x the merge peak at 4, for every continual merge.
The subprocesses run with ``MALLOC_ARENA_MAX=1`` (``--malloc_arena_max``; 0 keeps glibc's default):
with glibc's per-thread arenas, buffers freed by one of XLA's threads are not reused by another,
and the peak of identical runs varies by up to one model (about +-100 MB at 50M parameters,
whatever n: measured, n = 4 as often above n = 16 as below); one arena removes that noise, so the
4-versus-16 comparison measures the merge rather than the allocator.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import app
from absl import flags
import numpy as np

_PARAMS = flags.DEFINE_float('params', 50e6, 'Parameters per model (rounded to whole layers).')
_MODELS = flags.DEFINE_integer('models', 8, 'T, the number of finetuned models merged.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed calls per merge (the best is reported).')
_METHODS = flags.DEFINE_list('methods', ['task_arithmetic', 'ties', 'ties_sampled', 'opcm'],
                             'Merges to time.')
_MEMORY = flags.DEFINE_list('memory', ['continual_average', 'continual_task_arithmetic',
                                       'continual_ties', 'opcm'],
                            'Continual merges whose peak RSS is measured (empty: none).')
_MEMORY_COUNTS = flags.DEFINE_list('memory_counts', ['4', '16'], 'Numbers of models merged.')
_ARENAS = flags.DEFINE_integer(
    'malloc_arena_max', 1, 'MALLOC_ARENA_MAX of the memory subprocesses (0: glibc\'s default).')
_CHILD = flags.DEFINE_string('child', None, 'Internal: run one memory measurement (JSON).')

D_MODEL, D_MLP = 768, 3072


def layer_shapes(params: float) -> dict:
  """Leaf shapes of a transformer-like model of about ``params`` parameters (whole layers)."""
  per_layer = 4 * (D_MODEL * D_MODEL + D_MODEL) + 2 * D_MODEL * D_MLP + D_MLP + D_MODEL + 4 * D_MODEL
  shapes = {}
  for i in range(max(1, int(round(params / per_layer)))):
    for name in ('q', 'k', 'v', 'o'):
      shapes[f'layer{i}/attn_{name}/kernel'] = (D_MODEL, D_MODEL)
      shapes[f'layer{i}/attn_{name}/bias'] = (D_MODEL,)
    shapes[f'layer{i}/mlp_up/kernel'] = (D_MODEL, D_MLP)
    shapes[f'layer{i}/mlp_up/bias'] = (D_MLP,)
    shapes[f'layer{i}/mlp_down/kernel'] = (D_MLP, D_MODEL)
    shapes[f'layer{i}/mlp_down/bias'] = (D_MODEL,)
    for ln in ('ln1', 'ln2'):
      shapes[f'layer{i}/{ln}/scale'] = (D_MODEL,)
      shapes[f'layer{i}/{ln}/bias'] = (D_MODEL,)
  return shapes


def make_base(shapes: dict):
  """The base: 0.02 N(0, 1) per leaf, generated leaf by leaf on the host (no model-sized
  temporaries, so that the peak RSS measures the merge, not the generator)."""
  import jax.numpy as jnp
  rng = np.random.default_rng(0)
  return {name: jnp.asarray(0.02 * rng.standard_normal(shape, dtype=np.float32))
          for name, shape in shapes.items()}


def make_finetuned(base, i: int):
  """base + 1e-3 N(0, 1) noise, deterministic in i, leaf by leaf as `make_base`."""
  import jax.numpy as jnp
  rng = np.random.default_rng(1000 + i)
  return {name: jnp.asarray(np.asarray(x) + 1e-3 * rng.standard_normal(x.shape, dtype=np.float32))
          for name, x in base.items()}


def _best_time(fn, repeats: int) -> float:
  import jax
  jax.block_until_ready(fn())  # Compile (and fault in the allocator's pages) once.
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return min(times)


def copy_bandwidth(num_params: int, repeats: int) -> tuple:
  """(GB/s of np.copyto into a preallocated array, GB/s of a fresh a.copy()), best of repeats."""
  a = np.random.default_rng(0).standard_normal(num_params, dtype=np.float32)
  b = np.empty_like(a)
  np.copyto(b, a)
  warm, fresh = [], []
  for _ in range(max(repeats, 5)):
    start = time.perf_counter()
    np.copyto(b, a)
    warm.append(time.perf_counter() - start)
    start = time.perf_counter()
    c = a.copy()
    fresh.append(time.perf_counter() - start)
    del c
  return a.nbytes / min(warm) / 1e9, a.nbytes / min(fresh) / 1e9


def _timed_merges(base, models, methods, repeats):
  """{method: seconds} for the static merges and the donated-state OPCM over ``models``."""
  import jax
  from cljax import merging
  seconds = {}
  for method in methods:
    if method == 'task_arithmetic':
      fn = lambda: merging.task_arithmetic(base, models, scaling=0.3)
    elif method == 'ties':
      fn = lambda: merging.ties(base, models, density=0.2, scaling=1.0)
    elif method == 'ties_sampled':
      fn = lambda: merging.ties(base, models, density=0.2, scaling=1.0, threshold='sampled',
                                key=jax.random.key(0))
    elif method == 'opcm':
      # SVD-bound (seconds per update at this size): compiled ahead of time and timed once.
      merge = merging.opcm(alpha=0.5)
      update = jax.jit(merge.update, donate_argnums=0).lower(merge.init(base), models[0]).compile()
      params = jax.jit(merge.params).lower(merge.init(base)).compile()

      def fn():
        state = merge.init(base)
        for m in models:
          merging.check_finite(m, name='finetuned')  # jitted updates cannot see values
          state = update(state, m)
        return params(state)
      start = time.perf_counter()
      jax.block_until_ready(fn())
      seconds[method] = time.perf_counter() - start
      continue
    else:
      raise app.UsageError(f'unknown method {method!r} in --methods')
    seconds[method] = _best_time(fn, repeats)
  return seconds


def _status_kb(field: str) -> int:
  """A field of /proc/self/status in kB (VmRSS: resident now; VmHWM: peak since the last reset)."""
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith(field + ':'):
        return int(line.split()[1])
  raise RuntimeError(f'/proc/self/status has no {field}')


def _memory_child(spec: dict) -> dict:
  """In a fresh process: build the base, merge n models one at a time, report peak RSS.

  Two peaks, both VmHWM of /proc/self/status: the process's before the merges (importing JAX,
  building the base, compiling), and the merge's own, after resetting VmHWM
  (``/proc/self/clear_refs``) once the base is built and the update compiled: base, state, the
  model being merged and every temporary. (``ru_maxrss`` would not do: on Linux a child started
  by fork + exec inherits its parent's peak, here the parent's T models.)
  """
  import jax
  from cljax import merging
  base = make_base(layer_shapes(spec['params']))
  ctor = getattr(merging, spec['method'])
  kwargs = {'continual_task_arithmetic': dict(scaling=0.3),
            'continual_ties': dict(scaling=0.5, density=0.2), 'opcm': dict(alpha=0.5)}
  merge = ctor(**kwargs.get(spec['method'], {}))
  state = merge.init(base)
  model = make_finetuned(base, 0)
  update = jax.jit(merge.update, donate_argnums=0).lower(state, model).compile()
  params = jax.jit(merge.params).lower(state).compile()
  del model
  setup_peak = _status_kb('VmHWM')
  with open('/proc/self/clear_refs', 'w') as f:
    f.write('5')  # Resets VmHWM to the current RSS.
  before = _status_kb('VmRSS')
  start = time.perf_counter()
  for i in range(spec['n']):
    model = make_finetuned(base, i)
    merging.check_finite(model, name=f'finetuned[{i}]')
    state = jax.block_until_ready(update(state, model))  # Then the model can be freed.
    del model
  jax.block_until_ready(params(state))
  return dict(setup_peak_mb=setup_peak / 1024, merge_peak_mb=_status_kb('VmHWM') / 1024,
              rss_before_mb=before / 1024,
              seconds=time.perf_counter() - start)


def _measure_memory(method: str, n: int, params: float, arenas: int) -> dict:
  spec = json.dumps(dict(method=method, n=n, params=params))
  env = dict(os.environ)
  if arenas > 0:
    env['MALLOC_ARENA_MAX'] = str(arenas)
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), f'--child={spec}'],
                        capture_output=True, text=True, check=False, env=env)
  if proc.returncode:
    raise RuntimeError(f'memory child {spec} failed:\n{proc.stderr[-3000:]}')
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  if _CHILD.value:
    print(json.dumps(_memory_child(json.loads(_CHILD.value))))
    return
  import jax
  shapes = layer_shapes(_PARAMS.value)
  num_params = int(sum(np.prod(s) for s in shapes.values()))
  t = _MODELS.value
  print(f'{num_params / 1e6:.1f}M float32 parameters in {len(shapes)} leaves, T = {t} models, '
        f'{jax.default_backend()} ({os.cpu_count()} CPUs), best of {_REPEATS.value}')
  base = make_base(shapes)
  models = [make_finetuned(base, i) for i in range(t)]
  jax.block_until_ready(models)
  warm_before, fresh_before = copy_bandwidth(num_params, _REPEATS.value)
  seconds = _timed_merges(base, models, _METHODS.value, _REPEATS.value)
  warm_after, fresh_after = copy_bandwidth(num_params, _REPEATS.value)
  copy_bw = max(warm_before, warm_after)  # The machine's best; other load only lowers it.
  fresh_bw = max(fresh_before, fresh_after)
  model_gb = 4 * num_params / 1e9
  print(f'copy bandwidth: np.copyto {copy_bw:.2f} GB/s (before {warm_before:.2f}, after '
        f'{warm_after:.2f}); fresh a.copy() {fresh_bw:.2f} GB/s')
  print(f'{"merge":<16} {"seconds":>8} {"ms/model":>9} {"GB read":>8} {"GB/s":>7} '
        f'{"/ copy":>7} {"/ TA time":>9}')
  for method, sec in seconds.items():
    read = model_gb * (t if method == 'opcm' else t + 1)
    bw = read / sec
    ta = seconds.get('task_arithmetic')
    rel = f'{sec / ta:9.2f}' if ta else f'{"-":>9}'
    print(f'{method:<16} {sec:8.3f} {1e3 * sec / t:9.1f} {read:8.2f} {bw:7.2f} '
          f'{100 * bw / copy_bw:6.1f}% {rel}')
  if 'task_arithmetic' in seconds:
    ta_ratio = model_gb * (t + 1) / seconds['task_arithmetic'] / copy_bw
    print(f'target TA >= 40% of copy bandwidth: {100 * ta_ratio:.1f}% -> '
          f'{"met" if ta_ratio >= 0.4 else "MISSED"}')
    for name, how in [('ties', 'exact threshold'), ('ties_sampled', 'sampled threshold')]:
      if name in seconds:
        r = seconds[name] / seconds['task_arithmetic']
        print(f'target TIES within 3x of TA ({how}): {r:.2f}x -> {"met" if r <= 3 else "MISSED"}')
  if _MEMORY.value:
    counts = [int(c) for c in _MEMORY_COUNTS.value]
    model_mb = 4 * num_params / 2**20
    print(f'\npeak RSS while merging n models one at a time (fresh subprocess per cell; each model '
          f'generated just before its update), MB; one model is {model_mb:.0f} MB. "merge" is the '
          f'peak from the start of the merges ("at start": the RSS then, with JAX, the base and the '
          f'state resident), "setup" the peak before the merges (importing JAX, building the base, '
          f'compiling); MALLOC_ARENA_MAX={_ARENAS.value or "default"}:')
    print(f'{"merge":<26} {"at start":>9} ' + ' '.join(f'{f"merge n={n}":>12}' for n in counts) +
          ' ' + ' '.join(f'{f"setup n={n}":>12}' for n in counts) +
          f' {"ratio":>6} {"s/model":>8}')
    for method in _MEMORY.value:
      cells = [_measure_memory(method, n, _PARAMS.value, _ARENAS.value) for n in counts]
      ratio = cells[-1]['merge_peak_mb'] / cells[0]['merge_peak_mb']
      per_model = cells[-1]['seconds'] / counts[-1]
      print(f'{method:<26} {cells[-1]["rss_before_mb"]:9.0f} ' +
            ' '.join(f'{c["merge_peak_mb"]:12.0f}' for c in cells) + ' ' +
            ' '.join(f'{c["setup_peak_mb"]:12.0f}' for c in cells) +
            f' {ratio:6.3f} {per_model:8.2f}  {"met" if ratio <= 1.1 else "MISSED"} (<= 1.1)')


if __name__ == '__main__':
  app.run(main)
