"""The dataset format: Parquet shards of (image bytes, label) plus a JSON manifest, local or on S3."""

from diki_model.data.format import FORMAT_VERSION, DatasetError, DatasetReport, Manifest, list_shards, read_manifest
from diki_model.data.images import ImageDecodeError, decode_rgb, header_size, sniff_format
from diki_model.data.reading import decode_image, iter_records, load_split_tensors
from diki_model.data.validation import dataset_fingerprint, validate_dataset
from diki_model.data.writing import convert_image_folder, encode_png, write_dataset

__all__ = [
    "FORMAT_VERSION",
    "DatasetError",
    "DatasetReport",
    "ImageDecodeError",
    "Manifest",
    "convert_image_folder",
    "dataset_fingerprint",
    "decode_image",
    "decode_rgb",
    "encode_png",
    "header_size",
    "iter_records",
    "list_shards",
    "load_split_tensors",
    "read_manifest",
    "sniff_format",
    "validate_dataset",
    "write_dataset",
]
