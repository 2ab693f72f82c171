"""deeplab-pipeline: batch DeepLab segmentation with Ray Data, dense CRF and Parquet outputs."""

__version__ = "0.1.0"
