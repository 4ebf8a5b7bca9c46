"""Feature -> pixel decoders (blip3o.decoders): sampling contract, persistence, official layout, training."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import blip3o  # noqa: F401  (torchvision shim before diffusers)
import pytest
import torch
import torch.nn.functional as F

from blip3o.decoders import (
    DECODERS,
    DecoderLoadError,
    SanaFeatureDecoderPipeline,
    SDXLFeatureDecoderPipeline,
    build_decoder,
    decoder_training_loss,
    load_decoder,
    make_tiny_decoder,
    train_decoder_steps,
    train_vae_steps,
    trainable_parameters,
)
from blip3o.decoders.components import decode_latents, encode_to_latents

DIM = 32
KINDS = ["sdxl", "sana"]
STEPS = 3  # sampling steps in contract tests: the contract does not depend on the count
# Half-width UNet for the training tests (the default tiny preset trains ~3x slower on 2 CPU cores).
SMALL_UNET = {"block_out_channels": (32, 64), "attention_head_dim": (1, 2), "norm_num_groups": 16}


def gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def feats(batch, seed=0, tokens=64):
    return torch.randn(batch, tokens, DIM, generator=torch.Generator().manual_seed(seed))


def blob_images(batch, seed):
    """Flat background with three coloured rectangles, in [-1, 1]: a learnable 'random image'."""
    g = torch.Generator().manual_seed(seed)
    images = torch.full((batch, 3, 64, 64), -1.0)
    for img in images:
        for _ in range(3):
            colour = torch.rand(3, generator=g) * 2 - 1
            x0, y0 = torch.randint(0, 40, (2,), generator=g).tolist()
            w, h = torch.randint(8, 24, (2,), generator=g).tolist()
            img[:, y0:y0 + h, x0:x0 + w] = colour[:, None, None]
    return images


@pytest.fixture(scope="module", params=KINDS)
def pipe(request):
    return build_decoder(request.param, feature_dim=DIM)


def test_registry_and_official_presets():
    assert DECODERS.names() == ["sana", "sdxl"]
    assert DECODERS.get("sdxl").official_repo == "BLIP3o/BLIP3o-Model-8B"
    assert DECODERS.get("sdxl").official_subfolder == "diffusion-decoder"
    assert DECODERS.get("sana").official_repo == "BLIP3o/SigLIP2_SANA"
    with pytest.raises(KeyError, match="unknown decoder"):
        build_decoder("dalle")
    # The spec knows its builder's arguments: a misspelt one is a one-line error naming it.
    assert {"vae", "prediction", "spatial_features"} <= DECODERS.get("sdxl").build_kwargs
    with pytest.raises(ValueError, match=r"unknown argument\(s\) vea when building"):
        build_decoder("sdxl", feature_dim=DIM, vea="kl")
    with pytest.raises(ValueError, match=r"unknown argument\(s\) feature_dim when loading"):
        build_decoder("sdxl", preset="official", feature_dim=DIM)
    assert DECODERS.get("sana").trained == ("transformer", "connector") and DECODERS.get("sdxl").trained == ("unet",)
    # Offline, the official preset fails in one line instead of downloading.
    with pytest.raises(DecoderLoadError, match="hub downloads are disabled"):
        build_decoder("sdxl", preset="official")
    # The full-size architectures build on the meta device (no memory) for parameter counts.
    sdxl = build_decoder("sdxl", preset="official", pretrained=False, device="meta")
    sana = build_decoder("sana", preset="official", pretrained=False, device="meta")
    assert sdxl.unet.config.cross_attention_dim == 1792 and sdxl.feature_dim == 1792
    assert sdxl.unet.config.projection_class_embeddings_input_dim == 1792 + 6 * 256
    assert 2.4e9 < sum(p.numel() for p in sdxl.unet.parameters()) < 2.7e9
    assert sana.feature_dim == 1152 and sana.connector.config.caption_channels == 2304
    assert 1.5e9 < sum(p.numel() for p in sana.transformer.parameters()) < 1.7e9
    tiny_connector = build_decoder("sana", feature_dim=DIM).connector
    assert torch.allclose(tiny_connector.norm.weight, torch.full_like(tiny_connector.norm.weight, 5.5 ** 0.5))
    assert sdxl.scheduler.config.prediction_type == "epsilon"
    assert sana.scheduler.config.prediction_type == "flow_prediction"
    assert (sdxl.config.default_num_inference_steps, sana.config.default_num_inference_steps) == (50, 30)


@pytest.mark.parametrize("batch, per_sample", [(1, 1), (3, 1), (2, 2)])
def test_call_returns_count_and_size(pipe, batch, per_sample):
    images = pipe(feats(batch), num_inference_steps=STEPS, num_images_per_sample=per_sample).images
    assert len(images) == batch * per_sample
    assert all(im.size == (64, 64) and im.mode == "RGB" for im in images)
    if batch == 3:
        pt = pipe(feats(batch), num_inference_steps=STEPS, output_type="pt").images
        assert pt.shape == (3, 3, 64, 64) and pt.dtype == torch.float32 and 0 <= pt.min() and pt.max() <= 1
        arr = pipe(feats(batch), num_inference_steps=STEPS, output_type="np", height=32, width=32).images
        assert arr.shape == (3, 32, 32, 3)


def test_per_sample_generators(pipe):
    f = feats(3, seed=1)
    batch = pipe(f, num_inference_steps=STEPS, generator=gens([10, 11, 12]), output_type="pt").images
    again = pipe(f, num_inference_steps=STEPS, generator=gens([10, 11, 12]), output_type="pt").images
    alone = pipe(f[1:2], num_inference_steps=STEPS, generator=gens([11]), output_type="pt").images
    other = pipe(f[1:2], num_inference_steps=STEPS, generator=gens([99]), output_type="pt").images
    assert torch.equal(batch, again)
    assert (batch[1] - alone[0]).abs().max() < 1e-5
    assert (other[0] - alone[0]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="one per image"):
        pipe(f, num_inference_steps=STEPS, generator=gens([1, 2]))


@pytest.mark.parametrize("kind", KINDS)
def test_cfg_null_condition_encoded_once(kind):
    pipe = build_decoder(kind, feature_dim=DIM)
    calls = []
    encode = pipe.encode_condition

    def counting(features):
        calls.append(features.shape[0])
        return encode(features)

    pipe.encode_condition = counting
    for _ in range(2):
        pipe(feats(2), num_inference_steps=STEPS, guidance_scale=3.0, output_type="pt")
    assert calls == [2, 1, 2]  # cond, null (once), cond
    pipe(feats(2), num_inference_steps=STEPS, guidance_scale=1.0, output_type="pt")
    assert calls == [2, 1, 2, 2]  # no guidance: the null condition is not needed
    # Changing the null features (or, for SANA, the connector weights) invalidates the cache.
    pipe.set_null_features(torch.ones(64, DIM), source="black_image")
    pipe(feats(2), num_inference_steps=STEPS, output_type="pt")
    assert calls[-2:] == [2, 1]


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_roundtrip(kind, tmp_path):
    pipe = build_decoder(kind, feature_dim=DIM, seed=3)
    pipe.set_null_features(torch.randn(1, 64, DIM), source="black_image")
    pipe.save_pretrained(tmp_path / "dec")
    loaded = load_decoder(tmp_path / "dec")
    assert type(loaded) is type(pipe)
    assert loaded.null_condition.config.source == "black_image"
    assert loaded.config.default_num_inference_steps == pipe.config.default_num_inference_steps
    a = pipe(feats(2), num_inference_steps=STEPS, generator=gens([5, 6]), output_type="pt").images
    b = loaded(feats(2), num_inference_steps=STEPS, generator=gens([5, 6]), output_type="pt").images
    assert torch.allclose(a, b, atol=1e-6)
    # The subclass loader refuses the other kind.
    other = SanaFeatureDecoderPipeline if kind == "sdxl" else SDXLFeatureDecoderPipeline
    with pytest.raises(ValueError, match="holds a"):
        other.from_pretrained(tmp_path / "dec")


def test_official_sdxl_layout_loads(tmp_path):
    root = tmp_path / "BLIP3o-Model-8B"
    path = make_tiny_decoder("sdxl", root / "diffusion-decoder", feature_dim=DIM, seed=4, layout="official")
    for sub in ("unet", "vae"):
        assert os.path.isfile(os.path.join(path, sub, "diffusion_pytorch_model.bf16.safetensors"))
        assert not os.path.exists(os.path.join(path, sub, "diffusion_pytorch_model.safetensors"))
    assert os.path.isfile(os.path.join(path, "scheduler", "scheduler_config.json"))
    # The official folder ships custom pipeline code; loading must never import it.
    with open(os.path.join(path, "pipeline_llava_gen.py"), "w") as f:
        f.write("raise RuntimeError('custom pipeline code was executed')\n")

    pipe = load_decoder(root, subfolder="diffusion-decoder")
    assert isinstance(pipe, SDXLFeatureDecoderPipeline)
    assert pipe.unet.dtype == torch.float32 and pipe.null_condition.config.source == "zeros"
    assert torch.count_nonzero(pipe.null_condition.features) == 0

    # Same numbers as the builder's weights rounded through bf16.
    ref = build_decoder("sdxl", feature_dim=DIM, seed=4)
    with torch.no_grad():
        for p in list(ref.unet.parameters()) + list(ref.vae.parameters()):
            p.copy_(p.to(torch.bfloat16).float())
    a = ref(feats(2), num_inference_steps=STEPS, generator=gens([1, 2]), output_type="pt").images
    b = pipe(feats(2), num_inference_steps=STEPS, generator=gens([1, 2]), output_type="pt").images
    assert torch.allclose(a, b, atol=1e-5)

    # Runs in the UNet's dtype when loaded as bf16; fp32 features are cast, outputs are float32.
    bf16 = load_decoder(path, torch_dtype=torch.bfloat16)
    assert bf16.unet.dtype == torch.bfloat16
    out = bf16(feats(1), num_inference_steps=2, output_type="pt").images
    assert out.dtype == torch.float32 and out.shape == (1, 3, 64, 64)


def test_clear_errors(tmp_path, pipe):
    with pytest.raises(ValueError, match=f"expects feature dim {DIM}, got {DIM + 1}"):
        pipe(torch.randn(1, 64, DIM + 1), num_inference_steps=STEPS)
    with pytest.raises(ValueError, match="expects feature dim"):
        decoder_training_loss(pipe, torch.zeros(1, 3, 64, 64), torch.randn(1, 64, DIM + 1))
    with pytest.raises(DecoderLoadError, match="not found"):
        load_decoder(tmp_path / "missing")
    with pytest.raises(DecoderLoadError, match="hub downloads are disabled"):
        load_decoder("BLIP3o/SigLIP2_SANA")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DecoderLoadError, match="not a decoder folder"):
        load_decoder(tmp_path / "empty")
    with pytest.raises(ValueError, match="samples with prediction_type"):
        decoder_training_loss(pipe, torch.zeros(1, 3, 64, 64), feats(1), prediction="v_prediction")


@pytest.mark.parametrize("kind", KINDS)
def test_training_loss_decreases(kind):
    overrides = {"unet_config": SMALL_UNET} if kind == "sdxl" else {}
    pipe = build_decoder(kind, feature_dim=DIM, **overrides)
    params = trainable_parameters(pipe)
    assert not any(p.requires_grad for p in pipe.vae.parameters())
    assert len(params) > 0 and all(p.requires_grad for p in params)
    before = {id(p) for p in params}
    if kind == "sana":
        assert {id(p) for p in pipe.connector.parameters()} <= before
    batch = (blob_images(4, seed=0), feats(4, seed=1))
    losses = train_decoder_steps(pipe, [batch], steps=30, lr=2e-3)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, losses


@pytest.mark.parametrize("kind", KINDS)
def test_overfit_single_image_reconstructs(kind):
    """Decoding the features of one memorised image gives that image back (up to the VAE's own round trip)."""
    overrides = {"unet_config": SMALL_UNET} if kind == "sdxl" else {}
    pipe = build_decoder(kind, feature_dim=DIM, **overrides)
    target, other = blob_images(1, seed=1), blob_images(1, seed=2)
    f = feats(1, seed=3)
    batch = (target.expand(4, -1, -1, -1), f.expand(4, -1, -1))
    train_decoder_steps(pipe, [batch], steps=80, lr=2e-3, null_prob=0.0)
    sample = pipe(f, guidance_scale=1.0, generator=gens([0]), output_type="pt").images * 2 - 1
    # A random tiny VAE cannot reproduce pixels; the decoder's job is to reproduce the VAE's reconstruction.
    with torch.no_grad():
        target_rec = decode_latents(pipe.vae, encode_to_latents(pipe.vae, target)) * 2 - 1
        other_rec = decode_latents(pipe.vae, encode_to_latents(pipe.vae, other)) * 2 - 1
    err_target, err_other = F.mse_loss(sample, target_rec).item(), F.mse_loss(sample, other_rec).item()
    assert err_target < 0.02 and err_target < 0.25 * err_other, (err_target, err_other)


@pytest.mark.parametrize("kind", KINDS)
def test_pixel_space_variant(kind, tmp_path):
    pipe = build_decoder(kind, feature_dim=DIM, vae="pixel")
    images = blob_images(2, seed=5)
    latents = encode_to_latents(pipe.vae, images)
    assert latents.shape == (2, 48, 16, 16)
    assert torch.allclose(decode_latents(pipe.vae, latents) * 2 - 1, images, atol=1e-6)  # exact round trip
    pipe.save_pretrained(tmp_path / "pixel")
    loaded = load_decoder(tmp_path / "pixel")
    a = pipe(feats(1), num_inference_steps=STEPS, generator=gens([1]), output_type="pt").images
    b = loaded(feats(1), num_inference_steps=STEPS, generator=gens([1]), output_type="pt").images
    assert a.shape == (1, 3, 64, 64) and torch.allclose(a, b, atol=1e-6)
    loss, parts = decoder_training_loss(loaded, images, feats(2))
    assert loss.requires_grad and set(parts) >= {"mse", "null_frac"}


def test_fit_tiny_vae():
    pipe = build_decoder("sdxl", feature_dim=DIM)
    batches = [blob_images(4, seed=s) for s in range(4)]
    losses = train_vae_steps(pipe, batches, steps=12, lr=3e-3)
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses
    assert not any(p.requires_grad for p in pipe.vae.parameters())
    assert encode_to_latents(pipe.vae, batches[0]).std().item() == pytest.approx(1.0, rel=0.3)


@pytest.mark.parametrize("kind, prediction", [("sdxl", "epsilon"), ("sdxl", "v_prediction"), ("sana", "flow")])
def test_other_objectives_and_module_mapping(kind, prediction):
    """Non-default targets build a matching scheduler, and the loss accepts wrapped modules (DDP-style)."""
    pipe = build_decoder(kind, feature_dim=DIM, prediction=prediction)
    assert pipe.scheduler.config.prediction_type == ("flow_prediction" if prediction == "flow" else prediction)
    images, f = blob_images(2, seed=0), feats(2)
    loss, _ = decoder_training_loss(pipe, images, f, generator=torch.Generator().manual_seed(0))

    class Wrapper(torch.nn.Module):  # stands in for DistributedDataParallel: forwards, hides .config
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    modules = dict(pipe.components)
    modules[pipe.denoiser_name] = Wrapper(pipe.denoiser)
    wrapped, _ = decoder_training_loss(modules, images, f, generator=torch.Generator().manual_seed(0),
                                       prediction=prediction)
    assert torch.isfinite(loss) and torch.allclose(loss, wrapped)
    assert pipe(f[:1], num_inference_steps=STEPS, output_type="pt").images.shape == (1, 3, 64, 64)


def test_sdxl_spatial_feature_conditioning_round_trip_and_layout(tmp_path):
    """The optional feature-map input: the UNet reads the 8x8 map concatenated to its latents, training and
    sampling agree on it, it survives save/load, and moving a feature moves what the decoder sees."""
    import torch

    from blip3o.decoders import build_decoder, decoder_training_loss, load_decoder

    pipe = build_decoder("sdxl", preset="tiny", feature_dim=8, num_tokens=64, vae="pixel", spatial_features=True,
                         num_inference_steps=2)
    assert pipe.spatial_features and pipe.unet.config.in_channels == 48 + 8
    feats = torch.randn(2, 64, 8)
    loss, _ = decoder_training_loss(pipe, torch.rand(2, 3, 64, 64) * 2 - 1, feats)
    assert torch.isfinite(loss)
    g = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)]
    a = pipe(feats, generator=g, output_type="pt").images
    pipe.save_pretrained(str(tmp_path / "d"))
    again = load_decoder(str(tmp_path / "d"))
    assert again.spatial_features
    b = again(feats, generator=[torch.Generator().manual_seed(0) for _ in range(2)], output_type="pt").images
    torch.testing.assert_close(a, b)
    from blip3o.decoders.sdxl import concat_feature_map

    lat = torch.zeros(1, 48, 16, 16)
    tok = torch.zeros(1, 64, 8)
    tok[0, 9, 0] = 1.0  # row 1, col 1 of the 8x8 grid -> latent pixels [2:4, 2:4]
    m = concat_feature_map(lat, tok)[0, 48]
    assert m[2:4, 2:4].eq(1).all() and m.sum() == 4


@pytest.mark.parametrize("kind", KINDS)
def test_time_shift_moves_training_toward_high_noise(kind):
    """time_shift > 1 draws noisier training points (sdxl: timesteps, sana: sigmas) from the same uniforms; 1 is
    the unshifted draw, bit for bit; a non-positive shift is a one-line error."""
    pipe = build_decoder(kind, feature_dim=DIM)
    images, f = blob_images(64, seed=0), feats(64)
    key = "t_mean" if kind == "sdxl" else "sigma_mean"

    def level(**kw):
        with torch.no_grad():
            loss, parts = decoder_training_loss(pipe, images, f, generator=torch.Generator().manual_seed(0), **kw)
        return loss, parts[key].item()

    plain, plain_level = level()
    same, same_level = level(time_shift=1.0)
    shifted, shifted_level = level(time_shift=3.0)
    assert torch.equal(plain, same) and plain_level == same_level
    # E[3u / (1 + 2u)] = 0.70 for u ~ U[0, 1): the mean level rises from ~0.5 to ~0.7 of the range.
    scale = 1000.0 if kind == "sdxl" else 1.0
    assert 0.4 < plain_level / scale < 0.6 and 0.6 < shifted_level / scale < 0.8, (plain_level, shifted_level)
    with pytest.raises(ValueError, match="time_shift must be > 0"):
        decoder_training_loss(pipe, images[:1], f[:1], time_shift=0.0)


@pytest.mark.parametrize("kind", KINDS)
def test_default_guidance_scale_is_saved_and_used(kind, tmp_path):
    """A build's guidance_scale becomes the pipeline's default CFG scale, survives save/load (model_index.json),
    and is what a call without guidance_scale uses: 1 gives the unguided images of an explicit guidance_scale=1.
    Without it, the originals' 3.0; under 1 is a one-line error."""
    assert build_decoder(kind, feature_dim=DIM).config.default_guidance_scale == 3.0
    pipe = build_decoder(kind, feature_dim=DIM, guidance_scale=1.0)
    pipe.save_pretrained(tmp_path)
    loaded = load_decoder(str(tmp_path))
    assert loaded.config.default_guidance_scale == 1.0
    f = feats(1)
    default = loaded(f, num_inference_steps=STEPS, generator=gens([0]), output_type="pt").images
    unguided = loaded(f, guidance_scale=1.0, num_inference_steps=STEPS, generator=gens([0]), output_type="pt").images
    guided = loaded(f, guidance_scale=3.0, num_inference_steps=STEPS, generator=gens([0]), output_type="pt").images
    assert torch.equal(default, unguided) and not torch.equal(default, guided)
    with pytest.raises(ValueError, match="guidance_scale must be >= 1"):
        build_decoder(kind, feature_dim=DIM, guidance_scale=0.5)
