"""Two measurements behind session 4 of benchmarks/toy_world.md, on a trained toy generator:

* ``step``: where one training step goes (target encode, backbone forward + backward to the queries, DiT forward +
  backward, the whole step), one thread, batch 64 of real toy images and captions.
* ``probe``: whether the query states carry the prompt: a ridge probe from the (B, Q, H) states of 3,000 training
  captions to count / first colour / first shape / one-vs-two objects, fitted on 2,000 and scored on the rest.

    OMP_NUM_THREADS=1 python benchmarks/toy_generator.py step outputs/toy/model --data toy_data
    OMP_NUM_THREADS=1 python benchmarks/toy_generator.py step outputs/toy/model --batch 32 --bf16 --compile
    OMP_NUM_THREADS=1 python benchmarks/toy_generator.py probe outputs/toy/model --data toy_data
"""
from __future__ import annotations

import argparse
import io
import os
import tarfile
import time

import numpy as np
import torch
from PIL import Image

from blip3o.data.toy import COLORS, SHAPES
from blip3o.models.blip3o import Blip3oForConditionalGeneration

NUMBERS = ["a", "two", "three", "four"]


def read_toy(data: str, limit: int, images: bool):
    caps, imgs = [], []
    for name in sorted(os.listdir(os.path.join(data, "train"))):
        with tarfile.open(os.path.join(data, "train", name)) as tar:
            for mem in tar.getmembers():
                if mem.name.endswith(".txt") and not mem.name.endswith(".long.txt"):
                    caps.append(tar.extractfile(mem).read().decode())
                elif images and mem.name.endswith(".png"):
                    imgs.append(np.array(Image.open(io.BytesIO(tar.extractfile(mem).read())).convert("RGB")))
        if len(caps) >= limit:
            break
    return caps[:limit], imgs[:limit]


def timed(fn, n=3) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def step(m, data: str, batch: int = 64, bf16: bool = False, compile: bool = False,
         compile_backbone: bool = False, regional: bool = False) -> None:
    m.train()
    caps, imgs = read_toy(data, batch, images=True)
    pix = torch.tensor(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1
    tok = m.tokenize_prompts(caps)
    with torch.no_grad():
        x0 = m.normalize_target(m.target_encoder.encode(pix).float())
    cond = m.encode_condition(tok["input_ids"], tok["attention_mask"]).detach()

    def backbone():
        m.encode_condition(tok["input_ids"], tok["attention_mask"]).sum().backward()

    def dit():
        m.objective.loss(m._dit, x0, cond, None, None)[0].backward()

    def whole():
        m(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], pixel_values=pix).loss.backward()

    print(f"batch {batch}, DiT params {sum(p.numel() for p in m.dit.parameters()):,}")
    print(f"target encode {timed(lambda: m.target_encoder.encode(pix)):.3f} s")
    print(f"backbone fwd+bwd {timed(backbone):.3f} s")
    print(f"DiT fwd+bwd {timed(dit):.3f} s")
    fp32 = timed(whole)
    print(f"whole step {fp32:.3f} s")
    if bf16:  # what train.mixed_precision=bf16 does: the trainer's autocast around the forward
        def whole_bf16():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = m(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], pixel_values=pix).loss
            loss.backward()

        t = timed(whole_bf16)
        print(f"whole step, bf16 autocast {t:.3f} s ({fp32 / t:.2f}x fp32; native bf16: "
              f"{torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()})")
    def compiled(what: str) -> None:
        t0 = time.perf_counter()
        whole()  # the first step pays the compile
        first = time.perf_counter() - t0
        t = timed(whole, n=10)
        print(f"whole step, {what} compiled {t:.3f} s ({fp32 / t:.2f}x eager); first step (compiling) {first:.1f} s, "
              f"paid back after {first / max(fp32 - t, 1e-9):.0f} steps")

    if compile:  # what train.compile=inductor does: the DiT (or, --regional, each block) compiled in place
        for block in (m.dit.layers if regional else [m.dit]):
            block.compile()
        compiled("DiT")
        if compile_backbone:  # the frozen backbone's decoder too (prompt lengths vary: dynamic shapes)
            m.adapter.decoder(m.backbone).compile(dynamic=True)
            compiled("DiT and backbone")


def labels(caption: str):
    words = caption.split()
    count = NUMBERS.index(words[0]) if words[0] in NUMBERS else -1
    colour = next((list(COLORS).index(w) for w in words if w in COLORS), -1)
    shape = next((SHAPES.index(w.rstrip("s")) for w in words if w.rstrip("s") in SHAPES), -1)
    return count, colour, shape, int(" and " in caption or " of " in caption)


@torch.no_grad()
def probe(m, data: str, n_fit: int = 2000, n_all: int = 3000, ridge: float = 10.0) -> None:
    m.eval()
    caps, _ = read_toy(data, n_all, images=False)
    y_all = torch.tensor([labels(c) for c in caps])
    states = []
    for i in range(0, len(caps), 100):
        tok = m.tokenize_prompts(caps[i:i + 100])
        states.append(m.encode_condition(tok["input_ids"], tok["attention_mask"]).flatten(1).float())
    x = torch.cat(states)
    x = torch.cat([(x - x.mean(0)) / (x.std(0) + 1e-6), torch.ones(len(x), 1)], 1)
    for k, what in enumerate(["count", "first colour", "first shape", "two objects"]):
        keep = y_all[:, k] >= 0
        xk, yk = x[keep], y_all[keep, k]
        n = int(keep[:n_fit].sum())
        onehot = torch.nn.functional.one_hot(yk).float()
        w = torch.linalg.solve(xk[:n].T @ xk[:n] + ridge * torch.eye(x.shape[1]), xk[:n].T @ onehot[:n])
        acc = ((xk[n:] @ w).argmax(1) == yk[n:]).float().mean().item()
        chance = onehot[n:].mean(0).max().item()
        print(f"{what}: held-out accuracy {acc:.3f} (chance {chance:.2f}, {onehot.shape[1]} classes)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["step", "probe"])
    p.add_argument("model", help="a toy generator directory (outputs/toy/model)")
    p.add_argument("--data", default="toy_data", help="the toy data folder (train/*.tar)")
    p.add_argument("--batch", type=int, default=64, help="step: batch size")
    p.add_argument("--bf16", action="store_true", help="step: also time the whole step under bf16 autocast")
    p.add_argument("--compile", action="store_true", help="step: also time it with the DiT compiled (torch.compile)")
    p.add_argument("--compile-backbone", action="store_true", help="step, with --compile: then the backbone too")
    p.add_argument("--regional", action="store_true",
                   help="step, with --compile: compile each DiT block (one graph, reused) instead of the whole DiT")
    a = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    m = Blip3oForConditionalGeneration.from_pretrained(a.model)
    if a.what == "step":
        step(m, a.data, a.batch, a.bf16, a.compile, a.compile_backbone, a.regional)
    else:
        probe(m, a.data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
