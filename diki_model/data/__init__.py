"""The dataset format: Parquet shards of (image bytes, label) plus a JSON manifest, local or on S3."""

from diki_model.data.format import (
    FORMAT_VERSION,
    DatasetError,
    DatasetReport,
    Manifest,
    convert_image_folder,
    dataset_fingerprint,
    decode_image,
    encode_png,
    iter_records,
    list_shards,
    load_split_tensors,
    read_manifest,
    validate_dataset,
    write_dataset,
)

__all__ = [
    "FORMAT_VERSION",
    "DatasetError",
    "DatasetReport",
    "Manifest",
    "convert_image_folder",
    "dataset_fingerprint",
    "decode_image",
    "encode_png",
    "iter_records",
    "list_shards",
    "load_split_tensors",
    "read_manifest",
    "validate_dataset",
    "write_dataset",
]
