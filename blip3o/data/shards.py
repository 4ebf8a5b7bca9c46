"""Shard lists and raw tar reading for WebDataset-layout data.

A shard is a plain (optionally gzip-compressed) tar file; consecutive members that share a key form one
sample, as in WebDataset: ``dir/000123.jpg`` + ``dir/000123.txt`` (+ ``dir/000123.json``) is the sample
with key ``dir/000123`` and fields ``jpg``, ``txt``, ``json``. The key is everything before the first dot
of the basename, so ``000123.long.txt`` is field ``long.txt`` of sample ``000123``.

Reading is done here with :mod:`tarfile` rather than through ``webdataset``'s pipeline because exact
resumption needs two things it does not expose: skipping the first ``n`` samples of a shard from headers
alone (``tarfile`` seeks over member data it is not asked for), and a precise account of what went wrong
with a shard (unreadable, empty, truncated) instead of a swallowed exception. The files themselves are
written by ``webdataset.TarWriter`` (toy generator, target cache), so the format is WebDataset's.
"""
from __future__ import annotations

import glob
import logging
import os
import tarfile
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Union

logger = logging.getLogger(__name__)

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")

# Reasons a shard contributes nothing (or less than it should). Sample-level reasons live in pipeline.py.
UNREADABLE_SHARD = "unreadable_shard"  # cannot be opened: missing, no permission, not a tar
EMPTY_SHARD = "empty_shard"  # a 0-byte file or a valid tar with no samples
TRUNCATED_SHARD = "truncated_shard"  # readable up to some point, then corrupt or cut short

EventFn = Callable[[str, str], None]


def expand_shards(spec: Union[str, Sequence[str]]) -> List[str]:
    """Turns a shard specification into a sorted, de-duplicated list of existing files.

    ``spec`` is a folder (all ``*.tar``/``*.tar.gz``/``*.tgz`` in it, not recursive), a glob
    (``/data/*.tar``), a brace pattern (``/data/{000000..000099}.tar``), a single file, several of those
    joined with ``::`` (open_clip's convention), or a list of any of these. Errors are one line and name
    the offending part, because a typo in a path is the most common way a run fails at step 0.
    """
    if isinstance(spec, (list, tuple)):
        parts = [p for s in spec for p in str(s).split("::")]
    elif isinstance(spec, str):
        parts = spec.split("::")
    else:
        raise TypeError(f"shards must be a string or a list of strings, got {type(spec).__name__}")
    parts = [os.path.expanduser(p.strip()) for p in parts if p and p.strip()]
    if not parts:
        raise ValueError("no shards given (empty shard specification)")
    out: List[str] = []
    for part in parts:
        out.extend(_expand_one(part))
    seen, unique = set(), []
    for p in out:
        if p not in seen:
            seen.add(p)
            unique.append(p)
    return unique


def _expand_one(part: str) -> List[str]:
    if os.path.isdir(part):
        # scandir's entry types come from the directory listing itself: no stat per shard, which matters with
        # 100k shards on a network file system (time to first batch must not grow with the data set).
        with os.scandir(part) as entries:
            found = sorted(e.path for e in entries if e.name.endswith(SHARD_SUFFIXES) and e.is_file())
        if not found:
            raise ValueError(f"shard folder {part} contains no .tar/.tar.gz/.tgz files")
        return found
    if "{" in part and "}" in part:
        import braceexpand  # only for brace patterns; installed with webdataset, which importing blip3o.data avoids

        names = list(braceexpand.braceexpand(part))
        missing = [n for n in names if not os.path.isfile(n)]
        if missing:
            raise ValueError(
                f"{len(missing)} of {len(names)} shards of pattern {part} do not exist (first: {missing[0]})"
            )
        return names
    if any(c in part for c in "*?["):
        names = sorted(n for n in glob.glob(part) if os.path.isfile(n))
        if not names:
            raise ValueError(f"shard glob {part} matches no files")
        return names
    if not os.path.exists(part):
        parent = os.path.dirname(part) or "."
        hint = "" if os.path.isdir(parent) else f" (folder {parent} does not exist either)"
        raise ValueError(f"shard path {part} does not exist{hint}")
    return [part]


def split_member_name(name: str):
    """``a/b/000123.long.txt`` -> (``a/b/000123``, ``long.txt``); (name, "") when there is no dot."""
    dirname, base = os.path.split(name)
    if "." not in base:
        return name, ""
    stem, ext = base.split(".", 1)
    return (os.path.join(dirname, stem) if dirname else stem), ext.lower()


def iter_tar_samples(
    path: str, skip: int = 0, on_event: Optional[EventFn] = None
) -> Iterator[Dict[str, object]]:
    """Yields the samples of one shard as dicts ``{"__key__", "__url__", "__index__", ext: bytes, ...}``.

    The first ``skip`` samples are passed over from their headers only (their data is never read), which is
    what makes resuming in the middle of a large shard cheap. Problems are reported through ``on_event``
    (reason, detail) and never raised: an unreadable shard yields nothing, a truncated one yields the samples
    before the damage (the sample being read when it broke is dropped because it may be incomplete).
    """
    emit = on_event or (lambda reason, detail: None)
    try:
        if os.path.getsize(path) == 0:
            emit(EMPTY_SHARD, path)
            return
        tf = tarfile.open(path, mode="r:*")
    except (tarfile.TarError, OSError, EOFError) as e:
        emit(UNREADABLE_SHARD, f"{path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return
    index = 0
    current_key: Optional[str] = None
    current: Dict[str, object] = {}
    try:
        with tf:
            while True:
                member = tf.next()
                # TarFile keeps every TarInfo it has seen in .members; a long shard would grow it without
                # bound, and we never need random access, so drop them as we go.
                tf.members = []
                if member is None:
                    break
                if not member.isfile():
                    continue
                key, ext = split_member_name(member.name)
                if key != current_key:
                    if current_key is not None:
                        if index >= skip:
                            yield current
                        index += 1
                    current_key = key
                    current = {"__key__": key, "__url__": path, "__index__": index}
                if index < skip or not ext or ext in current:
                    continue  # fast-forward, or a duplicate field (WebDataset keeps one: we keep the first)
                fobj = tf.extractfile(member)
                current[ext] = fobj.read() if fobj is not None else b""
            complete = _ends_cleanly(tf)
        if not complete:
            raise EOFError("no end-of-archive marker (file cut short)")
        if current_key is not None:
            if index >= skip:
                yield current
            index += 1
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        emit(TRUNCATED_SHARD, f"{path} after {index} samples: {type(e).__name__}: {e}")
        return
    if index == 0:
        emit(EMPTY_SHARD, path)


def _ends_cleanly(tf: tarfile.TarFile) -> bool:
    """True when the archive stops at a zero block (the end-of-archive marker).

    ``tarfile`` treats a cut inside a header, or a cut exactly between members, as a normal end; only the
    missing marker tells a truncated shard from a complete one.
    """
    tf.fileobj.seek(tf.offset)
    block = tf.fileobj.read(tarfile.BLOCKSIZE)
    return len(block) == tarfile.BLOCKSIZE and block.count(0) == tarfile.BLOCKSIZE


def shard_cache_path(shard: str, cache_dir: Optional[str] = None, variant: Optional[str] = None) -> str:
    """Where the target-feature cache of ``shard`` lives: ``<cache_dir>/<basename>`` when a cache folder is
    given, else ``<shard folder>/x0_cache/<variant>/<basename>`` (written by ``scripts/cache_targets.py``)."""
    base = os.path.basename(shard)
    if cache_dir:
        return os.path.join(cache_dir, base)
    return os.path.join(os.path.dirname(shard), "x0_cache", variant or "default", base)
