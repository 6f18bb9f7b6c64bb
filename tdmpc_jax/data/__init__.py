"""Datasets: our on-disk format (memory-mapped), the slice sampler, importers and collection."""
from tdmpc_jax.data.dataset import Dataset, DatasetError, DatasetWriter, merge_datasets

__all__ = ["Dataset", "DatasetError", "DatasetWriter", "merge_datasets"]
