"""Training: data sets, head training, calibration, versions."""

from ..core.data import DatasetError, Sample, read_folder_dataset, stratified_split
from .trainer import train_on_samples, train_version

__all__ = ["DatasetError", "Sample", "read_folder_dataset", "stratified_split", "train_on_samples", "train_version"]
