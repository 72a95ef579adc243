"""Tests for cljax.data.sources: digits, IDX / Fashion-MNIST, TFDS, load and subsample."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import struct

import numpy as np
import pytest

from cljax.data import sources

tfds = pytest.importorskip('tensorflow_datasets')
PIL_Image = pytest.importorskip('PIL.Image')


# ----------------------------------------------------------------------------------- digits


def test_digits_real_shapes_and_values():
  from sklearn.datasets import load_digits
  data = sources.digits()
  assert data.name == 'digits' and data.num_classes == 10
  assert data.x_train.shape[0] + data.x_test.shape[0] == 1797
  assert data.x_test.shape[0] == 540  # ceil(0.3 * 1797), sklearn's rounding.
  assert data.x_train.shape[1:] == data.x_test.shape[1:] == (8, 8, 1)
  assert data.x_train.dtype == data.x_test.dtype == np.float32
  assert data.y_train.dtype == data.y_test.dtype == np.int32
  # Independent reference: the split is a re-ordering of sklearn's rows, pixels divided by 16.
  raw = load_digits()
  expected = np.concatenate([raw.images.reshape(1797, -1) / 16.0, raw.target[:, None]], axis=1)
  got = np.concatenate([
      np.concatenate([data.x_train.reshape(-1, 64), data.y_train[:, None]], axis=1),
      np.concatenate([data.x_test.reshape(-1, 64), data.y_test[:, None]], axis=1)])
  np.testing.assert_array_equal(np.unique(got, axis=0), np.unique(expected, axis=0))
  assert got.shape == expected.shape


def test_digits_split_is_stratified_and_deterministic():
  a, b, c = sources.digits(seed=0), sources.digits(seed=0), sources.digits(seed=1)
  np.testing.assert_array_equal(a.x_train, b.x_train)
  np.testing.assert_array_equal(a.y_test, b.y_test)
  assert not np.array_equal(a.y_train, c.y_train)
  train_counts, test_counts = np.bincount(a.y_train, minlength=10), np.bincount(a.y_test)
  # Every class has 174..183 examples; stratification puts 30% (+-1) of each in the test set.
  np.testing.assert_allclose(test_counts, 0.3 * (train_counts + test_counts), atol=1.0)


def test_digits_bad_test_fraction():
  with pytest.raises(ValueError, match='test_fraction'):
    sources.digits(test_fraction=1.0)


# -------------------------------------------------------------------------------------- IDX


def _idx_bytes(array: np.ndarray, type_code: int) -> bytes:
  header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f'>{array.ndim}I', *array.shape)
  return header + array.astype(array.dtype.newbyteorder('>')).tobytes()


@pytest.mark.parametrize('compress', [False, True])
@pytest.mark.parametrize('dtype,type_code', [(np.uint8, 0x08), (np.int32, 0x0C),
                                             (np.float32, 0x0D), (np.int16, 0x0B)])
def test_read_idx_round_trip(tmp_path, compress, dtype, type_code):
  array = (np.arange(2 * 3 * 5).reshape(2, 3, 5) * 7 % 251).astype(dtype)
  raw = _idx_bytes(array, type_code)
  path = tmp_path / 'file.idx'
  path.write_bytes(gzip.compress(raw) if compress else raw)
  got = sources.read_idx(path)
  assert got.dtype == np.dtype(dtype) and got.dtype.isnative
  np.testing.assert_array_equal(got, array)


def test_read_idx_big_endian_values(tmp_path):
  path = tmp_path / 'labels'
  # Hand-written file: int32 type, 1 dimension of size 2, values 1 and 258 big-endian.
  path.write_bytes(bytes([0, 0, 0x0C, 1, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 1, 2]))
  np.testing.assert_array_equal(sources.read_idx(path), [1, 258])


@pytest.mark.parametrize('content,message', [
    (bytes([1, 0, 8, 1, 0, 0, 0, 1, 5]), 'magic'),
    (bytes([0, 0, 0x42, 1, 0, 0, 0, 1, 5]), 'type code'),
    (bytes([0, 0, 8, 1, 0, 0, 0, 3, 5]), 'holds 1 data bytes'),
    (bytes([0, 0, 8, 2, 0, 0]), 'truncated'),
])
def test_read_idx_errors_name_the_file(tmp_path, content, message):
  path = tmp_path / 'broken-idx1-ubyte'
  path.write_bytes(content)
  with pytest.raises(ValueError, match=message) as info:
    sources.read_idx(path)
  assert str(path) in str(info.value)


# ---------------------------------------------------------------------------- Fashion-MNIST


def _write_fashion_files(directory, *, num_train=6, num_test=4, compress=True, skip=None):
  rng = np.random.default_rng(0)
  arrays = {
      'train-images-idx3-ubyte': rng.integers(0, 256, (num_train, 3, 2), dtype=np.uint8),
      'train-labels-idx1-ubyte': rng.integers(0, 10, (num_train,), dtype=np.uint8),
      't10k-images-idx3-ubyte': rng.integers(0, 256, (num_test, 3, 2), dtype=np.uint8),
      't10k-labels-idx1-ubyte': rng.integers(0, 10, (num_test,), dtype=np.uint8),
  }
  for stem, array in arrays.items():
    if stem == skip:
      continue
    raw = _idx_bytes(array, 0x08)
    (directory / (stem + ('.gz' if compress else ''))).write_bytes(
        gzip.compress(raw) if compress else raw)
  return arrays


@pytest.mark.parametrize('compress', [False, True])
def test_fashion_mnist_from_local_files(tmp_path, compress):
  arrays = _write_fashion_files(tmp_path, compress=compress)
  data = sources.fashion_mnist(data_dir=tmp_path)
  assert data.name == 'fashion_mnist' and data.num_classes == 10
  assert data.x_train.shape == (6, 3, 2, 1) and data.x_test.shape == (4, 3, 2, 1)
  assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int32
  np.testing.assert_allclose(data.x_train[..., 0],
                             arrays['train-images-idx3-ubyte'] / 255.0, rtol=1e-6)
  np.testing.assert_array_equal(data.y_test, arrays['t10k-labels-idx1-ubyte'])


def test_fashion_mnist_missing_file_message(tmp_path):
  _write_fashion_files(tmp_path, skip='t10k-labels-idx1-ubyte')
  with pytest.raises(FileNotFoundError) as info:
    sources.fashion_mnist(data_dir=tmp_path)
  message = str(info.value)
  assert str(tmp_path / 't10k-labels-idx1-ubyte.gz') in message
  assert 'apt-get install -y dataset-fashion-mnist' in message
  assert 'data_dir' in message


def test_fashion_mnist_label_count_mismatch(tmp_path):
  _write_fashion_files(tmp_path)
  (tmp_path / 'train-labels-idx1-ubyte.gz').write_bytes(
      gzip.compress(_idx_bytes(np.zeros(5, np.uint8), 0x08)))
  with pytest.raises(ValueError, match='5 labels for 6 images'):
    sources.fashion_mnist(data_dir=tmp_path)


@pytest.mark.skipif(not os.path.isdir(sources.FASHION_MNIST_DIR),
                    reason=f'{sources.FASHION_MNIST_DIR} absent: '
                    'apt-get install -y dataset-fashion-mnist')
def test_fashion_mnist_real_debian_files():
  data = sources.fashion_mnist()
  assert data.x_train.shape == (60000, 28, 28, 1) and data.x_test.shape == (10000, 28, 28, 1)
  assert data.y_train.shape == (60000,) and data.y_test.shape == (10000,)
  assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int32
  assert 0.0 <= data.x_train.min() and data.x_train.max() <= 1.0
  # Fashion-MNIST is balanced: 6,000 train and 1,000 test images per class.
  np.testing.assert_array_equal(np.bincount(data.y_train), np.full(10, 6000))
  np.testing.assert_array_equal(np.bincount(data.y_test), np.full(10, 1000))
  # Independent reader: the bytes after the 16-byte header of the gzipped image file.
  with gzip.open(os.path.join(sources.FASHION_MNIST_DIR, 't10k-images-idx3-ubyte.gz')) as f:
    first = np.frombuffer(f.read(16 + 2 * 784)[16:], np.uint8).reshape(2, 28, 28)
  np.testing.assert_allclose(data.x_test[:2, ..., 0] * 255.0, first, atol=1e-4)


# ------------------------------------------------------------------------------------- TFDS

with tfds.core.registered.skip_registration():

  class CljaxTinyImages(tfds.core.GeneratorBasedBuilder):
    """Five train and three test 5x4 RGB images of 3 classes, written by the test itself."""

    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          features=tfds.features.FeaturesDict({
              'image': tfds.features.Image(shape=(5, 4, 3)),
              'label': tfds.features.ClassLabel(num_classes=3),
          }),
          supervised_keys=('image', 'label'))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {'train': self._generate_examples('train'),
              'test': self._generate_examples('test')}

    def _generate_examples(self, split):
      images, labels = _tiny_arrays(split)
      for i, (image, label) in enumerate(zip(images, labels)):
        png = io.BytesIO()  # Encoded with PIL: TFDS would need TensorFlow to encode arrays.
        PIL_Image.fromarray(image).save(png, format='png')
        yield i, {'image': png.getvalue(), 'label': int(label)}


def _tiny_arrays(split):
  n = 5 if split == 'train' else 3
  rng = np.random.default_rng(0 if split == 'train' else 1)
  return rng.integers(0, 256, (n, 5, 4, 3), dtype=np.uint8), np.arange(n) % 3


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp('tfds')
  CljaxTinyImages(data_dir=str(data_dir), file_format='array_record').download_and_prepare()
  return data_dir


def _by_label_and_pixels(x, y):
  order = np.lexsort((x.reshape(len(x), -1).sum(1), y))
  return x[order], y[order]


def test_tfds_reads_local_array_record_without_tensorflow(tfds_dir):
  data = sources.tfds_dataset('cljax_tiny_images', data_dir=tfds_dir)
  assert data.name == 'tfds:cljax_tiny_images' and data.num_classes == 3
  assert data.x_train.shape == (5, 5, 4, 3) and data.x_test.shape == (3, 5, 4, 3)
  assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int32
  for split, x, y in (('train', data.x_train, data.y_train), ('test', data.x_test, data.y_test)):
    images, labels = _tiny_arrays(split)
    # TFDS shuffles examples when preparing, so compare as sets of (image, label) pairs.
    got_x, got_y = _by_label_and_pixels(x, y)
    want_x, want_y = _by_label_and_pixels(images / 255.0, labels)
    np.testing.assert_array_equal(got_y, want_y)
    np.testing.assert_allclose(got_x, want_x, rtol=1e-6)


def test_tfds_split_expressions_and_load(tfds_dir):
  data = sources.tfds_dataset('cljax_tiny_images', data_dir=tfds_dir, train_split='train[:2]',
                              test_split='train[2:]')
  assert data.x_train.shape[0] == 2 and data.x_test.shape[0] == 3
  loaded = sources.load('tfds:cljax_tiny_images', data_dir=tfds_dir)
  assert loaded.x_train.shape == (5, 5, 4, 3) and loaded.num_classes == 3


def test_tfds_missing_feature(tfds_dir):
  with pytest.raises(KeyError, match='features are'):
    sources.tfds_dataset('cljax_tiny_images', data_dir=tfds_dir, image_key='pixels')


def test_tfds_not_prepared_does_not_download(tmp_path):
  with pytest.raises(FileNotFoundError, match='download=True'):
    sources.tfds_dataset('mnist', data_dir=tmp_path)
  assert not any(tmp_path.rglob('*.array_record*'))


def test_tfds_tfrecord_needs_tensorflow(tfds_dir, tmp_path):
  try:
    import tensorflow  # noqa: F401  # pylint: disable=unused-import
  except ImportError:
    pass
  else:
    pytest.skip('TensorFlow is installed: tfrecord data would be read with tf.data')
  # A copy whose info says tfrecord: no random-access source, so reading needs tf.data.
  copy = tmp_path / 'tfds'
  shutil.copytree(tfds_dir, copy)
  info_path = copy / 'cljax_tiny_images' / '1.0.0' / 'dataset_info.json'
  info = json.loads(info_path.read_text())
  info['fileFormat'] = 'tfrecord'
  info_path.write_text(json.dumps(info))
  with pytest.raises(ImportError, match='tensorflow-cpu'):
    sources.tfds_dataset('cljax_tiny_images', data_dir=copy)


# ------------------------------------------------------------------------------------- load


def test_load_by_name(tmp_path):
  assert sources.load('digits').x_train.shape[1:] == (8, 8, 1)
  _write_fashion_files(tmp_path)
  assert sources.load('fashion_mnist', data_dir=tmp_path).x_train.shape == (6, 3, 2, 1)


@pytest.mark.parametrize('name', ['mnist', 'tfds:', 'Digits'])
def test_load_unknown_lists_choices(name):
  with pytest.raises(ValueError, match="digits, fashion_mnist, tfds:<name>"):
    sources.load(name)


# -------------------------------------------------------------------------------- subsample


def _toy_dataset(counts=(50, 30, 20), num_test=40):
  y = np.repeat(np.arange(len(counts)), counts).astype(np.int32)
  x = np.arange(y.size, dtype=np.float32).reshape(-1, 1, 1, 1) / y.size
  return sources.Dataset('toy', x, y, x[:num_test], y[:num_test], len(counts))


def test_subsample_keeps_class_proportions_and_order():
  data = _toy_dataset()
  small = sources.subsample(data, max_train=10, seed=3)
  assert small.x_train.shape == (10, 1, 1, 1) and small.y_train.shape == (10,)
  np.testing.assert_array_equal(np.bincount(small.y_train), [5, 3, 2])  # 50:30:20 of 10.
  # A subset of the rows, in the original order, each image still with its own label.
  index = np.round(small.x_train.ravel() * 100).astype(int)
  assert np.all(np.diff(index) > 0)
  np.testing.assert_array_equal(data.y_train[index], small.y_train)
  assert small.x_test is data.x_test  # max_test=None keeps everything, uncopied.


def test_subsample_deterministic_and_seeded():
  data = _toy_dataset()
  a = sources.subsample(data, max_train=20, max_test=7, seed=0)
  b = sources.subsample(data, max_train=20, max_test=7, seed=0)
  c = sources.subsample(data, max_train=20, max_test=7, seed=1)
  np.testing.assert_array_equal(a.x_train, b.x_train)
  np.testing.assert_array_equal(a.x_test, b.x_test)
  assert not np.array_equal(a.x_train, c.x_train)
  assert a.x_test.shape[0] == 7


def test_subsample_larger_than_data_keeps_all():
  data = _toy_dataset()
  same = sources.subsample(data, max_train=1000, max_test=40)
  assert same.x_train is data.x_train and same.y_test is data.y_test


@pytest.mark.parametrize('limit', [0, -3, 2.5, True])
def test_subsample_bad_limit(limit):
  with pytest.raises(ValueError, match='max_train'):
    sources.subsample(_toy_dataset(), max_train=limit)
