"""Tests for blip3o.models.targets: frozen target encoders (x0 producers)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import blip3o  # noqa: E402,F401  (torchvision shim before timm/transformers)
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from blip3o.data.transforms import center_crop, resize_shorter  # noqa: E402
from blip3o.models.targets import (  # noqa: E402
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    TARGET_PRESETS,
    TARGETS,
    EvaClipTarget,
    TargetEncoder,
    build_target_encoder,
    load_target_encoder,
    make_tiny_target,
    map_eva_clip_state_dict,
    to_eva_clip_state_dict,
)

# (registry name, preset, overrides): every tiny variant, all expected to give (B, C, 8, 8) from 64 px
TINY = [
    ("eva_clip", "tiny", {}),
    ("siglip", "tiny", {}),
    ("siglip", "tiny", {"arch": "siglip2"}),
    ("vae", "tiny", {}),
    ("vae", "tiny_dc", {}),
]
TINY_IDS = ["eva", "siglip", "siglip2", "vae_kl", "vae_dc"]


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny models are latency-bound; a second thread only adds contention on shared CI cores
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tiny(name, preset, overrides, seed=0):
    torch.manual_seed(seed)
    return build_target_encoder(name, preset=preset, **overrides)


def _pixels(enc, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, enc.image_size, enc.image_size, generator=g)


# ---------------------------------------------------------------- shapes, registry, freezing, determinism


def test_registry_and_presets():
    assert set(TARGETS.names()) == {"eva_clip", "siglip", "vae", "toy_clip"}
    for name in ("eva_clip", "siglip", "vae"):
        assert {"official", "tiny"} <= set(TARGET_PRESETS[name])
    assert set(TARGET_PRESETS["toy_clip"]) == {"tiny"}  # the toy world's own CLIP: trained, never official


@pytest.mark.parametrize("name,preset,overrides", TINY, ids=TINY_IDS)
def test_tiny_shapes_frozen_deterministic(name, preset, overrides):
    enc = _tiny(name, preset, overrides)
    assert isinstance(enc, TargetEncoder) and enc.name == name
    assert enc.image_size == 64 and enc.grid == (8, 8) and enc.num_tokens == 64
    x = _pixels(enc, b=3)
    x0 = enc.encode(x)
    assert x0.shape == (3, enc.channels, 8, 8) and x0.dtype == torch.float32
    assert torch.isfinite(x0).all() and x0.std() > 0
    assert torch.equal(x0, enc.encode(x))  # deterministic (KL uses the posterior mean, not a sample)
    # frozen: no trainable parameters, no graph even under enable_grad, stays in eval after train()
    assert all(not p.requires_grad for p in enc.parameters())
    with torch.enable_grad():
        assert not enc.encode(x).requires_grad
    enc.train()
    assert not enc.training and not any(m.training for m in enc.modules())
    # every sample is encoded independently of the rest of the batch
    torch.testing.assert_close(enc.encode(x[:1]), x0[:1], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="expected pixel_values"):
        enc.encode(torch.zeros(1, 3, 32, 32))


def test_vae_encode_decode():
    for preset in ("tiny", "tiny_dc"):
        enc = _tiny("vae", preset, {})
        x = _pixels(enc).clamp(-1, 1)
        x0 = enc.encode(x)
        px = enc.decode(x0)
        assert px.shape == x.shape and px.dtype == torch.float32
        assert px.min() >= -1 and px.max() <= 1
    # scaling/shift: x0 = (latent - shift) * scale
    a = _tiny("vae", "tiny", {})
    b = _tiny("vae", "tiny", {"scaling_factor": 2.0, "shift_factor": 0.5})
    x = _pixels(a)
    torch.testing.assert_close(b.encode(x), (a.encode(x) - 0.5) * 2.0)
    # kind="dc" with the generic preset name selects the DC preset
    assert build_target_encoder("vae", preset="tiny", kind="dc").config["kind"] == "dc"


# ---------------------------------------------------------------- EVA-CLIP official structure


def test_official_eva_structure_on_meta():
    enc = build_target_encoder("eva_clip", device="meta")
    n = sum(p.numel() for p in enc.parameters())
    assert abs(n - 4.35e9) / 4.35e9 < 0.01, n  # docs/decisions.md, "Targets": 4.35 B parameters
    assert enc.image_size == 448 and enc.channels == 1792
    assert enc.token_grid == (32, 32) and enc.grid == (8, 8) and enc.num_tokens == 64
    m = enc.model
    assert len(m.blocks) == 64 and m.pos_embed.shape == (1, 1025, 1792)
    assert m.patch_embed.proj.kernel_size == (14, 14) and m.patch_embed.proj.bias is not None
    blk = m.blocks[0]
    assert type(blk).__name__ == "EvaBlockPostNorm"
    assert blk.attn.num_heads == 16 and blk.attn.head_dim == 112 and blk.attn.q_bias is not None
    assert blk.mlp.fc1.out_features == 15360 and isinstance(blk.mlp.act, torch.nn.GELU)
    assert blk.norm1.eps == 1e-6
    assert m.rope is None and isinstance(m.norm, torch.nn.Identity)  # no RoPE, no final norm
    # in the BLIP3-o tower layout (fused qkv bias) it is 772 tensors, as the reference counted
    assert len(to_eva_clip_state_dict(m.state_dict())) == 772
    assert enc.signature()["weights"] is None  # nothing to fingerprint on meta


def test_eva_grid_math_small_depth():
    enc = build_target_encoder(
        "eva_clip", preset="official", depth=1, width=64, num_heads=4, mlp_dim=128, dtype="float32"
    )
    x = _pixels(enc, b=1)
    tokens = enc.encode_tokens(x)
    assert tokens.shape == (1, 1024, 64)  # 448/14 = 32 -> 32x32 tokens, CLS dropped
    x0 = enc.encode(x)
    assert x0.shape == (1, 64, 8, 8)  # avg_pool2d(4): 32x32 -> 8x8
    # row-major: token r*32+c sits at (r, c); x0[:, :, i, j] averages rows 4i..4i+3, cols 4j..4j+3
    grid = tokens.reshape(1, 32, 32, 64)
    torch.testing.assert_close(x0[0, :, 0, 0], grid[0, :4, :4].mean((0, 1)))
    torch.testing.assert_close(x0[0, :, 2, 5], grid[0, 8:12, 20:24].mean((0, 1)))


# ---------------------------------------------------------------- EVA-CLIP key mapping


def _synthetic_eva_clip_sd(cfg, prefix, fused_bias=True, seed=0):
    """A random state dict in the EVA-CLIP repo layout (what BLIP3-o's EVA tower file holds)."""
    g = torch.Generator().manual_seed(seed)
    w, p, mlp = cfg["width"], cfg["patch_size"], cfg["mlp_dim"]
    n = (cfg["image_size"] // p) ** 2 + 1

    def r(*shape, s=0.2):
        return torch.randn(*shape, generator=g) * s

    sd = {"cls_token": r(1, 1, w), "pos_embed": r(1, n, w), "patch_embed.proj.weight": r(w, 3, p, p),
          "patch_embed.proj.bias": r(w)}
    for i in range(cfg["depth"]):
        b = f"blocks.{i}."
        sd[b + "attn.qkv.weight"] = r(3 * w, w)
        if fused_bias:
            sd[b + "attn.qkv.bias"] = r(3 * w)  # non-zero key bias: must not change the output
        else:
            sd[b + "attn.q_bias"], sd[b + "attn.v_bias"] = r(w), r(w)
        sd.update({b + "attn.proj.weight": r(w, w), b + "attn.proj.bias": r(w),
                   b + "norm1.weight": 1 + r(w), b + "norm1.bias": r(w),
                   b + "norm2.weight": 1 + r(w), b + "norm2.bias": r(w),
                   b + "mlp.fc1.weight": r(mlp, w), b + "mlp.fc1.bias": r(mlp),
                   b + "mlp.fc2.weight": r(w, mlp), b + "mlp.fc2.bias": r(w)})
    sd["norm.weight"], sd["norm.bias"] = torch.ones(w), torch.zeros(w)  # final norm: unused
    sd["head.weight"] = r(8, w)
    return {prefix + k: v for k, v in sd.items()}


def _reference_eva_x0(sd, cfg, x):
    """Independent re-statement of docs/decisions.md, "Targets": post-norm blocks on the EVA-CLIP layout."""
    w, p, heads, pool = cfg["width"], cfg["patch_size"], cfg["num_heads"], cfg["pool"]
    hd = w // heads
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p)
    side = t.shape[-1]
    t = t.flatten(2).transpose(1, 2)
    t = torch.cat([sd["cls_token"].expand(len(x), -1, -1), t], 1) + sd["pos_embed"]
    b_, n, _ = t.shape
    for i in range(cfg["depth"]):
        k = f"blocks.{i}."
        bias = sd.get(k + "attn.qkv.bias")
        if bias is None:
            bias = torch.cat([sd[k + "attn.q_bias"], torch.zeros(w), sd[k + "attn.v_bias"]])
        q, kk, v = F.linear(t, sd[k + "attn.qkv.weight"], bias).reshape(b_, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
        a = ((q * hd ** -0.5) @ kk.transpose(-1, -2)).softmax(-1) @ v
        a = F.linear(a.transpose(1, 2).reshape(b_, n, w), sd[k + "attn.proj.weight"], sd[k + "attn.proj.bias"])
        t = t + F.layer_norm(a, (w,), sd[k + "norm1.weight"], sd[k + "norm1.bias"], 1e-6)
        m = F.linear(F.gelu(F.linear(t, sd[k + "mlp.fc1.weight"], sd[k + "mlp.fc1.bias"])),
                     sd[k + "mlp.fc2.weight"], sd[k + "mlp.fc2.bias"])
        t = t + F.layer_norm(m, (w,), sd[k + "norm2.weight"], sd[k + "norm2.bias"], 1e-6)
    fmap = t[:, 1:].transpose(1, 2).reshape(b_, w, side, side)
    return F.avg_pool2d(fmap, pool)


@pytest.mark.parametrize("fused_bias,prefix", [(True, "model.gen_vision_tower.vision_tower.model."),
                                                (False, "visual.")])
def test_eva_clip_key_mapping_matches_reference_forward(tmp_path, fused_bias, prefix):
    cfg = TARGET_PRESETS["eva_clip"]["tiny"]
    sd = _synthetic_eva_clip_sd(cfg, prefix, fused_bias=fused_bias)
    sd["text.token_embedding.weight"] = torch.zeros(4, 4)  # another tower in the same file: ignored
    path = str(tmp_path / "pytorch_model.bin")
    torch.save(sd, path)
    enc = build_target_encoder("eva_clip", pretrained=path, preset="tiny")
    assert enc.load_report["outside_prefix"] == ["text.token_embedding.weight"]
    assert sorted(enc.load_report["ignored"]) == sorted(prefix + k for k in ("norm.weight", "norm.bias", "head.weight"))
    x = _pixels(enc)
    plain = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    torch.testing.assert_close(enc.encode(x), _reference_eva_x0(plain, cfg, x), rtol=1e-4, atol=1e-4)
    # a directory holding the file works too, and a fused-bias export maps back to the same weights
    enc2 = build_target_encoder("eva_clip", pretrained=str(tmp_path), preset="tiny")
    assert torch.equal(enc2.encode(x), enc.encode(x))
    back, _ = map_eva_clip_state_dict(to_eva_clip_state_dict(enc.model.state_dict(), prefix="visual."))
    assert all(torch.equal(back[k], v) for k, v in enc.model.state_dict().items())


def test_eva_clip_key_mapping_edge_cases(tmp_path):
    cfg = TARGET_PRESETS["eva_clip"]["tiny"]
    sd = _synthetic_eva_clip_sd(cfg, "")
    # unfused q/k/v projections are fused
    w = cfg["width"]
    qkv = sd.pop("blocks.0.attn.qkv.weight")
    for part, t in zip("qkv", qkv.split(w)):
        sd[f"blocks.0.attn.{part}_proj.weight"] = t
    out, _ = map_eva_clip_state_dict(sd)
    assert torch.equal(out["blocks.0.attn.qkv.weight"], qkv)
    # a 4x4-token pos_embed is resampled to the model's 16x16 grid, CLS kept
    small = dict(sd, pos_embed=torch.randn(1, 17, w))
    out, _ = map_eva_clip_state_dict(small, num_pos_tokens=257)
    assert out["pos_embed"].shape == (1, 257, w) and torch.equal(out["pos_embed"][:, 0], small["pos_embed"][:, 0])
    # RoPE / layer-scale keys mean another architecture
    with pytest.raises(ValueError, match="RoPE"):
        map_eva_clip_state_dict(dict(sd, **{"rope.freqs_cos": torch.zeros(1)}))
    with pytest.raises(ValueError, match="prefix"):
        map_eva_clip_state_dict({"a.cls_token": torch.zeros(1), "b.cls_token": torch.zeros(1)})
    # missing tensors are reported, not silently random
    del sd["blocks.1.mlp.fc2.weight"]
    enc = build_target_encoder("eva_clip", preset="tiny")
    path = str(tmp_path / "missing.bin")
    torch.save(sd, path)
    with pytest.raises(ValueError, match="lacks 1 tensors"):
        enc.load_eva_clip_weights(path)


# ---------------------------------------------------------------- preprocessing


def test_preprocessing_constants_and_sizes():
    eva = build_target_encoder("eva_clip", device="meta")
    assert eva.mean == OPENAI_CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert eva.std == OPENAI_CLIP_STD == (0.26862954, 0.26130258, 0.27577711)
    assert eva.config["interpolation"] == "bicubic"
    assert build_target_encoder("siglip", device="meta").image_size == 512
    # shorter side -> 448 (long side truncated like torchvision), then a centered 448 crop
    im = Image.new("RGB", (600, 300))
    assert center_crop(resize_shorter(im, 448), 448).size == (448, 448)
    # 1344x448 needs no resize: black | white | black thirds -> the crop is exactly the white middle
    arr = np.zeros((448, 1344, 3), np.uint8)
    arr[:, 448:896] = 255
    x = eva.transform(Image.fromarray(arr))
    assert x.shape == (3, 448, 448) and x.dtype == torch.float32
    white = (1 - torch.tensor(OPENAI_CLIP_MEAN)) / torch.tensor(OPENAI_CLIP_STD)
    torch.testing.assert_close(x, white.view(3, 1, 1).expand(3, 448, 448))
    # portrait 300x700 -> 448x1045 -> center crop
    arr = np.zeros((700, 300, 3), np.uint8)
    arr[300:400] = 255  # a band in the vertical middle stays in the middle
    y = eva.transform(Image.fromarray(arr))
    rows = (y[0] > 0).nonzero()[:, 0]
    assert abs((rows.min() + rows.max()).item() / 2 - 223.5) <= 1.5


def test_transform_known_pixel_round_trip():
    color = (200, 30, 120)
    im = Image.new("RGB", (97, 131), color)
    for name in ("eva_clip", "siglip", "vae"):
        enc = _tiny(name, "tiny", {})
        x = enc.transform(im)
        assert x.shape == (3, 64, 64)
        expect = (torch.tensor(color) / 255 - torch.tensor(enc.mean)) / torch.tensor(enc.std)
        torch.testing.assert_close(x, expect.view(3, 1, 1).expand_as(x), atol=1e-6, rtol=0)
        # inverting the normalisation gives the 8-bit pixels back
        back = (x * torch.tensor(enc.std).view(3, 1, 1) + torch.tensor(enc.mean).view(3, 1, 1)) * 255
        assert torch.equal(back.round().to(torch.uint8)[:, 0, 0], torch.tensor(color, dtype=torch.uint8))
    # vae / siglip map black and white to -1 / +1
    vae = _tiny("vae", "tiny", {})
    assert vae.transform(Image.new("L", (64, 64), 0)).min() == -1
    assert vae.transform(Image.new("L", (64, 64), 255)).max() == 1
    # any mode is RGB-converted
    for mode in ("L", "RGBA", "P", "CMYK", "I;16"):
        assert vae.transform(Image.new(mode, (80, 64))).shape == (3, 64, 64)
    batch = vae.preprocess([im, im.convert("L")])
    assert batch.shape == (2, 3, 64, 64)


# ---------------------------------------------------------------- persistence and identity


@pytest.mark.parametrize("name,preset,overrides", TINY, ids=TINY_IDS)
def test_save_load_round_trip(tmp_path, name, preset, overrides):
    enc = _tiny(name, preset, overrides, seed=3)
    enc.save_pretrained(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    for loaded in (type(enc).from_pretrained(str(tmp_path)), TargetEncoder.from_pretrained(str(tmp_path)),
                   load_target_encoder(str(tmp_path)), build_target_encoder(name, pretrained=str(tmp_path))):
        assert type(loaded) is type(enc) and not loaded.training
        assert all(not p.requires_grad for p in loaded.parameters())
        x = _pixels(enc)
        assert torch.equal(loaded.encode(x), enc.encode(x))
        assert loaded.signature() == enc.signature()


def test_signature_tracks_config_and_weights(tmp_path):
    a = _tiny("eva_clip", "tiny", {}, seed=0)
    sig = a.signature()
    assert sig["name"] == "eva_clip" and sig["shape"] == [32, 8, 8] and sig["image_size"] == 64
    assert _tiny("eva_clip", "tiny", {}, seed=0).signature() == sig  # same config + weights
    assert _tiny("eva_clip", "tiny", {}, seed=1).signature()["weights"] != sig["weights"]
    other = _tiny("eva_clip", "tiny", {"interpolation": "bilinear"}, seed=0).signature()
    assert other["config_hash"] != sig["config_hash"] and other != sig
    pooled = _tiny("eva_clip", "tiny", {"pool": 4}, seed=0)
    assert pooled.grid == (4, 4) and pooled.signature()["shape"] == [32, 4, 4]
    s8, s4 = _tiny("siglip", "tiny", {}).signature(), _tiny("siglip", "tiny", {"grid": [4, 4]}).signature()
    assert s8["config_hash"] != s4["config_hash"] and s4["shape"] == [32, 4, 4]
    # make_tiny_target is seeded and reproducible
    p1 = make_tiny_target("vae", str(tmp_path / "a"), seed=5)
    p2 = make_tiny_target("vae", str(tmp_path / "b"), seed=5)
    assert load_target_encoder(p1).signature() == load_target_encoder(p2).signature()


def test_load_target_encoder_specs():
    enc = load_target_encoder("siglip:tiny")
    assert enc.name == "siglip" and enc.grid == (8, 8)
    enc = load_target_encoder({"name": "vae", "preset": "tiny", "latent_channels": 8})
    assert enc.channels == 8
    with pytest.raises(ValueError, match="neither"):
        load_target_encoder("no_such_target")
    with pytest.raises(KeyError, match="unknown config key"):
        build_target_encoder("siglip", preset="tiny", selct_layer=-1)


# ---------------------------------------------------------------- upstream weights (local only)


@pytest.mark.parametrize("name,hub_id", [("eva_clip", "jiuhai/eva_clip_vision_tower"),
                                         ("siglip", "google/siglip2-so400m-patch16-512"),
                                         ("vae", "stabilityai/sdxl-vae")])
def test_hub_id_without_allow_download_is_refused(name, hub_id):
    with pytest.raises(ValueError, match="allow_download=True"):
        build_target_encoder(name, pretrained=hub_id, preset="tiny")


def test_siglip_penultimate_layer_and_hf_dir(tmp_path):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    vc = dict(TARGET_PRESETS["siglip"]["tiny"]["vision_config"], num_hidden_layers=3)
    torch.manual_seed(0)
    hf = SiglipVisionModel(SiglipVisionConfig(**vc)).eval()  # with its pooling head, as checkpoints ship
    hf.save_pretrained(str(tmp_path))
    enc = build_target_encoder("siglip", pretrained=str(tmp_path), preset="tiny")
    assert enc.config["vision_config"]["num_hidden_layers"] == 3
    assert len(enc.model.encoder.layers) == 2  # the layer after the penultimate one is dropped
    x = _pixels(enc)
    with torch.no_grad():
        hs = hf(pixel_values=x, output_hidden_states=True).hidden_states
    ref = F.adaptive_avg_pool2d(hs[-2].transpose(1, 2).reshape(2, 32, 8, 8), (8, 8))
    torch.testing.assert_close(enc.encode(x), ref)


def test_vae_from_local_diffusers_dir(tmp_path):
    from diffusers import AutoencoderKL

    vc = TARGET_PRESETS["vae"]["tiny"]["vae_config"]
    torch.manual_seed(0)
    vae = AutoencoderKL(**dict(vc, scaling_factor=0.5, shift_factor=0.1)).eval()
    vae.save_pretrained(str(tmp_path / "vae"))  # a pipeline-style folder with vae/
    enc = build_target_encoder("vae", pretrained=str(tmp_path), preset="tiny")
    assert enc.config["scaling_factor"] == 0.5 and enc.config["shift_factor"] == 0.1
    x = _pixels(enc)
    with torch.no_grad():
        ref = (vae.encode(x).latent_dist.mean - 0.1) * 0.5
    torch.testing.assert_close(enc.encode(x), ref)


def test_eva_target_class_is_registered():
    assert TARGETS.get("eva_clip") is EvaClipTarget
