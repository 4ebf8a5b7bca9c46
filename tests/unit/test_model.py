"""The BLIP3-o model on tiny presets: loss goes down for every target x objective, save/load,
sampling determinism and batching, CFG in one batched forward."""
import pytest
import torch

from blip3o.config import load_config
from blip3o.models.blip3o import Blip3oForConditionalGeneration
from blip3o.models.build import build_model

PROMPTS = ["a red circle", "two blue squares", "a green triangle above a yellow circle", "four purple circles"]


def tiny(target="eva_clip", objective="flow", **extra):
    ov = [f"model.target={target}", f"model.objective={objective}", "model.num_queries=16"]
    ov += [f"model.{k}={v}" for k, v in extra.items()]
    cfg = load_config(None, ["preset=tiny"] + ov)
    torch.manual_seed(0)
    model, tok = build_model(cfg.model)
    return model, tok


def images(n, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    from PIL import Image

    out = []
    for i in range(n):
        arr = (torch.rand(size, size, 3, generator=g) * 255).byte().numpy()
        out.append(Image.fromarray(arr))
    return out


@pytest.mark.parametrize("target,objective", [("eva_clip", "flow"), ("eva_clip", "mse"), ("siglip", "flow"),
                                              ("siglip", "mse"), ("vae", "flow"), ("vae", "mse")])
def test_overfit_one_batch_every_target_and_objective(target, objective):
    model, _ = tiny(target, objective, cfg_dropout=0.0)
    enc = model.tokenize_prompts(PROMPTS)
    px = torch.stack([model.target_encoder.transform(im) for im in images(4)])
    x0 = model.target_encoder.encode(px)
    assert x0.shape == (4, model.config.target_channels, *model.config.target_grid)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=3e-3)
    model.train()
    losses = []
    for step in range(40):
        # fixed noise/time draws make the curve a fair overfitting measure for flow as well
        out = model(**enc, target_latents=x0, generator=torch.Generator().manual_seed(step % 4))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    # MSE first fits the per-position mean (a plateau for features whose images differ little,
    # e.g. SigLIP's), flow keeps falling; both must clearly decrease.
    assert last < 0.9 * first, (first, last)


def test_pixel_values_path_matches_target_latents():
    model, _ = tiny()
    enc = model.tokenize_prompts(PROMPTS[:2])
    px = torch.stack([model.target_encoder.transform(im) for im in images(2)])
    a = model(**enc, pixel_values=px, generator=torch.Generator().manual_seed(1)).loss
    b = model(**enc, target_latents=model.target_encoder.encode(px), generator=torch.Generator().manual_seed(1)).loss
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="pixel_values"):
        model(**enc)


def test_save_load_round_trip_is_self_contained(tmp_path):
    model, _ = tiny(target_norm="channel")
    model.init_target_stats(torch.randn(8, model.config.target_channels, 8, 8) * 3 + 1)
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "target_encoder" / "config.json").is_file()
    assert (tmp_path / "m" / "tokenizer_config.json").is_file()
    loaded = Blip3oForConditionalGeneration.from_pretrained(tmp_path / "m")
    assert not any("target_encoder" in k for k in loaded.state_dict())  # a separate component, not model weights
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(a, b, msg=n)
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(2)]  # noqa: E731
    x1 = model.eval().generate_features(PROMPTS[:2], generator=gens(), num_inference_steps=4)
    x2 = loaded.generate_features(PROMPTS[:2], generator=gens(), num_inference_steps=4)
    torch.testing.assert_close(x1, x2)
    px = torch.stack([loaded.target_encoder.transform(im) for im in images(1)])
    torch.testing.assert_close(loaded.target_encoder.encode(px), model.target_encoder.encode(px))
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if p.requires_grad}


def test_sampling_seeds_batching_and_one_forward_per_step():
    model, _ = tiny()
    model.eval()
    calls = []
    orig = model.dit.forward
    model.dit.forward = lambda *a, **k: (calls.append(a[0].shape[0]), orig(*a, **k))[1]
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    batch = model.generate_features(PROMPTS, generator=gens([0, 1, 2, 3]), num_inference_steps=5)
    assert calls == [8] * 5  # cond + uncond in ONE forward per step
    alone = model.generate_features(PROMPTS[2:3], generator=gens([2]), num_inference_steps=5)
    torch.testing.assert_close(batch[2:3], alone, atol=1e-5, rtol=1e-4)
    again = model.generate_features(PROMPTS[:1], generator=gens([0]), num_inference_steps=5)
    other = model.generate_features(PROMPTS[:1], generator=gens([7]), num_inference_steps=5)
    torch.testing.assert_close(batch[:1], again, atol=1e-5, rtol=1e-4)
    assert (batch[:1] - other).abs().max() > 1e-3
    many = model.generate_features(PROMPTS[:2], num_images_per_prompt=3, num_inference_steps=2)
    assert many.shape[0] == 6
    with pytest.raises(ValueError, match="non-empty"):
        model.generate_features(["  "])


def test_guidance_rescale_comes_from_the_config_and_survives_saving(tmp_path):
    model, _ = tiny(guidance_scale=9.0, guidance_rescale=1.0)
    assert model.config.guidance_rescale == 1.0
    model.save_pretrained(tmp_path / "m")
    loaded = Blip3oForConditionalGeneration.from_pretrained(tmp_path / "m").eval()
    assert loaded.config.guidance_rescale == 1.0
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(2)]  # noqa: E731
    rescaled = loaded.generate_features(PROMPTS[:2], generator=gens(), num_inference_steps=4)
    loaded.config.guidance_rescale = 0.0
    plain = loaded.generate_features(PROMPTS[:2], generator=gens(), num_inference_steps=4)
    assert (rescaled - plain).abs().max() > 1e-4  # the setting reaches the sampler
    mse, _ = tiny(objective="mse", guidance_rescale=0.5)
    with pytest.raises(ValueError, match="guidance_rescale"):
        mse.eval().generate_features(PROMPTS[:1])


def test_mse_is_deterministic_regression():
    model, _ = tiny(objective="mse")
    model.eval()
    a = model.generate_features(PROMPTS[:2], generator=[torch.Generator().manual_seed(s) for s in (0, 1)])
    b = model.generate_features(PROMPTS[:2], generator=[torch.Generator().manual_seed(s) for s in (5, 6)])
    torch.testing.assert_close(a, b)


def test_cfg_dropout_zeroes_whole_conditioning():
    from blip3o.objectives import FlowMatching

    model, _ = tiny(cfg_dropout=0.5)
    seen = []
    model.objective = type("Spy", (FlowMatching,), {
        "loss": lambda self, net, x0, cond, mask, gen: (seen.append(cond.detach()), FlowMatching.loss(self, net, x0, cond, mask, gen))[1]})()
    model.train()
    enc = model.tokenize_prompts(PROMPTS * 4)
    model(**enc, target_latents=torch.randn(16, model.config.target_channels, 8, 8),
          generator=torch.Generator().manual_seed(0))
    per_sample = seen[0].flatten(1).abs().sum(1)
    assert (per_sample == 0).any() and (per_sample > 0).any()


def test_sampler_feeds_the_originals_integer_timesteps():
    """sigma grid np.linspace(1, 1/30, 30) in float64 -> float32 (torch.linspace in float32 would floor to 499 at
    step 15), DiT timestep 1000 sigma truncated; floats on request or for continuous training schedules."""
    from blip3o.objectives import FlowMatching

    seen = []

    def net(x, t, cond, mask):
        seen.append(t[0].item())
        return torch.zeros_like(x)

    flow = FlowMatching()
    assert flow.integer_timesteps and not FlowMatching(sample_timesteps="float").integer_timesteps
    assert not FlowMatching(time_sampling="logit_normal").integer_timesteps
    flow.sample(net, torch.zeros(1, 4, 8), None, (1, 2, 2, 2), num_steps=30, guidance_scale=1.0)
    assert seen[:4] == [1000, 966, 933, 900] and seen[15] == 500 and all(t == int(t) for t in seen)
    seen.clear()
    FlowMatching(sample_timesteps="float").sample(net, torch.zeros(1, 4, 8), None, (1, 2, 2, 2), num_steps=30,
                                                  guidance_scale=1.0)
    assert seen[1] == pytest.approx(966.6667, abs=1e-3)


def _imports(node):
    """Modules an import statement names (``from a import b`` names ``a`` and ``a.b``)."""
    import ast

    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom) and node.module:
        return [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return []


def test_models_package_has_no_import_cycle_and_no_hidden_imports():
    """Every import in blip3o/models, function-level ones included, forms a graph without cycles; the only
    function-level import left is peft (optional: LoRA runs only)."""
    import ast

    from tests.conftest import ROOT

    files = {}
    for f in (ROOT / "blip3o" / "models").rglob("*.py"):
        parts = f.relative_to(ROOT).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    graph, inner = {}, []
    for name, f in files.items():
        tree = ast.parse(f.read_text())
        deps = {m for node in ast.walk(tree) for m in _imports(node) if m in files}
        # a package's submodules run while the package initialises: that is not an edge back to it
        graph[name] = {d for d in deps if d != name and not name.startswith(d + ".")}
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner += [m for node in ast.walk(fn) for m in _imports(node)[:1]]
    assert sorted(set(inner)) == ["peft"], inner
    done, active = set(), []

    def visit(n):
        assert n not in active, f"import cycle: {' -> '.join(active[active.index(n):] + [n])}"
        if n in done:
            return
        active.append(n)
        for d in sorted(graph[n]):
            visit(d)
        active.pop()
        done.add(n)

    for n in sorted(graph):
        visit(n)


def test_joint_batch_of_understanding_samples_only_trains_the_backbone_on_its_images():
    """A mixture draws each sample's source, so a joint-recipe batch can hold no generation sample: the text loss
    alone then, and the conversation's image reaches the vision tower (through the backbone's image processor)."""
    from blip3o.data.collate import encode_conversation
    from blip3o.prompts import get_template, left_pad

    model, tok = tiny(recipe="joint", text_loss_weight=1.0)
    model.train()
    vis = model.image_processor(images=images(2, size=56), return_tensors="pt")
    n = int(vis["image_grid_thw"][0].prod()) // 4
    conv = [{"from": "human", "value": "<image>\nWhat colour is the circle?"}, {"from": "gpt", "value": "red"}]
    ids, labels = encode_conversation(tok, conv, get_template(model.config.chat_template), n, 256)
    enc = left_pad([ids, ids], tok.pad_token_id, labels=[labels, labels])
    out = model(und_input_ids=enc["input_ids"], und_attention_mask=enc["attention_mask"], und_labels=enc["labels"],
                und_pixel_values=vis["pixel_values"], und_image_grid_thw=vis["image_grid_thw"])
    assert out.image_loss.item() == 0.0 and torch.isfinite(out.text_loss) and out.loss.item() == out.text_loss.item()
    # the answer-only LM head gives the backbone's own labels= loss
    ref = model.backbone(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=enc["labels"],
                         pixel_values=vis["pixel_values"], image_grid_thw=vis["image_grid_thw"]).loss
    assert torch.allclose(out.text_loss, ref, atol=1e-5), (out.text_loss, ref)
    out.loss.backward()
    visual = [p.grad for n_, p in model.backbone.named_parameters() if "visual" in n_ and p.requires_grad]
    assert visual and any(g is not None and g.abs().sum() > 0 for g in visual)
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.dit.parameters())
    with pytest.raises(ValueError, match="input_ids"):
        model(pixel_values=torch.zeros(1, 3, 64, 64))  # a generation batch without its prompts
