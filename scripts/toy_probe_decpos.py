"""Throwaway: does the decoder learn layout when each feature token also carries its (x, y) position?
Same tiny SDXL decoder (pixel VAE, x0 prediction) trained with train_decoder_steps on freshly rendered toy
scenes; features = frozen tiny EVA tokens concatenated with 16 fixed sin/cos channels of the token's grid
position (feature_dim 32 + 16). Scores ground-truth features of the 48 eval scenes at the end.

    python scripts/toy_probe_decpos.py STEPS OUT [--nopos]
"""
import json, os, random, sys, time, torch
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
from blip3o.config import load_config
from blip3o.train.tasks import DecoderTask
from blip3o.train.distributed import DistInfo
from blip3o.decoders import build_decoder
from blip3o.decoders.training import train_decoder_steps
from blip3o.data.toy import eval_scenes, eval_row, render, train_scene
from blip3o.eval.toy import score_dir

steps, out = int(sys.argv[1]), sys.argv[2]
pos = "--nopos" not in sys.argv
cfg = load_config("configs/toy_decoder.yaml")
task = DecoderTask(cfg, DistInfo())  # for the target + transforms; its own pipe is not used
P = 16 if pos else 0
def posenc(n=8, d=16):
    ys, xs = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    f = torch.exp(torch.arange(d // 4) * -1.0) * 3.0
    e = [torch.sin(xs[..., None] / n * f * 6.28), torch.cos(xs[..., None] / n * f * 6.28),
         torch.sin(ys[..., None] / n * f * 6.28), torch.cos(ys[..., None] / n * f * 6.28)]
    return torch.cat(e, -1).reshape(n * n, d)
PE = posenc()
def feats(imgs):
    f = task.features_of(imgs)
    f = (f - f.mean(dim=(0, 1), keepdim=True)) / f.std(dim=(0, 1), keepdim=True).clamp_min(1e-6) if False else f
    if P:
        f = torch.cat([f, PE[None].expand(f.shape[0], -1, -1) * f.std()], -1)
    return f
pipe = build_decoder("sdxl", preset="tiny", pretrained=False, feature_dim=task.target.channels + P,
                     num_tokens=task.target.num_tokens, vae="pixel")
def batches(bs=32):
    i = 0
    while True:
        imgs = torch.stack([task.image_transform(render(train_scene(0, (i + k) % 20000))) for k in range(bs)])
        i += bs
        yield imgs, feats(imgs)
t = time.time()
losses = train_decoder_steps(pipe, batches(), steps, lr=5e-4, feature_noise=0.2)
train_s = time.time() - t
scenes = eval_scenes(0, 12)
imgs = torch.stack([task.image_transform(render(s)) for s in scenes])
with torch.no_grad():
    res = pipe(feats(imgs), generator=[torch.Generator().manual_seed(i) for i in range(48)], output_type="pil").images
for i, (s, im) in enumerate(zip(scenes, res)):
    d = os.path.join(out, f"{i:05d}"); os.makedirs(os.path.join(d, "samples"), exist_ok=True)
    json.dump(eval_row(s), open(os.path.join(d, "metadata.jsonl"), "w")); im.save(os.path.join(d, "samples", "0000.png"))
sc = score_dir(out)
print(json.dumps({"pos": pos, "steps": steps, "train_s": round(train_s), "loss_last50": sum(losses[-50:]) / 50,
                  "overall": round(sc["overall"], 3), "tags": {k: round(v, 3) for k, v in sc["tags"].items()}}))
