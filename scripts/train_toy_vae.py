"""Fit the tiny ``vae`` target encoder as an autoencoder on toy images, so ``model.target=vae`` has a real
latent space (a random frozen tiny VAE decodes any latent to noise: benchmarks/toy_world.md, finding 2).

    python scripts/train_toy_vae.py --data toy_data --out outputs/toy_vae                 # defaults below
    python scripts/train_toy_vae.py --data toy_data --out /tmp/vae --steps 50 --images 256  # smoke
    python -m blip3o.train configs/toy_gen.yaml model.target=vae model.target_path=outputs/toy_vae ...

The result is written with ``TargetEncoder.save_pretrained`` so ``model.target_path=OUT`` loads it through the
normal path (``load_target_encoder``); OUT/train_info.json holds the reconstruction MSE, the time and the
config, OUT/recon.png originals (top) vs reconstructions (bottom) of held-out images.

Architecture: the ``tiny`` preset (f8: 64 px -> 8x8 latents, the same grid as the CLIP targets, so the DiT
cost per step is the same for every ablation variant) with wider blocks and 16 latent channels by default.
The preset's 4 channels at 8x8 are 256 numbers for a 64x64x3 image (48x compression); 16 channels (12x) give
the autoencoder room to keep shape edges, which the pixel scorer needs (it classifies shapes by their fill
ratio); the CLIP targets carry 32 channels on the same grid. This is an argument from capacity: after 300
steps both settings were equally blurry (held-out MSE 0.0073 with 16 channels, 0.0079 with 4); they were not
compared at convergence. --latent-channels 4 gives the preset's (SDXL-like) setting.

Blocks [8, 16, 32, 64]: the 64x64 stage dominates the cost (its decoder resnets run at full resolution), so it
stays at 8 channels; [32, 32, 64, 64] was 3x slower per step. Measured on the shared 2-core box (1 thread,
load 4-6): 0.6-1.2 s/step at batch 16, 1.9 s/step at batch 32; held-out reconstruction MSE ([0, 1] px)
0.0121 after 150 steps at batch 32 / lr 1e-3, 0.0073 (21.4 dB) after 300 steps at batch 16 / lr 2e-3 (the
defaults), still falling, with blurred edges and washed-out colours: the default 1200 steps are a guess at
convergence, not a measurement.

Loss: MSE + kl_weight * KL on a posterior sample (as ``blip3o.decoders.training.train_vae_steps``, adapted
to a target encoder: its latent scale lives in the target's config, not in the diffusers VAE's). After
fitting, ``shift_factor`` is set to the mean and ``scaling_factor`` to 1/std of the posterior means over the
held-out images, so x0 = (latent - shift) * scale has zero mean and unit std, as flow matching assumes.
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import os
import sys
import tarfile
import time
from pathlib import Path

import numpy as np


DEFAULT_OVERRIDES = {"latent_channels": 16, "block_out_channels": [8, 16, 32, 64], "norm_num_groups": 8}


def read_toy_images(shards: str, limit: int, size: int = 64) -> np.ndarray:
    """The first ``limit`` images of the toy shards (a folder of .tar) as uint8 (N, size, size, 3)."""
    from PIL import Image

    files = sorted(glob.glob(os.path.join(shards, "*.tar"))) if os.path.isdir(shards) else sorted(glob.glob(shards))
    if not files:
        raise SystemExit(f"error: no .tar shards in {shards}")
    out = []
    for f in files:
        with tarfile.open(f) as tar:
            for m in tar:
                if m.isfile() and m.name.rsplit(".", 1)[-1].lower() in ("png", "jpg", "jpeg", "webp"):
                    im = Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB")
                    if im.size != (size, size):
                        im = im.resize((size, size), Image.BICUBIC)
                    out.append(np.asarray(im, dtype=np.uint8))
                    if len(out) >= limit:
                        return np.stack(out)
    return np.stack(out)


def to_pixels(u8: np.ndarray):
    import torch

    return torch.from_numpy(u8).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)  # [-1, 1]


def signature(args) -> str:
    """What the cached VAE depends on (the ablation runner reuses an OUT with the same signature)."""
    import hashlib

    d = {"steps": args.steps, "batch": args.batch, "lr": args.lr, "kl": args.kl_weight, "images": args.images,
         "latent_channels": args.latent_channels, "overrides": DEFAULT_OVERRIDES, "seed": args.seed,
         "data": str(Path(args.data).resolve())}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="toy_data", help="toy dataset folder (with train/*.tar) or a shard folder")
    p.add_argument("--out", default="outputs/toy_vae")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--images", type=int, default=4000, help="training images read from the shards (+256 held out)")
    p.add_argument("--latent-channels", type=int, default=DEFAULT_OVERRIDES["latent_channels"])
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import torch.nn.functional as F

    import blip3o  # noqa: F401
    from blip3o.models.targets import build_target_encoder, load_target_encoder

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    shards = os.path.join(a.data, "train") if os.path.isdir(os.path.join(a.data, "train")) else a.data
    t0 = time.time()
    held = 256 if a.images > 512 else max(a.images // 4, 4)
    u8 = read_toy_images(shards, a.images + held)
    train_u8, eval_u8 = u8[:-held], u8[-held:]
    load_s = time.time() - t0

    torch.manual_seed(a.seed)
    ov = dict(DEFAULT_OVERRIDES, latent_channels=a.latent_channels)
    enc = build_target_encoder("vae", preset="tiny", **ov)
    vae = enc.vae
    vae.requires_grad_(True)
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=a.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(a.steps, 1), eta_min=a.lr * 0.1)
    g = torch.Generator().manual_seed(a.seed)
    losses = []
    t1 = time.time()
    for step in range(a.steps):
        idx = torch.randint(0, len(train_u8), (a.batch,), generator=g).numpy()
        x = to_pixels(train_u8[idx])
        post = vae.encode(x).latent_dist
        z = post.sample(g)
        recon = F.mse_loss(vae.decode(z).sample.float(), x)
        loss = recon + a.kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(recon.item())
        if (step + 1) % 100 == 0 or step + 1 == a.steps:
            print(f"step {step + 1}/{a.steps} recon mse {np.mean(losses[-100:]):.5f} "
                  f"({(time.time() - t1) / (step + 1):.3f} s/step)", flush=True)
    train_s = time.time() - t1
    vae.eval()
    vae.requires_grad_(False)

    # Latent calibration on the held-out images: zero mean, unit std (the generator's noise assumes it).
    xe = to_pixels(eval_u8)
    with torch.no_grad():
        lat = torch.cat([vae.encode(xe[i:i + 64]).latent_dist.mean for i in range(0, len(xe), 64)])
    shift, std = float(lat.mean()), float((lat - lat.mean()).std())
    enc.config = dict(enc.config, shift_factor=shift, scaling_factor=1.0 / max(std, 1e-6))
    enc._freeze()
    out = Path(a.out)
    enc.save_pretrained(str(out))

    # Reload through the normal path and measure what a generator would see.
    enc2 = load_target_encoder(str(out))
    with torch.no_grad():
        x0 = torch.cat([enc2.encode(xe[i:i + 64]) for i in range(0, len(xe), 64)])
        rec = torch.cat([enc2.decode(x0[i:i + 64]) for i in range(0, len(x0), 64)])
    mse_pm1 = float(F.mse_loss(rec, xe))  # in [-1, 1] units
    mse01 = mse_pm1 / 4.0  # in [0, 1] pixel units
    psnr = float(10 * np.log10(1.0 / max(mse01, 1e-12)))
    info = {
        "signature": signature(a), "steps": a.steps, "batch": a.batch, "lr": a.lr, "kl_weight": a.kl_weight,
        "train_images": int(len(train_u8)), "heldout_images": int(held), "overrides": ov,
        "x0_shape": [enc2.channels, *enc2.grid], "params": int(sum(p.numel() for p in vae.parameters())),
        "shift_factor": shift, "scaling_factor": 1.0 / max(std, 1e-6),
        "x0_mean": float(x0.mean()), "x0_std": float(x0.std()),
        "recon_mse_train_last100": float(np.mean(losses[-100:])) if losses else None,
        "recon_mse_heldout_pm1": mse_pm1, "recon_mse_heldout_01": mse01, "psnr_db": psnr,
        "read_s": load_s, "train_s": train_s, "s_per_step": train_s / max(a.steps, 1),
        "threads": torch.get_num_threads(),
    }
    (out / "train_info.json").write_text(json.dumps(info, indent=2))
    from blip3o.images import make_grid, to_pil

    n = min(8, len(xe))
    make_grid(to_pil(xe[:n]) + to_pil(rec[:n]), cols=n).save(out / "recon.png")
    print(f"vae: held-out recon mse {mse01:.5f} ([0,1] px; {psnr:.1f} dB), x0 {tuple(info['x0_shape'])} "
          f"std {info['x0_std']:.2f}; {a.steps} steps in {train_s:.0f}s ({info['s_per_step']:.3f} s/step); "
          f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
