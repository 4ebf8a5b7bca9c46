"""An official-layout BLIP3o directory (tiny fixture) loads with no unexplained keys and generates."""
import logging

import pytest
import torch
from safetensors.torch import load_file

from blip3o.models.blip3o import Blip3oForConditionalGeneration
from blip3o.models.loading import checkpoint_kind, load_generation_model
from blip3o.models.official import rename_official_key
from tests.official_fixture import write_official_fixture


def test_official_layout_loads_and_generates(tmp_path, caplog):
    d = write_official_fixture(tmp_path / "BLIP3o-Model-4B")
    assert checkpoint_kind(d) == "official"
    # our own class never lets transformers read the flat official config; the loader converts it
    with pytest.raises(ValueError, match="load_generation_model"):
        Blip3oForConditionalGeneration.from_pretrained(d)
    with caplog.at_level(logging.INFO, logger="blip3o.models.official"):
        m = load_generation_model(d)
    assert type(m) is Blip3oForConditionalGeneration
    assert "ignored 1 tensors" in caplog.text and "model.gen_vision_tower" in caplog.text
    assert m.config.num_queries == 64 and m.config.target_channels == 32
    # every tensor of the release landed where it belongs
    sd = {}
    for f in sorted(d.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    ours = m.state_dict()
    for k, v in sd.items():
        new = rename_official_key(k)
        if new:
            torch.testing.assert_close(ours[new], v)
    # tied lm_head re-tied to the embeddings
    assert torch.equal(m.backbone.lm_head.weight, m.backbone.get_input_embeddings().weight)
    assert m.tokenizer.convert_tokens_to_ids("[IMG]") == 151665
    x = m.generate_features(["a red circle", "two blue squares"], num_inference_steps=3,
                            generator=[torch.Generator().manual_seed(i) for i in range(2)])
    assert x.shape == (2, 32, 8, 8) and torch.isfinite(x).all()


def test_official_rename_table():
    assert rename_official_key("model.layers.3.mlp.up_proj.weight") == "backbone.model.language_model.layers.3.mlp.up_proj.weight"
    assert rename_official_key("visual.blocks.0.attn.qkv.weight") == "backbone.model.visual.blocks.0.attn.qkv.weight"
    assert rename_official_key("model.dit.model.layers.0.gate") == "dit.layers.0.gate"
    assert rename_official_key("model.latent_queries") == "latent_queries"
    assert rename_official_key("model.gen_vision_tower.x") is None
    assert rename_official_key("something.else") is False
