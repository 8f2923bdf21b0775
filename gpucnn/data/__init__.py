"""Data: IDX files, MNIST / Fashion-MNIST lookup and download, and mini-batching."""
from gpucnn.data.datasets import (
    DATASETS,
    DatasetSpec,
    FileSpec,
    download_dataset,
    find_dataset_dir,
    get_spec,
    load_dataset,
    normalize,
)
from gpucnn.data.idx import DataError, read_idx, write_idx
from gpucnn.data.loader import BatchIterator, epoch_permutation

__all__ = [
    "DATASETS", "DatasetSpec", "FileSpec", "DataError",
    "read_idx", "write_idx",
    "find_dataset_dir", "load_dataset", "download_dataset", "get_spec", "normalize",
    "BatchIterator", "epoch_permutation",
]
