"""PyTorch FSDP2 (``fully_shard``) as the trainer's second sharded engine (``train.fsdp: true``).

    torchrun --nproc_per_node=8 -m blip3o.train configs/pretrain_8b.yaml train.fsdp=true

What is sharded: every block of each trainable ``...layers`` ModuleList (the DiT blocks; the backbone's decoder
layers when the recipe trains them) is its own FSDP unit, and the root module holds the rest of the trainable
parameters (queries, DiT embedders and final layer; embeddings and norms in the joint recipe). Frozen parameters
outside those blocks (a frozen backbone) stay replicated and unsharded: they are never all-gathered, need no
gradient reduction, and the rest of the code may call such modules outside the model's forward.

Checkpoints are ``torch.distributed.checkpoint`` (DCP) directories: each rank writes its own shards of the
trainable parameters, the persistent buffers and the optimizer state, and any world size can read them back.
The final save gathers one full state dict on rank 0 (on the CPU) for an ordinary model directory.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import nn

# torch.distributed.fsdp / .checkpoint / .tensor are imported inside the functions: only FSDP runs use them, the
# trainer imports this module on every run, and torch builds without distributed support lack them.


def block_lists(model: nn.Module) -> List[nn.ModuleList]:
    """The outermost ``*layers`` ModuleLists that hold trainable parameters (transformer blocks)."""
    found: List[tuple] = []
    for name, mod in model.named_modules():
        if not (isinstance(mod, nn.ModuleList) and name.split(".")[-1] == "layers"):
            continue
        if any(name.startswith(f + ".") for f, _ in found):
            continue
        if any(p.requires_grad for p in mod.parameters()):
            found.append((name, mod))
    return [m for _, m in found]


def mp_policy(mixed_precision: str, cast_inputs: bool = True):
    """bf16/fp16 compute with fp32 gradient reduction; ``no`` keeps fp32 (what CPU/gloo tests use)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None,
                                cast_forward_inputs=cast_inputs)


def shard(model: nn.Module, mixed_precision: str) -> int:
    """Applies ``fully_shard`` in place (blocks first, then the root). Returns the number of block units."""
    from torch.distributed.fsdp import fully_shard

    policy = mp_policy(mixed_precision)
    blocks = [b for lst in block_lists(model) for b in lst]
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    for b in blocks:
        fully_shard(b, mp_policy=policy)
    ignored = {p for p in model.parameters() if not p.requires_grad and id(p) not in in_blocks}
    # The root's inputs stay as they come (the flow targets and noise in fp32, as under DDP + autocast); the
    # trainer's autocast still runs the root's own matmuls in 16 bit.
    fully_shard(model, mp_policy=mp_policy(mixed_precision, cast_inputs=False), ignored_params=ignored or None)
    return len(blocks)


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, **kw)  # frozen weights are rebuilt from the config


def save_sharded(model: nn.Module, optimizer, path: Path) -> None:
    """Every rank, collectively: trainable params + buffers + optimizer state as a DCP checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer, options=_options())
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path))


def load_sharded(model: nn.Module, optimizer, path: Path) -> None:
    """Every rank, collectively: the inverse of :func:`save_sharded` (missing keys are an error)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    # On a fresh optimizer, get_state_dict creates AdamW state for *every* parameter (a zero-lr step), while the
    # saved one holds state only for parameters that had a gradient before the save (in the joint recipe on
    # image-only data the vision tower never does). Those keep no state, exactly as in the unbroken run.
    msd, osd = get_state_dict(model, optimizer, options=_options())
    saved = set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    saved_params = {k.split(".", 2)[2].rsplit(".", 1)[0] for k in saved if k.startswith("optim.state.")}
    osd["state"] = {fqn: st for fqn, st in osd["state"].items() if fqn in saved_params}
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_options(strict=False))  # strict=False: frozen params are not in the checkpoint


def full_state_dict(model: nn.Module) -> Optional[Dict[str, torch.Tensor]]:
    """Every rank, collectively: the whole model (frozen parts too) on rank 0's CPU; an empty dict elsewhere."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_norm(norm) -> float:
    """clip_grad_norm_ over DTensor gradients returns a DTensor; the logged value is the global norm."""
    from torch.distributed.tensor import DTensor

    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return float(norm)
