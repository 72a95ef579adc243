"""Image classification data as host numpy arrays: sklearn digits, IDX files, TFDS by name.

Every source returns a `Dataset` of float32 images in [0, 1], NHWC, with int32 labels, so the
streams in `cljax.data.streams` never care where the data came from:

  * `digits`: the 1,797 real 8x8 digits that ship with scikit-learn; needs nothing else, which
    makes it the embedded default.
  * `fashion_mnist`: the four IDX files of Fashion-MNIST, as installed by the Debian package
    ``dataset-fashion-mnist`` (or any directory holding them, gzipped or not).
  * `tfds_dataset`: any TFDS image classification dataset by name, read through
    ``tfds.data_source`` (random access over ``array_record`` files), which needs no
    TensorFlow once the dataset is prepared.

References:
  Xiao, Rasul & Vollgraf, "Fashion-MNIST: a novel image dataset for benchmarking machine
  learning algorithms", arXiv 1708.07747 (2017).
  LeCun et al., "Gradient-based learning applied to document recognition", Proc. IEEE 1998
  (the IDX file format, described at http://yann.lecun.com/exdb/mnist/).
"""

from __future__ import annotations

import gzip
import os
from typing import Any, Callable, NamedTuple, Optional

import numpy as np


class Dataset(NamedTuple):
  """An image classification dataset held in host memory.

  Attributes:
    name: what `load` calls it, e.g. ``'digits'``, ``'fashion_mnist'``, ``'tfds:mnist'``.
    x_train: (N, H, W, C) float32 in [0, 1].
    y_train: (N,) int32 in [0, num_classes).
    x_test: (M, H, W, C) float32 in [0, 1].
    y_test: (M,) int32 in [0, num_classes).
    num_classes: number of classes.
  """

  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int


FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'

_FASHION_MNIST_FILES = {
    'x_train': 'train-images-idx3-ubyte',
    'y_train': 'train-labels-idx1-ubyte',
    'x_test': 't10k-images-idx3-ubyte',
    'y_test': 't10k-labels-idx1-ubyte',
}

# IDX type codes (third byte of the magic number) -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype('>u1'),
    0x09: np.dtype('>i1'),
    0x0B: np.dtype('>i2'),
    0x0C: np.dtype('>i4'),
    0x0D: np.dtype('>f4'),
    0x0E: np.dtype('>f8'),
}

_GZIP_MAGIC = b'\x1f\x8b'


def digits(*, test_fraction: float = 0.3, seed: int = 0) -> Dataset:
  """The scikit-learn digits (1,797 real 8x8 handwritten digits), split into train and test.

  Args:
    test_fraction: fraction of the examples held out for testing, in (0, 1).
    seed: seed of the split; the split is stratified by class and deterministic.

  Returns:
    A `Dataset` named ``'digits'`` with 8x8x1 images (pixel values 0..16 divided by 16) and 10
    classes.

  Raises:
    ValueError: if ``test_fraction`` is not in (0, 1).

  References:
    Alpaydin & Kaynak, "Optical Recognition of Handwritten Digits", UCI ML repository (1998).
  """
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f'digits: test_fraction must be in (0, 1), got {test_fraction!r}')
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
  from sklearn import model_selection  # pylint: disable=g-import-not-at-top

  raw = sk_datasets.load_digits()
  x = (raw.images.astype(np.float32) / np.float32(16.0))[..., None]
  y = raw.target.astype(np.int32)
  x_train, x_test, y_train, y_test = model_selection.train_test_split(
      x, y, test_size=test_fraction, random_state=seed, stratify=y)
  return Dataset('digits', x_train, y_train, x_test, y_test, 10)


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
  """Reads an IDX file (the MNIST / Fashion-MNIST format), gzipped or raw.

  The format: two zero bytes, a type code byte, the number of dimensions ``d``, then ``d``
  big-endian uint32 sizes, then the data in row-major order, big-endian. Gzip is detected from
  the file's first bytes, not its name.

  Args:
    path: the file.

  Returns:
    An array of shape given by the header, in native byte order (uint8 for image and label files).

  Raises:
    FileNotFoundError: if ``path`` does not exist.
    ValueError: naming the file, if the magic number, type code or size does not match the data.
  """
  path = os.fspath(path)
  with open(path, 'rb') as f:
    raw = f.read()
  if raw[:2] == _GZIP_MAGIC:
    try:
      raw = gzip.decompress(raw)
    except (OSError, EOFError) as e:
      raise ValueError(f'{path}: corrupt gzip data ({e})') from e
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
    raise ValueError(f'{path}: not an IDX file (bad magic number {raw[:4].hex()!r})')
  dtype = _IDX_DTYPES.get(raw[2])
  if dtype is None:
    raise ValueError(f'{path}: unknown IDX type code 0x{raw[2]:02x}')
  ndim = raw[3]
  header = 4 + 4 * ndim
  if ndim == 0 or len(raw) < header:
    raise ValueError(f'{path}: truncated IDX header ({ndim} dimensions, {len(raw)} bytes)')
  shape = tuple(int(s) for s in np.frombuffer(raw, '>u4', count=ndim, offset=4))
  expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  if len(raw) - header != expected:
    raise ValueError(
        f'{path}: IDX header says shape {shape} ({expected} data bytes) but the file holds '
        f'{len(raw) - header} data bytes')
  data = np.frombuffer(raw, dtype, offset=header).reshape(shape)
  return data.astype(dtype.newbyteorder('='))


def _find_idx_file(data_dir: str, stem: str) -> str:
  """Path of ``stem.gz`` or ``stem`` in ``data_dir``; FileNotFoundError naming it otherwise."""
  for candidate in (stem + '.gz', stem):
    path = os.path.join(data_dir, candidate)
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(
      f'Fashion-MNIST file {os.path.join(data_dir, stem + ".gz")} (or {stem}) not found. '
      f'Install the Debian package with `apt-get install -y dataset-fashion-mnist` (it puts the '
      f'files in {FASHION_MNIST_DIR}), or pass data_dir= a directory holding '
      f'{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte[.gz].')


def fashion_mnist(*, data_dir: str | os.PathLike[str] = FASHION_MNIST_DIR) -> Dataset:
  """Fashion-MNIST from its four IDX files: 60,000 train and 10,000 test 28x28 images.

  Args:
    data_dir: directory with ``{train,t10k}-{images-idx3,labels-idx1}-ubyte`` files, each
      gzipped (``.gz``) or raw.

  Returns:
    A `Dataset` named ``'fashion_mnist'``: 28x28x1 images (bytes divided by 255), 10 classes.

  Raises:
    FileNotFoundError: naming the missing file and how to install it.
    ValueError: naming the file, if a file is malformed or images and labels disagree.

  References:
    Xiao, Rasul & Vollgraf, arXiv 1708.07747 (2017).
  """
  data_dir = os.fspath(data_dir)
  paths = {k: _find_idx_file(data_dir, stem) for k, stem in _FASHION_MNIST_FILES.items()}
  arrays = {}
  for split in ('train', 'test'):
    images, labels = read_idx(paths['x_' + split]), read_idx(paths['y_' + split])
    if images.ndim != 3 or images.dtype != np.uint8:
      raise ValueError(f'{paths["x_" + split]}: expected (N, H, W) uint8 images, got '
                       f'{images.shape} {images.dtype}')
    if labels.shape != images.shape[:1]:
      raise ValueError(f'{paths["y_" + split]}: {labels.shape[0] if labels.ndim else 0} labels '
                       f'for {images.shape[0]} images in {paths["x_" + split]}')
    if labels.size and labels.max() >= 10:
      raise ValueError(f'{paths["y_" + split]}: label {labels.max()} outside [0, 10)')
    arrays['x_' + split] = _to_unit_float(images[..., None], paths['x_' + split])
    arrays['y_' + split] = labels.astype(np.int32)
  return Dataset('fashion_mnist', num_classes=10, **arrays)


def _to_unit_float(images: np.ndarray, what: str) -> np.ndarray:
  """Images as float32 in [0, 1]: integers divided by their dtype's maximum, floats checked."""
  if images.dtype == np.bool_:
    return images.astype(np.float32)
  if np.issubdtype(images.dtype, np.integer):
    info = np.iinfo(images.dtype)
    if info.min < 0 and images.size and images.min() < 0:
      raise ValueError(f'{what}: negative pixel value {images.min()}')
    scaled = images.astype(np.float32)
    scaled /= np.float32(info.max)
    return scaled
  if np.issubdtype(images.dtype, np.floating):
    scaled = images.astype(np.float32, copy=False)
    if scaled.size and (scaled.min() < 0.0 or scaled.max() > 1.0):
      raise ValueError(f'{what}: float pixel values must lie in [0, 1], got '
                       f'[{scaled.min()}, {scaled.max()}]')
    return scaled
  raise ValueError(f'{what}: unsupported image dtype {images.dtype}')


def _read_split(builder: Any, split: str, image_key: str, label_key: str,
                chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
  """All (image, label) pairs of one split of a prepared TFDS builder, as numpy arrays."""
  try:
    source = builder.as_data_source(split=split)
  except NotImplementedError as e:
    # Prepared in a format without random access (tfrecord): only tf.data can read it.
    return _read_split_with_tensorflow(builder, split, image_key, label_key, e)
  images, labels = [], []
  for start in range(0, len(source), chunk):
    for example in source.__getitems__(range(start, min(start + chunk, len(source)))):
      for key in (image_key, label_key):
        if key not in example:
          raise KeyError(f'TFDS {builder.name!r} split {split!r}: no feature {key!r}; '
                         f'features are {sorted(example)}')
      images.append(np.asarray(example[image_key]))
      labels.append(np.asarray(example[label_key]))
  return _stack_images(images, builder.name, split, image_key), np.asarray(labels)


def _read_split_with_tensorflow(builder: Any, split: str, image_key: str, label_key: str,
                                cause: Exception) -> tuple[np.ndarray, np.ndarray]:
  """Reads a tfrecord-prepared split through tf.data; needs TensorFlow."""
  try:
    import tensorflow  # pylint: disable=g-import-not-at-top,unused-import  # noqa: F401
  except ImportError as e:
    raise ImportError(
        f'TFDS {builder.name!r} is prepared at {builder.data_dir} in the '
        f'{builder.info.file_format} format, which only TensorFlow can read. Either install '
        f'TensorFlow (`pip install tensorflow-cpu`), or prepare the dataset as array_record in '
        f'another data_dir (tfds_dataset(..., download=True) does so), which reads without it.'
    ) from cause
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
  return np.asarray(arrays[image_key]), np.asarray(arrays[label_key])


def _stack_images(images: list[np.ndarray], name: str, split: str, key: str) -> np.ndarray:
  """Stacks same-shape (H, W) or (H, W, C) images into (N, H, W, C)."""
  if not images:
    raise ValueError(f'TFDS {name!r} split {split!r} is empty')
  shapes = {im.shape for im in images}
  if len(shapes) != 1:
    raise ValueError(f'TFDS {name!r} split {split!r} feature {key!r}: images of different '
                     f'shapes {sorted(shapes)[:4]}; resize them to one shape first')
  stacked = np.stack(images)
  return stacked[..., None] if stacked.ndim == 3 else stacked


def tfds_dataset(name: str,
                 *,
                 data_dir: Optional[str | os.PathLike[str]] = None,
                 train_split: str = 'train',
                 test_split: str = 'test',
                 image_key: str = 'image',
                 label_key: str = 'label',
                 download: bool = False) -> Dataset:
  """A TFDS image classification dataset by name, read into host memory.

  Reading goes through TFDS's random-access data source (``array_record`` files), which needs
  no TensorFlow; images are decoded with PIL. With ``download=True`` the dataset is first
  downloaded and prepared as ``array_record`` in ``data_dir`` (preparation itself may need
  TensorFlow for some datasets, e.g. to encode images). A dataset already prepared in the
  ``tfrecord`` format is read with ``tf.data`` and then needs TensorFlow.

  Args:
    name: TFDS name, optionally with config and version (``'mnist'``, ``'cifar10:3.0.2'``).
    data_dir: TFDS data directory; None means TFDS's default (``$TFDS_DATA_DIR`` or
      ``~/tensorflow_datasets``).
    train_split: TFDS split expression of the training data (e.g. ``'train[:90%]'``).
    test_split: TFDS split expression of the test data.
    image_key: feature holding the image: (H, W) or (H, W, C), integer (scaled by the dtype's
      maximum, e.g. 255 for uint8) or float in [0, 1].
    label_key: feature holding the label, a ``tfds.features.ClassLabel``.
    download: whether to download and prepare the dataset when it is missing.

  Returns:
    A `Dataset` named ``'tfds:<name>'``; ``num_classes`` comes from the builder's info.

  Raises:
    FileNotFoundError: if the dataset is not prepared in ``data_dir`` and ``download`` is False.
    ValueError: if the label feature has no ``num_classes``, labels fall outside it, or images
      differ in shape.
    KeyError: if ``image_key`` or ``label_key`` is not a feature.
    ImportError: if the data can only be read or prepared with TensorFlow, which is missing.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  builder = tfds.builder(name, data_dir=None if data_dir is None else os.fspath(data_dir))
  if not builder.is_prepared():
    if not download:
      raise FileNotFoundError(
          f'TFDS {name!r} is not prepared in {builder.data_dir}; pass download=True (needs '
          f'network), or data_dir= the TFDS data directory that holds it.')
    try:
      builder.download_and_prepare(file_format='array_record')
    except ModuleNotFoundError as e:
      if 'tensorflow' not in str(e):
        raise
      raise ImportError(f'Preparing TFDS {name!r} needs TensorFlow here '
                        f'(`pip install tensorflow-cpu`); reading it afterwards does not.') from e
  label_feature = builder.info.features[label_key]
  num_classes = getattr(label_feature, 'num_classes', None)
  if num_classes is None:
    raise ValueError(f'TFDS {name!r} feature {label_key!r} is {type(label_feature).__name__}, '
                     f'not a ClassLabel with num_classes')
  arrays = {}
  for part, split in (('train', train_split), ('test', test_split)):
    images, labels = _read_split(builder, split, image_key, label_key)
    labels = labels.astype(np.int32)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
      raise ValueError(f'TFDS {name!r} split {split!r}: labels outside [0, {num_classes})')
    arrays['x_' + part] = _to_unit_float(images, f'TFDS {name!r} split {split!r} {image_key!r}')
    arrays['y_' + part] = labels
  return Dataset('tfds:' + name, num_classes=int(num_classes), **arrays)


def _fashion_mnist(data_dir, download):
  del download  # Installed from Debian (dataset-fashion-mnist), never downloaded.
  return fashion_mnist(data_dir=FASHION_MNIST_DIR if data_dir is None else data_dir)


# Datasets by name: ``load(data_dir, download) -> Dataset``; ``'tfds:<name>'`` reads any TFDS
# dataset. A new source is one function plus one line here.
REGISTRY: dict[str, Callable[..., Dataset]] = {
    'digits': lambda data_dir, download: digits(),
    'fashion_mnist': _fashion_mnist,
}
_TFDS = 'tfds:'


def load(name: str, *, data_dir: Optional[str | os.PathLike[str]] = None,
         download: bool = False) -> Dataset:
  """A dataset by name: a key of `REGISTRY` (``'digits'``, ``'fashion_mnist'``) or
  ``'tfds:<tfds name>'``.

  Args:
    name: which dataset.
    data_dir: where the data lives: the IDX directory for ``'fashion_mnist'`` (None means
      `FASHION_MNIST_DIR`), the TFDS data directory for ``'tfds:...'``; unused by ``'digits'``.
    download: for ``'tfds:...'`` only: download and prepare the dataset if it is missing
      (needs network). Never done otherwise.

  Returns:
    The `Dataset`.

  Raises:
    ValueError: for an unknown name, listing the choices (config key `dataset`).
  """
  if name in REGISTRY:
    return REGISTRY[name](data_dir, download)
  if name.startswith(_TFDS) and len(name) > len(_TFDS):
    return tfds_dataset(name[len(_TFDS):], data_dir=data_dir, download=download)
  raise ValueError(f'Unknown dataset {name!r} (config key `dataset`); choose one of '
                   f'{", ".join([*REGISTRY, _TFDS + "<name>"])}')


def _stratified_indices(labels: np.ndarray, limit: Optional[int], rng: np.random.Generator,
                        what: str) -> Optional[np.ndarray]:
  """Sorted indices of a class-proportional random subset of size ``limit``; None for all."""
  if limit is None:
    return None
  if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1:
    raise ValueError(f'subsample: {what} must be a positive int or None, got {limit!r}')
  if limit >= labels.shape[0]:
    return None
  order = rng.permutation(labels.shape[0])
  shuffled = labels[order]
  # Rank of each shuffled example within its class, as a fraction of the class size: taking
  # the smallest fractions first keeps every class at (almost) its share of the data.
  by_class = np.argsort(shuffled, kind='stable')
  counts = np.bincount(shuffled)
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  rank = np.empty_like(by_class)
  rank[by_class] = np.arange(by_class.size) - starts[shuffled[by_class]]
  fraction = (rank + 0.5) / counts[shuffled]
  chosen = order[np.argsort(fraction, kind='stable')[:limit]]
  return np.sort(chosen)


def subsample(dataset: Dataset,
              *,
              max_train: Optional[int] = None,
              max_test: Optional[int] = None,
              seed: int = 0) -> Dataset:
  """A deterministic random subset that keeps the class proportions (up to rounding).

  Args:
    dataset: the full `Dataset`.
    max_train: keep at most this many training examples; None keeps all.
    max_test: keep at most this many test examples; None keeps all.
    seed: seed of the choice; train and test use independent streams of it.

  Returns:
    A `Dataset` with the same name and classes, examples kept in their original order. Arrays
    that keep everything are returned as they are, not copied.

  Raises:
    ValueError: if a limit is not a positive int or None.
  """
  train_rng, test_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
  arrays = {}
  for part, limit, rng in (('train', max_train, train_rng), ('test', max_test, test_rng)):
    x, y = getattr(dataset, 'x_' + part), getattr(dataset, 'y_' + part)
    keep = _stratified_indices(y, limit, rng, 'max_' + part)
    arrays['x_' + part] = x if keep is None else x[keep]
    arrays['y_' + part] = y if keep is None else y[keep]
  return dataset._replace(**arrays)
