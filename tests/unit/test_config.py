import pytest

from blip3o.config import ConfigError, load_config


def test_defaults_are_the_paper():
    cfg = load_config()
    m, t = cfg.model, cfg.train
    assert (m.backbone, m.target, m.objective["name"], m.num_queries) == ("qwen2_5_vl", "eva_clip", "flow", 64)
    assert m.backbone_path == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert (m.cfg_dropout, m.num_inference_steps, m.guidance_scale) == (0.1, 30, 3.0)
    assert (t.learning_rate, t.min_lr, t.lr_scheduler_type, t.warmup_ratio) == (1e-4, 1e-5, "cosine_with_min_lr", 0.003)
    assert (t.per_device_train_batch_size, t.mixed_precision, m.max_length) == (16, "bf16", 512)


def test_presets_and_overrides(tmp_path):
    y = tmp_path / "exp.yaml"
    y.write_text("preset: tiny\nmodel: {objective: mse, target: siglip}\ntrain: {max_steps: 7}\n")
    cfg = load_config(y, ["train.learning_rate=0.01", "model.dit.dim=32", "data.train_shards=/x/{0..3}.tar"])
    assert cfg.model.backbone_path == "tiny" and cfg.model.objective == {"name": "mse"} and cfg.model.target == "siglip"
    assert cfg.train.max_steps == 7 and cfg.train.learning_rate == 0.01 and cfg.model.dit == {"dim": 32}
    assert cfg.data.train_shards == "/x/{0..3}.tar"
    assert load_config(None, ["preset=official-4b"]).model.backbone_path == "Qwen/Qwen2.5-VL-3B-Instruct"


@pytest.mark.parametrize("override,fragment", [
    (["train.learning_rate=fast"], "train.learning_rate: expected float"),
    (["train.max_step=3"], "unknown field 'train.max_step' (did you mean 'train.max_steps'?)"),
    (["model.objective=diffusion"], "model.objective: 'diffusion' is not one of"),
    (["model.num_queries=1.5"], "model.num_queries: expected int"),
    (["modle.num_queries=3"], "unknown section 'modle'"),
    (["max_steps=3"], "must name its section"),
    (["preset=huge"], "preset: 'huge' is not one of"),
    (["model.cfg_dropout=1.5"], "model.cfg_dropout: must be in [0, 1)"),
    # accepted-but-unused fields are refused (no silent no-ops)
    (["model.lora_rank=8"], "model.lora_rank: the sequential recipe keeps the backbone frozen"),
    (["model.text_loss_weight=1.0"], "model.text_loss_weight: the sequential recipe has no text loss"),
    (["model.image_loss_weight=2.0"], "model.image_loss_weight: applies to generator=transfusion|lmfusion"),
    (["model.fusion_patch_size=4"], "model.fusion_patch_size: applies to generator=transfusion|lmfusion"),
    (["model.generator=transfusion", "model.target=vae", "model.num_queries=16"], "has no queries or DiT"),
    (["model.generator=transfusion", "model.target=vae", "model.dit={dim: 64}"], "has no queries or DiT"),
    (["model.lora_alpha=32"], "model.lora_alpha: only used with model.lora_rank > 0"),
    (["model.objective.logit_std=2.0"], "model.objective.logit_mean/logit_std: only used with time_sampling=logit_normal"),
    (["model.objective=mse", "model.objective.sample_timesteps=float"],
     "model.objective.sample_timesteps: not a setting of objective 'mse'"),
    (["model.objective.time_shfit=3"], "model.objective.time_shfit: not a setting of objective 'flow' (did you mean"),
    (["model.objective.time_shift=fast"], "model.objective.time_shift: expected float"),
    (["model.objective=[flow]"], "model.objective: expected a name or a mapping"),
    (["model.time_shift=3.0"], "unknown field 'model.time_shift' (a setting of the objective now: 'model.objective.time_shift')"),
    (["model.generator=gan"], "model.generator: 'gan' is not one of ['blip3o', 'lmfusion', 'transfusion']"),
    (["model.recipe=lora"], "model.recipe: 'lora' is not one of ['joint', 'sequential']"),
    (["model.decoder=dalle"], "model.decoder: 'dalle' is not one of ['sana', 'sdxl', 'none']"),
    (["train.task=rl"], "train.task: 'rl' is not one of ['clip', 'decoder', 't2i']"),
    (["model.decoder_feature_noise=0.1"], "only used when training a decoder"),
    (["train.task=decoder", "data.eval_prompts=p.jsonl"], "data.eval_prompts: the decoder task"),
    (["model.objective.sample_timesteps=round"], "model.objective.sample_timesteps: 'round' is not one of"),
    (["model.inference_max_length=10"], "model.inference_max_length: 0 (no cut)"),
    (["train.lr_scheduler_type=cosine", "train.min_lr=1e-6"], "train.min_lr: only used by"),
    (["data.use_cache=false", "data.cache_dir=/x"], "data.cache_dir: the target-feature cache is off"),
    (["train.ema_warmup=true"], "train.ema_warmup: needs an EMA"),
])
def test_bad_config_is_one_line_naming_the_field(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    msg = str(e.value)
    assert fragment in msg and "\n" not in msg


def test_bad_yaml(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("model:\n  num_queries: [1\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(y)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    y.write_text("trian: {max_steps: 3}\n")
    with pytest.raises(ConfigError, match="did you mean 'train'"):
        load_config(y)


def test_objective_settings_nest_under_the_objective(tmp_path):
    y = tmp_path / "exp.yaml"
    y.write_text("model:\n  objective: {name: flow, time_sampling: logit_normal, logit_std: 2}\n")
    m = load_config(y, ["model.objective.time_shift=3.0"]).model
    assert m.objective == {"name": "flow", "time_sampling": "logit_normal", "logit_mean": 0.0, "logit_std": 2.0,
                           "time_shift": 3.0, "sample_timesteps": "auto"}
    assert load_config(y, ["model.objective=mse"]).model.objective == {"name": "mse"}  # another name: its defaults
    assert load_config(None, ["model.objective=flow"]).model.objective["time_shift"] == 1.0


def test_model_configs_saved_with_flat_objective_settings_still_load():
    from blip3o.objectives import build_objective, saved_settings

    old = dict(time_sampling="uniform", logit_mean=0.0, logit_std=1.0, shift=3.0, sample_timesteps="float")
    assert saved_settings("flow", old) == dict(time_sampling="uniform", logit_mean=0.0, logit_std=1.0,
                                               time_shift=3.0, sample_timesteps="float")
    assert build_objective("flow", **saved_settings("flow", old)).time_shift == 3.0
    assert saved_settings("mse", old) == {}  # the mse objective ignored them
    with pytest.raises(ValueError, match=r"objective 'mse': unknown setting\(s\) \['shift'\]"):
        build_objective("mse", shift=3.0)  # nothing is dropped silently any more
