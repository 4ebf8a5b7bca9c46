"""The training loop: one code path for a laptop CPU, torchrun/DDP, the DeepSpeed launcher and Slurm.

Thin by design: a *task* (``blip3o.train.tasks``) owns the model, its loss, its data and what a
final model directory contains; this loop owns optimisation, mixed precision, distribution,
checkpoints, exact resume, EMA, logging and failure handling. We drive ``deepspeed.initialize``
ourselves rather than HF ``Trainer`` because exact resumption needs the streaming loader's position,
every RNG and atomic checkpoint directories, and because accelerate+DeepSpeed mis-reads the world
size on CPU (docs/decisions.md, "Environment"), which would leave the data unsharded.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Dict

import torch
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm
from transformers import get_scheduler

from blip3o.config import ExperimentConfig
from blip3o.train import checkpoint as ckpt
from blip3o.train import fsdp
from blip3o.train.distributed import (DistInfo, all_reduce_max, all_reduce_mean, barrier, broadcast_buffers,
                                      init_distributed)
from blip3o.train.ema import EMA

logger = logging.getLogger("blip3o.train")


class NonFiniteLossError(RuntimeError):
    pass


def build_scheduler(optimizer, cfg, total_steps: int):
    warmup = int(math.ceil(cfg.warmup_ratio * total_steps))
    kw = {}
    name = cfg.lr_scheduler_type
    if name == "cosine_with_min_lr":
        kw["scheduler_specific_kwargs"] = {"min_lr": cfg.min_lr}
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps, **kw)


def param_groups(named_params, weight_decay: float):
    """No decay on biases, norms, gates and the query embeddings (LLaVA-style groups)."""
    decay, no_decay = [], []
    for n, p in named_params:
        (no_decay if p.ndim < 2 or "norm" in n or n.endswith("latent_queries") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def device_peak_flops(device: torch.device) -> float:
    """Peak dense FLOP/s for MFU: a table for known GPUs (bf16), a measured fp32 matmul on CPU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        table = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}
        for k, v in table.items():
            if k in name:
                return v
        return 312e12
    n = 512
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    reps = 8
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


class Trainer:
    def __init__(self, cfg: ExperimentConfig, task_factory):
        self.cfg = cfg
        t = cfg.train
        self.ds_config = self._load_ds_config(t.deepspeed) if t.deepspeed else None
        self.zero3 = (self.ds_config or {}).get("zero_optimization", {}).get("stage", 0) == 3
        self.fsdp = bool(t.fsdp)
        self._check_sharded_engine()
        self.dist: DistInfo = init_distributed(t.device, need_group=self.ds_config is not None)
        self.out = Path(t.output_dir)
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        barrier()
        torch.manual_seed(t.seed)  # same init of new modules on every rank
        # Rank 0 builds first: building may materialise a tiny preset into the shared cache, and transformers'
        # save_pretrained writes no config/weights on rank != 0 once a process group exists, so a rank != 0
        # that won the cache race would leave a "complete" directory without model files.
        if not self.dist.is_main:
            barrier()
        self.task = task_factory(cfg, self.dist)
        if self.dist.is_main:
            barrier()
        self.model = self.task.model.to(self.dist.device)
        self.named_trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if not self.named_trainable:
            raise RuntimeError("nothing to train: no parameter requires grad")
        self.step = 0
        self.train_seconds = 0.0  # time spent in training steps, carried across resumes (train.max_minutes)
        self.skipped_nonfinite = 0
        self.consecutive_nonfinite = 0
        self._stop_signal = None
        # A launcher running stages side by side on one CPU thread each widens the one left running by
        # writing a thread count to this file (scripts/toy_world.py). A file, not a signal: a signal sent
        # before the handler is installed would kill a stage that is still starting up.
        self._threads_file = os.environ.get("BLIP3O_THREADS_FILE")
        if t.compile != "no":
            self._compile(t.compile)
        self.ema = EMA(self.named_trainable, t.ema_decay, t.ema_warmup) if t.ema_decay > 0 else None
        self.flops = self.task.flops_per_sample()  # before ZeRO-3 empties the parameters it counts
        self._setup_optimization()
        self.loader = self.task.build_loader(self.dist.rank, self.dist.world_size, t.seed)
        self.metrics_path = self.out / "metrics.jsonl"
        self.wandb = None
        self.peak_flops = device_peak_flops(self.dist.device)

    # -- setup ------------------------------------------------------------------------------------
    def _check_sharded_engine(self):
        """ZeRO-3 and FSDP keep no full copy of the weights on any rank, so what needs one is refused here
        rather than failing (or hanging in a collective) mid-run."""
        t = self.cfg.train
        if self.fsdp and self.ds_config is not None:
            raise ValueError("train.fsdp and train.deepspeed select two engines: set only one")
        if not (self.zero3 or self.fsdp):
            return
        engine = "FSDP" if self.fsdp else "DeepSpeed ZeRO-3"
        if t.ema_decay > 0:
            raise ValueError(f"train.ema_decay > 0 is not supported with {engine} (the EMA would need the full "
                             "weights on every rank); use ZeRO-1/2 or DDP for EMA runs")
        if t.sample_steps:
            raise ValueError(f"train.sample_steps is not supported with {engine} (sampling on rank 0 alone would "
                             "wait forever for the other ranks' shards); set it to 0")
        if t.task != "t2i":
            raise ValueError(f"train.task={t.task} supports DDP and DeepSpeed ZeRO-1/2, not {engine}")

    def _compile(self, backend: str):
        """train.compile: the task's hot module compiled in place (nn.Module.compile), so parameter names, the
        optimizer, the EMA and the checkpoints stay those of the eager module."""
        if self.ds_config is not None or self.fsdp:
            raise ValueError("train.compile: supported for single-process and DDP runs, not with DeepSpeed or FSDP")
        modules = getattr(self.task, "compile_modules", lambda: [])()
        if not modules:
            raise ValueError(f"train.compile: train.task={self.cfg.train.task} has no module to compile")
        for m in modules:
            m.compile(backend=backend)
        logger.info("train.compile=%s: %s compiled (the first step pays the compile)", backend,
                    ", ".join(type(m).__name__ for m in modules))

    def _load_ds_config(self, path: str) -> Dict[str, Any]:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"train.deepspeed: config file not found: {path}")
        d = json.loads(p.read_text())
        t = self.cfg.train
        world = int(os.environ.get("WORLD_SIZE", "1"))
        fill = {"train_micro_batch_size_per_gpu": t.per_device_train_batch_size,
                "gradient_accumulation_steps": t.gradient_accumulation_steps,
                "gradient_clipping": t.max_grad_norm,
                "train_batch_size": t.per_device_train_batch_size * t.gradient_accumulation_steps * world}
        for k, v in fill.items():
            if d.get(k, "auto") == "auto":
                d[k] = v
        for prec in ("bf16", "fp16"):
            if prec in d and d[prec].get("enabled") == "auto":
                d[prec]["enabled"] = t.mixed_precision == prec
        if "optimizer" in d:
            for k, v in d["optimizer"].get("params", {}).items():
                if v == "auto":
                    d["optimizer"]["params"][k] = {"lr": t.learning_rate, "weight_decay": t.weight_decay,
                                                   "betas": [t.adam_beta1, t.adam_beta2], "eps": 1e-8}[k]
        d.setdefault("steps_per_print", 10 ** 9)
        return d

    def _setup_optimization(self):
        t = self.cfg.train
        self.engine = None
        if self.fsdp:
            units = fsdp.shard(self.model, t.mixed_precision)
            logger.info("FSDP: %d block units + the root", units)
            # fully_shard replaced the parameters by sharded (DTensor) ones: the optimizer must see those
            self.named_trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        groups = param_groups(self.named_trainable, t.weight_decay)
        if self.ds_config is not None:
            import deepspeed  # optional: only DeepSpeed runs need it installed

            optimizer = None
            if "optimizer" not in self.ds_config:
                optimizer = torch.optim.AdamW(groups, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2))
            self.engine, self.optimizer, _, _ = deepspeed.initialize(
                model=self.model, model_parameters=groups if optimizer is None else None,
                optimizer=optimizer, config=self.ds_config)
            # ZeRO wraps the torch optimizer (no .defaults, which cosine_with_min_lr reads); schedule the
            # wrapped one: its param_groups are the ones the wrapper steps with.
            self.scheduler = build_scheduler(getattr(self.optimizer, "optimizer", self.optimizer), t, t.max_steps)
            self.forward_module = self.engine
        else:
            self.optimizer = torch.optim.AdamW(groups, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2))
            self.scheduler = build_scheduler(self.optimizer, t, t.max_steps)
            self.forward_module = self.model  # FSDP2 hooks into the module itself
            if self.dist.distributed and not self.fsdp:
                ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
                self.forward_module = DDP(self.model, device_ids=ids)

    def _autocast(self):
        mp = self.cfg.train.mixed_precision
        if self.engine is not None or mp == "no":
            return torch.autocast(self.dist.device.type, enabled=False)
        return torch.autocast(self.dist.device.type, dtype=torch.bfloat16 if mp == "bf16" else torch.float16)

    # -- checkpoints --------------------------------------------------------------------------------
    def _persistent_buffers(self):
        keys = set(self.model.state_dict())  # persistent buffers only (e.g. target statistics)
        return [(n, b) for n, b in self.model.named_buffers() if n in keys]

    def _trainable_state(self, full=None) -> Dict[str, torch.Tensor]:
        """Trainable parameters + buffers, from the live module or (ZeRO-3) from a gathered state dict."""
        src = dict(self.named_trainable) if full is None else full
        sd = {n: src[n].detach().cpu().contiguous() for n, _ in self.named_trainable}
        for n, b in self._persistent_buffers():
            sd[n] = (b if full is None else full[n]).detach().cpu().contiguous()
        return sd

    def _gather_full(self):
        """Every rank, collectively: the full weights on rank 0 (CPU) under ZeRO-3/FSDP, where no module holds
        them; None otherwise (the module itself is complete)."""
        if self.zero3:
            # layer by layer onto rank 0's CPU, in the engine's 16-bit (or fp32) dtype
            return self.engine._zero3_consolidated_16bit_state_dict() or {}
        if self.fsdp:
            return fsdp.full_state_dict(self.model)
        return None

    def save_checkpoint(self) -> Path:
        t = self.cfg.train
        tmp = ckpt.tmp_dir(self.out, self.step)
        if self.dist.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        barrier()
        if self.engine is not None:
            # ZeRO partitions optimizer state across ranks: every rank writes its own shard.
            self.engine.save_checkpoint(str(tmp / "deepspeed"), tag="state")
        if self.fsdp:  # sharded weights + optimizer state, every rank its own part
            fsdp.save_sharded(self.model, self.optimizer, tmp / "fsdp")
        full = self._gather_full() if self.zero3 else None  # ZeRO-3: the full trainable weights, too
        if self.dist.is_main:
            if not self.fsdp:
                save_file(self._trainable_state(full), str(tmp / "trainable.safetensors"))
            if self.ema is not None:
                save_file({k: v.contiguous() for k, v in self.ema.shadow.items()}, str(tmp / "ema.safetensors"))
            if self.engine is None and not self.fsdp:
                torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            ckpt.write_json(tmp / "trainer_state.json", {
                "step": self.step, "skipped_nonfinite": self.skipped_nonfinite, "world_size": self.dist.world_size,
                "train_seconds": round(self.train_seconds, 3),
                "config": self.cfg.to_dict()})
        torch.save({"rng": ckpt.rng_state(), "data": self.loader.state_dict()}, tmp / f"rank{self.dist.rank}.pt")
        barrier()
        final = None
        if self.dist.is_main:
            final = ckpt.finalize(self.out, self.step)
            ckpt.rotate(self.out, t.save_total_limit)
            logger.info("saved checkpoint %s", final)
        barrier()
        return final or self.out / f"checkpoint-{self.step}"

    def load_checkpoint(self, path: Path) -> None:
        state = json.loads((path / "trainer_state.json").read_text())
        if state["world_size"] != self.dist.world_size:
            raise RuntimeError(f"checkpoint {path} was written by {state['world_size']} processes, this run has "
                               f"{self.dist.world_size}: the data position cannot be resumed exactly")
        if self.fsdp:
            if not (path / "fsdp").is_dir():
                raise RuntimeError(f"checkpoint {path} was not written with train.fsdp=true (no fsdp/ folder)")
            fsdp.load_sharded(self.model, self.optimizer, path / "fsdp")
        else:
            sd = load_file(str(path / "trainable.safetensors"))
            names = {n for n, _ in self.named_trainable}
            if names - set(sd):
                raise RuntimeError(f"checkpoint {path} lacks trainable tensors: {sorted(names - set(sd))[:5]}")
            if self.zero3:  # partitioned parameters come from the engine's own files; buffers from here
                sd = {n: sd[n] for n, _ in self._persistent_buffers() if n in sd}
            self.model.load_state_dict(sd, strict=False)
        if self.engine is not None:
            self.engine.load_checkpoint(str(path / "deepspeed"), tag="state", load_module_strict=False)
        elif not self.fsdp:
            self.optimizer.load_state_dict(ckpt.load_state(path / "optimizer.pt"))
        self.scheduler.load_state_dict(ckpt.load_state(path / "scheduler.pt"))
        if self.ema is not None and (path / "ema.safetensors").is_file():
            self.ema.shadow = {k: v.float() for k, v in load_file(str(path / "ema.safetensors")).items()}
        rank_state = ckpt.load_state(path / f"rank{self.dist.rank}.pt")
        ckpt.set_rng_state(rank_state["rng"])
        self.loader.load_state_dict(rank_state["data"])
        self.step = state["step"]
        self.skipped_nonfinite = state.get("skipped_nonfinite", 0)
        self.train_seconds = float(state.get("train_seconds", 0.0))
        logger.info("resumed from %s at step %d", path, self.step)

    # -- logging ------------------------------------------------------------------------------------
    def _log(self, rec: Dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.wandb is not None:
            self.wandb.log(rec, step=rec["step"])

    def _init_wandb(self):
        if self.cfg.train.report_to != "wandb" or not self.dist.is_main:
            return
        import wandb  # optional: only runs that report to wandb need it

        self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "blip3o"), dir=str(self.out),
                                config=self.cfg.to_dict(), mode=os.environ.get("WANDB_MODE", "offline"))

    def _on_signal(self, signum, frame):
        self._stop_signal = signum

    def _take_threads(self) -> None:
        try:
            n = int(Path(self._threads_file).read_text().strip())
        except (OSError, ValueError):
            return  # not written (yet), or half-written: look again later
        if n > torch.get_num_threads():
            logger.info("%s: %d -> %d threads at step %d", self._threads_file, torch.get_num_threads(), n, self.step)
            torch.set_num_threads(n)

    # -- the loop -------------------------------------------------------------------------------------
    def train(self) -> Dict[str, Any]:
        t = self.cfg.train
        if self.dist.is_main:
            for p in ckpt.clean_incomplete(self.out):
                logger.warning("removed incomplete checkpoint %s (left by a killed save)", p)
        barrier()
        resume = ckpt.resolve_resume(self.out, t.resume_from_checkpoint)
        if resume is not None:
            self.load_checkpoint(resume)
        elif t.resume_from_checkpoint == "latest":
            logger.info("resume_from_checkpoint=latest: no checkpoint in %s, starting fresh", self.out)
        signal.signal(signal.SIGTERM, self._on_signal)  # Slurm preemption: checkpoint, then exit
        self._init_wandb()
        flops = self.flops
        bsz = t.per_device_train_batch_size
        bar = tqdm(total=t.max_steps, initial=self.step, disable=not self.dist.is_main, desc="train",
                   dynamic_ncols=True, mininterval=1.0)
        try:
            return self._loop(bar, flops, bsz)
        finally:
            bar.close()

    def _cool_down(self, budget_s: float) -> None:
        """train.time_cooldown: scales the scheduler's LR for the next step by the share of the cooldown window
        (the last time_cooldown * budget seconds) still left; the scheduler resets the LR every step, so the
        factor never compounds, and a resumed run continues it from its carried train_seconds."""
        frac = self.cfg.train.time_cooldown
        self._lr_factor = 1.0
        if not (frac and budget_s):
            return
        self._lr_factor = min(1.0, max(0.0, (budget_s - self.train_seconds) / (frac * budget_s)))
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr * self._lr_factor

    def _loop(self, bar, flops, bsz) -> Dict[str, Any]:
        t = self.cfg.train
        it = iter(self.loader)
        # DDP broadcasts rank 0's buffers before every forward itself; DeepSpeed and FSDP do not
        synced_buffers = self.engine is None and not self.fsdp
        window_t, window_samples = time.perf_counter(), 0
        last = {}
        self.model.train()
        budget_s = 60.0 * t.max_minutes
        self._cool_down(budget_s)
        if budget_s and self.train_seconds >= budget_s:  # resumed a run whose time budget is already spent
            logger.info("train.max_minutes=%g already spent at step %d: finishing", t.max_minutes, self.step)
        while self.step < t.max_steps and not (budget_s and self.train_seconds >= budget_s):
            if self._threads_file and self.step % 10 == 0:
                self._take_threads()
            step_start = time.perf_counter()
            loss_sum, parts_sum, finite = 0.0, {}, True
            accum = t.gradient_accumulation_steps
            for _ in range(accum):
                raw = next(it)
                if t.log_sample_keys and "keys" in raw:
                    with open(self.out / f"keys-rank{self.dist.rank}.jsonl", "a") as f:
                        f.write(json.dumps({"step": self.step + 1, "keys": list(raw["keys"])}) + "\n")
                batch = self.task.to_device(raw, self.dist.device)
                if not synced_buffers:  # DeepSpeed/FSDP: the first batch may set buffers from rank-local data
                    broadcast_buffers(self.model)  # (target_norm=channel statistics): keep rank 0's, as DDP does
                    synced_buffers = True
                with self._autocast():
                    loss, parts = self.task.loss(self.forward_module, batch)
                # Every rank must agree to skip, or collective ops would deadlock.
                if all_reduce_max(0.0 if torch.isfinite(loss).item() else 1.0):
                    finite = False
                    break
                if self.engine is not None:
                    self.engine.backward(loss)
                    self.engine.step()  # DeepSpeed applies the update itself at the accumulation boundary
                else:
                    (loss / accum).backward()
                loss_sum += loss.item() / accum
                for k, v in parts.items():
                    parts_sum[k] = parts_sum.get(k, 0.0) + float(v) / accum
                window_samples += bsz * self.dist.world_size
            if not finite:
                self.skipped_nonfinite += 1
                self.consecutive_nonfinite += 1
                self.optimizer.zero_grad(set_to_none=True)
                if self.engine is not None:
                    self.engine.zero_grad()
                logger.warning("non-finite loss at step %d: step skipped (%d in a row)", self.step + 1,
                               self.consecutive_nonfinite)
                if self.consecutive_nonfinite >= t.max_nonfinite_steps:
                    raise NonFiniteLossError(
                        f"{self.consecutive_nonfinite} consecutive non-finite losses at step {self.step + 1}; "
                        f"stopping. The last good checkpoint in {self.out} is intact (lower the learning rate?)")
                continue
            self.consecutive_nonfinite = 0
            if self.engine is not None:
                grad_norm = self.engine.get_global_grad_norm()
                grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
            else:
                norm = torch.nn.utils.clip_grad_norm_([p for _, p in self.named_trainable], t.max_grad_norm)
                if self.fsdp:
                    grad_norm = fsdp.full_norm(norm)
                else:
                    grad_norm = float(norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update(self.named_trainable, self.step)
            self.step += 1
            bar.update(1)
            step_time = time.perf_counter() - step_start
            self.train_seconds += step_time
            self._cool_down(budget_s)
            if self.step % t.logging_steps == 0 or self.step == t.max_steps:
                elapsed = time.perf_counter() - window_t
                sps = window_samples / max(elapsed, 1e-9)
                skipped = self.loader.stats() if hasattr(self.loader, "stats") else {}
                rec = {"step": self.step, "loss": all_reduce_mean(loss_sum),
                       "lr": self.scheduler.get_last_lr()[0] * self._lr_factor, "grad_norm": grad_norm, "samples_per_s": sps,
                       "step_time_s": step_time, "skipped_samples": int(sum(skipped.values())),
                       "skipped_by_reason": skipped, "nonfinite_skipped": self.skipped_nonfinite,
                       "tflops_trainable": flops["trainable"] * sps / 1e12,
                       "tflops_frozen": flops["frozen"] * sps / 1e12,
                       "mfu": (flops["trainable"] + flops["frozen"]) * sps / (self.peak_flops * self.dist.world_size)}
                rec.update({k: all_reduce_mean(v) for k, v in parts_sum.items()})
                self._log(rec)
                last = rec
                bar.set_postfix(loss=f"{rec['loss']:.4f}", sps=f"{sps:.1f}", skipped=rec["skipped_samples"])
                window_t, window_samples = time.perf_counter(), 0
            if t.sample_steps and self.step % t.sample_steps == 0 and self.dist.is_main:
                self.task.sample(self.out / "samples" / f"step-{self.step:07d}.png", self.ema)
            # One collective for both reasons to stop (signal: 1, time budget spent: 2), so every rank stops at
            # the same step (or the next collective would hang) without a second host sync per step. A max
            # of 1 (signal on one rank) and 2 (time on another) is 2: the run finishes and saves, losing nothing.
            flags = int(all_reduce_max(float((self._stop_signal is not None) | 2 * bool(
                budget_s and self.train_seconds >= budget_s))))
            stop, out_of_time = bool(flags & 1), bool(flags & 2)
            if (t.save_steps and self.step % t.save_steps == 0) or stop or out_of_time:
                self.save_checkpoint()
            if out_of_time:
                logger.info("train.max_minutes=%g reached at step %d: finishing", t.max_minutes, self.step)
                break
            if stop:
                logger.warning("received signal %s: checkpoint saved at step %d, exiting", self._stop_signal, self.step)
                return {"stopped_by_signal": True, "step": self.step}
        if self.dist.is_main and hasattr(self.loader, "summary"):
            logger.info("data: %s", self.loader.summary())
        full = self._gather_full()  # collective under ZeRO-3/FSDP
        if self.dist.is_main:
            self.task.save_final(self.out, self.ema, state_dict=full)
        barrier()
        if self.wandb is not None:
            self.wandb.finish()
        return {"step": self.step, "last": last}
