"""cljax.workdir: exclusive claims, config checks on reuse and resume, no trace of failed runs."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from cljax import workdir as workdir_lib
from conftest import ROOT

CONFIG = {'learning_rate': 0.05, 'num_tasks': 5, 'ewc': {'strength': 100.0}, 'methods': ['ewc']}


def test_diff_keys_names_nested_missing_and_changed_keys():
  other = {'learning_rate': 0.01, 'num_tasks': 5, 'ewc': {'strength': 1.0, 'extra': 2},
           'methods': ['ewc'], 'seed': 0}
  assert workdir_lib.diff_keys(CONFIG, other) == ['ewc.extra', 'ewc.strength', 'learning_rate',
                                                  'seed']
  assert workdir_lib.diff_keys(CONFIG, json.loads(json.dumps(CONFIG))) == []
  assert workdir_lib.diff_keys({'a': None}, {}) == ['a']   # None is a value, not a missing key


def test_claim_creates_and_reuse_with_the_same_config(tmp_path):
  wd = str(tmp_path / 'runs' / 'x')
  with workdir_lib.claim(wd, CONFIG) as c:
    assert c.created and not c.config_recorded
    assert not os.path.exists(os.path.join(wd, 'config.json'))   # only with the first stage
    c.record_config()
  with open(os.path.join(wd, 'config.json')) as f:
    assert json.load(f) == CONFIG
  with workdir_lib.claim(wd, CONFIG) as c:
    assert not c.created and c.config_recorded


def test_claim_refuses_another_config_naming_the_keys(tmp_path):
  wd = str(tmp_path / 'w')
  with workdir_lib.claim(wd, CONFIG) as c:
    c.record_config()
  with pytest.raises(workdir_lib.WorkdirError, match=r'different config \(keys differing: '
                                                     r'learning_rate\)'):
    workdir_lib.claim(wd, dict(CONFIG, learning_rate=0.01))
  with open(os.path.join(wd, 'config.json')) as f:
    assert json.load(f)['learning_rate'] == 0.05   # nothing overwritten
  with workdir_lib.claim(wd, CONFIG):   # the refused claim released the lock
    pass


def test_workdir_that_is_a_file_names_the_flag(tmp_path):
  path = tmp_path / 'file'
  path.write_text('x')
  with pytest.raises(workdir_lib.WorkdirError, match=r"--workdir '.*file' is a file"):
    workdir_lib.claim(str(path), CONFIG)
  with pytest.raises(workdir_lib.WorkdirError, match=r'--workdir .* cannot be created'):
    workdir_lib.claim(str(path / 'below'), CONFIG)
  assert path.read_text() == 'x'


def test_second_claim_is_refused_with_the_pid_until_released(tmp_path):
  wd = str(tmp_path / 'w')
  first = workdir_lib.claim(wd, CONFIG)
  with pytest.raises(workdir_lib.WorkdirError, match=rf'in use by process {os.getpid()}\b'):
    workdir_lib.claim(wd, CONFIG)
  first.release()
  with workdir_lib.claim(wd, CONFIG):
    pass


_HOLD = textwrap.dedent("""\
    import sys, time
    sys.path.insert(0, {root!r})
    from cljax import workdir
    c = workdir.claim({wd!r}, {{'a': 1}})
    print('claimed', flush=True)
    time.sleep(60)
    """)


def test_lock_of_another_process_refuses_and_a_killed_one_frees_it(tmp_path):
  wd = str(tmp_path / 'w')
  proc = subprocess.Popen([sys.executable, '-c', _HOLD.format(root=ROOT, wd=wd)],
                          stdout=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline().strip() == 'claimed'
    with pytest.raises(workdir_lib.WorkdirError, match=rf'in use by process {proc.pid}\b'):
      workdir_lib.claim(wd, {'a': 1})
  finally:
    proc.kill()   # kill -9: no cleanup code runs, the lock file stays
    proc.wait()
  assert os.path.exists(os.path.join(wd, workdir_lib.LOCK_FILE))
  with workdir_lib.claim(wd, {'a': 1}):   # the kernel dropped the dead process's lock
    with open(os.path.join(wd, workdir_lib.LOCK_FILE)) as f:
      assert f.read().strip() == str(os.getpid())


def test_failure_before_the_first_stage_leaves_a_reusable_workdir(tmp_path):
  wd = tmp_path / 'w'
  with pytest.raises(ValueError, match='batch size'):
    with workdir_lib.claim(str(wd), CONFIG):
      os.makedirs(wd / 'ewc' / 'checkpoints')   # what a runner creates before task 0 fails
      raise ValueError('batch size 100000 exceeds task 0')
  assert not wd.exists()
  fixed = dict(CONFIG, learning_rate=0.01)   # the corrected re-run is not "a different config"
  with workdir_lib.claim(str(wd), fixed) as c:
    c.record_config()


def test_failure_keeps_a_workdir_it_did_not_create_or_that_holds_files(tmp_path):
  wd = tmp_path / 'w'
  wd.mkdir()
  with pytest.raises(RuntimeError):
    with workdir_lib.claim(str(wd), CONFIG):
      raise RuntimeError('x')
  assert wd.is_dir()
  with pytest.raises(RuntimeError):
    with workdir_lib.claim(str(tmp_path / 'v'), CONFIG):
      (tmp_path / 'v' / 'notes.txt').write_text('keep')
      raise RuntimeError('x')
  assert (tmp_path / 'v' / 'notes.txt').read_text() == 'keep'
  with pytest.raises(RuntimeError):
    with workdir_lib.claim(str(tmp_path / 'u'), CONFIG) as c:
      c.record_config()   # a stage was saved: the run is resumable, nothing is removed
      raise RuntimeError('x')
  assert (tmp_path / 'u' / 'config.json').exists()


def test_check_resume_names_stage_method_and_keys():
  workdir_lib.check_resume(CONFIG, dict(CONFIG), workdir='runs/x', method='ewc', stage=2)
  with pytest.raises(workdir_lib.WorkdirError,
                     match=r"workdir 'runs/x': stage 2 of method ewc was written with a different "
                           r'config \(keys differing: learning_rate\)'):
    workdir_lib.check_resume(CONFIG, dict(CONFIG, learning_rate=0.01), workdir='runs/x',
                             method='ewc', stage=2)
  with pytest.raises(workdir_lib.WorkdirError, match='holds no config'):
    workdir_lib.check_resume(None, CONFIG, workdir='runs/x', method='ewc', stage=1)


def test_runner_contract_refuses_a_resume_after_config_json_was_deleted(tmp_path):
  """F1 as the runner meets it: config.json gone, the stage's meta still has the old config."""
  import jax.numpy as jnp
  from cljax import checkpoint
  wd = str(tmp_path / 'w')
  state = {'params': {'w': jnp.ones((2, 2))}}
  with workdir_lib.claim(wd, CONFIG) as c:
    with checkpoint.StageCheckpointer(os.path.join(wd, 'ewc', 'checkpoints'), name='ewc') as ckpt:
      ckpt.save(1, state, {'config': CONFIG})
    c.record_config()
  os.remove(os.path.join(wd, 'config.json'))
  changed = dict(CONFIG, learning_rate=0.01)
  with workdir_lib.claim(wd, changed):   # nothing to compare at the workdir level any more
    with checkpoint.StageCheckpointer(os.path.join(wd, 'ewc', 'checkpoints'), name='ewc') as ckpt:
      step = ckpt.latest_step()
      stage = ckpt.restore(step, state)
      with pytest.raises(workdir_lib.WorkdirError, match=r'stage 1 of method ewc was written '
                                                         r'with a different config \(keys '
                                                         r'differing: learning_rate\)'):
        workdir_lib.check_resume(stage.meta.get('config'), changed, workdir=wd, method='ewc',
                                 stage=step)
