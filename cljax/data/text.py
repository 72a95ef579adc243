"""Text corpora as continual-pretraining streams: documents -> tokens -> packed (N, L) examples.

A *domain* is a corpus split into documents (a dictionary entry, a fortune, a Python module, ...).
`text_domains` makes one task per domain: the documents are split into train and test by a
permutation drawn from the seed, each split is tokenized, concatenated (every document followed
by the tokenizer's ``eos``) and cut into rows of ``L + 1`` tokens that overlap by one:

    row r:  x = tokens[r*L : r*L + L],   y = tokens[r*L + 1 : r*L + L + 1]

so every token but the first is a label exactly once. The last row is padded with ``pad``;
``weights`` are 1 where ``y`` is a real token and 0 on padding, so the losses and
`cljax.training.evaluate` (token accuracy, mean NLL in nats; perplexity = exp(NLL)) count real
tokens only. Attention is not masked at document boundaries (GPT-2-style packing).

Tokenizers: `ByteTokenizer` (UTF-8 bytes 0..255 plus ``pad``, ``bos``, ``eos``: 259 ids, nothing
to train) and `SentencePieceTokenizer` (a model file trained offline with `train_sentencepiece`).

``DOMAINS`` names the corpora that install from Debian (``apt-get install -y <package>``) and
Python's own standard-library source, which is always present.

References:
  Radford et al., "Language Models are Unsupervised Multitask Learners" (GPT-2, 2019): byte-level
  inputs and end-of-text separators between packed documents.
  Kudo & Richardson, "SentencePiece: A simple and language independent subword tokenizer and
  detokenizer for Neural Text Processing", EMNLP 2018 (arXiv 1808.06226).
  Kudo, "Subword Regularization" (unigram LM tokenizer), ACL 2018 (arXiv 1804.10959).
  Gururangan et al., "Don't Stop Pretraining: Adapt Language Models to Domains and Tasks",
  ACL 2020 (domain-adaptive continual pretraining).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import fnmatch
import glob
import gzip
import os
import re
import subprocess
import sysconfig
import zlib
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

from cljax.core import Batch
from cljax.data import streams

PathLike = str | os.PathLike


# --------------------------------------------------------------------------------------------
# Tokenizers.


class ByteTokenizer:
  """UTF-8 bytes as token ids 0..255, plus ``pad`` = 256, ``bos`` = 257, ``eos`` = 258.

  Nothing to train, nothing to download: every string round-trips (`decode` drops the
  special ids).

  Attributes:
    name: ``'byte'`` (used in error messages and stream names).
    vocab_size: 259.
    pad_id, bos_id, eos_id: 256, 257, 258.

  References:
    Radford et al., GPT-2 (2019), Sec. 2.2 (byte-level language modelling).
  """

  name = 'byte'
  vocab_size = 259
  pad_id, bos_id, eos_id = 256, 257, 258

  def encode(self, text: str) -> np.ndarray:
    """The UTF-8 bytes of ``text`` as an (n,) int32 array of ids in [0, 256)."""
    return np.frombuffer(text.encode('utf-8'), np.uint8).astype(np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """The text of ``ids``; ids >= 256 (the specials) are dropped, invalid UTF-8 is replaced."""
    ids = np.asarray(ids, np.int64).ravel()
    return ids[(ids >= 0) & (ids < 256)].astype(np.uint8).tobytes().decode('utf-8', 'replace')


def _import_sentencepiece():
  try:
    import sentencepiece  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('the sentencepiece tokenizer needs the `sentencepiece` package '
                      '(pip install sentencepiece; it is in requirements.txt)') from e
  return sentencepiece


class SentencePieceTokenizer:
  """A trained SentencePiece model (BPE or unigram) read from its ``.model`` file.

  Args:
    model_path: the ``.model`` file written by `train_sentencepiece` (or any SentencePiece
      model).

  Attributes:
    name: the model file's path.
    vocab_size: number of pieces.
    pad_id, bos_id, eos_id: the model's ids; a model without a ``pad`` piece pads with
      ``eos`` (padding carries weight 0, so its id is never a label that counts).

  Raises:
    FileNotFoundError: ``model_path`` does not exist (naming it).
    ValueError: the file is not a SentencePiece model (naming it), or it has no ``eos``.
    ImportError: sentencepiece is not installed.
  """

  def __init__(self, model_path: PathLike):
    spm = _import_sentencepiece()
    path = os.fspath(model_path)
    if not os.path.isfile(path):
      raise FileNotFoundError(f'sentencepiece model file {path} does not exist (config key '
                              f'`stream_kwargs.tokenizer_model`); write one with '
                              f'cljax.data.text.train_sentencepiece')
    try:
      self._sp = spm.SentencePieceProcessor(model_file=path)
    except (RuntimeError, OSError) as e:
      raise ValueError(f'{path} is not a sentencepiece model file: {e}') from None
    self.name = path
    self.vocab_size = int(self._sp.get_piece_size())
    self.eos_id = int(self._sp.eos_id())
    self.bos_id = int(self._sp.bos_id())
    if self.eos_id < 0:
      raise ValueError(f'sentencepiece model {path} has no eos piece (train it with eos_id >= 0)')
    pad = int(self._sp.pad_id())
    self.pad_id = pad if pad >= 0 else self.eos_id

  def encode(self, text: str) -> np.ndarray:
    """The piece ids of ``text``, (n,) int32."""
    return np.asarray(self._sp.encode(text, out_type=int), np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """The text of ``ids`` (control pieces such as pad / bos / eos decode to nothing)."""
    return self._sp.decode([int(i) for i in np.asarray(ids).ravel()])


def train_sentencepiece(documents: Iterable[str], *, model_path: PathLike, vocab_size: int,
                        model_type: str = 'unigram', seed: int = 0,
                        character_coverage: float = 1.0) -> SentencePieceTokenizer:
  """Trains a SentencePiece tokenizer offline on ``documents`` and writes its model file.

  Training is deterministic: one thread, the input in the given order and not sampled, a fixed
  seed. Text is not normalized (``identity`` rule, whitespace kept) and characters the model has
  no piece for fall back to byte pieces, so newlines, tabs and indentation survive `decode`.
  Ids: ``unk`` 0, ``bos`` 1, ``eos`` 2, ``pad`` 3.

  Args:
    documents: the training text; each line of each document is one SentencePiece sentence.
    model_path: the ``.model`` file to write (a ``.vocab`` file is written beside it).
    vocab_size: number of pieces, including the 4 specials and the 256 byte pieces.
    model_type: ``'unigram'`` (Kudo 2018) or ``'bpe'``.
    seed: SentencePiece's random seed.
    character_coverage: fraction of characters covered by character pieces.

  Returns:
    The trained `SentencePieceTokenizer`.

  Raises:
    ValueError: an unknown ``model_type``, a ``model_path`` not ending in ``.model``, no text,
      or a ``vocab_size`` SentencePiece cannot reach on this text (its message, naming the
      key ``vocab_size``).

  References:
    Kudo & Richardson, EMNLP 2018 (arXiv 1808.06226); Kudo, ACL 2018 (arXiv 1804.10959).
  """
  spm = _import_sentencepiece()
  if model_type not in ('unigram', 'bpe'):
    raise ValueError(f"train_sentencepiece: model_type must be 'unigram' or 'bpe', got "
                     f'{model_type!r}')
  path = os.fspath(model_path)
  if not path.endswith('.model'):
    raise ValueError(f'train_sentencepiece: model_path must end in .model, got {path!r}')
  lines = [line for doc in documents for line in doc.split('\n') if line.strip()]
  if not lines:
    raise ValueError('train_sentencepiece: the documents hold no text')
  spm.set_random_generator_seed(int(seed))
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=path[:-len('.model')],
        vocab_size=int(vocab_size), model_type=model_type,
        character_coverage=float(character_coverage), byte_fallback=True,
        normalization_rule_name='identity', remove_extra_whitespaces=False,
        split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=3, num_threads=1,
        input_sentence_size=0, shuffle_input_sentence=False, max_sentence_length=1 << 16,
        minloglevel=2)
  except RuntimeError as e:
    raise ValueError(f'train_sentencepiece: vocab_size={vocab_size}: {e}') from None
  return SentencePieceTokenizer(path)


Tokenizer = ByteTokenizer | SentencePieceTokenizer


def make_tokenizer(name: str = 'byte', *, model_path: Optional[PathLike] = None) -> Tokenizer:
  """A tokenizer by name: ``'byte'`` or ``'sentencepiece'`` (reading ``model_path``).

  Raises:
    ValueError: an unknown name (config key ``stream_kwargs.tokenizer``), a sentencepiece
      tokenizer without ``model_path`` or a byte tokenizer with one.
    FileNotFoundError: ``model_path`` does not exist.
  """
  if name == 'byte':
    if model_path:
      raise ValueError(f'the byte tokenizer reads no model file, got tokenizer_model='
                       f'{os.fspath(model_path)!r} (config key `stream_kwargs.tokenizer_model`)')
    return ByteTokenizer()
  if name == 'sentencepiece':
    if not model_path:
      raise ValueError('the sentencepiece tokenizer needs its model file (config key '
                       '`stream_kwargs.tokenizer_model`)')
    return SentencePieceTokenizer(model_path)
  raise ValueError(f"unknown tokenizer {name!r} (config key `stream_kwargs.tokenizer`); choose "
                   f"'byte' or 'sentencepiece'")


def check_vocab(tokenizer: Tokenizer, num_outputs: int, *, key: str = 'num_outputs') -> None:
  """Checks that a model with ``num_outputs`` logits per position can predict every token id.

  A model may have more outputs than the tokenizer has ids (HF vocabularies are often padded),
  never fewer.

  Args:
    tokenizer: the tokenizer.
    num_outputs: the model's output size (an LM's vocabulary).
    key: the config key or tensor that ``num_outputs`` came from, for the error.

  Raises:
    ValueError: ``num_outputs`` < ``tokenizer.vocab_size``, naming the tokenizer (its model
      file) and ``key``.
  """
  if isinstance(num_outputs, bool) or not isinstance(num_outputs, (int, np.integer)):
    raise ValueError(f'{key} must be an int, got {num_outputs!r}')
  if num_outputs < tokenizer.vocab_size:
    raise ValueError(f'tokenizer {tokenizer.name} has {tokenizer.vocab_size} ids but the model '
                     f'has {num_outputs} outputs ({key}); the model must have at least as many '
                     f'outputs as the tokenizer has ids')


# --------------------------------------------------------------------------------------------
# Packing.


def pack(token_lists: Iterable[np.ndarray], *, seq_len: int, eos_id: int, pad_id: int,
         max_tokens: Optional[int] = None) -> Batch:
  """Concatenates documents (each followed by ``eos_id``) and cuts them into next-token rows.

  With ``t`` the concatenation, cut to its first ``max_tokens`` tokens, row ``r`` is
  ``x = t[r*L : r*L + L]``, ``y = t[r*L + 1 : r*L + L + 1]``; ``ceil((len(t) - 1) / L)`` rows,
  the last padded with ``pad_id`` (weight 0).

  Args:
    token_lists: each document's (n,) int token ids.
    seq_len: L, tokens per row.
    eos_id: appended after every document.
    pad_id: fills the last row.
    max_tokens: keep at most this many tokens of the concatenation (None: all); documents are
      tokenized only until it is reached.

  Returns:
    A `Batch` with x, y (N, L) int32 and weights (N, L) float32 (1 on real labels, 0 on
    padding), mask None.

  Raises:
    ValueError: ``seq_len`` < 1, ``max_tokens`` < 2, or fewer than 2 tokens in all.
  """
  if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
    raise ValueError(f'seq_len must be an int >= 1 (config key `stream_kwargs.seq_len`), got '
                     f'{seq_len!r}')
  if max_tokens is not None and (isinstance(max_tokens, bool) or
                                 not isinstance(max_tokens, (int, np.integer)) or max_tokens < 2):
    raise ValueError(f'max_tokens must be an int >= 2 or None (config key '
                     f'`stream_kwargs.max_tokens`), got {max_tokens!r}')
  parts, total = [], 0
  eos = np.asarray([eos_id], np.int32)
  for ids in token_lists:
    parts += [np.asarray(ids, np.int32).ravel(), eos]
    total += parts[-2].size + 1
    if max_tokens is not None and total >= max_tokens:
      break
  tokens = np.concatenate(parts) if parts else np.zeros((0,), np.int32)
  if max_tokens is not None:
    tokens = tokens[:max_tokens]
  if tokens.size < 2:
    raise ValueError(f'pack: {tokens.size} token(s) make no (input, label) pair')
  rows = -(-(tokens.size - 1) // seq_len)
  padded = np.full(rows * seq_len + 1, pad_id, np.int32)
  padded[:tokens.size] = tokens
  real = np.zeros(rows * seq_len + 1, np.float32)
  real[:tokens.size] = 1.0
  x = padded[:-1].reshape(rows, seq_len)
  y = padded[1:].reshape(rows, seq_len)
  return Batch(x, y, weights=real[1:].reshape(rows, seq_len))


# --------------------------------------------------------------------------------------------
# Corpora: files -> documents.


def _read_text(path: str) -> str:
  """The UTF-8 text of a file, gunzipped when it starts with the gzip magic (``.gz``, dictzip
  ``.dz``); invalid bytes are replaced."""
  with open(path, 'rb') as f:
    raw = f.read()
  if raw[:2] == b'\x1f\x8b':
    raw = gzip.decompress(raw)
  return raw.decode('utf-8', 'replace')


def _checked_text(path: str) -> str:
  """`_read_text`, refusing a file with no text (naming it)."""
  text = _read_text(path)
  if not text.strip():
    raise ValueError(f'corpus file {path} is empty')
  return text


def read_paragraphs(paths: Sequence[str]) -> list[str]:
  """Plain text: documents are separated by blank lines (a file without one is one document).

  Args:
    paths: text files (gzipped or not).

  Returns:
    The documents, file by file, stripped of surrounding blank lines.

  Raises:
    ValueError: a file holds no text (naming it).
  """
  docs = []
  for path in paths:
    docs += [d.strip('\n') for d in re.split(r'\n(?:[ \t]*\n)+', _checked_text(path)) if d.strip()]
  return docs


def read_fortunes(paths: Sequence[str]) -> list[str]:
  """Fortune files (``fortune(6)``'s format): documents are separated by lines holding ``%``."""
  docs = []
  for path in paths:
    docs += [d.strip('\n') for d in re.split(r'(?m)^%[ \t]*$', _checked_text(path)) if d.strip()]
  return docs


_B64 = {c: i for i, c in enumerate(
    'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/')}


def _dictd_number(text: str, path: str) -> int:
  """A dictd index number: base-64 digits, most significant first (dictd(8), ``.index``)."""
  value = 0
  for c in text:
    if c not in _B64:
      raise ValueError(f'{path}: {text!r} is not a dictd base-64 number')
    value = value * 64 + _B64[c]
  return value


def read_dictd(paths: Sequence[str]) -> list[str]:
  """dictd databases: one document per entry of ``<name>.dict[.dz]``, located by its index.

  Each path is the ``.dict`` or ``.dict.dz`` file; ``<name>.index`` beside it lists
  ``headword<TAB>offset<TAB>length`` (base-64 numbers, byte ranges of the uncompressed text).
  Entries listed under several headwords are read once; the database's own ``00-database-*`` /
  ``00database*`` entries are skipped.

  Raises:
    FileNotFoundError: the index beside a dictionary is missing (naming it).
    ValueError: an empty file, or an index line that is not ``word, offset, length``.
  """
  docs = []
  for path in paths:
    index = re.sub(r'\.dict(\.dz)?$', '.index', path)
    if not os.path.isfile(index):
      raise FileNotFoundError(f'dictd index {index} (beside {path}) does not exist')
    with open(path, 'rb') as f:
      raw = f.read()
    if raw[:2] == b'\x1f\x8b':
      raw = gzip.decompress(raw)
    if not raw.strip():
      raise ValueError(f'corpus file {path} is empty')
    seen = set()
    for n, line in enumerate(_checked_text(index).splitlines()):
      fields = line.split('\t')
      if len(fields) < 3:
        raise ValueError(f'{index}:{n + 1}: expected headword, offset, length; got {line!r}')
      if fields[0].startswith(('00-database', '00database')):
        continue
      span = (_dictd_number(fields[1], index), _dictd_number(fields[2], index))
      if span in seen:
        continue
      seen.add(span)
      doc = raw[span[0]:span[0] + span[1]].decode('utf-8', 'replace').strip('\n')
      if doc.strip():
        docs.append(doc)
  return docs


def read_wordnet(paths: Sequence[str]) -> list[str]:
  """WordNet ``data.<pos>`` files: one document per synset, ``'word, word: gloss'``.

  The license header (lines starting with spaces) is skipped; a synset line is
  ``offset lex_filenum ss_type w_cnt (word lex_id){w_cnt} ... | gloss`` (wndb(5WN)), ``w_cnt``
  in hexadecimal; underscores in words are spaces, adjective markers such as ``(a)`` dropped.

  Raises:
    ValueError: an empty file, or a synset line that does not parse (naming file and line).
  """
  docs = []
  for path in paths:
    for n, line in enumerate(_checked_text(path).splitlines()):
      if not line.strip() or line.startswith(' '):
        continue
      head, _, gloss = line.partition(' | ')
      fields = head.split()
      try:
        count = int(fields[3], 16)
        words = [re.sub(r'\([a-z]+\)$', '', w).replace('_', ' ')
                 for w in fields[4:4 + 2 * count:2]]
      except (IndexError, ValueError):
        raise ValueError(f'{path}:{n + 1}: not a WordNet synset line: {line[:80]!r}') from None
      if len(words) != count:
        raise ValueError(f'{path}:{n + 1}: not a WordNet synset line: {line[:80]!r}')
      docs.append(f'{", ".join(words)}: {gloss.strip()}')
  return docs


# Debian bible-kjv's program, which prints the text of bible-kjv-text's compressed data file.
BIBLE_PROGRAM = 'bible'


def read_bible(paths: Sequence[str]) -> list[str]:
  """The King James Bible from ``bible-kjv-text``'s compressed data file: one document per
  chapter (1189), ``'<Book> <chapter>'`` followed by its numbered verses.

  The data file (``EC02`` compressed) is decoded by Debian's ``bible`` program (package
  ``bible-kjv``), run on the whole range ``gen1:1-rev22:21`` with unwrapped lines.

  Raises:
    FileNotFoundError: the ``bible`` program is missing (naming its package).
    ValueError: ``bible`` fails on a data file or prints no text (naming the file).
  """
  docs = []
  for path in paths:
    directory, name = os.path.split(os.path.abspath(path))
    command = [BIBLE_PROGRAM, '-l100000', '-p', directory, '-d', name, 'gen1:1-rev22:21']
    try:
      run = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, check=False)
    except FileNotFoundError:
      raise FileNotFoundError(f'reading {path} needs the `{BIBLE_PROGRAM}` program (install the '
                              f'Debian package: apt-get install -y bible-kjv)') from None
    out = run.stdout.decode('utf-8', 'replace')
    if run.returncode != 0 or not out.strip():
      detail = (run.stderr or run.stdout).decode('utf-8', 'replace').strip()
      raise ValueError(f'corpus file {path}: `{" ".join(command)}` printed no text '
                       f'(exit {run.returncode}: {detail[:200]})')
    chapters = re.split(r'(?m)^(?=\S[^\n]* \d+$)', out)
    docs += [c.strip() for c in chapters if c.strip()]
  return docs


class _Files(collections.abc.Sequence):
  """Documents that are whole files, read when indexed (a directory of sources stays unread
  but for the documents a stream takes)."""

  def __init__(self, paths: Sequence[str]):
    self._paths = list(paths)

  def __len__(self) -> int:
    return len(self._paths)

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(len(self)))]
    return _read_text(self._paths[i])


def read_files(paths: Sequence[str]) -> Sequence[str]:
  """One document per file (source code), read lazily; empty files are left out."""
  return _Files([p for p in paths if os.path.getsize(p) > 0])


# Readers by name: ``read(paths) -> documents``.
READERS: dict[str, Callable[[Sequence[str]], Sequence[str]]] = {
    'paragraphs': read_paragraphs,
    'fortunes': read_fortunes,
    'dictd': read_dictd,
    'wordnet': read_wordnet,
    'bible': read_bible,
    'files': read_files,
}


@dataclasses.dataclass(frozen=True)
class Domain:
  """A corpus: where its files are and how to read them into documents.

  Attributes:
    files: the corpus files: paths, or glob patterns (``dir/**/*.py`` walks ``dir``).
    reader: a key of ``READERS`` (the file format; also how documents are delimited).
    package: the Debian package that installs the files ('' when they are always present).
    exclude: a regex; files (and, under ``**``, directories) whose path it finds are left out.
  """

  files: tuple[str, ...]
  reader: str = 'paragraphs'
  package: str = ''
  exclude: str = ''


STDLIB_DIR = sysconfig.get_paths()['stdlib']

# The corpora that install from Debian (``apt-get install -y <package>``; the Bible's compressed
# data file is decoded by the ``bible`` program of package ``bible-kjv``), and Python's own
# standard library (its regression tests, full of deliberately odd sources, and installed
# third-party packages left out). A document is a Bible chapter, a dictionary entry, a WordNet
# synset, a fortune or a module.
DOMAINS: dict[str, Domain] = {
    'bible': Domain(('/usr/lib/bible.data',), 'bible', 'bible-kjv-text'),
    'gcide': Domain(('/usr/share/dictd/gcide.dict.dz',), 'dictd', 'dict-gcide'),
    'wordnet': Domain(('/usr/share/wordnet/data.*',), 'wordnet', 'wordnet-base'),
    'jargon': Domain(('/usr/share/dictd/jargon.dict.dz',), 'dictd', 'dict-jargon'),
    'foldoc': Domain(('/usr/share/dictd/foldoc.dict.dz',), 'dictd', 'dict-foldoc'),
    'fortunes': Domain(('/usr/share/games/fortunes/*',), 'fortunes', 'fortunes',
                       exclude=r'\.(dat|u8)$'),
    'stdlib': Domain((os.path.join(STDLIB_DIR, '**', '*.py'),), 'files',
                     exclude=r'/(site-packages|dist-packages|test|__pycache__)(/|$)'),
}


def _walk(root: str, name_pattern: str, exclude: Optional[re.Pattern]) -> list[str]:
  """Files under ``root`` whose name matches ``name_pattern``, pruning excluded directories."""
  out = []
  for top, dirs, names in os.walk(root):
    dirs[:] = [d for d in dirs
               if not (exclude and exclude.search(os.path.join(top, d) + '/'))]
    out += [os.path.join(top, n) for n in names if fnmatch.fnmatch(n, name_pattern)]
  return out


def domain_files(name: str, domain: Domain) -> list[str]:
  """The sorted corpus files of a domain.

  Raises:
    FileNotFoundError: a path that does not exist, or a pattern matching no file, naming it,
      the domain and (for Debian corpora) the package to install.
  """
  exclude = re.compile(domain.exclude) if domain.exclude else None
  install = (f' (install the Debian package: apt-get install -y {domain.package})'
             if domain.package else '')
  paths = []
  for pattern in domain.files:
    pattern = os.fspath(pattern)
    if not glob.has_magic(pattern):
      if not os.path.isfile(pattern):
        raise FileNotFoundError(f'domain {name!r}: corpus file {pattern} does not exist{install}')
      found = [pattern]
    elif '/**/' in pattern:
      root, tail = pattern.split('/**/', 1)
      found = _walk(root, tail, exclude) if os.path.isdir(root) else []
    else:
      found = [p for p in glob.glob(pattern) if os.path.isfile(p)]
    found = [p for p in found if not (exclude and exclude.search(p))]
    if not found:
      raise FileNotFoundError(f'domain {name!r}: no corpus file matches {pattern}{install}')
    paths += found
  return sorted(set(paths))


def read_domain(name: str, domain: Domain) -> Sequence[str]:
  """The documents of a domain: `domain_files` read by ``READERS[domain.reader]``.

  Raises:
    FileNotFoundError: a missing corpus file (see `domain_files`).
    ValueError: an unknown reader, an empty corpus file (naming it), or fewer than 2 documents
      (a train/test split by document needs both).
  """
  if domain.reader not in READERS:
    raise ValueError(f'domain {name!r}: unknown reader {domain.reader!r}; choose one of '
                     f'{sorted(READERS)}')
  paths = domain_files(name, domain)
  docs = READERS[domain.reader](paths)
  if len(docs) < 2:
    raise ValueError(f'domain {name!r}: {len(docs)} document(s) in {", ".join(paths)}; a '
                     f'train/test split by document needs at least 2')
  return docs


def _as_domain(name: str, value: Any) -> Domain:
  """A `Domain` from a ``files`` entry: a `Domain`, one path, or a sequence of plain-text paths."""
  if isinstance(value, Domain):
    return value
  if isinstance(value, (str, os.PathLike)):
    value = [value]
  paths = tuple(os.fspath(p) for p in value)
  if not paths:
    raise ValueError(f'stream_kwargs.files[{name!r}] lists no file')
  return Domain(paths, 'paragraphs')


def _split_by_document(name: str, num_docs: int, test_fraction: float,
                       seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(train, test) document indices: a permutation drawn from (seed, the domain's name), its
  first ``round(test_fraction * num_docs)`` (at least 1, at most num_docs - 1) for test."""
  order = np.random.default_rng([int(seed), zlib.crc32(name.encode())]).permutation(num_docs)
  num_test = min(num_docs - 1, max(1, int(round(test_fraction * num_docs))))
  return order[num_test:], order[:num_test]


def _check_int(value: Any, key: str, minimum: int) -> int:
  """``value`` as an int >= ``minimum``; ValueError naming the config ``key`` otherwise."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f'{key.rpartition(".")[2]} must be an int >= {minimum} (config key '
                     f'`{key}`), got {value!r}')
  return int(value)


def text_domains(*,
                 domains: Optional[Sequence[str]] = None,
                 files: Optional[Mapping[str, Any]] = None,
                 num_tasks: Optional[int] = None,
                 seed: int = 0,
                 seq_len: int = 128,
                 max_tokens: int = 1 << 16,
                 max_test_tokens: int = 1 << 13,
                 test_fraction: float = 0.1,
                 tokenizer: str | Tokenizer = 'byte',
                 tokenizer_model: Optional[PathLike] = None,
                 num_outputs: Optional[int] = None) -> streams.Stream:
  """A continual-pretraining stream: one next-token-prediction task per text domain.

  Each domain's documents are split into train and test by document (`_split_by_document`:
  deterministic from ``seed`` and the domain's name, so adding a domain changes no other), taken
  in that random order, tokenized until the split's token budget is reached and packed (`pack`).

  Args:
    domains: the task order, names of ``files`` entries or of ``DOMAINS``; None: every ``files``
      entry when ``files`` is given, else every ``DOMAINS`` corpus.
    files: extra domains, ``{name: paths}`` of plain-text files (documents separated by blank
      lines; gzip read transparently) or ``{name: Domain}``.
    num_tasks: use the first ``num_tasks`` domains (None: all).
    seed: seed of the train/test split and of the document order.
    seq_len: L, tokens per row.
    max_tokens: tokens per task's training split (the rows hold ``max_tokens - 1`` labels when
      the domain has that many tokens).
    max_test_tokens: the same for the test split.
    test_fraction: fraction of each domain's documents held out for test, in (0, 1).
    tokenizer: ``'byte'``, ``'sentencepiece'`` (reading ``tokenizer_model``) or a tokenizer.
    tokenizer_model: the sentencepiece ``.model`` file.
    num_outputs: the model's output size; None: the tokenizer's vocabulary size.

  Returns:
    A `cljax.data.streams.Stream` named ``'text_domains-<tokenizer>'`` with tasks
    ``'text-<t>:<domain>'``, scenario ``'domain'``, ``input_shape = (seq_len,)``; every task's
    train and test are `Batch` es with x, y (N, L) int32, weights (N, L) float32, mask None.

  Raises:
    ValueError: an unknown or repeated domain (config key ``stream_kwargs.domains``), a bad
      ``num_tasks`` / ``seq_len`` / budget / ``test_fraction``, an empty corpus file or a domain
      of one document (naming the file), ``num_outputs`` below the tokenizer's vocabulary
      (naming the tokenizer's model file and the key).
    FileNotFoundError: a missing corpus or tokenizer file (naming it; for a Debian corpus, the
      package to install).

  References:
    Gururangan et al., ACL 2020 (domain-adaptive continual pretraining); Radford et al., GPT-2
    (2019) (packing with end-of-text separators).
  """
  table = dict(DOMAINS)
  for name, value in (files.items() if files is not None else ()):
    table[name] = _as_domain(name, value)
  names = list(domains) if domains is not None else list(files or DOMAINS)
  unknown = [n for n in names if n not in table]
  if unknown or len(set(names)) != len(names) or not names:
    raise ValueError(f'stream_kwargs.domains={names!r}: each must appear once and name a '
                     f'`stream_kwargs.files` entry or one of {sorted(DOMAINS)}'
                     + (f'; unknown: {unknown}' if unknown else ''))
  num_tasks = len(names) if num_tasks is None else _check_int(num_tasks, 'num_tasks', 1)
  if num_tasks > len(names):
    raise ValueError(f'text_domains: num_tasks={num_tasks} exceeds the {len(names)} domains '
                     f'{names} (config keys `num_tasks`, `stream_kwargs.domains`)')
  names = names[:num_tasks]
  seq_len = _check_int(seq_len, 'stream_kwargs.seq_len', 1)
  max_tokens = _check_int(max_tokens, 'stream_kwargs.max_tokens', 2)
  max_test_tokens = _check_int(max_test_tokens, 'stream_kwargs.max_test_tokens', 2)
  if not 0.0 < float(test_fraction) < 1.0:
    raise ValueError(f'test_fraction must be in (0, 1) (config key '
                     f'`stream_kwargs.test_fraction`), got {test_fraction!r}')
  if isinstance(tokenizer, str):
    tokenizer = make_tokenizer(tokenizer, model_path=tokenizer_model)
  num_outputs = tokenizer.vocab_size if num_outputs is None else num_outputs
  check_vocab(tokenizer, num_outputs, key='stream_kwargs.num_outputs')
  tasks = []
  for t, name in enumerate(names):
    docs = read_domain(name, table[name])
    splits = []
    for indices, budget in zip(_split_by_document(name, len(docs), float(test_fraction), seed),
                               (max_tokens, max_test_tokens)):
      splits.append(pack((tokenizer.encode(docs[i]) for i in indices), seq_len=seq_len,
                         eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, max_tokens=budget))
    tasks.append(streams.Task(f'text-{t}:{name}', *splits))
  label = 'byte' if isinstance(tokenizer, ByteTokenizer) else 'sentencepiece'
  return streams.Stream(f'text_domains-{label}', tuple(tasks), int(num_outputs), (seq_len,),
                        'domain')


def make_text_domains(dataset: Any, *, num_tasks: int, seed: int, scenario: str,
                      **kwargs: Any) -> streams.Stream:
  """`text_domains` as a `cljax.data.streams.REGISTRY` entry (config ``stream='text_domains'``,
  its keyword arguments in ``stream_kwargs``).

  Args:
    dataset: unused: a text stream reads its corpora, not the config's image ``dataset``.
    num_tasks: the first ``num_tasks`` domains.
    seed: as in `text_domains`.
    scenario: ``'domain'`` (one shared vocabulary head), checked by `make_stream`.
    **kwargs: the other keyword arguments of `text_domains`.

  Returns:
    The `Stream`.
  """
  del dataset, scenario
  return text_domains(num_tasks=num_tasks, seed=seed, **kwargs)
