"""Training tasks: what the generic loop optimises.

* ``t2i``: the BLIP3-o generator (queries + DiT, optionally the backbone in the joint recipe) on
  caption/image data — the paper's training.
* ``decoder``: the CLIP->pixels diffusion decoder by reconstruction (frozen target encoder ->
  features -> decoder recovers the image).
* ``clip``: the toy world's CLIP (``clip_task.py``).

A task provides ``model``, ``build_loader``, ``to_device``, ``loss``, ``flops_per_sample``,
``sample`` and ``save_final``; the loop in ``trainer.py`` does the rest.
"""
from __future__ import annotations

import contextlib
import json
import logging
import shutil
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from blip3o.config import ExperimentConfig
from blip3o.data import build_train_dataloader
from blip3o.decoders import build_decoder, decoder_training_loss, load_decoder, trainable_parameters
from blip3o.images import feature_summary_image, make_grid, to_pil
from blip3o.models.build import build_model, load_target
from blip3o.prompts import get_template
from blip3o.train.clip_task import ClipTask  # noqa: F401  (registers "clip")
from blip3o.train.distributed import DistInfo
from blip3o.train.image_task import ImageLoaderTask
from blip3o.train.task_registry import TASKS

logger = logging.getLogger("blip3o.train")

DEFAULT_VAL_PROMPTS = ["a red circle", "two blue squares", "a green triangle to the left of a yellow circle",
                       "three purple circles"]


def _read_eval_prompts(path: Optional[str], n: int = 8) -> List[str]:
    """The first ``n`` prompts of a GenEval-format JSONL; without a file, four built-in toy prompts. A file that
    is configured but missing or empty is an error (a typo must not silently swap the validation prompts)."""
    if not path:
        return DEFAULT_VAL_PROMPTS
    if not Path(path).is_file():
        raise FileNotFoundError(f"data.eval_prompts: file not found: {path}")
    out = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            out.append(json.loads(line)["prompt"])
        if len(out) >= n:
            break
    if not out:
        raise ValueError(f"data.eval_prompts: no prompts in {path}")
    return out


def move(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move(v, device) for k, v in batch.items()}
    return batch


@TASKS.register("t2i")
class T2ITask:
    def __init__(self, cfg: ExperimentConfig, dist: DistInfo):
        self.cfg = cfg
        self.dist = dist
        self.val_prompts = _read_eval_prompts(cfg.data.eval_prompts)  # a bad path fails before the model loads
        self.model, self.tokenizer = build_model(cfg.model)
        self.target = self.model.target_encoder  # attached by build_model
        self.target.to(dist.device)
        if cfg.model.gradient_checkpointing:
            self.model.set_gradient_checkpointing(True)
        self.decoder = None
        if cfg.model.decoder_path:
            self.decoder = load_decoder(cfg.model.decoder_path)

    def build_loader(self, rank: int, world_size: int, seed: int):
        c = self.cfg
        return build_train_dataloader(
            c.data, self.tokenizer, image_transform=self.target.transform, rank=rank, world_size=world_size,
            seed=seed, batch_size=c.train.per_device_train_batch_size, num_workers=c.data.num_workers,
            template=get_template(self.model.config.chat_template),
            # slots after the prompt: the queries, or a fusion model's image block (+ [/IMG])
            num_queries=getattr(self.model, "prompt_reserve", c.model.num_queries),
            max_length=c.model.max_length, target_signature=self.target.signature())

    def to_device(self, batch, device):
        cond_images = batch.get("cond_images")
        und_images = [im for im in batch.get("und_images") or [] if im is not None]
        batch = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
        if und_images:
            # Understanding conversations (joint recipe): their images go through the backbone's own image processor
            # here, as at inference (blip3o/models/understanding.py), so the vision tower sees them; the collator
            # reserved data.und_image_tokens <|image_pad|> slots per image, which must be what the processor makes.
            if self.model.image_processor is None:
                raise ValueError("understanding data with images needs a backbone with an image processor (qwen2_5_vl)")
            vis = self.model.image_processor(images=und_images, return_tensors="pt")
            merge = getattr(self.model.image_processor, "merge_size", 2)
            made = {int(g.prod()) // (merge * merge) for g in vis["image_grid_thw"]}
            if made != {self.cfg.data.und_image_tokens}:
                raise ValueError(f"data.und_image_tokens={self.cfg.data.und_image_tokens}, but the backbone's image "
                                 f"processor makes {sorted(made)} tokens of data.und_image_size="
                                 f"{self.cfg.data.und_image_size} images; set it to that")
            batch["und_pixel_values"] = vis["pixel_values"]
            batch["und_image_grid_thw"] = vis["image_grid_thw"]
        if cond_images:
            # Editing: the source images go through the backbone's own image processor here (not in
            # the workers), so the patch layout always matches the backbone being trained.
            if self.model.image_processor is None:
                raise ValueError("editing data needs a backbone with an image processor (qwen2_5_vl)")
            vis = self.model.image_processor(images=cond_images, return_tensors="pt")
            batch["cond_pixel_values"] = vis["pixel_values"]
            batch["cond_image_grid_thw"] = vis["image_grid_thw"]
        batch = move(batch, device)
        if "target_latents" not in batch and "pixel_values" in batch:
            with torch.no_grad():
                batch["target_latents"] = self.target.encode(batch.pop("pixel_values"))
        if self.model.config.target_norm == "channel" and not getattr(self, "_stats_done", False) \
                and "target_latents" in batch:  # (a joint batch of understanding samples only has none)
            if float(self.model.target_std.sum()) == self.model.target_std.numel() and \
                    float(self.model.target_mean.abs().sum()) == 0.0:
                self.model.init_target_stats(batch["target_latents"])  # first batch of a fresh run
            self._stats_done = True
        return batch

    def loss(self, module, batch):
        out = module(**batch)
        return out.loss, out.parts or {}

    def compile_modules(self):
        """train.compile: the DiT, where a generator step spends most of its time (the backbone is frozen)."""
        dit = getattr(self.model, "dit", None)
        return [dit] if isinstance(dit, torch.nn.Module) else []

    def flops_per_sample(self) -> Dict[str, float]:
        m = self.model
        if hasattr(m, "flops_per_sample"):  # fusion generators count their own
            return m.flops_per_sample()
        dit = sum(p.numel() for p in m.dit.parameters())
        tokens = m.config.target_grid[0] * m.config.target_grid[1] // (m.dit.cfg.patch_size ** 2)
        emb = m.backbone.get_input_embeddings().weight.numel()
        bb = sum(p.numel() for p in m.adapter.decoder(m.backbone).parameters()) - emb
        seq = min(m.config.max_prompt_length, 128) + m.config.num_queries  # typical prompt length + queries
        # fwd + bwd of the DiT (6 N per token); the frozen backbone: forward (2 N per token) plus the
        # activation-gradient half of its backward (2 N per token), needed to reach the queries.
        return {"trainable": 6.0 * dit * tokens, "frozen": 4.0 * bb * seq}

    @torch.no_grad()
    def generate(self, prompts, seed: int = 0, ema=None):
        m = self.model
        was = m.training
        m.eval()
        try:
            with contextlib.nullcontext() if ema is None else ema.swapped_in(m):
                gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
                feats = m.generate_features(prompts, generator=gens)
        finally:
            m.train(was)
        return feats

    def decode(self, feats):
        if self.decoder is not None:
            tokens = feats.flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, h*w, C), row-major
            return self.decoder(tokens, output_type="pil")
        if self.target.decodes_to_pixels:
            return to_pil(self.target.decode(feats.to(self.dist.device)).clamp(-1, 1))
        return None

    def sample(self, path: Path, ema=None):
        feats = self.generate(self.val_prompts, ema=ema)
        images = self.decode(feats)
        grid = make_grid(images) if images else feature_summary_image(feats.cpu())
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        return path

    def save_final(self, out: Path, ema=None, state_dict=None):
        """``state_dict``: the full weights gathered by a sharded engine (ZeRO-3, FSDP), whose module holds
        only this rank's shards."""
        m = self.model
        if ema is not None:
            ema.copy_to(m)
        if self.cfg.model.decoder_path:
            dst = out / "diffusion-decoder"
            if Path(self.cfg.model.decoder_path).resolve() != dst.resolve():
                shutil.rmtree(dst, ignore_errors=True)
                shutil.copytree(self.cfg.model.decoder_path, dst)
            m.config.decoder_path = "diffusion-decoder"
        m.save_pretrained(out, **({"state_dict": state_dict} if state_dict is not None else {}))
        (out / "experiment.json").write_text(json.dumps(self.cfg.to_dict(), indent=2))
        logger.info("saved final model to %s", out)


class _DecoderModule(torch.nn.Module):
    """The decoder's trainable parts as one module, so DDP/DeepSpeed and the checkpoint code see
    an ordinary model; forward returns the reconstruction loss."""

    def __init__(self, pipe, null_prob: float, feature_noise: float, time_shift: float = 1.0, edge_weight: float = 0.0):
        super().__init__()
        self.pipe = pipe
        self.denoiser = pipe.denoiser
        for name in pipe.spec.trained[1:]:  # what the loss trains besides the denoiser (SANA's connector)
            setattr(self, name, getattr(pipe, name))
        self.vae = pipe.vae
        self.null_condition = pipe.null_condition
        trainable_parameters(pipe)
        self.null_prob, self.feature_noise, self.time_shift = null_prob, feature_noise, time_shift
        self.edge_weight = edge_weight

    def forward(self, images, features, generator=None):
        loss, parts = decoder_training_loss(self.pipe, images, features, generator=generator,
                                            null_prob=self.null_prob if self.training else 0.0,
                                            feature_noise=self.feature_noise if self.training else 0.0,
                                            time_shift=self.time_shift, edge_weight=self.edge_weight)
        return loss, parts


@TASKS.register("decoder")
class DecoderTask(ImageLoaderTask):
    """Reconstruction training of the CLIP->pixels decoder: image -> frozen target encoder -> pooled
    features -> the decoder learns to recover the image (docs/decisions.md, "Decoders"). The loader yields decoder
    images in [-1, 1]; the target's input is resampled from the same crop, so both see one view."""

    def __init__(self, cfg: ExperimentConfig, dist: DistInfo):
        self.cfg, self.dist = cfg, dist
        m = cfg.model
        self.target = load_target(m).to(dist.device)
        if m.decoder == "none":
            raise ValueError("model.decoder: set sdxl or sana to train a decoder")
        if m.decoder_path:
            pipe = load_decoder(m.decoder_path)
        else:
            kw = dict(feature_dim=self.target.channels, num_tokens=self.target.num_tokens)
            kw.update(m.decoder_kwargs)
            pipe = build_decoder(m.decoder, preset=m.decoder_preset, pretrained=False, **kw)
        if pipe.feature_dim != self.target.channels:
            raise ValueError(f"model.decoder_path: decoder expects {pipe.feature_dim}-d features, the {m.target} "
                             f"target gives {self.target.channels}")
        self.pipe = pipe
        self.image_size = int(pipe.default_image_size)
        self.model = _DecoderModule(pipe, m.decoder_null_prob, m.decoder_feature_noise, m.decoder_time_shift,
                                     m.decoder_edge_weight)
        self.val_images = None
        self._init_tokenizer()  # the loader builds generation prompts for every sample; the decoder ignores them

    def features_of(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] decoder images -> target tokens (B, N, C)."""
        x = (images + 1) / 2
        s = self.target.image_size
        if x.shape[-1] != s or x.shape[-2] != s:
            x = F.interpolate(x, size=(s, s), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        mean = torch.tensor(self.target.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.target.std, device=x.device).view(1, 3, 1, 1)
        x = (x - mean) / std  # the encoder's own normalisation (VAE: mean = std = 0.5, i.e. [-1, 1])
        with torch.no_grad():
            f = self.target.encode(x)
        return f.flatten(2).transpose(1, 2)

    def to_device(self, batch, device):
        images = batch["pixel_values"].to(device)
        if self.val_images is None:
            self.val_images = images[:4].clone()
        return {"images": images, "features": self.features_of(images)}

    def loss(self, module, batch):
        return module(batch["images"], batch["features"])

    def compile_modules(self):
        return [self.pipe.denoiser]

    def flops_per_sample(self) -> Dict[str, float]:
        n = sum(p.numel() for p in self.pipe.denoiser.parameters())
        lat = max(self.image_size // max(getattr(self.pipe, "vae_scale_factor", 8), 1), 1) ** 2
        return {"trainable": 6.0 * n * lat, "frozen": 0.0}

    @torch.no_grad()
    def sample(self, path: Path, ema=None):
        if self.val_images is None:
            return None
        feats = self.features_of(self.val_images)
        gens = [torch.Generator().manual_seed(i) for i in range(feats.shape[0])]
        recon = self.pipe(feats, generator=gens, output_type="pil").images
        orig = to_pil(self.val_images)
        grid = make_grid(orig + list(recon), cols=len(orig))
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        return path

    def save_final(self, out: Path, ema=None, state_dict=None):
        if state_dict is not None:
            raise ValueError("the decoder task does not support sharded engines (ZeRO-3, FSDP)")
        if ema is not None:
            ema.copy_to(self.model)
        self.pipe.save_pretrained(str(out))
        (out / "experiment.json").write_text(json.dumps(self.cfg.to_dict(), indent=2))
        logger.info("saved decoder to %s", out)



def get_task(name: str):
    """The task class for ``train.task`` (a ValueError naming the registered ones otherwise)."""
    if name not in TASKS:
        raise ValueError(f"train.task: '{name}' is not one of {TASKS.names()}")
    return TASKS.get(name)
