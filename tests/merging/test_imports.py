"""The pure merges import no IO library: no Orbax, absl, TFDS, matplotlib, YAML or safetensors,
and nothing of `cljax.merge_io` (read from the sources' import statements)."""

import ast
import glob
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_FORBIDDEN = ('orbax', 'absl', 'tensorflow_datasets', 'matplotlib', 'yaml', 'safetensors',
              'cljax.merge_io', 'cljax.checkpoint')


def _imports(path):
  tree = ast.parse(open(path).read(), path)
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      yield from (a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      yield node.module
      yield from (f'{node.module}.{a.name}' for a in node.names)


@pytest.mark.parametrize('path', sorted(glob.glob(os.path.join(ROOT, 'cljax', 'merging', '*.py'))),
                         ids=os.path.basename)
def test_pure_merges_import_no_io(path):
  bad = [m for m in _imports(path) if any(m == f or m.startswith(f + '.') for f in _FORBIDDEN)]
  assert not bad, f'{os.path.relpath(path, ROOT)} imports {bad}'


def test_only_checkpoint_and_merge_io_import_orbax():
  users = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, 'cljax', '**',
                                                                          '*.py'), recursive=True)
                 if any(m.split('.')[0] == 'orbax' for m in _imports(p)))
  assert all(u == os.path.join('cljax', 'checkpoint.py') or
             u.startswith(os.path.join('cljax', 'merge_io', '')) for u in users), users
