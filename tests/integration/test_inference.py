"""inference.py and Blip3oPipeline on a tiny saved checkpoint: text->image, seeds, understanding,
editing, features-only checkpoints, the official layout with a diffusion-decoder/, and CLI errors."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import ROOT, make_tiny_checkpoint, run_env


def cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "inference.py"), *map(str, args)], env=run_env(),
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_cli_text_to_image_grid_and_files(tiny_ckpt, tmp_path):
    r = cli(tiny_ckpt, "--prompt", "a red circle", "--prompt", "two blue squares", "--num-images", "2",
            "--out", tmp_path / "grid.png", "--out-dir", tmp_path / "imgs", "--seed", "3", "--steps", "2",
            "--decoder-steps", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    files = sorted((tmp_path / "imgs").glob("*.png"))
    assert [f.name for f in files] == ["000_00.png", "000_01.png", "001_00.png", "001_01.png"]
    assert Image.open(files[0]).size == (64, 64)
    assert Image.open(tmp_path / "grid.png").size == (128, 128)


def test_cli_demo_default(tiny_ckpt, tmp_path):
    r = cli(tiny_ckpt, "--out", tmp_path / "demo.png", "--steps", "2", "--decoder-steps", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert Image.open(tmp_path / "demo.png").size == (128, 128)  # 4 images of the demo prompt, 2x2


def test_pipeline_seeds_are_per_image(tiny_ckpt):
    from blip3o.pipeline import Blip3oPipeline

    pipe = Blip3oPipeline.from_pretrained(tiny_ckpt, device="cpu")
    kw = dict(num_inference_steps=2, decoder_num_inference_steps=2)
    a = pipe(["a red circle", "two blue squares"], seed=5, **kw)
    b = pipe(["a red circle", "two blue squares"], seed=5, **kw)
    c = pipe(["a red circle", "two blue squares"], seed=6, **kw)
    px = lambda r: torch.stack([torch.from_numpy(np.asarray(im).copy()) for im in r.images]).float()  # noqa: E731
    assert torch.equal(px(a), px(b))
    assert (px(a) - px(c)).abs().max() > 0
    # image 0 does not depend on what else is in the batch
    alone = pipe(["a red circle"], seed=5, **kw)
    torch.testing.assert_close(a.features[:1], alone.features, atol=1e-5, rtol=1e-4)


def test_understanding_answer_equals_bare_backbone(tiny_ckpt):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from blip3o.models.understanding import build_understanding_inputs
    from blip3o.pipeline import Blip3oPipeline

    pipe = Blip3oPipeline.from_pretrained(tiny_ckpt, device="cpu")
    img = Image.new("RGB", (56, 56), (30, 60, 220))
    ans = pipe.understand(img, "What colour?", max_new_tokens=5)
    bare = Qwen2_5_VLForConditionalGeneration.from_pretrained(pipe.model.config.backbone_path).eval()
    enc = build_understanding_inputs(pipe.model, [img], ["What colour?"])
    out = bare.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=pipe.model.tokenizer.pad_token_id)
    assert ans == pipe.model.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    r = cli(tiny_ckpt, "--image", ROOT / "tests" / "data" / "blue.png", "--question", "What colour?")
    assert r.returncode == 0, r.stderr[-2000:]


def test_editing_path_runs_and_uses_the_image(tiny_ckpt):
    from blip3o.pipeline import Blip3oPipeline

    pipe = Blip3oPipeline.from_pretrained(tiny_ckpt, device="cpu")
    red = pipe.edit(Image.new("RGB", (56, 56), (220, 30, 30)), "make it blue", seed=0, num_inference_steps=2)
    blue = pipe.edit(Image.new("RGB", (56, 56), (30, 60, 220)), "make it blue", seed=0, num_inference_steps=2)
    assert len(red.images) == 1 and red.images[0].size == (64, 64)
    assert (red.features - blue.features).abs().max() > 0  # the input image conditions the queries


def test_checkpoint_without_decoder_saves_features(tmp_path):
    ck = make_tiny_checkpoint(tmp_path / "nodec", with_decoder=False)
    r = cli(ck, "--prompt", "a red circle", "--out", tmp_path / "x.png", "--steps", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "no pixel decoder" in r.stdout
    feats = torch.load(tmp_path / "x.pt")["features"]
    assert feats.shape[0] == 1 and feats.dim() == 4


def test_official_layout_with_diffusion_decoder_generates(tmp_path):
    from blip3o.decoders import build_decoder, save_official_layout
    from blip3o.pipeline import Blip3oPipeline
    from tests.official_fixture import write_official_fixture

    d = write_official_fixture(tmp_path / "BLIP3o-Model-8B")
    dec = build_decoder("sdxl", preset="tiny", feature_dim=32, num_tokens=64, num_inference_steps=2)
    save_official_layout(dec, str(d / "diffusion-decoder"))
    pipe = Blip3oPipeline.from_pretrained(d, device="cpu")
    out = pipe(["a cat"], seed=0, num_inference_steps=2, decoder_num_inference_steps=2)
    assert len(out.images) == 1 and out.images[0].size == (64, 64)


@pytest.mark.parametrize("args,message", [
    (["/nonexistent/ckpt"], "checkpoint directory not found"),
    (["{ckpt}", "--image", "/nonexistent.png", "--question", "hi"], "cannot read image"),
    (["{ckpt}", "--image", "{bad}", "--question", "hi"], "cannot read image"),
    (["{ckpt}", "--prompt", "  "], "empty prompt"),
    (["{ckpt}", "--question", "hi"], "--question needs --image"),
    (["{ckpt}", "--num-images", "0"], "--num-images must be >= 1, got 0"),
    (["{ckpt}", "--steps", "-3"], "--steps must be >= 1, got -3"),
    (["{ckpt}", "--height", "37"], "positive multiples of"),
    (["{ckpt}", "--width", "64", "--embeddings-only"], "--embeddings-only skips it"),
])
def test_cli_errors_are_one_line(tiny_ckpt, tmp_path, args, message):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    r = cli(*[a.format(ckpt=tiny_ckpt, bad=bad) for a in args])
    assert r.returncode == 2
    assert message in r.stderr.strip().splitlines()[-1]
