"""Tests for cljax.data.text: tokenizers, packing, corpus readers and the text_domains stream."""

from __future__ import annotations

import gzip
import math
import os

import jax
import ml_collections
import numpy as np
import optax
import pytest

from cljax import continual
from cljax import methods
from cljax import models
from cljax.data import streams
from cljax.data import text


def _write(path, content: str, *, gz: bool = False) -> str:
  data = content.encode('utf-8')
  with open(path, 'wb') as f:
    f.write(gzip.compress(data) if gz else data)
  return str(path)


def _token_stream(batch) -> np.ndarray:
  """The packed token sequence of a split: the first input, then every real label."""
  return np.concatenate([batch.x[:1, 0], batch.y[batch.weights > 0]])


def _documents(batch, tokenizer) -> list[str]:
  """The documents of a split read back from its rows (split at eos; the last may be cut)."""
  tokens = _token_stream(batch)
  cuts = np.flatnonzero(tokens == tokenizer.eos_id)
  pieces = np.split(tokens, cuts + 1)
  return [tokenizer.decode(p[p != tokenizer.eos_id]) for p in pieces if p.size]


# ----------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trips_unicode_and_drops_specials():
  tok = text.ByteTokenizer()
  s = 'héllo ✓\n\tdef f(x):\n  return x  # 数\n'
  ids = tok.encode(s)
  assert ids.dtype == np.int32
  assert ids.tolist() == list(s.encode('utf-8'))  # UTF-8 bytes, by hand
  assert tok.decode(ids) == s
  assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, 256, 257, 258)
  assert tok.decode([257, 104, 105, 258, 256]) == 'hi'
  assert tok.encode('').shape == (0,)


def test_make_tokenizer_errors_name_the_key_and_file(tmp_path):
  with pytest.raises(ValueError, match=r'stream_kwargs.tokenizer`'):
    text.make_tokenizer('wordpiece')
  with pytest.raises(ValueError, match=r'stream_kwargs.tokenizer_model'):
    text.make_tokenizer('sentencepiece')
  missing = str(tmp_path / 'absent.model')
  with pytest.raises(FileNotFoundError, match=r'absent\.model'):
    text.make_tokenizer('sentencepiece', model_path=missing)
  with pytest.raises(ValueError, match=r'reads no model file'):
    text.make_tokenizer('byte', model_path=missing)


def test_check_vocab_refuses_a_model_smaller_than_the_vocabulary():
  tok = text.ByteTokenizer()
  text.check_vocab(tok, 259)
  text.check_vocab(tok, 300)  # padded vocabularies are fine
  with pytest.raises(ValueError, match=r"tokenizer byte has 259 ids .* 258 outputs \(model.vocab"):
    text.check_vocab(tok, 258, key='model.vocab_size')


# ----------------------------------------------------------------------------- packing


def test_pack_matches_a_hand_example():
  docs = [np.array([1, 2, 3]), np.array([4, 5])]
  # Concatenation with eos 9 after each document: [1 2 3 9 4 5 9], 6 labels.
  b = text.pack(docs, seq_len=4, eos_id=9, pad_id=0)
  np.testing.assert_array_equal(b.x, [[1, 2, 3, 9], [4, 5, 9, 0]])
  np.testing.assert_array_equal(b.y, [[2, 3, 9, 4], [5, 9, 0, 0]])
  np.testing.assert_array_equal(b.weights, [[1, 1, 1, 1], [1, 1, 0, 0]])
  assert b.x.dtype == b.y.dtype == np.int32 and b.weights.dtype == np.float32
  assert b.mask is None
  # L = 3 divides the 6 labels: no padding.
  b = text.pack(docs, seq_len=3, eos_id=9, pad_id=0)
  np.testing.assert_array_equal(b.x, [[1, 2, 3], [9, 4, 5]])
  np.testing.assert_array_equal(b.y, [[2, 3, 9], [4, 5, 9]])
  np.testing.assert_array_equal(b.weights, np.ones((2, 3)))
  # A budget of 5 tokens: [1 2 3 9 4], 4 labels.
  b = text.pack(docs, seq_len=3, eos_id=9, pad_id=7, max_tokens=5)
  np.testing.assert_array_equal(b.x, [[1, 2, 3], [9, 4, 7]])
  np.testing.assert_array_equal(b.y, [[2, 3, 9], [4, 7, 7]])
  np.testing.assert_array_equal(b.weights, [[1, 1, 1], [1, 0, 0]])


def test_pack_tokenizes_only_until_the_budget():
  def docs():
    yield np.array([1, 2, 3])
    yield np.array([4, 5])
    raise AssertionError('read a document past the budget')
  b = text.pack(docs(), seq_len=2, eos_id=9, pad_id=0, max_tokens=6)
  assert _token_stream(b).tolist() == [1, 2, 3, 9, 4, 5]


def test_pack_errors():
  with pytest.raises(ValueError, match=r'stream_kwargs.seq_len'):
    text.pack([np.array([1, 2])], seq_len=0, eos_id=9, pad_id=0)
  with pytest.raises(ValueError, match=r'stream_kwargs.max_tokens'):
    text.pack([np.array([1, 2])], seq_len=2, eos_id=9, pad_id=0, max_tokens=1)
  with pytest.raises(ValueError, match=r'no \(input, label\) pair'):
    text.pack([], seq_len=2, eos_id=9, pad_id=0)


# ----------------------------------------------------------------------------- readers


def test_read_paragraphs_and_fortunes(tmp_path):
  a = _write(tmp_path / 'a.txt', 'one\ntwo\n\n  \nthree\n\n\nfour\n')
  b = _write(tmp_path / 'b.txt.gz', 'five', gz=True)
  assert text.read_paragraphs([a, b]) == ['one\ntwo', 'three', 'four', 'five']
  f = _write(tmp_path / 'fortunes', 'A fool.\n%\nTwo\nlines.\n%\n%\nLast\n')
  assert text.read_fortunes([f]) == ['A fool.', 'Two\nlines.', 'Last']


def test_read_dictd_uses_the_index(tmp_path):
  body = '00-database-info\nabout\napple\nA fruit.\n\nbanana\nYellow.\n'
  dz = _write(tmp_path / 'tiny.dict.dz', body, gz=True)
  # Byte ranges by hand: info [0, 23), apple [23, 39), banana [39, 54); base-64 digits
  # A=0 ... Z=25 a=26 ...: 23 = 'X', 16 = 'Q', 39 = 'n', 15 = 'P'; 'BA' = 64.
  _write(tmp_path / 'tiny.index',
         '00-database-info\tA\tX\napple\tX\tQ\npomme\tX\tQ\nbanana\tn\tP\n')
  assert text.read_dictd([dz]) == ['apple\nA fruit.', 'banana\nYellow.']
  assert text._dictd_number('BA', 'x') == 64
  os.remove(tmp_path / 'tiny.index')
  with pytest.raises(FileNotFoundError, match=r'tiny\.index'):
    text.read_dictd([dz])


def test_read_wordnet_synset_lines(tmp_path):
  data = ('  1 This software and database is being provided\n'
          '00001740 03 n 02 entity 0 physical_thing 0 001 ~ 00001930 n 0000 | that which is '
          'perceived\n'
          '00002098 00 s 01 able(a) 0 000 | having the necessary means\n')
  path = _write(tmp_path / 'data.noun', data)
  assert text.read_wordnet([path]) == ['entity, physical thing: that which is perceived',
                                       'able: having the necessary means']
  bad = _write(tmp_path / 'data.verb', '00001740 03 n zz entity | x\n')
  with pytest.raises(ValueError, match=r'data\.verb:1'):
    text.read_wordnet([bad])


def test_read_bible_splits_the_programs_output_into_chapters(tmp_path, monkeypatch):
  # A stand-in for Debian's `bible` program, printing what it prints for two chapters.
  fake = tmp_path / 'bible'
  fake.write_text('#!/bin/sh\nprintf "\\nGenesis 1\\n\\n  1 In the beginning.\\n  2 And the '
                  'earth.\\n\\n1 Kings 2\\n\\n  1 Now the days 3 drew nigh.\\n"\n')
  fake.chmod(0o755)
  data = _write(tmp_path / 'bible.data', 'compressed')
  monkeypatch.setattr(text, 'BIBLE_PROGRAM', str(fake))
  assert text.read_bible([data]) == ['Genesis 1\n\n  1 In the beginning.\n  2 And the earth.',
                                     '1 Kings 2\n\n  1 Now the days 3 drew nigh.']
  monkeypatch.setattr(text, 'BIBLE_PROGRAM', str(tmp_path / 'absent'))
  with pytest.raises(FileNotFoundError, match=r'apt-get install -y bible-kjv'):
    text.read_bible([data])
  fake.write_text('#!/bin/sh\necho "Cannot open data file" >&2; exit 1\n')
  monkeypatch.setattr(text, 'BIBLE_PROGRAM', str(fake))
  with pytest.raises(ValueError, match=r'bible\.data: .*printed no text.*Cannot open data file'):
    text.read_bible([data])


def test_empty_and_missing_corpus_files_are_named(tmp_path):
  empty = _write(tmp_path / 'empty.txt', ' \n\n')
  good = _write(tmp_path / 'good.txt', 'a\n\nb\n')
  with pytest.raises(ValueError, match=r'corpus file .*empty\.txt is empty'):
    text.text_domains(files={'e': [empty], 'g': [good]})
  with pytest.raises(FileNotFoundError, match=r"domain 'm': corpus file .*nowhere\.txt"):
    text.text_domains(files={'m': [str(tmp_path / 'nowhere.txt')]})
  one = _write(tmp_path / 'one.txt', 'just one document\n')
  with pytest.raises(ValueError, match=r"domain 'o': 1 document.*one\.txt"):
    text.text_domains(files={'o': one})
  pattern = text.Domain((str(tmp_path / 'no' / '*.txt'),), 'paragraphs', 'some-package')
  with pytest.raises(FileNotFoundError, match=r'apt-get install -y some-package'):
    text.text_domains(files={'p': pattern})


# ----------------------------------------------------------------------------- the stream


@pytest.fixture
def two_domains(tmp_path):
  """Two plain-text domains of 8 short documents each, every document distinct."""
  files = {}
  for name, word in (('animals', 'cat dog'), ('numbers', '1 2 3')):
    docs = [f'{name} {i}: {word} {i * "x"}.' for i in range(8)]
    files[name] = [_write(tmp_path / f'{name}.txt', '\n\n'.join(docs) + '\n')]
  return files


def test_text_domains_splits_by_document_deterministically(two_domains):
  tok = text.ByteTokenizer()
  stream = text.text_domains(files=two_domains, seed=3, seq_len=8, test_fraction=0.25)
  assert [t.name for t in stream.tasks] == ['text-0:animals', 'text-1:numbers']
  assert (stream.num_outputs, stream.input_shape, stream.scenario) == (259, (8,), 'domain')
  for task, name in zip(stream.tasks, ('animals', 'numbers')):
    all_docs = text.read_paragraphs(two_domains[name])
    train, test = _documents(task.train, tok), _documents(task.test, tok)
    assert len(test) == 2 and len(train) == 6  # round(0.25 * 8) for test
    assert sorted(train + test) == sorted(all_docs) and not set(train) & set(test)
    for batch in (task.train, task.test):
      assert batch.x.shape == batch.y.shape == batch.weights.shape
      assert batch.x.shape[1] == 8 and batch.x.dtype == np.int32
      # Every document plus its eos, less the first token, are labels.
      assert batch.weights.sum() == sum(len(d.encode()) + 1 for d in
                                        (train if batch is task.train else test)) - 1
  again = text.text_domains(files=two_domains, seed=3, seq_len=8, test_fraction=0.25)
  other = text.text_domains(files=two_domains, seed=4, seq_len=8, test_fraction=0.25)
  np.testing.assert_array_equal(again.tasks[1].train.x, stream.tasks[1].train.x)
  assert any(_documents(o.test, tok) != _documents(s.test, tok)
             for o, s in zip(other.tasks, stream.tasks))
  # A domain's split does not depend on the domains around it.
  alone = text.text_domains(files=two_domains, domains=['numbers'], seed=3, seq_len=8,
                            test_fraction=0.25)
  np.testing.assert_array_equal(alone.tasks[0].test.y, stream.tasks[1].test.y)


def test_text_domains_token_budgets(two_domains):
  stream = text.text_domains(files=two_domains, seq_len=5, max_tokens=23, max_test_tokens=7)
  for task in stream.tasks:
    assert task.train.weights.sum() == 22 and task.train.x.shape == (5, 5)
    assert task.test.weights.sum() == 6 and task.test.x.shape == (2, 5)


def test_text_domains_argument_errors(two_domains):
  with pytest.raises(ValueError, match=r"stream_kwargs.domains.*unknown: \['plants'\]"):
    text.text_domains(files=two_domains, domains=['animals', 'plants'])
  with pytest.raises(ValueError, match=r'each must appear once'):
    text.text_domains(files=two_domains, domains=['animals', 'animals'])
  with pytest.raises(ValueError, match=r'num_tasks=3 exceeds the 2 domains'):
    text.text_domains(files=two_domains, num_tasks=3)
  with pytest.raises(ValueError, match=r'stream_kwargs.test_fraction'):
    text.text_domains(files=two_domains, test_fraction=1.0)
  with pytest.raises(ValueError, match=r'stream_kwargs.max_test_tokens'):
    text.text_domains(files=two_domains, max_test_tokens=1)
  with pytest.raises(ValueError, match=r'tokenizer byte has 259 ids .*stream_kwargs.num_outputs'):
    text.text_domains(files=two_domains, num_outputs=256)


def test_make_stream_names_the_text_stream(two_domains):
  assert 'text_domains' in streams.KINDS
  stream = streams.make_stream('text_domains', None, num_tasks=1, seed=0, files=two_domains,
                               seq_len=8)
  assert [t.name for t in stream.tasks] == ['text-0:animals']
  # As the runner calls it: the keyword arguments from a config's `stream_kwargs` block.
  config = ml_collections.ConfigDict({'stream_kwargs': {'files': two_domains, 'seq_len': 8,
                                                        'domains': ('numbers', 'animals')}})
  stream = streams.make_stream('text_domains', None, num_tasks=2, seed=0,
                               **dict(config.stream_kwargs))
  assert [t.name for t in stream.tasks] == ['text-0:numbers', 'text-1:animals']
  with pytest.raises(ValueError, match=r'scenario'):
    streams.make_stream('text_domains', None, num_tasks=1, seed=0, scenario='class',
                        files=two_domains)


def _reference_row(logits_fn, params, tests):
  """Token accuracy and mean NLL per test split in numpy float64 from the model's logits."""
  acc, nll = [], []
  for batch in tests:
    logits = np.asarray(logits_fn(params, batch.x), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    w = batch.weights.astype(np.float64)
    picked = np.take_along_axis(logp, batch.y[..., None], -1)[..., 0]
    acc.append((w * (logits.argmax(-1) == batch.y)).sum() / w.sum())
    nll.append(-(w * picked).sum() / w.sum())
  return np.array(acc), np.array(nll)


def test_tiny_qwen3_trains_on_a_two_domain_stream(two_domains):
  stream = text.text_domains(files=two_domains, seq_len=16, max_tokens=16 * 8 + 1,
                             max_test_tokens=40, test_fraction=0.25)
  module = models.make_model('qwen3', num_outputs=stream.num_outputs, hidden_size=32,
                             intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=1, head_dim=16)
  apply_fn = models.linen_apply_fn(module)
  params = jax.jit(lambda key: models.init_params(module, key, stream.input_shape))(
      jax.random.key(0))
  result = continual.run_stream(apply_fn, params, methods.get('finetune'), optax.adam(1e-2),
                                stream, epochs=3, batch_size=4, seed=0)
  acc, nll = result.accuracy_matrix, result.nll_matrix
  assert acc.shape == nll.shape == (2, 2)
  assert np.all((acc >= 0) & (acc <= 1)) and np.all(np.isfinite(nll))
  # Training on task 0 takes its NLL well below log(259), a uniform guess's (where the
  # near-zero initial logits start).
  assert nll[0, 0] < math.log(259) - 1.0
  # The last row equals an independent float64 computation over the weighted test tokens
  # (3 test rows evaluated in padded batches of 4: padding must not count).
  ref_acc, ref_nll = _reference_row(jax.jit(apply_fn), result.state.params,
                                    [t.test for t in stream.tasks])
  np.testing.assert_allclose(acc[-1], ref_acc, atol=1e-6)
  np.testing.assert_allclose(nll[-1], ref_nll, rtol=1e-4)


# ----------------------------------------------------------------------------- corpora


def test_stdlib_domain_reads_python_sources():
  files = text.domain_files('stdlib', text.DOMAINS['stdlib'])
  assert os.path.realpath(os.__file__) in map(os.path.realpath, files)
  assert not any('/site-packages/' in f or '/test/' in f for f in files)
  tok = text.ByteTokenizer()
  stream = text.text_domains(domains=['stdlib'], seq_len=64, max_tokens=4000,
                             max_test_tokens=1000)
  assert stream.tasks[0].train.weights.sum() == 3999
  first = _documents(stream.tasks[0].train, tok)[0]
  sources = [text._read_text(f) for f in files]
  assert any(s.startswith(first) for s in sources if s)


@pytest.mark.parametrize('name', sorted(n for n, d in text.DOMAINS.items() if d.package))
def test_debian_corpus_domains(name):
  domain = text.DOMAINS[name]
  try:
    text.domain_files(name, domain)
  except FileNotFoundError:
    pytest.skip(f'Debian package {domain.package} is not installed (.ci/run installs it)')
  docs = text.read_domain(name, domain)
  assert len(docs) > 100 and all(d.strip() for d in docs[:100])
  stream = text.text_domains(domains=[name], seq_len=32, max_tokens=513, max_test_tokens=129)
  assert stream.tasks[0].train.x.shape == (16, 32)
  assert stream.tasks[0].test.weights.sum() == 128


# ----------------------------------------------------------------------------- sentencepiece


def _sp_corpus() -> list[str]:
  rng = np.random.default_rng(0)
  words = ('the cat sat on a mat dog ran to its bed and fox jumps over lazy river stone house '
           'tree garden window green blue yellow quick slow morning evening bright dark').split()
  return [' '.join(rng.choice(words, size=12)) + f' {i}.\n  indented line {i}' for i in range(60)]


@pytest.mark.parametrize('model_type', ['unigram', 'bpe'])
def test_sentencepiece_trains_offline_deterministically(tmp_path, model_type):
  docs = _sp_corpus()
  a = text.train_sentencepiece(docs, model_path=tmp_path / 'a.model', vocab_size=310,
                               model_type=model_type)
  b = text.train_sentencepiece(docs, model_path=tmp_path / 'b.model', vocab_size=310,
                               model_type=model_type)
  # The same pieces and scores (the .model files differ only in the recorded model_prefix).
  with open(tmp_path / 'a.vocab', 'rb') as fa, open(tmp_path / 'b.vocab', 'rb') as fb:
    assert fa.read() == fb.read()
  assert (a.vocab_size, a.pad_id, a.bos_id, a.eos_id) == (310, 3, 1, 2)
  for s in ('the cat sat on a mat 7.', 'dog\n\tran  to 12 ✓ Zebra!', docs[3]):
    ids = a.encode(s)
    assert ids.dtype == np.int32 and ids.min() >= 0 and ids.max() < 310
    assert a.decode(ids) == s
  # Learned pieces: the corpus' words take fewer ids than their bytes.
  assert len(a.encode(docs[0])) < 0.8 * len(docs[0].encode())


def test_sentencepiece_stream_and_vocab_mismatch(tmp_path, two_domains):
  tok = text.train_sentencepiece(_sp_corpus(), model_path=tmp_path / 'sp.model', vocab_size=310)
  stream = text.text_domains(files=two_domains, seq_len=8, tokenizer='sentencepiece',
                             tokenizer_model=tok.name)
  assert stream.name == 'text_domains-sentencepiece' and stream.num_outputs == 310
  train = stream.tasks[0].train
  assert train.y.max() < 310 and train.y[train.weights > 0].min() >= 0
  assert set(_documents(train, tok)) <= set(text.read_paragraphs(two_domains['animals']))
  with pytest.raises(ValueError, match=r'tokenizer .*sp\.model has 310 ids but the model has '
                                       r'259 outputs \(stream_kwargs.num_outputs\)'):
    text.text_domains(files=two_domains, tokenizer='sentencepiece', tokenizer_model=tok.name,
                      num_outputs=259)
  garbage = _write(tmp_path / 'garbage.model', 'not a model')
  with pytest.raises(ValueError, match=r'garbage\.model is not a sentencepiece model'):
    text.make_tokenizer('sentencepiece', model_path=garbage)
  with pytest.raises(ValueError, match=r"model_type must be 'unigram' or 'bpe'"):
    text.train_sentencepiece(['x'], model_path=tmp_path / 'c.model', vocab_size=310,
                             model_type='wordpiece')
