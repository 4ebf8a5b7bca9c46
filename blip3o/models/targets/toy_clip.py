"""The toy world's CLIP: a tiny image-text model trained contrastively on the toy shards, whose frozen image
tower is the toy generator's target (``model.target: toy_clip``).

BLIP3-o diffuses *CLIP features* because they are semantic: a CLIP image token says "red square" where a
pixel patch or a random projection of it says "these 64 numbers". The toy world tests that argument only
if its target is semantic too, so this is a CLIP in miniature, trained from nothing on the toy images and
captions (``python -m blip3o.train configs/toy_clip.yaml``, task ``clip``):

* image tower: a small conv net, 64 px -> 8x8 grid of ``dim``-d tokens (the paper's 8x8 layout). The grid is
  the target x0; its mean- and max-pooled summary, projected, is the image embedding for the contrastive loss.
  No normalisation layers: with GroupNorm the tower needed ~3x the steps to learn shape (benchmarks/toy_world.md).
* text tower: a bag of words (embedding mean + MLP) over the toy vocabulary. Binding ("a red square and a blue
  circle") is carried by the image grid, where each object sits in its own cells; the text tower only has to
  name what is there.
* loss: CLIP's symmetric InfoNCE (captions that repeat inside a batch count as positives of each other) plus
  hard negatives: each caption with one colour or shape word swapped (NegCLIP-style). Shape is a small pixel
  difference that in-batch negatives rarely isolate; with the swaps the tower separates shapes in a few
  hundred steps.

Saved with ``save_pretrained`` as a regular target-encoder directory (config.json + model.safetensors hold the
image tower, so ``TargetEncoder.from_pretrained`` and the generator load it like any target), plus
``text_tower.safetensors`` for zero-shot classification (``ToyClipModel.from_pretrained``).
"""
from __future__ import annotations

import math
import os
import random
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from blip3o.data import toy
from blip3o.data.streams import derive_seed
from blip3o.data.transforms import HALF
from blip3o.models.targets.base import TARGETS, TargetEncoder

TEXT_WEIGHTS = "text_tower.safetensors"
PAD, UNK = 0, 1
_WORD = re.compile(r"[a-z]+")


def toy_vocabulary() -> List[str]:
    """Every word the toy captions (short and long) use, from the toy grammar itself."""
    words = set(toy.COLORS) | set(toy.SHAPES) | {s + "s" for s in toy.SHAPES} | set(toy.NUMBERS.values())
    words |= set(" ".join(toy.RELATIONS).split()) | {"a", "an", "and", "to", "the", "filled", "on", "plain",
                                                      "white", "background", "one", "in", "at", "centre", "top",
                                                      "bottom", "left", "right", "is", "of"}
    return sorted(words)


def toy_hard_negative_groups() -> List[List[str]]:
    """Words that swap for one another to make a hard negative caption: colours, shapes, plural shapes."""
    return [sorted(toy.COLORS), list(toy.SHAPES), [s + "s" for s in toy.SHAPES]]


TOY_CLIP_PRESETS = {  # TARGET_PRESETS["toy_clip"]
    "tiny": dict(image_size=64, stem=4, downsample=1, widths=[48, 64, 96], dim=32, embed_dim=64, pool="meanmax",
                 text_width=64, vocab=toy_vocabulary(), hard_negative_groups=toy_hard_negative_groups(),
                 mean=list(HALF), std=list(HALF), interpolation="bicubic", dtype="float32"),
}


class ToyClipImageTower(nn.Module):
    """(B, 3, 64, 64) in [-1, 1] -> grid (B, dim, 8, 8) and embedding (B, embed_dim)."""

    def __init__(self, c: Dict[str, Any], device=None):
        super().__init__()
        w1, w2, w3 = c["widths"]
        kw = dict(device=device)
        # 4x4 patchify stem, then 3x3 convs; one stride-2 conv lands on the 8x8 grid at 64 px (the default,
        # downsample 1); each further one (downsample 2: 4x4) halves the grid.
        extra = []
        for _ in range(c.get("downsample", 1) - 1):
            extra += [nn.Conv2d(w3, w3, 3, 2, 1, **kw), nn.GELU()]
        self.net = nn.Sequential(
            nn.Conv2d(3, w1, c["stem"], c["stem"], **kw), nn.GELU(),
            nn.Conv2d(w1, w2, 3, 1, 1, **kw), nn.GELU(),
            nn.Conv2d(w2, w3, 3, 2, 1, **kw), nn.GELU(),
            *extra,
            nn.Conv2d(w3, w3, 3, 1, 1, **kw), nn.GELU(),
            nn.Conv2d(w3, c["dim"], 1, **kw),
        )
        self.pool = c["pool"]
        self.proj = nn.Linear(c["dim"] * (2 if self.pool == "meanmax" else 1), c["embed_dim"], **kw)

    def grid(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def embed(self, grid: torch.Tensor) -> torch.Tensor:
        # mean keeps how much of each thing there is (counts), max keeps that a small object is there at all
        pooled = grid.mean((2, 3))
        if self.pool == "meanmax":
            pooled = torch.cat([pooled, grid.amax((2, 3))], 1)
        return self.proj(pooled)


class ToyClipTextTower(nn.Module):
    """Word ids (B, L) -> embedding (B, embed_dim): mean of word embeddings, then an MLP."""

    def __init__(self, c: Dict[str, Any], device=None):
        super().__init__()
        w = c["text_width"]
        self.embed_tokens = nn.Embedding(len(c["vocab"]) + 2, w, padding_idx=PAD, device=device)
        self.mlp = nn.Sequential(nn.Linear(w, 2 * w, device=device), nn.GELU(),
                                 nn.Linear(2 * w, c["embed_dim"], device=device))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        m = (ids != PAD).unsqueeze(-1).to(self.embed_tokens.weight.dtype)
        return self.mlp((self.embed_tokens(ids) * m).sum(1) / m.sum(1).clamp_min(1.0))


@TARGETS.register("toy_clip")
class ToyClipTarget(TargetEncoder):
    """The toy CLIP's frozen image tower as a generation target: x0 = the 8x8 grid of ``dim``-d tokens."""

    name = "toy_clip"

    def __init__(self, config: Dict[str, Any], device: Union[str, torch.device, None] = None):
        super().__init__(config)
        c = self.config
        n = c.get("downsample", 1)  # toy CLIPs saved before the setting existed have one stride-2 conv
        side = c["image_size"] // c["stem"] // 2 ** n
        if n < 1 or side * c["stem"] * 2 ** n != c["image_size"]:
            raise ValueError(f"toy_clip: image_size {c['image_size']} is not a multiple of stem ({c['stem']}) x "
                             f"2^downsample ({n}), or downsample < 1")
        self.image_size, self.channels, self.grid = c["image_size"], c["dim"], (side, side)
        self.tower = ToyClipImageTower(c, device=device)
        self._freeze()

    def _weights_module(self) -> nn.Module:
        return self.tower

    def _encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.tower.grid(pixel_values)

    def load_external(self, pretrained: str, allow_download: bool = False) -> None:
        raise ValueError(f"toy_clip: {pretrained} is not a saved toy CLIP (train one with configs/toy_clip.yaml)")


class ToyClipModel(nn.Module):
    """Both towers and the learned temperature: what the ``clip`` training task optimises."""

    def __init__(self, config: Optional[Dict[str, Any]] = None, device=None, **overrides):
        super().__init__()
        c = dict(TOY_CLIP_PRESETS["tiny"] if config is None else config)
        unknown = set(overrides) - set(c)
        if unknown:
            raise ValueError(f"toy_clip: unknown setting(s) {sorted(unknown)}; settings are {sorted(c)}")
        c.update(overrides)
        self.config = c
        self.image = ToyClipImageTower(c, device=device)
        self.text = ToyClipTextTower(c, device=device)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0), device=device))
        self.word_ids = {w: i + 2 for i, w in enumerate(c["vocab"])}
        # word id -> (group, position in group) for the hard-negative swaps
        self._groups = [[self.word_ids[w] for w in g] for g in c["hard_negative_groups"]]
        self._group_of = torch.full((len(self.word_ids) + 2,), -1, dtype=torch.long)  # word id -> group, -1 none
        for gi, g in enumerate(self._groups):
            self._group_of[torch.tensor(g)] = gi

    # -- text ---------------------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str], max_words: int = 48) -> torch.Tensor:
        rows = [[self.word_ids.get(w, UNK) for w in _WORD.findall(t.lower())][:max_words] or [UNK] for t in texts]
        out = torch.full((len(rows), max(map(len, rows))), PAD, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, :len(r)] = torch.tensor(r)
        return out.to(self.logit_scale.device)

    def hard_negatives(self, ids: torch.Tensor, k: int = 4, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """(B, L) -> (B, k, L): each caption with one swappable word replaced by another of its group;
        even k swap a shape word, odd k a colour word (a row without such a word stays unchanged)."""
        out = ids.unsqueeze(1).repeat(1, k, 1)
        grp = self._group_of[ids.cpu()]
        for j in range(k):
            want = (grp == 0) if j % 2 else (grp >= 1)
            score = torch.rand(ids.shape, generator=generator) * want
            pos = score.argmax(1)
            has = want.any(1)
            for b in torch.nonzero(has).flatten().tolist():
                tok = int(ids[b, pos[b]])
                g = self._groups[int(grp[b, pos[b]])]
                choice = g[(g.index(tok) + 1 + int(torch.randint(len(g) - 1, (1,), generator=generator))) % len(g)]
                out[b, j, pos[b]] = choice
        return out

    def encode_text(self, texts_or_ids) -> torch.Tensor:
        ids = texts_or_ids if torch.is_tensor(texts_or_ids) else self.tokenize(texts_or_ids)
        return F.normalize(self.text(ids), dim=-1)

    def encode_image(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """[-1, 1] images -> (grid, normalised embedding)."""
        g = self.image.grid(images)
        return g, F.normalize(self.image.embed(g), dim=-1)

    # -- training -----------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, captions: Sequence[str], generator=None, hard_negatives: int = 4):
        _, ie = self.encode_image(images)
        ids = self.tokenize(captions)
        te = self.encode_text(ids)
        scale = self.logit_scale.exp().clamp(max=100.0)
        logits = scale * ie @ te.t()
        same = (ids.unsqueeze(1) == ids.unsqueeze(0)).all(-1) if ids.shape[1] else torch.eye(len(ids), dtype=torch.bool)
        target = same.float() / same.float().sum(1, keepdim=True)
        clip = 0.5 * (-(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.log_softmax(0).t()).sum(1).mean())
        loss, parts = clip, {"clip_loss": clip.detach()}
        if hard_negatives:
            neg = self.hard_negatives(ids, hard_negatives, generator).to(ids.device)
            ne = self.encode_text(neg.flatten(0, 1)).view(len(ids), hard_negatives, -1)
            pos = logits.diagonal().unsqueeze(1)
            hard = -(pos - torch.logsumexp(torch.cat([pos, scale * (ne @ ie.unsqueeze(-1)).squeeze(-1)], 1), 1,
                                           keepdim=True)).mean()
            loss = loss + hard
            parts["hard_negative_loss"] = hard.detach()
        return loss, parts

    @torch.no_grad()
    def zero_shot(self, images: torch.Tensor, candidates: Sequence[Sequence[str]]) -> List[int]:
        """For image i, the index of the best-matching caption among ``candidates[i]``."""
        _, ie = self.encode_image(images)
        out = []
        for i, cands in enumerate(candidates):
            out.append(int((self.encode_text(list(cands)) @ ie[i]).argmax()))
        return out

    # -- persistence --------------------------------------------------------------------------------------
    def as_target(self) -> ToyClipTarget:
        t = ToyClipTarget(self.config, device="meta")
        t._materialize({k: v.detach().cpu() for k, v in self.image.state_dict().items()})
        return t

    def save_pretrained(self, path: str) -> str:
        """A target-encoder directory (the image tower) plus the text tower and temperature beside it."""
        self.as_target().save_pretrained(path)
        text = {k: v.detach().contiguous().cpu() for k, v in self.text.state_dict().items()}
        text["logit_scale"] = self.logit_scale.detach().cpu().reshape(1)
        save_file(text, os.path.join(path, TEXT_WEIGHTS))
        return path

    @classmethod
    def from_pretrained(cls, path: str, device=None) -> "ToyClipModel":
        if not os.path.isfile(os.path.join(path, TEXT_WEIGHTS)):
            raise FileNotFoundError(f"{path} has no {TEXT_WEIGHTS}: not a toy CLIP saved by the clip task")
        target = TargetEncoder.from_pretrained(path)
        if target.name != "toy_clip":
            raise ValueError(f"{path} holds a {target.name!r} target, not a toy CLIP")
        model = cls(target.config)
        model.image.load_state_dict(target.tower.state_dict())
        text = load_file(os.path.join(path, TEXT_WEIGHTS))
        with torch.no_grad():
            model.logit_scale.copy_(text.pop("logit_scale")[0])
        model.text.load_state_dict(text)
        return model.to(device or "cpu").eval()


@torch.no_grad()
def zero_shot_accuracy(model: ToyClipModel, n: int = 300, seed: int = 0) -> Dict[str, float]:
    """Zero-shot toy classification on ``n`` single-object scenes from a stream training never draws
    (``(seed, "clip-zero-shot", i)``): the shape among the three (colour given) and the colour among the six
    (shape given), each by ranking the captions "a <colour> <shape>"."""
    scenes = [toy.sample_scene(random.Random(derive_seed(seed, "clip-zero-shot", i)), tag="single_object")
              for i in range(n)]
    dev = model.logit_scale.device
    x = torch.tensor(np.stack([np.asarray(toy.render(s)) for s in scenes])).permute(0, 3, 1, 2)
    x = x.to(dev, torch.float32) / 127.5 - 1.0
    objs = [s.objects[0] for s in scenes]
    shapes, colours = list(toy.SHAPES), list(toy.COLORS)
    by_shape = model.zero_shot(x, [[toy._noun(o.color, sh) for sh in shapes] for o in objs])
    by_colour = model.zero_shot(x, [[toy._noun(c, o.shape) for c in colours] for o in objs])
    return {"shape": float(np.mean([shapes[p] == o.shape for p, o in zip(by_shape, objs)])),
            "colour": float(np.mean([colours[p] == o.color for p, o in zip(by_colour, objs)])), "n": n}
