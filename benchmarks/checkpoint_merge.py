"""Out-of-core checkpoint merging (`cljax-merge`): peak memory and throughput on a generated model.

Generates, in a scratch folder, a LLaMA-shaped float32 base model of >= ``--params`` parameters
(vocab 32000, hidden 2048, MLP 5632, as many layers as needed) saved as a Hugging Face folder of
exactly ``--shards`` safetensors shards, and ``--models`` finetuned copies (base + 1e-3 noise).
Then each method in ``--methods`` merges them with `cljax.merge_io.checkpoint_merge` in a fresh
subprocess, which reports its peak resident set size (``ru_maxrss``) and wall time. It prints

  * peak RSS (VmHWM), and (peak RSS - fixed overhead) / largest tensor, against the bound
    (number of finetuned models + 2) x largest tensor + fixed overhead, the fixed overhead being
    the peak RSS of the same subprocess merging a tiny model (Python, JAX, the compiled merges);
  * MB/s of tensors merged (bytes read from all models in the merge pass / wall time, compiles
    and the TIES threshold passes included) against the machine's copy bandwidth (`np.copyto`
    of 512 MB, best of 5; bytes copied per second).

The scratch folder needs (models + 2) x 4 bytes x params of disk (about 12 GB for the default);
the script checks the free space first and deletes everything at the end (unless ``--keep``).

  python benchmarks/checkpoint_merge.py                          # 594M params, 8 shards, 3 models
  python benchmarks/checkpoint_merge.py --params=50e6 --methods=task_arithmetic
  python benchmarks/checkpoint_merge.py --workdir=/mnt/big/scratch
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

from cljax.merge_io import checkpoint_merge
from cljax.merge_io import mergekit_config
from cljax.merge_io import recipes
from cljax.merge_io import safetensors_writer

_PARAMS = flags.DEFINE_float('params', 500e6, 'Minimum parameters of the generated model.')
_SHARDS = flags.DEFINE_integer('shards', 8, 'Shards of each generated model.')
_MODELS = flags.DEFINE_integer('models', 3, 'Finetuned models merged into the base.')
_METHODS = flags.DEFINE_list('methods', ['task_arithmetic', 'ties', 'dare_ties'],
                             'merge_method values to run (see cljax.merge_io.mergekit_config).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Scratch folder (default: a new one in $TMPDIR).')
_KEEP = flags.DEFINE_bool('keep', False, 'Keep the scratch folder.')
_BLOCK = flags.DEFINE_integer('block_entries', checkpoint_merge.DEFAULT_BLOCK_ENTRIES,
                              'Entries per merged block.')
_CHILD = flags.DEFINE_string('child', None, 'Internal: run one merge from this JSON job file.')

VOCAB, HIDDEN, MLP = 32000, 2048, 5632


def llama_shapes(min_params: float) -> dict:
  """name -> shape of a LLaMA-like model with enough layers for ``min_params``."""
  layer = {'self_attn.q_proj.weight': (HIDDEN, HIDDEN), 'self_attn.k_proj.weight': (HIDDEN, HIDDEN),
           'self_attn.v_proj.weight': (HIDDEN, HIDDEN), 'self_attn.o_proj.weight': (HIDDEN, HIDDEN),
           'mlp.gate_proj.weight': (MLP, HIDDEN), 'mlp.up_proj.weight': (MLP, HIDDEN),
           'mlp.down_proj.weight': (HIDDEN, MLP), 'input_layernorm.weight': (HIDDEN,),
           'post_attention_layernorm.weight': (HIDDEN,)}
  fixed = 2 * VOCAB * HIDDEN + HIDDEN
  per_layer = sum(int(np.prod(s)) for s in layer.values())
  layers = max(1, int(np.ceil((min_params - fixed) / per_layer)))
  shapes = {'model.embed_tokens.weight': (VOCAB, HIDDEN)}
  for i in range(layers):
    shapes.update({f'model.layers.{i}.{k}': s for k, s in layer.items()})
  shapes.update({'model.norm.weight': (HIDDEN,), 'lm_head.weight': (VOCAB, HIDDEN)})
  return shapes


def shard_limit(specs: list, shards: int) -> int:
  """The smallest max shard size (in 1 MB steps) that gives at most ``shards`` shards."""
  total = sum(s.nbytes for s in specs)
  limit = total // shards
  while len(safetensors_writer.plan_shards(specs, limit)) > shards:
    limit += 1 << 20
  return limit


def generate(folder: str, shapes: dict, index: int, shards: int) -> None:
  """Model ``index`` (0 = base): deterministic per tensor, one tensor in memory at a time."""
  os.makedirs(folder)
  specs = [safetensors_writer.TensorSpec(n, np.dtype(np.float32), s) for n, s in shapes.items()]

  def produce(name):
    seed = recipes.name_hash(name)
    x = np.random.default_rng(seed).standard_normal(shapes[name], dtype=np.float32)
    x *= np.float32(0.02)
    if index:
      x += np.float32(1e-3) * np.random.default_rng([seed, index]).standard_normal(
          shapes[name], dtype=np.float32)
    return x

  safetensors_writer.write_checkpoint(folder, specs, produce, shard_limit(specs, shards))
  with open(os.path.join(folder, 'config.json'), 'w') as f:
    json.dump({'model_type': 'llama', 'hidden_size': HIDDEN, 'vocab_size': VOCAB,
               'torch_dtype': 'float32'}, f)


def copy_bandwidth() -> float:
  """Bytes per second of np.copyto of 512 MB (best of 5)."""
  src = np.ones(1 << 27, np.float32)
  dst = np.empty_like(src)
  best = float('inf')
  for _ in range(5):
    start = time.perf_counter()
    np.copyto(dst, src)
    best = min(best, time.perf_counter() - start)
  return src.nbytes / best


def peak_rss() -> int:
  """This process's peak resident set size in bytes (VmHWM).

  Not ``ru_maxrss``: Linux carries the parent's high-water mark at fork into a child's
  ``ru_maxrss``, so a subprocess of a big parent would report the parent's peak.
  """
  with open('/proc/self/status') as f:
    line = next(l for l in f if l.startswith('VmHWM:'))
  return int(line.split()[1]) * 1024


def run_child(job_file: str) -> None:
  with open(job_file) as f:
    job = json.load(f)
  checkpoint_merge.return_freed_blocks_to_os()   # as the command line does
  config = mergekit_config.parse_config(job['config'])
  summary = checkpoint_merge.merge_checkpoints(config, job['output'], progress=False,
                                               block_entries=job['block_entries'],
                                               max_shard_size='1GB')
  print(json.dumps({'peak_rss': peak_rss(),
                    'seconds': summary.seconds, 'input_bytes': summary.input_bytes,
                    'output_bytes': summary.output_bytes, 'recipe': summary.recipe}))


def merge_in_child(workdir: str, method: str, paths: list, output: str) -> dict:
  density = 0.5 if method in ('ties', 'dare_ties', 'dare_linear', 'continual_ties') else 1.0
  config = {'merge_method': method, 'base_model': paths[0],
            'models': [{'model': p, 'parameters': {'weight': 1.0, 'density': density}}
                       for p in paths[1:]]}
  if method in ('magmax', 'continual_average', 'continual_task_arithmetic', 'opcm', 'linear'):
    config['models'] = [{'model': p} for p in paths[1:]]
  job_file = os.path.join(workdir, f'{method}.json')
  with open(job_file, 'w') as f:
    json.dump({'config': config, 'output': output, 'block_entries': _BLOCK.value}, f)
  out = subprocess.run([sys.executable, os.path.abspath(__file__), f'--child={job_file}'],
                       capture_output=True, text=True, check=False)
  if out.returncode:
    raise RuntimeError(f'{method} failed:\n{out.stderr[-4000:]}')
  shutil.rmtree(output, ignore_errors=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  if _CHILD.value:
    run_child(_CHILD.value)
    return
  shapes = llama_shapes(_PARAMS.value)
  params = sum(int(np.prod(s)) for s in shapes.values())
  largest = max(int(np.prod(s)) for s in shapes.values()) * 4
  model_bytes = params * 4
  workdir = _WORKDIR.value or tempfile.mkdtemp(prefix='cljax-merge-bench-')
  os.makedirs(workdir, exist_ok=True)
  need = (_MODELS.value + 2) * model_bytes * 1.02
  free = shutil.disk_usage(workdir).free
  print(f'model: {params / 1e6:.0f}M float32 parameters ({model_bytes / 1e9:.2f} GB), '
        f'{len(shapes)} tensors, largest {largest / 1e6:.0f} MB; base + {_MODELS.value} '
        f'finetuned, {_SHARDS.value} shards each; scratch {workdir}: needs {need / 1e9:.1f} GB, '
        f'{free / 1e9:.1f} GB free')
  if free < need:
    sys.exit(f'not enough disk space in {workdir}; pass --workdir on a larger disk')
  try:
    start = time.time()
    paths = []
    for i in range(_MODELS.value + 1):
      paths.append(os.path.join(workdir, 'base' if i == 0 else f'ft{i}'))
      generate(paths[-1], shapes, i, _SHARDS.value)
    print(f'generated {len(paths)} models in {time.time() - start:.0f} s')
    tiny = llama_shapes(0)
    tiny = {k: (8,) * len(v) for k, v in tiny.items() if '.1.' not in k and '.2.' not in k}
    tiny_paths = []
    for i in range(_MODELS.value + 1):
      tiny_paths.append(os.path.join(workdir, f'tiny{i}'))
      generate(tiny_paths[-1], tiny, i, 2)
    bandwidth = copy_bandwidth()
    print(f'copy bandwidth (np.copyto, 512 MB): {bandwidth / 1e6:.0f} MB/s; block '
          f'{_BLOCK.value} entries')
    bound_factor = _MODELS.value + 2   # finetuned models + 2 (the stricter reading)
    print(f'{"method":<26} {"time s":>8} {"MB/s":>8} {"/copy":>7} {"peak RSS MB":>12} '
          f'{"overhead MB":>12} {"(peak-ovh)/largest":>19} {"bound":>6}')
    for method in _METHODS.value:
      base_run = merge_in_child(workdir, method, tiny_paths, os.path.join(workdir, 'tiny-out'))
      r = merge_in_child(workdir, method, paths, os.path.join(workdir, 'out'))
      rate = r['input_bytes'] / r['seconds']
      ratio = (r['peak_rss'] - base_run['peak_rss']) / largest
      print(f'{method:<26} {r["seconds"]:>8.1f} {rate / 1e6:>8.0f} {rate / bandwidth:>7.3f} '
            f'{r["peak_rss"] / 1e6:>12.0f} {base_run["peak_rss"] / 1e6:>12.0f} {ratio:>19.2f} '
            f'{bound_factor:>6}')
      print(f'  {r["recipe"]}')
  finally:
    if not _KEEP.value:
      shutil.rmtree(workdir, ignore_errors=True)


if __name__ == '__main__':
  app.run(main)
