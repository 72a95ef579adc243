"""README.md's library snippet runs as written and prints R and ACC/BWT."""

import os
import re
import subprocess
import sys

from conftest import ROOT


def test_library_snippet_runs(tmp_path):
  with open(os.path.join(ROOT, 'README.md')) as f:
    readme = f.read()
  section = readme[readme.index('## Library'):]
  code = re.search(r'```python\n(.*?)```', section, re.S).group(1)
  proc = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  assert lines[0].startswith('[[') and len(lines) == 6  # The 5 x 5 accuracy matrix, then metrics.
  assert re.search(r'acc=0\.\d+.*bwt=-?0\.\d+', lines[-1]), lines[-1]
