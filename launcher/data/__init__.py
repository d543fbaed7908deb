"""Datasets for the trainer: ``load_dataset`` and the measurement-split helper."""

from launcher.data.datasets import DATASET_NAMES, DatasetSplits, load_dataset
from launcher.data.readers import DatasetError
from launcher.data.sampling import measurement_indices

__all__ = ["DATASET_NAMES", "DatasetError", "DatasetSplits", "load_dataset", "measurement_indices"]
