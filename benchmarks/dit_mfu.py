"""MFU of BLIP3-o's trainable path at the official size (random weights), and images/s of its sampling path.

    # on one GPU: the 8B head (DiT 1.365 B params, conditioning width 3584), bf16 autocast, AdamW
    python benchmarks/dit_mfu.py --preset official-8b --batch 16 --steps 20 --json benchmarks/dit_mfu_8b.json
    python benchmarks/dit_mfu.py --preset official-4b --batch 16 --steps 20
    # + the frozen backbone in the loop (a random Qwen2.5-VL-7B language model, bf16, ~15 GB)
    python benchmarks/dit_mfu.py --preset official-8b --batch 16 --steps 10 --with-backbone
    # CPU smoke (seconds)
    OMP_NUM_THREADS=1 python benchmarks/dit_mfu.py --preset tiny --steps 2

What runs. Training: x0 (B, C, 8, 8) and the conditioning hidden states (B, 64, Hc) are random tensors of the
official shapes (the frozen backbone's output fed directly, unless --with-backbone); one step is the flow
loss (blip3o.objectives.FlowMatching), backward, grad clipping and AdamW, with fp32 master weights under bf16
autocast (what the trainer does without DeepSpeed). Sampling: the same conditioning -> 30 Euler steps with
CFG 3 (cond + uncond in one batched forward per step, blip3o.sampling.euler_sample) at batch 16 and 64.

FLOPs (counted analytically per sample, matmuls only, 2 FLOPs per multiply-add):
    forward  F = 2 * (P_img * N + P_ctx * L + P_once) + 4 * n_layers * D * N * (N + L)
        N = image tokens (H/p * W/p = 64), L = conditioning tokens (64), D = DiT width;
        P_img: Linear weights applied to every image token (patch embed, self-attn q/k/v, cross-attn q and
        out, SwiGLU, final projection); P_ctx: applied to every conditioning token (caption projection,
        cross-attn k/v); P_once: once per sample (timestep/caption embedders, adaLN modulation);
        4 D N (N + L) per layer: QK^T and AV of self-attention (N x N) and cross-attention (N x L).
    train    3 F (backward = 2 forwards); activation recomputation (--grad-ckpt) is not counted (model FLOPs).
    The common 6 * params * tokens estimate is the P_img * N term alone, with all params counted per token;
    both are printed.
    backbone (--with-backbone; frozen, the queries' gradient flows through it): forward 2 P_bb S
        + 4 n_layers_bb D_bb S^2 (no causal discount), backward activation gradients only (no weight grads):
        the same again, so 2x forward. S = prompt tokens (--prompt-len) + 64 queries.
MFU = FLOPs per step / step time / peak. Peak: dense bf16 tensor-core figures by device name (H100 SXM and
H200 989, H100 NVL 835, H100 PCIe 756, A100 312, L40S 362, A10G 125, RTX 4090 165 TFLOP/s); on CPU, a
measured fp32 512x512 matmul rate (so CPU "MFU" is relative to what this box's matmul reaches).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path


# preset -> (DiT preset, DiT overrides, backbone width Hc for the conditioning, backbone for --with-backbone)
PRESETS = {
    "official-8b": ("official_8b", {}, 3584, "qwen2.5-vl-7b"),
    "official-4b": ("official", {}, 2048, "qwen2.5-vl-3b"),
    "small": ("small", {}, 256, None),
    "tiny": ("tiny", {}, 64, "tiny"),
}
# Language-model sizes of the Qwen2.5-VL backbones (text tower; the vision tower is idle for generation).
BACKBONES = {
    "qwen2.5-vl-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                          num_key_value_heads=4, vocab_size=152064),
    "qwen2.5-vl-3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                          num_key_value_heads=2, vocab_size=151936),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000),  # CPU tests of the --with-backbone path
}
GPU_PEAK_BF16 = [("H200", 989e12), ("H100 NVL", 835e12), ("H100 PCIe", 756e12), ("H100", 989e12),
                 ("A100", 312e12), ("L40S", 362e12), ("A10G", 125e12), ("4090", 165e12)]


def peak_flops(device) -> tuple:
    import torch

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for k, v in GPU_PEAK_BF16:
            if k in name:
                return v, name
        return float("nan"), name
    n = 512
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    reps, t = 20, time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t), "cpu (measured fp32 matmul)"


def dit_flops(dit, n_img: int, n_ctx: int) -> dict:
    """Forward FLOPs per sample of a NextDiT (see the module docstring), and the 6*params*tokens estimate."""
    import torch

    p_img = p_ctx = p_once = 0
    for name, mod in dit.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        w = mod.weight.numel()
        if name.startswith("caption_projection") or ".attn2.to_k" in name or ".attn2.to_v" in name:
            p_ctx += w
        elif name.startswith("time_caption_embed") or name.endswith("norm1.linear") or name == "norm_out.linear_1":
            p_once += w
        else:
            p_img += w
    c = dit.cfg
    attn = 4 * c.n_layers * c.dim * n_img * (n_img + n_ctx)
    fwd = 2 * (p_img * n_img + p_ctx * n_ctx + p_once) + attn
    params = sum(p.numel() for p in dit.parameters())
    return {"fwd": float(fwd), "train": 3.0 * fwd, "six_n_t": 6.0 * params * n_img, "params": params,
            "p_img": p_img, "p_ctx": p_ctx, "p_once": p_once, "attn_fwd": float(attn)}


def build_backbone(name: str, device, dtype):
    import torch
    from transformers import Qwen2Config, Qwen2Model

    cfg = Qwen2Config(**BACKBONES[name], max_position_embeddings=4096, rope_theta=1e6, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    with torch.device(device):
        m = Qwen2Model(cfg).to(dtype)
    m.requires_grad_(False)
    m.eval()
    return m


def timed(fn, steps: int, warmup: int, device) -> list:
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    ts = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return ts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="official-8b", choices=sorted(PRESETS))
    p.add_argument("--batch", type=int, default=16, help="training batch per step")
    p.add_argument("--steps", type=int, default=20, help="timed training steps (median reported)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 3 on GPU, 1 on CPU)")
    p.add_argument("--num-queries", type=int, default=64)
    p.add_argument("--with-backbone", action="store_true", help="random frozen Qwen2.5-VL LM in the loop")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens before the queries (--with-backbone)")
    p.add_argument("--grad-ckpt", action="store_true", help="DiT activation checkpointing (the training default)")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="autocast dtype (GPU bf16, CPU fp32)")
    p.add_argument("--sample-batches", default=None, help="comma list (default 16,64 on GPU, 2,8 on CPU)")
    p.add_argument("--sample-steps", type=int, default=30)
    p.add_argument("--sample-repeats", type=int, default=None, help="timed sampling runs (default 3 GPU, 1 CPU)")
    p.add_argument("--no-sampling", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args(argv)
    import torch

    import blip3o  # noqa: F401
    from blip3o.models.dit import build_dit
    from blip3o.objectives import FlowMatching
    from blip3o.sampling import euler_sample, zeroed_condition

    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    gpu = device.type == "cuda"
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype or ("bf16" if gpu else "fp32")]
    warmup = a.warmup if a.warmup is not None else (3 if gpu else 1)
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dit_preset, dit_ov, hc, bb_name = PRESETS[a.preset]
    torch.manual_seed(0)
    with torch.device(device):
        dit = build_dit(dit_preset, caption_dim=hc, gradient_checkpointing=a.grad_ckpt, **dit_ov)
    dit.train()
    c = dit.cfg
    n_img = (c.input_size // c.patch_size) ** 2
    L = a.num_queries
    fl = dit_flops(dit, n_img, L)
    backbone = queries = None
    bb_flops = 0.0
    if a.with_backbone:
        if bb_name is None:
            print(f"error: --with-backbone has no backbone for preset {a.preset}", file=sys.stderr)
            return 2
        backbone = build_backbone(bb_name, device, torch.bfloat16 if gpu else torch.float32)
        queries = torch.nn.Parameter(torch.randn(L, hc, device=device) * 0.02)
        s_len = a.prompt_len + L
        bcfg = BACKBONES[bb_name]
        p_bb = sum(p.numel() for p in backbone.parameters()) - backbone.embed_tokens.weight.numel()
        bb_fwd = 2 * p_bb * s_len + 4 * bcfg["num_hidden_layers"] * bcfg["hidden_size"] * s_len ** 2
        bb_flops = 2.0 * bb_fwd
    params = list(dit.parameters()) + ([queries] if queries is not None else [])
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=gpu)
    fm = FlowMatching()
    B, C, H = a.batch, c.in_channels, c.input_size
    x0 = torch.randn(B, C, H, H, device=device)
    cond_fixed = torch.randn(B, L, hc, device=device)
    prompt_ids = torch.randint(0, 1000, (B, a.prompt_len), device=device)
    gen = torch.Generator().manual_seed(0)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            if backbone is not None:
                emb = backbone.embed_tokens(prompt_ids)
                inp = torch.cat([emb, queries.to(emb.dtype).expand(B, -1, -1)], dim=1)
                cond = backbone(inputs_embeds=inp).last_hidden_state[:, -L:]
            else:
                cond = cond_fixed
            loss, _ = fm.loss(dit, x0, cond, None, generator=gen)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    if gpu:
        torch.cuda.reset_peak_memory_stats(device)
    ts = timed(step, a.steps, warmup, device)
    step_s = statistics.median(ts)
    peak, dev_name = peak_flops(device)
    flops_step = B * (fl["train"] + bb_flops)
    res = {
        "preset": a.preset, "device": dev_name, "dtype": str(dtype).replace("torch.", ""), "batch": B,
        "with_backbone": a.with_backbone, "grad_ckpt": a.grad_ckpt, "dit_params": fl["params"],
        "image_tokens": n_img, "cond_tokens": L, "steps": a.steps, "warmup": warmup,
        "step_s": step_s, "step_s_all": ts, "samples_per_s": B / step_s,
        "train_flops_per_sample_dit": fl["train"], "six_n_t_per_sample": fl["six_n_t"],
        "train_flops_per_sample_backbone": bb_flops, "flops_per_step": flops_step,
        "tflops": flops_step / step_s / 1e12, "peak_tflops": peak / 1e12,
        "mfu": flops_step / step_s / peak, "mfu_6nt": B * (fl["six_n_t"] + bb_flops) / step_s / peak,
        "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2 ** 30 if gpu else None,
        "sampling": [],
    }
    del opt
    if not a.no_sampling:
        dit.eval()
        sig = fm.sigmas(a.sample_steps)
        reps = a.sample_repeats if a.sample_repeats is not None else (3 if gpu else 1)
        batches = a.sample_batches or ("16,64" if gpu else "2,8")
        for bs in [int(x) for x in batches.split(",") if x]:
            cond = torch.randn(bs, L, hc, device=device, dtype=dtype)
            x = torch.randn(bs, C, H, H, device=device)

            def sample():
                with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    return euler_sample(zeroed_condition(dit, cond, None), x, sig, guidance_scale=3.0)

            st = statistics.median(timed(sample, reps, 1, device))
            sflops = a.sample_steps * 2 * bs * fl["fwd"]
            res["sampling"].append({"batch": bs, "steps": a.sample_steps, "cfg": 3.0, "s": st,
                                    "images_per_s": bs / st, "tflops": sflops / st / 1e12,
                                    "mfu": sflops / st / peak})
    lines = [f"`{a.preset}` on {dev_name}, {res['dtype']}, batch {B}, DiT {fl['params'] / 1e6:.1f} M params, "
             f"{n_img} image + {L} cond tokens" + (f", + frozen {bb_name}" if a.with_backbone else ""), "",
             "| what | value |", "|---|---|",
             f"| train step (median of {a.steps}) | {step_s * 1e3:.1f} ms |",
             f"| samples/s | {res['samples_per_s']:.1f} |",
             f"| train FLOPs/sample (DiT; 6·N·T) | {fl['train'] / 1e9:.2f} G ({fl['six_n_t'] / 1e9:.2f} G) |",
             f"| achieved TFLOP/s | {res['tflops']:.3g} |",
             f"| MFU (peak {peak / 1e12:.3g} TFLOP/s) | {100 * res['mfu']:.1f}% "
             f"(6·N·T: {100 * res['mfu_6nt']:.1f}%) |"]
    if res["peak_mem_gb"] is not None:
        lines.append(f"| peak memory | {res['peak_mem_gb']:.1f} GiB |")
    for s in res["sampling"]:
        lines.append(f"| sampling, batch {s['batch']}, {s['steps']} steps, CFG 3 | {s['images_per_s']:.1f} images/s "
                     f"({s['tflops']:.3g} TFLOP/s, MFU {100 * s['mfu']:.1f}%) |")
    print("\n".join(lines))
    ok = all(math.isfinite(v) for v in (res["step_s"], res["tflops"], res["mfu"]))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    print("json: " + json.dumps({k: v for k, v in res.items() if k != "step_s_all"}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
