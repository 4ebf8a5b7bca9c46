"""Transfusion / LMFusion generators (blip3o/models/fusion.py) on the tiny presets: the block-causal mask,
which weights train, overfitting, LMFusion's unchanged text behaviour, the prompt cache, save/load, and
the real entry points (python -m blip3o.train, Blip3oPipeline, inference.py)."""
import pytest
import torch

from tests.conftest import ROOT

CAPTIONS = ["a red circle", "two blue squares left of a green triangle", "three purple circles", "a yellow square"]


def build(generator, *overrides):
    from blip3o.config import load_config
    from blip3o.models.build import build_model

    extra = ["model.text_loss_weight=0.1"] if generator == "transfusion" else []
    cfg = load_config(None, ["preset=tiny", "model.target=vae", "model.backbone_path=tiny-std0.2",
                             f"model.generator={generator}", "model.num_inference_steps=3", *extra, *overrides])
    torch.manual_seed(0)
    model, _ = build_model(cfg.model)
    return model


@pytest.fixture(scope="module", params=["transfusion", "lmfusion"])
def trained(request):
    """A tiny model of each kind, overfit for 30 steps on one batch; with its before/after eval losses."""
    model = build(request.param)
    enc = model.tokenize_prompts(CAPTIONS)
    g = torch.Generator().manual_seed(1)
    # one colour-like latent per caption (+ a little texture): learnable in 30 steps, unlike white noise
    x0 = (2 * torch.randn(4, 4, 1, 1, generator=g)).expand(4, 4, 8, 8) + 0.1 * torch.randn(4, 4, 8, 8, generator=g)
    batch = dict(enc, target_latents=x0)

    def eval_loss():
        model.eval()  # fixed sigmas and noise, no caption dropout
        with torch.no_grad():
            return model(**batch, generator=torch.Generator().manual_seed(123))

    before = eval_loss()
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=2e-3)
    model.train()
    for i in range(30):
        out = model(**batch, generator=torch.Generator().manual_seed(i))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    after = eval_loss()
    model.eval()
    return model, batch, before, after


# ----------------------------------------------------------------------------------------------------------
def test_mask_is_causal_over_text_and_bidirectional_within_images():
    from blip3o.models.fusion import fusion_attention_mask

    # pad pad | t t t | I1 I1 I1 | t t | I2 I2 | t
    blk = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 2, 2, 0])
    valid = torch.ones(2, 13, dtype=torch.long)
    valid[0, :2] = 0  # row 0 is left padded
    m = fusion_attention_mask(valid, blk)
    assert m.shape == (2, 1, 13, 13) and m.dtype == torch.bool
    m = m[:, 0]
    img1, img2 = [5, 6, 7], [10, 11]
    for i in img1:  # bidirectional inside an image, every pair both ways
        for j in img1:
            assert m[:, i, j].all()
    for i in img2:
        for j in img2:
            assert m[:, i, j].all()
    text = [k for k in range(13) if blk[k] == 0]
    for i in text:  # text: exactly causal (over real tokens)
        for j in range(13):
            assert bool(m[1, i, j]) == (j <= i)
    for i in text:  # no text token attends to a later image
        for j in img1 + img2:
            if j > i:
                assert not m[:, i, j].any()
    assert not m[:, 5, 10].any() and m[:, 10, 5].all()  # an image sees earlier images, not later ones
    assert not m[:, 7, 8].any() and m[:, 8, 7].all()  # text after an image sees it
    # padding is never a key (except a pad row's own diagonal, which keeps its softmax finite)
    assert not m[0, 2:, :2].any() and m[0, 0, 0] and m[0, 1, 1] and not m[0, 1, 0]


def test_patchify_round_trip():
    from blip3o.models.fusion import patchify, unpatchify

    x = torch.randn(2, 4, 8, 8)
    t = patchify(x, 2)
    assert t.shape == (2, 16, 16)
    torch.testing.assert_close(t[0, 1], x[0, :, 0:2, 2:4].reshape(-1))  # raster order, (C, p, p) per token
    assert torch.equal(unpatchify(t, 2, 4, 8, 8), x)


@pytest.mark.parametrize("override,message", [
    ("model.generator=fusion", "model.generator: 'fusion' is not one of"),
    ("model.target=eva_clip", "model.target: the lmfusion generator denoises VAE latents"),
    ("model.lora_rank=4", "model.lora_rank: lmfusion"),
])
def test_bad_fusion_config_is_one_line(override, message):
    from blip3o.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config(None, ["preset=tiny", "model.target=vae", "model.generator=lmfusion", override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_only_the_intended_parameters_train(trained):
    model, *_ = trained
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    new = {n for n in names if n.split(".")[0] in ("patch_in", "patch_out", "time_embed", "image_pos")}
    assert {"patch_in.weight", "patch_out.weight", "image_pos"} <= new
    lm = {n for n, _ in model.named_parameters() if n.startswith("backbone.model.language_model.")}
    if model.config.generator_type == "lmfusion":
        expert = {n for n, _ in model.named_parameters() if n.split(".")[0] in ("image_layers", "image_norm")}
        assert names == new | expert
        assert any(".self_attn.q_proj." in n for n in expert) and any(".mlp." in n for n in expert)
        assert any("input_layernorm" in n for n in expert) and "image_norm.weight" in expert
    else:
        assert names == new | lm  # the whole language model (incl. embeddings); the vision tower stays frozen
    assert not any(n.startswith("backbone.model.visual.") for n in names)


def test_loss_decreases_when_overfitting(trained):
    model, _, before, after = trained
    assert after.image_loss < 0.6 * before.image_loss, (before.image_loss, after.image_loss)
    if model.config.generator_type == "transfusion":
        assert after.text_loss < before.text_loss


def test_lmfusion_text_logits_equal_the_frozen_backbone(trained):
    model, batch, *_ = trained
    if model.config.generator_type != "lmfusion":
        pytest.skip("transfusion trains its text weights")
    from blip3o.models.backbone import get_backbone

    # The untouched backbone straight from disk, after the image expert was trained for 30 steps.
    fresh = get_backbone(model.config.backbone).from_pretrained(model.config.backbone_path).eval()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    pos = (mask.cumsum(-1) - 1).clamp_min(0)  # left-pad-aware positions, as Blip3o's conditioning passes them
    with torch.no_grad():
        ref = fresh(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        own = model.text_logits(ids, mask)
        # ... and the prompt's logits inside a full text + image sequence (the image comes later, unseen)
        text_h, _ = model.forward_sequence(ids, mask, batch["target_latents"], torch.full((4,), 700.0))
        mixed = model.backbone.get_output_embeddings()(text_h)
    real = mask.bool()
    assert torch.equal(own[real], ref[real])  # bit-equal
    # a longer (masked) key set changes the attention kernel's summation order: fp32 noise only
    torch.testing.assert_close(mixed[real], ref[real], atol=2e-5, rtol=1e-5)
    unpadded = int(mask.sum(1).argmax())  # the longest prompt: also equal to the backbone's default call
    with torch.no_grad():
        plain = fresh(input_ids=ids[unpadded:unpadded + 1]).logits[0]
    assert torch.equal(own[unpadded], plain)


def test_cached_prompt_sampling_step_equals_the_full_sequence(trained):
    model, batch, *_ = trained
    x0, t = batch["target_latents"], torch.tensor([900.0, 500.0, 100.0, 10.0])
    with torch.no_grad():
        _, full = model.forward_sequence(batch["input_ids"], batch["attention_mask"], x0, t)
        cache = model.prefix_cache(batch["input_ids"], batch["attention_mask"])
        cached = model.image_velocity(x0, t, cache)
    assert full.abs().max() > 1e-3  # the trained output projection is no longer zero
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-4)


def test_save_load_round_trip(trained, tmp_path):
    from transformers import AutoModel

    from blip3o.models.fusion import Blip3oFusionForConditionalGeneration

    model, batch, *_ = trained
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "target_encoder").is_dir() and (tmp_path / "m" / "tokenizer_config.json").is_file()
    for loaded in [AutoModel.from_pretrained(tmp_path / "m")]:  # Auto-registered -> our from_pretrained
        assert loaded.tokenizer is not None
        assert type(loaded) is Blip3oFusionForConditionalGeneration
        loaded.eval()
        assert loaded.config.generator_type == model.config.generator_type
        assert {n for n, p in loaded.named_parameters() if p.requires_grad} == \
            {n for n, p in model.named_parameters() if p.requires_grad}
        a = model(**batch, generator=torch.Generator().manual_seed(5))
        b = loaded(**batch, generator=torch.Generator().manual_seed(5))
        assert torch.equal(a.loss, b.loss)
        gens = lambda: [torch.Generator().manual_seed(i) for i in range(2)]  # noqa: E731
        fa = model.generate_features(CAPTIONS[:2], generator=gens())
        fb = loaded.generate_features(CAPTIONS[:2], generator=gens())
        assert torch.equal(fa, fb) and fa.shape == (2, 4, 8, 8)


def test_transfusion_lora_trains_only_adapters_and_round_trips(tmp_path):
    from blip3o.models.fusion import Blip3oFusionForConditionalGeneration

    model = build("transfusion", "model.lora_rank=4")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    backbone = {n for n in names if n.startswith("backbone.")}
    assert backbone and all("lora_" in n for n in backbone)
    enc = model.tokenize_prompts(CAPTIONS[:2])
    batch = dict(enc, target_latents=torch.randn(2, 4, 8, 8))
    model.train()
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    for i in range(2):
        model(**batch, generator=torch.Generator().manual_seed(i)).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model.save_pretrained(tmp_path / "lora")
    loaded = Blip3oFusionForConditionalGeneration.from_pretrained(tmp_path / "lora").eval()
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == names
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert torch.equal(model(**batch, generator=g()).loss, loaded(**batch, generator=g()).loss)


# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def entry_point_runs(tmp_path_factory):
    """3 steps of each toy recipe through the main() of `python -m blip3o.train` (in this process: a
    subprocess would pay the ~10 s transformers import again; tests/integration/test_train.py covers the subprocess)."""
    import signal

    from blip3o.data.toy import write_toy_dataset
    from blip3o.train.__main__ import main

    d = tmp_path_factory.mktemp("fusion_toy")
    write_toy_dataset(str(d / "toy"), num=48, seed=0, shard_size=24)
    results = {}
    handler = signal.getsignal(signal.SIGTERM)
    try:
        for gen, extra in (("transfusion", ["model.text_loss_weight=0.1"]), ("lmfusion", [])):
            out = d / gen
            rc = main([str(ROOT / "configs" / f"toy_{gen}.yaml"), f"data.train_shards={d / 'toy' / 'train'}",
                       f"data.eval_prompts={d / 'toy' / 'eval' / 'prompts.jsonl'}", f"train.output_dir={out}",
                       "train.max_steps=3", "train.logging_steps=1", "train.save_steps=3",
                       "train.per_device_train_batch_size=4", "data.num_workers=0", "data.shuffle_buffer=16",
                       "model.num_inference_steps=2", *extra])
            results[gen] = (out, rc)
    finally:
        signal.signal(signal.SIGTERM, handler)  # the trainer checkpoints on SIGTERM; give pytest its own back
    return results


@pytest.mark.parametrize("generator", ["transfusion", "lmfusion"])
def test_train_entry_point_pipeline_and_inference(entry_point_runs, generator, tmp_path):
    import json

    from PIL import Image

    import inference
    from blip3o.models.fusion import Blip3oFusionForConditionalGeneration
    from blip3o.pipeline import Blip3oPipeline

    out, rc = entry_point_runs[generator]
    assert rc == 0
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3] and all(r["loss"] == r["loss"] for r in recs)
    assert ("text_loss" in recs[0]) == (generator == "transfusion")
    assert (out / "checkpoint-3" / "COMPLETE").is_file()
    pipe = Blip3oPipeline.from_pretrained(out, device="cpu")
    assert isinstance(pipe.model, Blip3oFusionForConditionalGeneration)
    res = pipe(["a red circle", "two blue squares"], num_images_per_prompt=2, seed=0, num_inference_steps=2)
    assert len(res.images) == 4 and all(im.size == (64, 64) for im in res.images)
    assert res.features.shape == (4, 4, 8, 8)
    alone = pipe(["a red circle"], seed=0, num_inference_steps=2)  # per-image seeds: same image alone
    torch.testing.assert_close(alone.features, res.features[:1], atol=1e-5, rtol=1e-4)
    if generator == "lmfusion":  # understanding is the (untouched) backbone's own chat
        assert isinstance(pipe.understand(Image.new("RGB", (56, 56), (30, 60, 220)), "What colour?",
                                          max_new_tokens=3), str)
    rc = inference.main([str(out), "--prompt", "a red circle", "--num-images", "2", "--steps", "2",
                         "--out", str(tmp_path / "grid.png"), "--out-dir", str(tmp_path / "imgs")])
    assert rc == 0
    assert Image.open(tmp_path / "imgs" / "000_01.png").size == (64, 64)
    assert Image.open(tmp_path / "grid.png").size == (128, 64)


def test_qwen3_backbone_text_logits_and_prompt_cache():
    """Qwen3's per-head q/k norms are routed too: bit-equal text logits, cache == full sequence."""
    model = build("lmfusion", "model.backbone=qwen3", "model.backbone_path=tiny").eval()
    enc = model.tokenize_prompts(CAPTIONS)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert "image_layers.0.self_attn.q_norm.weight" in dict(model.named_parameters())
    with torch.no_grad():
        ref = model.backbone(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).logits
        assert torch.equal(model.text_logits(ids, mask)[mask.bool()], ref[mask.bool()])
        torch.nn.init.normal_(model.patch_out.weight, std=0.1)
        x0, t = torch.randn(4, 4, 8, 8), torch.tensor([900.0, 500.0, 100.0, 10.0])
        _, full = model.forward_sequence(ids, mask, x0, t)
        cached = model.image_velocity(x0, t, model.prefix_cache(ids, mask))
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-4)
