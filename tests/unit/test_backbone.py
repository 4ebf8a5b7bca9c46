"""Prompt format, special tokens, left-padding invariance and the untouched understanding path."""
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from blip3o.models.backbone import get_backbone, resolve_backbone_path
from blip3o.models.blip3o import Blip3oConfig, Blip3oForConditionalGeneration
from blip3o.models.dit import DIT_PRESETS
from blip3o.prompts import CHATML, GEN_INSTRUCTION, encode_generation_prompts


def bare_model(backbone="qwen2_5_vl", recipe="sequential"):
    path = resolve_backbone_path(backbone, "tiny")
    adapter = get_backbone(backbone)
    bb = adapter.from_pretrained(path)
    dit = DIT_PRESETS["tiny"].to_dict()
    dit.update(in_channels=8, input_size=8, caption_dim=adapter.hidden_size(bb))
    cfg = Blip3oConfig(backbone=backbone, backbone_config=bb.config.to_dict(), num_queries=16, dit_config=dit,
                       target_channels=8, target_grid=[8, 8], chat_template=adapter.template.name, max_prompt_length=96,
                       recipe=recipe, text_loss_weight=1.0 if recipe == "joint" else 0.0)
    torch.manual_seed(0)
    m = Blip3oForConditionalGeneration(cfg, backbone=bb)
    m.tokenizer = AutoTokenizer.from_pretrained(path)
    m._source_dir = path
    return m.eval()


def test_qwen25_special_token_ids_match_the_release(tiny_qwen_dir):
    tok = AutoTokenizer.from_pretrained(tiny_qwen_dir)
    assert [tok.convert_tokens_to_ids(t) for t in ("[IMG]", "[/IMG]", "<image>")] == [151665, 151666, 151667]
    assert tok.convert_tokens_to_ids("<|im_start|>") == 151644 and tok("Hello world")["input_ids"] == [9707, 1879]


def test_generation_prompt_is_one_open_assistant_turn(tiny_qwen_dir):
    tok = AutoTokenizer.from_pretrained(tiny_qwen_dir)
    enc = encode_generation_prompts(tok, ["a red circle"], CHATML, max_length=128, num_queries=64)
    text = tok.decode(enc["input_ids"][0])
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    + GEN_INSTRUCTION + "a red circle<|im_end|>\n<|im_start|>assistant\n[IMG]")


@pytest.mark.parametrize("caption,ids", [  # from ': ' on; the original's ids (decisions.md, "Prompts")
    ("A photo of cute cat", [25, 362, 6548, 315, 18838, 8251]),  # ': A' -> [':', 'ĠA'], not [':', 'Ġ', 'A']
    (" starts with a space", [25, 220, 8471, 448, 264, 3550]),
    ("猫 and a dog, 3 apples", [25, 10236, 234, 104, 323, 264, 5562, 11, 220, 18, 40676]),
])
def test_whole_user_message_is_tokenised_at_once(tiny_qwen_dir, caption, ids):
    from blip3o.data.collate import BatchCollator
    from blip3o.prompts import tokenize_for_generation

    tok = AutoTokenizer.from_pretrained(tiny_qwen_dir)
    tail = [151645, 198, 151644, 77091, 198, 151665]  # <|im_end|>\n<|im_start|>assistant\n[IMG]
    infer = tokenize_for_generation(tok, [caption], "chatml", 0, 64)["input_ids"][0].tolist()
    train = BatchCollator(tok, CHATML, num_queries=64, max_length=512)(
        [{"kind": "gen", "caption": caption, "key": "k", "source": "s", "pixel_values": torch.zeros(3, 2, 2)}])
    assert infer[22:] == ids + tail and train["input_ids"][0].tolist() == infer  # one builder for both


def test_caption_capped_by_tokens_and_left_padded(tiny_qwen_dir):
    tok = AutoTokenizer.from_pretrained(tiny_qwen_dir)
    enc = encode_generation_prompts(tok, ["word " * 500, "short"], CHATML, max_length=128, num_queries=64)
    assert enc["input_ids"].shape[1] == 128 - 64
    assert enc["attention_mask"][1, 0] == 0 and enc["attention_mask"][1, -1] == 1  # left padding
    assert (enc["input_ids"][:, -1] == 151665).all()
    with pytest.raises(ValueError, match="no room"):
        encode_generation_prompts(tok, ["x"], CHATML, max_length=70, num_queries=64)


@pytest.mark.parametrize("backbone", ["qwen2_5_vl", "llama3", "qwen3"])
def test_batched_conditioning_equals_one_at_a_time(backbone):
    m = bare_model(backbone)
    prompts = ["a red circle", "three blue squares to the left of a big yellow triangle", "x"]
    with torch.no_grad():
        enc = m.tokenize_prompts(prompts)
        batched = m.encode_condition(enc["input_ids"], enc["attention_mask"])
        for i, p in enumerate(prompts):
            e1 = m.tokenize_prompts([p])
            single = m.encode_condition(e1["input_ids"], e1["attention_mask"])
            torch.testing.assert_close(batched[i:i + 1], single, atol=1e-5, rtol=1e-4)
    assert batched.shape == (3, 16, 64)


def test_only_queries_and_dit_train_in_the_sequential_recipe():
    m = bare_model()
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert names and all(n == "latent_queries" or n.startswith("dit.") for n in names)
    m.train()
    assert not m.backbone.training and m.dit.training
    out = m(**m.tokenize_prompts(["a", "b c"]), target_latents=torch.randn(2, 8, 8, 8))
    out.loss.backward()
    assert m.latent_queries.grad is not None and m.latent_queries.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.backbone.parameters())
    assert all(p.grad is not None for p in m.dit.parameters())


def test_joint_recipe_unfreezes_backbone_and_adds_text_loss():
    m = bare_model(recipe="joint").train()
    assert all(p.requires_grad for p in m.backbone.parameters())
    tok = m.tokenizer
    und = tok(["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>"], return_tensors="pt")
    out = m(**m.tokenize_prompts(["a"]), target_latents=torch.randn(1, 8, 8, 8), und_input_ids=und["input_ids"],
            und_attention_mask=und["attention_mask"], und_labels=und["input_ids"])
    assert out.text_loss is not None and torch.isfinite(out.loss)
    out.loss.backward()
    assert m.backbone.get_input_embeddings().weight.grad is not None


def test_understanding_path_is_the_bare_backbone(tiny_qwen_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from blip3o.models.understanding import build_understanding_inputs

    m = bare_model()
    bare = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_qwen_dir).eval()
    img = Image.new("RGB", (56, 56), (200, 30, 30))
    enc = build_understanding_inputs(m, [img], ["What colour is this?"])
    with torch.no_grad():
        ours = m.backbone(**enc).logits
        ref = bare(**enc).logits
    torch.testing.assert_close(ours, ref)
    answers = m.understand([img], ["What colour is this?"], max_new_tokens=4)
    gen = bare.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=m.tokenizer.pad_token_id)
    assert answers[0] == m.tokenizer.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_materialising_a_tiny_preset_leaves_the_global_rng_alone(tmp_path):
    # A fresh checkout builds the preset inside the trainer after it seeds: the build must not move that seed
    # (it did once, and a fresh cache trained from other initial weights than a filled one).
    torch.manual_seed(123)
    want = torch.rand(1)
    torch.manual_seed(123)
    get_backbone("qwen3").make_tiny(str(tmp_path / "q3"), seed=0)
    assert torch.equal(torch.rand(1), want)
