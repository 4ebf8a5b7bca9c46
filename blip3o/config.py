"""Typed experiment configuration: model / data / train dataclasses, presets, YAML + CLI overrides.

An experiment is one small YAML file (see ``configs/``)::

    preset: tiny            # optional: official-8b | official-4b | tiny (applied first)
    imports: [my_pkg.my_target]   # optional: modules that register variants (docs/extending.md)
    model: {target: siglip, objective: {name: flow, time_shift: 3.0}}   # or just `objective: flow`
    data:  {train_shards: toy_data/train}
    train: {max_steps: 200, learning_rate: 3.0e-4}

and ``key=value`` overrides on the command line (``train.max_steps=10 model.objective=mse``,
``model.objective.time_shift=3.0``, ``imports=[my_pkg.my_target]``). The paper's settings are the dataclass
defaults; a component's settings (the objective's) are the fields of its registered class. Unknown keys and
wrong types raise :class:`ConfigError` with one line naming the field, e.g.
``ConfigError: train.learning_rate: expected float, got 'fast'``.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message is one line that names the field."""


@dataclass
class ModelConfig:
    # Backbone: a registry name plus where its weights live (hub id, local dir, or "tiny" for the
    # random tiny preset materialised locally).
    backbone: str = "qwen2_5_vl"
    backbone_path: str = "Qwen/Qwen2.5-VL-7B-Instruct"
    recipe: str = "sequential"  # sequential: frozen backbone; joint: backbone trains + text loss
    init_from: Optional[str] = None  # start from a saved BLIP3-o model dir (instruction tuning, continued training)
    num_queries: int = 64
    attn_implementation: str = "sdpa"
    # Target (what the DiT generates).
    target: str = "eva_clip"
    target_path: Optional[str] = None  # None -> the registry's default for `target_preset`
    target_preset: str = "official"
    # Overrides of the target preset's architecture (e.g. {pool: 4} for a 4x4 token grid); a tiny preset
    # with overrides is materialised once per distinct set, so every stage that names them gets the same encoder.
    target_kwargs: Dict[str, Any] = field(default_factory=dict)
    # Generator. The objective and its settings (the fields of its class in blip3o/objectives.py), e.g.
    # {name: flow, time_sampling: logit_normal, time_shift: 3.0}; a bare name means its defaults.
    objective: Dict[str, Any] = field(default_factory=lambda: {"name": "flow"})
    dit_preset: str = "official"
    dit: Dict[str, Any] = field(default_factory=dict)  # overrides of blip3o.models.dit.DiTConfig
    cfg_dropout: float = 0.1  # conditioning zeroed for this fraction of samples (CFG)
    target_norm: str = "none"  # none (reference) | channel: per-channel z-score with stats in the checkpoint
    text_loss_weight: float = 0.0  # > 0 only for the joint recipe (and transfusion's LM loss on captions)
    # Fusion generators (generator=transfusion|lmfusion): the backbone itself denoises VAE latents
    # (blip3o/models/fusion.py); recipe/num_queries/dit do not apply to them.
    generator: str = "blip3o"
    image_loss_weight: float = 1.0  # weight of the flow loss on the image block (fusion generators)
    fusion_patch_size: int = 2  # p x p latent patches per image token (fusion generators)
    lora_rank: int = 0  # transfusion: 0 = full fine-tune of the backbone, > 0 = peft LoRA adapters of this rank
    lora_alpha: float = 16.0
    # Pixels.
    decoder: str = "sdxl"
    decoder_path: Optional[str] = None  # a decoder dir (diffusion-decoder/ layout); for train.task=decoder: init from it
    decoder_preset: str = "tiny"  # train.task=decoder without decoder_path: build this preset (tiny | official)
    decoder_kwargs: Dict[str, Any] = field(default_factory=dict)  # build overrides (image_size, vae, prediction, ...)
    decoder_null_prob: float = 0.1  # null-image dropout for the decoder's CFG
    decoder_feature_noise: float = 0.0  # Gaussian noise on input features (robustness to generated features)
    decoder_time_shift: float = 1.0  # > 1 trains the decoder more at high noise (blip3o/decoders/training.py)
    decoder_edge_weight: float = 0.0  # > 0 weights the loss up on the image's edges (blip3o/decoders/training.py)
    # Sampling defaults (the original's: docs/decisions.md, "Flow matching").
    num_inference_steps: int = 30
    guidance_scale: float = 3.0
    guidance_rescale: float = 0.0  # 0 = plain CFG (the original); > 0 pulls guided samples' spread back (sampling.py)
    gradient_checkpointing: bool = True
    max_length: int = 512  # training prompts (with the queries) are cut to this many tokens, as the original
    inference_max_length: int = 0  # 0 = prompts are never cut at inference (the original); > 0 cuts like max_length


@dataclass
class DataConfig:
    """Fields read by ``blip3o.data.build_train_dataloader`` (see blip3o/data/loader.py)."""
    train_shards: Optional[str] = None  # folder, glob, brace pattern or "a::b" of .tar shards
    sources: List[Dict[str, Any]] = field(default_factory=list)  # mixture: [{name, shards|json_path, weight, task, ...}]
    json_path: Optional[str] = None  # JSON/JSONL text-to-image pairs or LLaVA-style conversations
    image_root: Optional[str] = None  # folder that JSON image paths are relative to
    caption_key: str = "txt"
    resampled: bool = True  # shards drawn with replacement (True) or once per epoch
    shuffle_buffer: int = 1000
    interleave: int = 4
    num_workers: int = 4
    use_cache: str = "auto"  # target-feature cache: auto (use if present) | true (required) | false
    cache_dir: Optional[str] = None
    und_image_size: int = 448
    und_image_tokens: int = 256
    json_loader: str = "auto"
    max_consecutive_bad: int = 1000
    prefetch_factor: int = 2
    pin_memory: bool = False
    log_every: int = 500
    eval_prompts: Optional[str] = None  # GenEval-format JSONL for sample grids / toy scoring


@dataclass
class TrainConfig:
    task: str = "t2i"  # t2i: queries + DiT (the paper) | decoder: CLIP->pixels decoder by reconstruction | clip: the toy CLIP
    output_dir: str = "outputs/run"
    seed: int = 42
    max_steps: int = 150_000
    # Wall-clock budget in minutes of training (0 = none): the run stops after the first step past it, then
    # checkpoints and saves its final model as at max_steps. Counted across resumes. Pair it with a constant
    # LR schedule, since a decaying one is laid out over max_steps.
    max_minutes: float = 0.0
    # The last fraction of max_minutes decays the LR linearly to 0 (a WSD-style cooldown on the wall clock, since a
    # time-budgeted run cannot lay a decay out over steps it does not know yet); 0 = off.
    time_cooldown: float = 0.0
    per_device_train_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    min_lr: float = 1e-5
    lr_scheduler_type: str = "cosine_with_min_lr"  # cosine_with_min_lr | cosine | constant_with_warmup | linear
    warmup_ratio: float = 0.003
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    max_grad_norm: float = 1.0
    mixed_precision: str = "bf16"  # bf16 | fp16 | no
    # torch.compile backend for the task's trainable core, compiled in place: the DiT (t2i) or the decoder's denoiser
    # (no | inductor | aot_eager | eager, as accelerate's dynamo_backend). inductor pays a one-off compile at the first
    # step (~1.5 min on one CPU thread for the toy DiT) for faster steps after it (1.3-1.45x there: small tensors,
    # where eager PyTorch pays per op); eager only traces (what the tests use). Single-process and DDP runs.
    compile: str = "no"
    deepspeed: Optional[str] = None  # path to configs/deepspeed/zero{1,2,3}.json
    fsdp: bool = False  # PyTorch FSDP2 (fully_shard) instead of DDP; exclusive with deepspeed
    save_steps: int = 1000
    save_total_limit: int = 1
    logging_steps: int = 10
    sample_steps: int = 0  # 0 = never; else a PNG grid of validation prompts every N steps
    resume_from_checkpoint: Optional[str] = None  # a checkpoint dir or "latest"
    report_to: str = "none"  # none | wandb (offline works: WANDB_MODE=offline)
    ema_decay: float = 0.0  # 0 = no EMA
    # decay min(ema_decay, (1+n)/(10+n)) at update n (diffusers' EMAModel): early on the average forgets the random
    # init instead of keeping ema_decay**n of it (the toy decoder: benchmarks/toy_world.md, session 8)
    ema_warmup: bool = False
    max_nonfinite_steps: int = 5  # consecutive non-finite losses before stopping
    log_sample_keys: bool = False  # write the sample keys each rank consumed (OUTPUT/keys-rank{r}.jsonl)
    device: str = "auto"


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # Modules imported before validation, so that the variants they register are valid names (docs/extending.md).
    imports: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}

# Presets: applied before the YAML body, so a YAML only states what differs.
PRESETS: Dict[str, Dict[str, Dict[str, Any]]] = {
    "official-8b": {
        "model": {"backbone": "qwen2_5_vl", "backbone_path": "Qwen/Qwen2.5-VL-7B-Instruct",
                  "target": "eva_clip", "target_preset": "official", "dit_preset": "official"},
    },
    "official-4b": {
        "model": {"backbone": "qwen2_5_vl", "backbone_path": "Qwen/Qwen2.5-VL-3B-Instruct",
                  "target": "eva_clip", "target_preset": "official", "dit_preset": "official"},
    },
    "tiny": {
        "model": {"backbone_path": "tiny", "target_preset": "tiny", "dit_preset": "tiny", "decoder": "none",
                  "gradient_checkpointing": False, "max_length": 128},
        "train": {"mixed_precision": "no", "per_device_train_batch_size": 8, "max_steps": 200,
                  "learning_rate": 3e-4, "warmup_ratio": 0.0, "save_steps": 100, "logging_steps": 10},
        "data": {"num_workers": 0, "shuffle_buffer": 100},
    },
}

# String settings that YAML may hand over as a bool: the word each of true / false stands for.
BOOL_WORDS = {("data", "use_cache"): ("true", "false"), ("train", "compile"): ("inductor", "no")}

# Fixed choices of plain settings. Variant names (backbone, target, objective, decoder, recipe, generator,
# train.task) are checked against their registries in `validate`.
CHOICES = {
    ("model", "decoder_preset"): ("tiny", "official"),
    ("model", "target_norm"): ("none", "channel"),
    ("model", "target_preset"): ("official", "tiny"), ("model", "dit_preset"): ("official", "tiny", "small"),
    ("data", "use_cache"): ("auto", "true", "false"), ("data", "json_loader"): ("auto", "json", "datasets"),
    ("train", "mixed_precision"): ("bf16", "fp16", "no"),
    ("train", "compile"): ("no", "inductor", "aot_eager", "eager"), ("train", "report_to"): ("none", "wandb"),
    ("train", "lr_scheduler_type"): ("cosine_with_min_lr", "cosine", "constant_with_warmup", "linear", "constant"),
}


# ----------------------------------------------------------------------------------------------
def _coerce(value: Any, tp, where: str) -> Any:
    """Checks `value` against the annotation `tp`, allowing int -> float and nothing else implicit."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        last = None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                last = e
        raise last or ConfigError(f"{where}: bad value {value!r}")
    if tp is Any:
        return value
    if origin in (list, List, Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return list(value)
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):  # YAML 1.1 reads an unquoted no/yes/off/on as a boolean
            raise ConfigError(f"{where}: expected str, got {value!r} (YAML reads an unquoted no/yes/off/on as a "
                              f"boolean: quote it, e.g. {where}='\"no\"')")
        raise ConfigError(f"{where}: expected str, got {value!r}")
    return value


def _expand_env(value: Any) -> Any:
    if isinstance(value, str) and "$" in value:
        return os.path.expandvars(value)
    if isinstance(value, list):
        return [_expand_env(v) for v in value]
    if isinstance(value, dict):
        return {k: _expand_env(v) for k, v in value.items()}
    return value


# Fields that name a registered component together with its settings: `{name: flow, time_shift: 3.0}` or the
# bare name. A mapping without `name`, or with the current one, updates the current settings; another name
# starts from that component's defaults. `validate` checks the settings against the component's class.
COMPONENTS = {("model", "objective")}


def _component(current: Dict[str, Any], value: Any, where: str) -> Dict[str, Any]:
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a name or a mapping {{name: ..., <setting>: ...}}, got {value!r}")
    if value.get("name", current["name"]) == current["name"]:
        return {**current, **value}
    return dict(value)


def import_plugins(cfg: ExperimentConfig, modules: Any) -> None:
    """Imports each module (a name or a list of names) and records it in ``cfg.imports``."""
    if isinstance(modules, str):
        modules = [modules]
    if not isinstance(modules, list) or not all(isinstance(m, str) and m for m in modules):
        raise ConfigError(f"imports: expected a list of module names, got {modules!r}")
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ConfigError(f"imports: cannot import '{name}' ({e})") from None
        if name not in cfg.imports:
            cfg.imports.append(name)


def _set(section_obj, section: str, key: str, value: Any) -> None:
    cls = type(section_obj)
    hints = typing.get_type_hints(cls)
    if key not in hints:
        close = difflib.get_close_matches(key, list(hints), n=1)
        hint = f" (did you mean '{section}.{close[0]}'?)" if close else ""
        for s, k in COMPONENTS:  # the flat keys that older configs used (model.time_shift=3.0) say where they went
            if s == section and key in {f.name for f in dataclasses.fields(_registries()[(s, k)].get(
                    getattr(section_obj, k)["name"]))}:
                hint = f" (a setting of the {k} now: '{s}.{k}.{key}')"
        raise ConfigError(f"unknown field '{section}.{key}'{hint}")
    where = f"{section}.{key}"
    if (section, key) in BOOL_WORDS and isinstance(value, bool):  # YAML read true/false (or yes/no) as a bool
        value = BOOL_WORDS[(section, key)][0 if value else 1]
    value = _expand_env(value)  # ${IMG_FOLDER} etc., as the original launch scripts use
    if (section, key) in COMPONENTS:
        value = _component(getattr(section_obj, key), value, where)
    value = _coerce(value, hints[key], where)
    choices = CHOICES.get((section, key))
    if choices is not None and value not in choices:
        raise ConfigError(f"{where}: '{value}' is not one of {list(choices)}")
    setattr(section_obj, key, value)


def apply_dict(cfg: ExperimentConfig, body: Dict[str, Any], source: str = "config") -> ExperimentConfig:
    if not isinstance(body, dict):
        raise ConfigError(f"{source}: top level must be a mapping with model/data/train sections")
    for section, values in body.items():
        if section == "preset":
            continue
        if section == "imports":
            import_plugins(cfg, values)
            continue
        if section not in SECTIONS:
            close = difflib.get_close_matches(str(section), list(SECTIONS) + ["preset", "imports"], n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown section '{section}' in {source}{hint}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{section}: expected a mapping in {source}, got {values!r}")
        for k, v in values.items():
            _set(getattr(cfg, section), section, k, v)
    return cfg


def parse_override(item: str):
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like section.field=value")
    key, raw = item.split("=", 1)
    if key == "preset":
        return "preset", "preset", raw
    if key == "imports":  # imports=my_pkg.mod or imports=[a.mod,b.mod]
        return "imports", "imports", yaml.safe_load(raw)
    if "." not in key:
        raise ConfigError(f"override '{item}' must name its section, e.g. train.{key}={raw}")
    section, name = key.split(".", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return section, name, value


def load_config(path: Optional[Union[str, Path]] = None, overrides: Sequence[str] = (),
                preset: Optional[str] = None) -> ExperimentConfig:
    """YAML file (optional) -> preset -> YAML body -> CLI overrides, validated at every step."""
    body: Dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            body = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(body, dict):
            raise ConfigError(f"{p}: top level must be a mapping with model/data/train sections")
    ov = [parse_override(o) for o in overrides]
    for s, n, v in ov:  # a `preset=...` override picks the preset too
        if s == "preset":
            preset = v
    preset = preset or body.get("preset")
    cfg = ExperimentConfig()
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"preset: '{preset}' is not one of {sorted(PRESETS)}")
        apply_dict(cfg, PRESETS[preset], f"preset {preset}")
    apply_dict(cfg, body, str(path))
    for section, name, value in ov:
        if section == "preset":
            continue
        if section == "imports":
            import_plugins(cfg, value)
            continue
        if section not in SECTIONS:
            raise ConfigError(f"unknown section '{section}' in override '{section}.{name}'")
        if "." in name:  # dict fields: model.dit.dim=128
            head, sub = name.split(".", 1)
            cur = getattr(getattr(cfg, section), head, None)
            if not isinstance(cur, dict):
                raise ConfigError(f"{section}.{head} is not a mapping; cannot set {section}.{name}")
            cur = dict(cur)
            cur[sub] = value
            _set(getattr(cfg, section), section, head, cur)
        else:
            _set(getattr(cfg, section), section, name, value)
    validate(cfg)
    return cfg


def _registries() -> Dict[Tuple[str, str], Any]:
    """(section, field) -> the registry that holds that field's variants, so the registries are the only list
    of names. Imported here, not at the top: they pull in torch and the model code, and `import blip3o.config`
    stays cheap for tools that only read a YAML."""
    from blip3o.decoders import DECODERS
    from blip3o.models import fusion  # noqa: F401  (registers the transfusion and lmfusion generators)
    from blip3o.models.backbone import BACKBONES
    from blip3o.models.blip3o import GENERATORS, RECIPES
    from blip3o.models.targets import TARGETS
    from blip3o.objectives import OBJECTIVES
    from blip3o.train.tasks import TASKS

    return {("model", "backbone"): BACKBONES, ("model", "target"): TARGETS, ("model", "objective"): OBJECTIVES,
            ("model", "decoder"): DECODERS, ("model", "recipe"): RECIPES, ("model", "generator"): GENERATORS,
            ("train", "task"): TASKS}


def _check_names(cfg: ExperimentConfig) -> None:
    for (section, key), registry in _registries().items():
        value = getattr(getattr(cfg, section), key)
        if (section, key) in COMPONENTS:
            value = value["name"]
        choices = sorted(registry) + (["none"] if (section, key) == ("model", "decoder") else [])  # none: no pixels
        if value not in choices:
            raise ConfigError(f"{section}.{key}: '{value}' is not one of {choices}")


def _check_settings(cfg: ExperimentConfig) -> None:
    """Each component's settings against the fields of its registered class, which then checks their values
    (its ValueError messages start with the setting's name); stores the full settings, defaults included."""
    registries = _registries()
    for section, key in sorted(COMPONENTS):
        spec, where = getattr(getattr(cfg, section), key), f"{section}.{key}"
        registry = registries[(section, key)]
        name, cls = spec["name"], registry.get(spec["name"])
        hints = typing.get_type_hints(cls)
        known = [f.name for f in dataclasses.fields(cls)]
        settings = {}
        for k, v in spec.items():
            if k == "name":
                continue
            if k not in known:
                close = difflib.get_close_matches(str(k), known, n=1)
                hint = f" (did you mean '{where}.{close[0]}'?)" if close else ""
                raise ConfigError(f"{where}.{k}: not a setting of {registry.kind} '{name}'{hint}; "
                                  f"its settings: {sorted(known) or 'none'}")
            settings[k] = _coerce(v, hints[k], f"{where}.{k}")
        try:
            obj = cls(**settings)
        except ValueError as e:
            raise ConfigError(f"{where}.{e}") from None
        setattr(getattr(cfg, section), key, {"name": name, **dataclasses.asdict(obj)})


def validate(cfg: ExperimentConfig) -> None:
    _check_names(cfg)
    _check_settings(cfg)
    m, t = cfg.model, cfg.train
    if m.num_queries < 1:
        raise ConfigError(f"model.num_queries: must be >= 1, got {m.num_queries}")
    if not 0.0 <= m.cfg_dropout < 1.0:
        raise ConfigError(f"model.cfg_dropout: must be in [0, 1), got {m.cfg_dropout}")
    if m.decoder_time_shift <= 0:
        raise ConfigError(f"model.decoder_time_shift: must be > 0 (1 = uniform), got {m.decoder_time_shift}")
    if m.decoder_edge_weight < 0:
        raise ConfigError(f"model.decoder_edge_weight: must be >= 0 (0 = plain MSE), got {m.decoder_edge_weight}")
    if m.generator != "blip3o":
        _validate_fusion(m)
    elif m.recipe == "joint" and m.text_loss_weight <= 0:
        raise ConfigError("model.text_loss_weight: the joint recipe needs a positive text loss weight")
    _refuse_ignored(cfg)
    if t.max_minutes < 0:
        raise ConfigError(f"train.max_minutes: must be >= 0 (0 = no time limit), got {t.max_minutes}")
    if t.learning_rate <= 0:
        raise ConfigError(f"train.learning_rate: must be > 0, got {t.learning_rate}")
    if not 0.0 <= t.time_cooldown <= 1.0:
        raise ConfigError(f"train.time_cooldown: must be in [0, 1] (a fraction of train.max_minutes), got {t.time_cooldown}")
    if t.time_cooldown > 0 and t.max_minutes <= 0:
        raise ConfigError("train.time_cooldown: needs a wall-clock budget (train.max_minutes > 0)")
    if t.ema_warmup and t.ema_decay <= 0:
        raise ConfigError("train.ema_warmup: needs an EMA (train.ema_decay > 0)")
    if t.per_device_train_batch_size < 1:
        raise ConfigError(f"train.per_device_train_batch_size: must be >= 1, got {t.per_device_train_batch_size}")
    if m.inference_max_length < 0 or 0 < m.inference_max_length <= m.num_queries + 16:
        raise ConfigError(f"model.inference_max_length: 0 (no cut) or > num_queries + 16, got {m.inference_max_length}")
    if m.max_length <= m.num_queries + 16:
        raise ConfigError(f"model.max_length: {m.max_length} leaves no room for the prompt next to {m.num_queries} queries")


def _refuse_ignored(cfg: ExperimentConfig) -> None:
    """A field set to a non-default value where nothing reads it is an error, not a silent no-op."""
    m, d, t = cfg.model, cfg.data, cfg.train
    default = ModelConfig()
    if m.lora_rank < 0:
        raise ConfigError(f"model.lora_rank: must be >= 0, got {m.lora_rank}")
    if m.generator == "blip3o":
        if m.lora_rank > 0 and m.recipe != "joint":
            raise ConfigError("model.lora_rank: the sequential recipe keeps the backbone frozen; LoRA adapters train "
                              "the backbone in model.recipe=joint (or generator=transfusion)")
        if m.recipe != "joint" and m.text_loss_weight > 0:
            raise ConfigError("model.text_loss_weight: the sequential recipe has no text loss (set model.recipe=joint)")
        for name in ("image_loss_weight", "fusion_patch_size"):
            if getattr(m, name) != getattr(default, name):
                raise ConfigError(f"model.{name}: applies to generator=transfusion|lmfusion, not blip3o")
    else:
        if m.recipe != "sequential" or m.num_queries != default.num_queries or m.dit:
            raise ConfigError(f"model.recipe/num_queries/dit: the {m.generator} generator has no queries or DiT "
                              "(its backbone denoises the image); leave them at their defaults")
    if m.lora_rank == 0 and m.lora_alpha != default.lora_alpha:
        raise ConfigError("model.lora_alpha: only used with model.lora_rank > 0")
    if t.lr_scheduler_type != "cosine_with_min_lr" and t.min_lr != TrainConfig().min_lr:
        raise ConfigError(f"train.min_lr: only used by lr_scheduler_type=cosine_with_min_lr, not '{t.lr_scheduler_type}'")
    if d.use_cache == "false" and d.cache_dir:
        raise ConfigError("data.cache_dir: the target-feature cache is off (data.use_cache=false)")
    if t.task != "decoder":
        for name in ("decoder_preset", "decoder_kwargs", "decoder_null_prob", "decoder_feature_noise",
                     "decoder_time_shift", "decoder_edge_weight"):
            if getattr(m, name) != getattr(default, name):
                raise ConfigError(f"model.{name}: only used when training a decoder (train.task=decoder)")
    elif d.eval_prompts:
        raise ConfigError("data.eval_prompts: the decoder task samples reconstructions of training images, not "
                          "prompts; unset it")


def _validate_fusion(m: ModelConfig) -> None:
    g = m.generator
    if not _registries()[("model", "target")].get(m.target).decodes_to_pixels:  # a latent space with its own decoder
        raise ConfigError(f"model.target: the {g} generator denoises VAE latents; set model.target=vae, got '{m.target}'")
    if m.objective["name"] != "flow":
        raise ConfigError(f"model.objective: the {g} generator is trained by flow matching; set model.objective=flow")
    if m.fusion_patch_size < 1:
        raise ConfigError(f"model.fusion_patch_size: must be >= 1, got {m.fusion_patch_size}")
    if g == "lmfusion" and m.lora_rank > 0:
        raise ConfigError("model.lora_rank: lmfusion trains a full image expert and keeps the text weights frozen; set 0")
    if g == "lmfusion" and m.text_loss_weight > 0:
        raise ConfigError("model.text_loss_weight: lmfusion keeps the text weights frozen, so a text loss trains nothing; set 0")
    if m.image_loss_weight <= 0:
        raise ConfigError(f"model.image_loss_weight: must be > 0, got {m.image_loss_weight}")


def config_from_dict(d: Dict[str, Any]) -> ExperimentConfig:
    return apply_dict(ExperimentConfig(), d, "dict")
