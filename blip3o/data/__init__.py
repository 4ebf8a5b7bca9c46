"""Data: streaming WebDataset and JSON sources, mixing, transforms, collation, target cache, toy world.

Entry point for training: :func:`build_train_dataloader` (``blip3o/data/loader.py``). Importing this
package reads no data and imports neither ``datasets`` nor ``webdataset`` (both are loaded when used).
"""
from blip3o.data.cache import CacheMismatchError, cache_shards, resolve_cache
from blip3o.data.collate import IGNORE_INDEX, BatchCollator, encode_conversation
from blip3o.data.json_data import load_json_records
from blip3o.data.loader import ResumableLoader, as_data_config, build_train_dataloader, parse_sources
from blip3o.data.mixing import Mixer
from blip3o.data.pipeline import SampleDecoder, SourceSpec, StreamingDataset
from blip3o.data.shards import expand_shards, iter_tar_samples
from blip3o.data.stats import SkipStats, format_counts
from blip3o.data.streams import AllBadError
from blip3o.data.transforms import (
    ImageTransform, build_image_transform, clip_transform, eva_clip_transform, siglip_transform, vae_transform,
)

__all__ = [
    "AllBadError", "BatchCollator", "CacheMismatchError", "IGNORE_INDEX", "ImageTransform",
    "Mixer", "ResumableLoader", "SampleDecoder", "SkipStats", "SourceSpec", "StreamingDataset", "as_data_config",
    "build_image_transform", "build_train_dataloader", "cache_shards", "clip_transform", "encode_conversation",
    "eva_clip_transform", "expand_shards", "format_counts", "iter_tar_samples", "load_json_records",
    "parse_sources", "resolve_cache", "siglip_transform", "vae_transform",
]
