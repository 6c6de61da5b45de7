"""medsr-dist: distributed training and batch inference of medical image super-resolution models on Ray."""

__version__ = "0.1.0"
