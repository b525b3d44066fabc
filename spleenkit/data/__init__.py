"""Datasets in the MSD Task09 layout: synthetic phantoms, downloads, the datalist and its checks."""

from spleenkit.data.datalist import dataset_fingerprint, load_datalist, split_datalist

__all__ = ["dataset_fingerprint", "load_datalist", "split_datalist"]
