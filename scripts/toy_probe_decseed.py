"""Throwaway: does the decoder place objects from the features or from its own noise seed?
Decodes the ground-truth features of 4 eval scenes with 4 seeds each (rows = scenes, columns = seeds)."""
import json, os, sys, torch
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from safetensors.torch import load_file
from blip3o.config import ExperimentConfig, apply_dict
from blip3o.train.tasks import DecoderTask
from blip3o.train.distributed import DistInfo
from blip3o.data.toy import eval_scenes, render
from PIL import Image
ck = sys.argv[1]
c = ExperimentConfig(); apply_dict(c, json.load(open(os.path.join(ck, "trainer_state.json")))["config"])
t = DecoderTask(c, DistInfo()); t.model.load_state_dict(load_file(os.path.join(ck, "trainable.safetensors")), strict=False)
sc = [eval_scenes(0, 12)[i] for i in (0, 12, 25, 37)]
imgs = torch.stack([t.image_transform(render(s)) for s in sc])
with torch.no_grad():
    f = t.features_of(imgs).repeat_interleave(4, 0)
    out = t.pipe(f, generator=[torch.Generator().manual_seed(k % 4) for k in range(16)], output_type="pil").images
g = Image.new("RGB", (64 * 5, 64 * 4), "white")
for r in range(4):
    g.paste(render(sc[r]), (0, r * 64))
    for k in range(4):
        g.paste(out[r * 4 + k], ((k + 1) * 64, r * 64))
g.resize((640, 512), Image.NEAREST).save(sys.argv[2])
