"""BLIP3-o inference from the command line.

    python inference.py CHECKPOINT_DIR                                  # the reference demo: 4 images of
                                                                        # "A photo of cute cat", seed 42 -> grid
    python inference.py CKPT --prompt "a red circle" --prompt "two blue squares" --num-images 4 --out grid.png
    python inference.py CKPT --prompts-file prompts.txt --out-dir samples/ --seed 0 --steps 30 --guidance 3.0
    python inference.py CKPT --image photo.jpg --question "What is in the image?"     # understanding
    python inference.py CKPT --image photo.jpg --edit --prompt "make it blue"           # editing
    python inference.py CKPT --prompt "..." --embeddings-only --out feats.pt            # CLIP features only
    python inference.py CKPT --prompt "the fruit monkeys like" --reason --out x.png     # + x.reasoning.txt
    python inference.py CKPT --image photo.jpg --classify "cat,dog,bird"                # zero-shot ranking
    python inference.py CKPT --prompt "how are barns built?" --interleaved --out answer.md   # text + images
    python inference.py CKPT --chat --out-dir chat_out/                                 # interactive chat
    python inference.py CKPT --chat-script turns.jsonl --out-dir DIR    # DIR/transcript.jsonl + images

Chat turns, scripts and transcripts: see blip3o/chat.py and blip3o/chat_io.py.

A checkpoint without a pixel decoder still works: the generated features are saved (``.pt``) and the
command says so. Nothing is downloaded: CHECKPOINT_DIR must be a local directory.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a model directory (ours, or an official BLIP3o-Model-4B/8B layout)")
    p.add_argument("--prompt", action="append", default=None, help="text prompt (repeatable); with --edit, the instruction")
    p.add_argument("--prompts-file", help="a .txt (one prompt per line) or .jsonl (field 'prompt') file")
    p.add_argument("--image", help="input image: understanding (with --question) or editing (with --edit)")
    p.add_argument("--question", help="question about --image (image -> text)")
    p.add_argument("--edit", action="store_true", help="edit --image following --prompt")
    p.add_argument("--num-images", type=int, default=None, help="images per prompt (default 4 for the demo, else 1)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--guidance", type=float, default=None, help="CFG scale of the DiT (default: checkpoint's, 3.0)")
    p.add_argument("--decoder-guidance", type=float, default=None, help="CFG scale of the pixel decoder")
    p.add_argument("--steps", type=int, default=None, help="DiT sampling steps (default 30)")
    p.add_argument("--decoder-steps", type=int, default=None, help="pixel decoder steps")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--out", default="blip3o_output.png", help="PNG grid (or .pt with --embeddings-only)")
    p.add_argument("--out-dir", default=None, help="also write every image as OUT_DIR/{prompt:03d}_{k:02d}.png")
    p.add_argument("--embeddings-only", action="store_true", help="save generated features, skip the decoder")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="default: float32")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--cpu-offload", action="store_true", help="keep only the running stage on the GPU")
    p.add_argument("--max-new-tokens", type=int, default=128)
    g = p.add_argument_group("conversation, reasoning, classification")
    g.add_argument("--chat", action="store_true", help="interactive multi-turn chat on this terminal (images to --out-dir)")
    g.add_argument("--chat-script", help="JSONL of user turns {text, image, mode}; needs --out-dir")
    g.add_argument("--reason", action="store_true", help="the backbone describes what to draw before the queries run")
    g.add_argument("--interleaved", action="store_true", help="answer --prompt with text and <image> pictures (Markdown)")
    g.add_argument("--classify", help='comma-separated labels to rank for --image, e.g. "cat,dog,bird"')
    g.add_argument("--max-images", type=int, default=4, help="chat history budget: images kept (oldest dropped first)")
    g.add_argument("--max-history-tokens", type=int, default=4096, help="chat history budget: prompt tokens")
    g.add_argument("--no-truncate", action="store_true", help="over the history budget: error instead of dropping")
    return p.parse_args(argv)


def run_conversation(args, pipe, prompts, image) -> int:
    """--chat, --chat-script, --interleaved and --classify (errors: ChatError, reported by main in one line)."""
    from blip3o import chat_io
    from blip3o.chat import classify

    if args.classify is not None:
        labels = [l.strip() for l in args.classify.split(",") if l.strip()]
        for label, score in classify(pipe, image, labels):
            print(f"{label}\t{score:.4f}")
        return 0
    chat = pipe.chat(max_images=args.max_images, max_tokens=args.max_history_tokens, truncate=not args.no_truncate,
                     seed=args.seed, guidance_scale=args.guidance, num_inference_steps=args.steps,
                     decoder_guidance_scale=args.decoder_guidance, decoder_num_inference_steps=args.decoder_steps,
                     max_new_tokens=args.max_new_tokens)
    if args.chat_script:
        n = chat_io.run_chat_script(chat, chat_io.read_chat_script(args.chat_script), args.out_dir)
        print(f"wrote {n} model turns to {Path(args.out_dir) / 'transcript.jsonl'}")
        return 0
    if args.chat:
        return chat_io.interactive(chat, args.out_dir or "chat_out")
    md = Path(args.out)
    md = md if md.suffix in (".md", ".markdown") else md.with_suffix(".md")
    sections = [(p, chat.send(p, image=image if i == 0 else None, interleaved=True)) for i, p in enumerate(prompts)]
    chat_io.write_markdown(sections, md)
    print(f"wrote {md} with {sum(len(r.images) for _, r in sections)} images beside it")
    return 0


def read_prompts(args) -> list:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        f = Path(args.prompts_file)
        if not f.is_file():
            raise ValueError(f"prompts file not found: {f}")
        for line in f.read_text().splitlines():
            if not line.strip():
                continue
            prompts.append(json.loads(line)["prompt"] if f.suffix == ".jsonl" else line.strip())
    for p in prompts:
        if not p.strip():
            raise ValueError("empty prompt")
    return prompts


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ckpt = Path(args.checkpoint)
    if not ckpt.is_dir():
        print(f"error: checkpoint directory not found: {ckpt}", file=sys.stderr)
        return 2
    try:
        prompts = read_prompts(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    image = None
    if args.image:
        from PIL import Image, UnidentifiedImageError

        try:
            image = Image.open(args.image)
            image.load()
        except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
            print(f"error: cannot read image {args.image}: {e.__class__.__name__}", file=sys.stderr)
            return 2
    if args.classify is not None and image is None:
        print("error: --classify needs --image", file=sys.stderr)
        return 2
    if args.chat_script and not args.out_dir:
        print("error: --chat-script needs --out-dir (where the transcript and images go)", file=sys.stderr)
        return 2
    if args.interleaved and not prompts:
        print("error: --interleaved needs --prompt", file=sys.stderr)
        return 2
    if args.reason and (args.edit or args.question or args.embeddings_only):
        print("error: --reason applies to text -> image (drop --edit / --question / --embeddings-only)", file=sys.stderr)
        return 2
    conversation = bool(args.chat or args.chat_script or args.interleaved or args.classify is not None)
    if args.question and image is None:
        print("error: --question needs --image", file=sys.stderr)
        return 2
    if args.edit and (image is None or not prompts):
        print("error: --edit needs --image and --prompt (the instruction)", file=sys.stderr)
        return 2
    demo = not prompts and image is None and not conversation
    if demo:
        prompts = ["A photo of cute cat"]
    n = args.num_images if args.num_images is not None else (4 if demo else 1)
    for flag, value in (("--num-images", n), ("--steps", args.steps), ("--decoder-steps", args.decoder_steps),
                        ("--max-new-tokens", args.max_new_tokens)):
        if value is not None and value < 1:
            print(f"error: {flag} must be >= 1, got {value}", file=sys.stderr)
            return 2
    if args.embeddings_only and (args.height or args.width):
        print("error: --height/--width size the pixel decoder's images; --embeddings-only skips it", file=sys.stderr)
        return 2

    # blip3o and torch are imported only here, after the arguments are checked: `--help` and a bad flag answer
    # in a fraction of a second (the same holds for the blip3o imports in the functions above).
    import blip3o  # noqa: F401
    import torch
    from tqdm.auto import tqdm

    from blip3o.pipeline import Blip3oPipeline
    from blip3o.images import make_grid

    try:
        pipe = Blip3oPipeline.from_pretrained(ckpt, device=args.device, dtype=args.dtype,
                                              load_decoder=not (args.embeddings_only or args.classify is not None))
    except (FileNotFoundError, OSError, ValueError) as e:
        print(f"error: cannot load {ckpt}: {e}", file=sys.stderr)
        return 2
    if args.cpu_offload:
        pipe.enable_model_cpu_offload()
    if not args.question and not args.embeddings_only:
        try:
            pipe.check_image_size(args.height, args.width)
        except ValueError as e:
            print(f"error: --height/--width: {e}", file=sys.stderr)
            return 2

    if conversation:
        from blip3o.chat import ChatError

        try:
            return run_conversation(args, pipe, prompts, image)
        except ChatError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if args.question:
        print(pipe.understand(image, args.question, max_new_tokens=args.max_new_tokens))
        return 0

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.edit:
        results = [pipe.edit(image, p, num_images=n, seed=args.seed, guidance_scale=args.guidance,
                             num_inference_steps=args.steps, decoder_guidance_scale=args.decoder_guidance,
                             height=args.height, width=args.width) for p in prompts]
        images = [im for r in results for im in r.images]
    else:
        progress = lambda it: tqdm(it, desc="DiT", leave=False)  # noqa: E731
        if args.embeddings_only or not pipe.has_decoder():
            feats = pipe.embed(prompts, num_images_per_prompt=n, seed=args.seed, guidance_scale=args.guidance,
                               num_inference_steps=args.steps, progress=progress)
            path = out if out.suffix == ".pt" else out.with_suffix(".pt")
            torch.save({"prompts": prompts, "num_images_per_prompt": n, "features": feats.cpu()}, path)
            why = "" if args.embeddings_only else " (this checkpoint has no pixel decoder)"
            print(f"saved {feats.shape[0]} generated feature maps {tuple(feats.shape[1:])} to {path}{why}")
            return 0
        res = pipe(prompts, num_images_per_prompt=n, seed=args.seed, guidance_scale=args.guidance,
                   num_inference_steps=args.steps, decoder_guidance_scale=args.decoder_guidance,
                   decoder_num_inference_steps=args.decoder_steps, height=args.height, width=args.width,
                   progress=progress, reason=args.reason)
        images = res.images
        if res.reasoning is not None:  # saved beside the image(s): what the queries read after each prompt
            text = "".join(f"prompt: {p}\nreasoning: {r}\n\n" for p, r in zip(prompts, res.reasoning))
            out.with_suffix(".reasoning.txt").write_text(text)
            if args.out_dir:
                Path(args.out_dir).mkdir(parents=True, exist_ok=True)
                for i, r in enumerate(res.reasoning):
                    (Path(args.out_dir) / f"{i:03d}.reasoning.txt").write_text(r + "\n")
            print(text.strip())
    # one prompt: a near-square grid (the reference's demo is 2x2); several: one row per prompt
    grid = make_grid(images, cols=math.ceil(math.sqrt(n)) if len(prompts) == 1 else n)
    grid.save(out)
    if args.out_dir:
        d = Path(args.out_dir)
        d.mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(images):
            im.save(d / f"{i // n:03d}_{i % n:02d}.png")
    print(f"wrote {len(images)} images to {out}" + (f" and {args.out_dir}/" if args.out_dir else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
