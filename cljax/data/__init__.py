"""Data for continual learning: sources of arrays, text corpora and tokenizers, and the task
streams built from them."""

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
from cljax.data.text import DOMAINS
from cljax.data.text import ByteTokenizer
from cljax.data.text import Domain
from cljax.data.text import SentencePieceTokenizer
from cljax.data.text import make_tokenizer
from cljax.data.text import pack
from cljax.data.text import text_domains
from cljax.data.text import train_sentencepiece

__all__ = [
    'ByteTokenizer',
    'DOMAINS',
    'Dataset',
    'Domain',
    'FASHION_MNIST_DIR',
    'KINDS',
    'SentencePieceTokenizer',
    'Stream',
    'Task',
    'digits',
    'fashion_mnist',
    'load',
    'make_stream',
    'make_tokenizer',
    'pack',
    'permuted',
    'read_idx',
    'rotated',
    'split',
    'subsample',
    'text_domains',
    'tfds_dataset',
    'train_sentencepiece',
]
