"""Throwaway: score a generator checkpoint (or GT features) with a decoder checkpoint, without final saves.

    python scripts/toy_probe_eval.py GEN_CKPT_DIR|gt DEC_CKPT_DIR OUT [--steps 30 --cfg 3 --dsteps N --prompts P]
"""
import argparse, json, os, shutil, sys, time
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch
from safetensors.torch import load_file
from blip3o.config import ExperimentConfig, apply_dict
from blip3o.eval.toy import score_dir

p = argparse.ArgumentParser()
p.add_argument("gen"); p.add_argument("dec"); p.add_argument("out")
p.add_argument("--steps", type=int, default=None); p.add_argument("--cfg", type=float, default=None)
p.add_argument("--dsteps", type=int, default=None); p.add_argument("--dcfg", type=float, default=None)
p.add_argument("--prompts", default="/tmp/tw20k/eval/prompts.jsonl"); p.add_argument("--n", type=int, default=1)
p.add_argument("--ema", action="store_true"); p.add_argument("--feats-only", action="store_true")
a = p.parse_args()
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

def cfg_of(ck):
    st = json.load(open(os.path.join(ck, "trainer_state.json")))["config"]
    c = ExperimentConfig(); apply_dict(c, st); return c

t0 = time.time()
dc = cfg_of(a.dec)
from blip3o.train.tasks import DecoderTask
from blip3o.train.distributed import DistInfo
import inspect
dist = DistInfo()
dtask = DecoderTask(dc, dist)
sd = load_file(os.path.join(a.dec, "trainable.safetensors"))
missing, unexpected = dtask.model.load_state_dict(sd, strict=False)
pipe_dec = dtask.pipe
pipe_dec.denoiser.eval()
rows = [json.loads(l) for l in open(a.prompts)]
shutil.rmtree(a.out, ignore_errors=True)
kw = {}
if a.dsteps: kw["num_inference_steps"] = a.dsteps
if a.dcfg is not None: kw["guidance_scale"] = a.dcfg
if a.gen == "gt":
    # ground-truth features of the eval scenes (decoder-only check)
    from blip3o.data.toy import eval_scenes, render
    scenes = eval_scenes(0, 12)
    imgs = torch.stack([dtask.image_transform(render(s)) for s in scenes])
    with torch.no_grad():
        feats = dtask.features_of(imgs)
if True:
    cache = os.path.join(a.gen, f"feats_{a.steps}_{a.cfg}_{a.n}_{int(a.ema)}.pt")
if a.gen != "gt" and os.path.isfile(cache):
    feats = torch.load(cache)
elif a.gen != "gt":
    gc = cfg_of(a.gen)
    from blip3o.models.build import build_model
    model, tok = build_model(gc.model)
    sd = load_file(os.path.join(a.gen, "ema.safetensors" if a.ema else "trainable.safetensors"))
    if a.ema:
        sd.update({k: v for k, v in load_file(os.path.join(a.gen, "trainable.safetensors")).items() if k not in sd})
    mi, un = model.load_state_dict(sd, strict=False)
    model.eval()
    prompts = [r["prompt"] for r in rows]
    gens = [torch.Generator().manual_seed(i) for i in range(len(prompts) * a.n)]
    with torch.no_grad():
        f = model.generate_features(prompts, num_inference_steps=a.steps, guidance_scale=a.cfg,
                                    generator=gens, num_images_per_prompt=a.n)
    feats = f.flatten(2).transpose(1, 2)  # (B, N, C)
    torch.save(feats, cache)
if a.feats_only:
    print("features", tuple(feats.shape), round(time.time() - t0, 1)); sys.exit(0)
t1 = time.time()
gens = [torch.Generator().manual_seed(i) for i in range(feats.shape[0])]
with torch.no_grad():
    images = pipe_dec(feats, generator=gens, output_type="pil", **kw).images
n = a.n if a.gen != "gt" else 1
for i, r in enumerate(rows):
    d = os.path.join(a.out, f"{i:05d}"); os.makedirs(os.path.join(d, "samples"), exist_ok=True)
    json.dump(r, open(os.path.join(d, "metadata.jsonl"), "w"))
    for j in range(n):
        images[i * n + j].save(os.path.join(d, "samples", f"{j:04d}.png"))
s = score_dir(a.out)
print(json.dumps({"gen": a.gen, "dec": a.dec, "overall": round(s["overall"], 3),
                  "tags": {k: round(v, 3) for k, v in s["tags"].items()}, "feat_s": round(t1 - t0, 1),
                  "decode_s": round(time.time() - t1, 1)}))
