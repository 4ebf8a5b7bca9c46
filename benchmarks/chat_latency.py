"""Latency per conversation turn type (blip3o/chat.py) on the tiny preset: text, image, edit, reason + image,
interleaved with 2 images.

    OMP_NUM_THREADS=1 python benchmarks/chat_latency.py                       # tiny preset, CPU, 1 thread
    OMP_NUM_THREADS=1 python benchmarks/chat_latency.py --repeats 5 --out benchmarks/chat_latency.md --json x.json

Every turn is timed as the second turn of a fresh conversation whose first turn drew "a red circle" (so the
history holds one generated image, which re-enters through the vision tower); median of --repeats. Text turns
generate exactly --max-new-tokens tokens (a random backbone never ends its turn early). A random backbone also
never writes ``<image>`` tags, so the interleaved turn runs the real text generation and then answers with a fixed
two-picture text; both pictures are generated for real. Figures depend on the machine's load: record ``uptime``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


TWO_PICTURES = "A barn: <image>a red barn</image> and the sky above it: <image>a blue sky</image> That is all."


def build_pipe(steps=None):
    import torch

    from blip3o.config import load_config
    from blip3o.decoders import build_decoder
    from blip3o.models.build import build_model
    from blip3o.pipeline import Blip3oPipeline

    cfg = load_config(None, ["preset=tiny"] + ([f"model.num_inference_steps={steps}"] if steps else []))
    torch.manual_seed(0)
    model, _ = build_model(cfg.model)
    model.eval()
    dec = build_decoder("sdxl", preset="tiny", feature_dim=model.config.target_channels,
                        num_tokens=model.config.target_grid[0] * model.config.target_grid[1])
    return Blip3oPipeline(model, dec, "cpu")


def make_chat(pipe, args):
    from blip3o.chat import Blip3oChat

    class TwoPictureChat(Blip3oChat):
        def _generate_text(self, ids, images, max_new_tokens, keep_image_tags=False):
            text = super()._generate_text(ids, images, max_new_tokens, keep_image_tags)
            return TWO_PICTURES if keep_image_tags else text

    return TwoPictureChat(pipe, seed=0, num_inference_steps=args.steps, decoder_num_inference_steps=args.decoder_steps,
                          max_new_tokens=args.max_new_tokens, reason_max_new_tokens=args.max_new_tokens)


TURNS = {
    "text": dict(text="what is in the picture?", mode="text"),
    "image": dict(text="a blue square", mode="image"),
    "edit": dict(text="make it green", mode="edit"),
    "reason + image": dict(text="the fruit monkeys like, in the colour of the sky", mode="image", reason=True),
    "interleaved (2 images)": dict(text="tell me about barns", interleaved=True),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=None, help="DiT steps (default: the tiny preset's)")
    p.add_argument("--decoder-steps", type=int, default=None, help="pixel decoder steps (default: its own)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="text and reasoning length")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per turn type first")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="write the Markdown table here")
    p.add_argument("--json", help="write the figures here")
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    pipe = build_pipe(a.steps)
    res = {}
    for name, kw in TURNS.items():
        times = []
        for r in range(a.warmup + a.repeats):
            chat = make_chat(pipe, a)
            chat.send("a red circle", mode="image")
            t = time.perf_counter()
            reply = chat.send(**kw)
            if r >= a.warmup:
                times.append(time.perf_counter() - t)
        res[name] = {"median_s": statistics.median(times), "min_s": min(times), "images": len(reply.images)}
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    cfg = pipe.model.config
    head = (f"tiny preset, CPU, {a.threads} thread(s), DiT steps {a.steps or cfg.num_inference_steps}, decoder steps "
            f"{a.decoder_steps or 'default'}, {a.max_new_tokens} new tokens, median of {a.repeats}; "
            f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    lines = [head, "", "| turn | median s | min s | images |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['median_s']:.3f} | {v['min_s']:.3f} | {v['images']} |" for k, v in res.items()]
    print("\n".join(lines))
    if a.out:
        Path(a.out).write_text("# Chat latency per turn type\n\n" + "\n".join(lines) + "\n")
    if a.json:
        Path(a.json).write_text(json.dumps({"settings": head, "turns": res, "loadavg": list(load)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
