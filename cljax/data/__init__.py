"""Data for continual learning: sources of arrays and task streams built from them."""

from cljax.data.sources import Dataset
from cljax.data.sources import FASHION_MNIST_DIR
from cljax.data.sources import digits
from cljax.data.sources import fashion_mnist
from cljax.data.sources import load
from cljax.data.sources import read_idx
from cljax.data.sources import subsample
from cljax.data.sources import tfds_dataset
from cljax.data.streams import KINDS
from cljax.data.streams import Stream
from cljax.data.streams import Task
from cljax.data.streams import make_stream
from cljax.data.streams import permuted
from cljax.data.streams import rotated
from cljax.data.streams import split

__all__ = [
    'Dataset',
    'FASHION_MNIST_DIR',
    'KINDS',
    'Stream',
    'Task',
    'digits',
    'fashion_mnist',
    'load',
    'make_stream',
    'permuted',
    'read_idx',
    'rotated',
    'split',
    'subsample',
    'tfds_dataset',
]
