"""Sampling speed: prompt -> embeddings with batched CFG (cond + uncond in one forward per step) vs a
two-pass batch-1 loop like the original's, and the decoder stage; scaling with batch size and steps.

    OMP_NUM_THREADS=2 python benchmarks/sampling.py [--preset tiny|small] [--out benchmarks/sampling.md]

Times are per image, median of --repeats runs, on whatever device is available (CPU here).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def build(preset: str, tmp: str):
    import torch

    from blip3o.config import load_config
    from blip3o.decoders import build_decoder
    from blip3o.models.build import build_model

    ov = ["preset=tiny"] + (["model.dit_preset=small"] if preset == "small" else [])
    cfg = load_config(None, ov)
    torch.manual_seed(0)
    model, _ = build_model(cfg.model)
    model.eval()
    dec = build_decoder("sdxl", preset="tiny", feature_dim=model.config.target_channels,
                        num_tokens=model.config.target_grid[0] * model.config.target_grid[1])
    return model, dec


def timeit(fn, repeats):
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def two_pass_batch1(model, prompts, steps, guidance):
    """The reference's loop: one prompt at a time, and (as a non-batched CFG) two DiT passes per step."""
    import torch

    from blip3o.objectives import FlowMatching

    outs = []
    for p in prompts:
        enc = model.tokenize_prompts([p])
        cond = model.encode_condition(enc["input_ids"], enc["attention_mask"])
        x = torch.randn(1, model.config.target_channels, *model.config.target_grid)
        sig = FlowMatching().sigmas(steps)
        for i in range(steps):
            t = torch.full((1,), float(sig[i]) * 1000)
            vc = model.dit(x, t, cond)
            vu = model.dit(x, t, torch.zeros_like(cond))
            x = x + (sig[i + 1] - sig[i]) * (vu + guidance * (vc - vu))
        outs.append(x)
    return torch.cat(outs)


def main(argv=None):
    import torch

    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    with tempfile.TemporaryDirectory() as tmp:
        model, dec = build(a.preset, tmp)
    prompts = ["a red circle", "two blue squares", "a green triangle to the left of a yellow circle",
               "three purple circles"] * 4
    rows = []
    with torch.no_grad():
        for bs in (1, 4, 16):
            ps = prompts[:bs]
            gens = lambda: [torch.Generator().manual_seed(i) for i in range(bs)]  # noqa: E731
            t_b = timeit(lambda: model.generate_features(ps, generator=gens(), num_inference_steps=30), a.repeats)
            t_o = timeit(lambda: two_pass_batch1(model, ps, 30, 3.0), a.repeats)
            feats = model.generate_features(ps, num_inference_steps=30)
            tokens = feats.flatten(2).transpose(1, 2)
            t_d = timeit(lambda: dec(tokens, generator=gens(), output_type="pt"), a.repeats)
            rows.append((bs, 30, t_b / bs * 1e3, t_o / bs * 1e3, t_d / bs * 1e3))
        for steps in (10, 50):
            ps = prompts[:16]
            t_b = timeit(lambda: model.generate_features(ps, num_inference_steps=steps), a.repeats)
            rows.append((16, steps, t_b / 16 * 1e3, float("nan"), float("nan")))
    lines = [f"preset `{a.preset}`, {torch.get_num_threads()} threads, device cpu, DiT steps as given, CFG 3.0, "
             f"decoder: tiny sdxl at its default steps", "",
             "| batch | DiT steps | ours: batched CFG, ms/image | original-style batch-1 two-pass, ms/image | speed-up | decoder, ms/image |",
             "|---|---|---|---|---|---|"]
    for bs, st, tb, to, td in rows:
        sp = f"{to / tb:.1f}x" if to == to else "-"
        lines.append(f"| {bs} | {st} | {tb:.1f} | {'-' if to != to else f'{to:.1f}'} | {sp} | "
                     f"{'-' if td != td else f'{td:.1f}'} |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
