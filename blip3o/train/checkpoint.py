"""Atomic, resumable training checkpoints.

Layout of ``OUTPUT/checkpoint-{step}/``::

    trainable.safetensors     trainable parameters + model buffers (queries, DiT, target stats ...)
    ema.safetensors           EMA of the trainable parameters (when enabled)
    optimizer.pt scheduler.pt (single process / DDP)   |   deepspeed/ (engine.save_checkpoint, all ranks)
    rank{r}.pt                per-rank RNG states and data-loader position
    trainer_state.json        step, counters, the full experiment config
    COMPLETE                  written last; a directory without it is not a checkpoint

Every rank writes into ``checkpoint-{step}.tmp``; after a barrier rank 0 writes COMPLETE and renames
the directory into place. A kill at any moment therefore leaves either the previous checkpoint or
the new one, never a half-written directory that ``latest`` would pick.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

_CKPT = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir) -> list:
    out = []
    root = Path(output_dir)
    if not root.is_dir():
        return out
    for p in root.iterdir():
        m = _CKPT.match(p.name)
        if m and (p / "COMPLETE").is_file():
            out.append((int(m.group(1)), p))
    return [p for _, p in sorted(out)]


def resolve_resume(output_dir, spec: Optional[str]) -> Optional[Path]:
    if not spec:
        return None
    if spec == "latest":
        ckpts = list_checkpoints(output_dir)
        return ckpts[-1] if ckpts else None
    p = Path(spec)
    if not (p / "COMPLETE").is_file():
        raise FileNotFoundError(f"train.resume_from_checkpoint: '{spec}' is not a complete checkpoint directory")
    return p


def rotate(output_dir, limit: int) -> None:
    if limit is None or limit <= 0:
        return
    ckpts = list_checkpoints(output_dir)
    for p in ckpts[:-limit]:
        shutil.rmtree(p, ignore_errors=True)
    for p in Path(output_dir).glob("checkpoint-*.tmp"):  # leftovers of a killed save
        shutil.rmtree(p, ignore_errors=True)


def clean_incomplete(output_dir) -> list:
    """Removes what a killed save can leave: ``checkpoint-N.tmp`` dirs and ``checkpoint-N`` dirs
    without their COMPLETE marker. Returns the removed paths."""
    removed = []
    root = Path(output_dir)
    if not root.is_dir():
        return removed
    for p in root.glob("checkpoint-*"):
        if p.is_dir() and (p.name.endswith(".tmp") or (_CKPT.match(p.name) and not (p / "COMPLETE").is_file())):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(str(p))
    return removed


def rng_state() -> Dict[str, Any]:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: Dict[str, Any]) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _rng_safe_globals() -> list:
    """The only non-tensor types our ``*.pt`` files pickle: numpy's RNG state is a tuple holding a uint32
    array, which unpickles through these (``_reconstruct`` builds only allow-listed array types)."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_state(path) -> Any:
    """``torch.load`` of an optimizer / scheduler / rank state with ``weights_only=True``: tensors, plain
    containers and numbers, plus numpy's RNG state. A checkpoint that pickles anything else (which could
    run code when loaded) is refused with one line naming the offending global."""
    try:
        with torch.serialization.safe_globals(_rng_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f"it pickles {found.group(1)}" if found else str(e).splitlines()[0]
        raise ValueError(f"refusing to load {path}: {what}, which is not on the allow-list of checkpoint types "
                         "(tensors, containers, numbers, numpy RNG state)") from None


def tmp_dir(output_dir, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step}.tmp"


def finalize(output_dir, step: int) -> Path:
    """Rank 0, after every rank wrote its part: mark complete and rename atomically."""
    tmp = tmp_dir(output_dir, step)
    final = Path(output_dir) / f"checkpoint-{step}"
    (tmp / "COMPLETE").write_text("ok")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".part")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)
