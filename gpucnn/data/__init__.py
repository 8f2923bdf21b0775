"""Data: IDX files, MNIST / Fashion-MNIST and CIFAR-10 lookup and download, image folders, mini-batching and augmentation."""
from gpucnn.data.augment import Augment
from gpucnn.data.cifar import load_cifar10
from gpucnn.data.datasets import (
    DATASETS,
    DatasetSpec,
    FileSpec,
    channel_stats,
    download_dataset,
    find_dataset_dir,
    get_spec,
    load_dataset,
    normalize,
    standardize,
)
from gpucnn.data.folder import load_image_folder
from gpucnn.data.idx import DataError, read_idx, write_idx
from gpucnn.data.images import read_image, read_model_input, read_pgm
from gpucnn.data.loader import BatchIterator, epoch_permutation
from gpucnn.data.sources import DATASET_NAMES, Split, load_split

__all__ = [
    "DATASETS", "DatasetSpec", "FileSpec", "DataError",
    "read_idx", "write_idx",
    "find_dataset_dir", "load_dataset", "download_dataset", "get_spec", "normalize", "standardize", "channel_stats",
    "load_cifar10", "load_image_folder", "read_image", "read_model_input", "read_pgm",
    "DATASET_NAMES", "Split", "load_split",
    "Augment", "BatchIterator", "epoch_permutation",
]
