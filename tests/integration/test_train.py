"""The real training entry point on the tiny preset, single process on CPU (diffusers-example style):
train, log, checkpoint, SIGKILL + resume to identical losses, kill-during-save, SIGTERM, bad input."""
import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, run_env, train_cmd


def run(cmd, env=None, **kw):
    return subprocess.run(cmd, env=env or run_env(), capture_output=True, text=True, timeout=300, cwd=ROOT, **kw)


def losses(out: Path):
    recs = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        recs[r["step"]] = r["loss"]  # a resumed run rewrites the steps after its checkpoint
    return recs


@pytest.fixture(scope="module")
def unbroken(toy_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("unbroken")
    r = run(train_cmd(toy_data, out, "train.ema_decay=0.9", "train.sample_steps=6"))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_trains_logs_and_saves_a_loadable_model(unbroken):
    recs = [json.loads(l) for l in (unbroken / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 7))
    for key in ("step", "loss", "lr", "grad_norm", "samples_per_s", "skipped_samples", "mfu", "tflops_trainable",
                "tflops_frozen"):
        assert key in recs[0]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in recs)
    assert (unbroken / "checkpoint-6" / "COMPLETE").is_file() and not (unbroken / "checkpoint-3").exists()  # limit 1
    assert (unbroken / "samples" / "step-0000006.png").is_file()
    from blip3o.models.blip3o import Blip3oForConditionalGeneration

    m = Blip3oForConditionalGeneration.from_pretrained(unbroken)
    x = m.generate_features(["a red circle"], num_inference_steps=2)
    assert x.shape[0] == 1 and torch.isfinite(x).all()
    # the final weights are the EMA ones
    from safetensors.torch import load_file

    ema = load_file(str(unbroken / "checkpoint-6" / "ema.safetensors"))
    torch.testing.assert_close(m.latent_queries.detach(), ema["latent_queries"])


def test_compile_traces_the_dit_once_and_trains_as_eager(toy_data, unbroken, tmp_path):
    # train.compile with dynamo's eager backend: the tracing, guards and in-place wrapping that inductor also gets,
    # without its C++ build (a minute; benchmarks/toy_generator.py step --compile times that)
    out = tmp_path / "compiled"
    r = run(train_cmd(toy_data, out, "train.ema_decay=0.9", "train.compile=eager"),  # `unbroken`, sampling aside
            env=dict(run_env(), TORCH_LOGS="recompiles"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "train.compile=eager: NextDiT compiled" in r.stderr
    assert "Recompiling" not in r.stderr, r.stderr[-3000:]  # one graph for every training step
    assert losses(out) == pytest.approx(losses(unbroken), rel=1e-5)
    from safetensors.torch import load_file

    keys = set(load_file(str(out / "checkpoint-6" / "ema.safetensors")))  # in place: the eager parameter names
    assert keys == set(load_file(str(unbroken / "checkpoint-6" / "ema.safetensors")))


def test_sigkill_and_resume_gives_identical_losses(toy_data, unbroken, tmp_path):
    out = tmp_path / "killed"
    cmd = train_cmd(toy_data, out, "train.ema_decay=0.9", "train.sample_steps=6")
    p = subprocess.Popen(cmd, env=run_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (out / "checkpoint-3" / "COMPLETE").is_file():
        assert time.time() < deadline and p.poll() is None, "run ended before its first checkpoint"
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    r = run(cmd + ["train.resume_from_checkpoint=latest"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr
    assert losses(out) == losses(unbroken)  # bit-for-bit on CPU, single process


def test_sigkill_and_resume_with_a_data_worker_gives_identical_losses(toy_data, tmp_path):
    """As above with data.num_workers=1 (every real config uses workers). Starting the workers must not draw
    from the training RNG (torch's DataLoader takes its workers' base seed from the global generator unless
    given its own): that draw fell at step 1 of the unbroken run but at the first resumed step of the resumed
    one, so every loss after a resume differed while the batch keys were the same."""
    cmd = lambda out: train_cmd(toy_data, out, "data.num_workers=1", "train.log_sample_keys=true")  # noqa: E731
    ref = tmp_path / "unbroken"
    r = run(cmd(ref))
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "killed"
    log = tmp_path / "killed.log"
    with open(log, "w") as f:
        p = subprocess.Popen(cmd(out), env=run_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=f)
        try:
            deadline = time.time() + 600  # generous: under a load of ~9 on 2 cores, 240 s did not reach step 3
            while not (out / "checkpoint-3" / "COMPLETE").is_file():
                assert time.time() < deadline and p.poll() is None, log.read_text()[-3000:]
                time.sleep(0.05)
        finally:  # also when the wait fails: never leave a training run behind
            p.send_signal(signal.SIGKILL)  # the data worker notices its parent is gone and exits on its own
            p.wait()
    r = run(cmd(out) + ["train.resume_from_checkpoint=latest"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr
    assert losses(out) == losses(ref)  # bit-for-bit on CPU, single process
    keys = lambda d: {json.loads(l)["step"]: json.loads(l)["keys"]  # noqa: E731
                      for l in (d / "keys-rank0.jsonl").read_text().splitlines()}
    assert keys(out) == keys(ref)
    a, b = (torch.load(d / "checkpoint-6" / "rank0.pt", weights_only=False)["rng"]["torch"] for d in (out, ref))
    assert torch.equal(a, b)  # the training RNG ends in the same state too


def test_kill_during_save_leaves_previous_checkpoint(toy_data, tmp_path):
    out = tmp_path / "run"
    r = run(train_cmd(toy_data, out, steps=3))
    assert r.returncode == 0, r.stderr[-2000:]
    # What a kill in the middle of writing checkpoint-6 leaves behind: a .tmp dir (never picked up) ...
    partial = out / "checkpoint-6.tmp"
    partial.mkdir()
    (partial / "trainable.safetensors").write_bytes(b"truncated")
    # ... or, if the kill hit between rename steps, a directory without its COMPLETE marker.
    (out / "checkpoint-9").mkdir()
    r = run(train_cmd(toy_data, out, "train.resume_from_checkpoint=latest", steps=5))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "checkpoint-3" in r.stderr and "resumed from" in r.stderr
    assert not partial.exists()  # cleaned at the next rotation


def test_sigterm_saves_a_checkpoint_then_exits(toy_data, tmp_path):
    out = tmp_path / "term"
    cmd = train_cmd(toy_data, out, "train.save_steps=1000", steps=400)
    p = subprocess.Popen(cmd, env=run_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (out / "metrics.jsonl").is_file() or len((out / "metrics.jsonl").read_text().splitlines()) < 2:
        assert time.time() < deadline and p.poll() is None
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-2000:]
    ckpts = list(out.glob("checkpoint-*/COMPLETE"))
    assert len(ckpts) == 1 and "received signal" in err


def test_nonfinite_losses_stop_with_a_clear_message(toy_data, tmp_path):
    out = tmp_path / "nan"
    r = run(train_cmd(toy_data, out, "train.learning_rate=1e30", "train.max_grad_norm=1e38",
                      "train.max_nonfinite_steps=2", "train.warmup_ratio=0.0", steps=50))
    assert r.returncode == 1
    assert "consecutive non-finite losses" in r.stderr and r.stderr.strip().splitlines()[-1].startswith("error:")
    assert (out / "checkpoint-3" / "COMPLETE").is_file() or not list(out.glob("checkpoint-*"))


@pytest.mark.parametrize("override,message", [
    (["train.max_step=3"], "unknown field 'train.max_step'"),
    (["data.train_shards=/nonexistent/shards"], "/nonexistent/shards"),
    (["train.deepspeed=/nonexistent/ds.json"], "config file not found"),
    (["model.target_path=/nonexistent/eva"], "/nonexistent/eva"),
    (["train.fsdp=true", "train.deepspeed=configs/deepspeed/zero2.json"], "select two engines"),
    (["train.fsdp=true", "train.ema_decay=0.9"], "train.ema_decay > 0 is not supported with FSDP"),
    (["train.compile=max"], "train.compile: 'max' is not one of"),
])
def test_bad_config_and_paths_fail_with_one_line(toy_data, tmp_path, override, message):
    r = run(train_cmd(toy_data, tmp_path / "bad", *override, steps=1))
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and message in last, r.stderr[-2000:]


def test_max_minutes_stops_saves_and_counts_across_resume(toy_data, tmp_path):
    out = tmp_path / "timed"
    # ~0.1 s of training budget: the run stops after its first step or so, far before max_steps
    r = run(train_cmd(toy_data, out, "train.max_minutes=0.002", "train.save_steps=1000", steps=400))
    assert r.returncode == 0, r.stderr[-2000:]
    (ck,) = list(out.glob("checkpoint-*"))
    state = json.loads((ck / "trainer_state.json").read_text())
    assert 1 <= state["step"] < 400 and state["train_seconds"] >= 0.12
    assert (out / "model.safetensors").is_file() and "max_minutes" in r.stderr
    # resuming with the budget already spent: no further steps, the same checkpoint
    r = run(train_cmd(toy_data, out, "train.max_minutes=0.002", "train.save_steps=1000",
                      "train.resume_from_checkpoint=latest", steps=400))
    assert r.returncode == 0, r.stderr[-2000:]
    state2 = json.loads((sorted(out.glob("checkpoint-*"))[-1] / "trainer_state.json").read_text())
    assert state2["step"] == state["step"] and "already spent" in r.stderr
    with pytest.raises(Exception, match="max_minutes"):
        from blip3o.config import load_config

        load_config(ROOT / "configs" / "toy.yaml", ["train.max_minutes=-1"])


def test_time_cooldown_decays_the_lr_to_zero_over_the_budget_end(toy_data, tmp_path):
    """train.time_cooldown=1: the LR falls linearly with the seconds trained, from the constant schedule's value
    at the start to ~0 when the wall-clock budget is spent; the factor never compounds between steps."""
    out = tmp_path / "cooled"
    r = run(train_cmd(toy_data, out, "train.max_minutes=0.03", "train.time_cooldown=1.0", "train.logging_steps=1",
                      "train.lr_scheduler_type=constant", "train.learning_rate=1e-3", "train.save_steps=1000",
                      steps=2000))
    assert r.returncode == 0, r.stderr[-2000:]
    lrs = [json.loads(l)["lr"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lrs) >= 5, lrs  # ~1.8 s of budget: several steps
    assert all(b <= a for a, b in zip(lrs, lrs[1:])), lrs
    assert lrs[0] > 0.5e-3 and lrs[-1] < 0.2e-3, lrs
    from blip3o.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="train.time_cooldown: needs a wall-clock budget"):
        load_config(ROOT / "configs" / "toy.yaml", ["train.time_cooldown=0.2"])
    with pytest.raises(ConfigError, match=r"train.time_cooldown: must be in \[0, 1\]"):
        load_config(ROOT / "configs" / "toy.yaml", ["train.max_minutes=1", "train.time_cooldown=1.5"])


def test_threads_file_widens_a_running_stage(toy_data, tmp_path):
    """scripts/toy_world.py hands a finished stage's core to the one still running through this file."""
    threads = tmp_path / "threads"
    env = dict(run_env(), BLIP3O_THREADS_FILE=str(threads))
    out = tmp_path / "widened"
    r = subprocess.run(train_cmd(toy_data, out, steps=12), env=env, capture_output=True, text=True, timeout=300,
                       cwd=ROOT)  # no file: stays on its one thread
    assert r.returncode == 0 and "threads at step" not in r.stderr, r.stderr[-2000:]
    threads.write_text("2\n")
    r = subprocess.run(train_cmd(toy_data, tmp_path / "widened2", steps=12), env=env, capture_output=True,
                       text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "1 -> 2 threads at step 0" in r.stderr


class _WritesAFile:
    """A pickle that runs code when loaded without weights_only: it would create `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_resume_refuses_a_checkpoint_pickling_code(toy_data, tmp_path):
    out = tmp_path / "run"
    r = run(train_cmd(toy_data, out, steps=3))
    assert r.returncode == 0, r.stderr[-2000:]
    rank = out / "checkpoint-3" / "rank0.pt"
    state = torch.load(rank, weights_only=False)  # our own file: trusted here
    marker = tmp_path / "ran"
    state["data"] = {"payload": _WritesAFile(marker)}
    torch.save(state, rank)
    r = run(train_cmd(toy_data, out, "train.resume_from_checkpoint=latest", steps=4))
    assert r.returncode == 1 and not marker.exists()
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: refusing to load") and "rank0.pt" in last, r.stderr[-2000:]


def test_ema_swap_restores_live_weights_and_copy_casts():
    """The one EMA swap (blip3o/train/ema.py): averages inside the block, the exact live weights after it."""
    from blip3o.train.ema import EMA

    model = torch.nn.Linear(4, 3).to(torch.bfloat16)
    ema = EMA(model.named_parameters(), decay=0.5)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model.named_parameters())
    live = {n: p.detach().clone() for n, p in model.named_parameters()}
    with ema.swapped_in(model):
        assert torch.equal(model.weight, ema.shadow["weight"].to(torch.bfloat16))
        assert not torch.equal(model.weight, live["weight"])
    assert all(torch.equal(p, live[n]) for n, p in model.named_parameters())
    ema.copy_to(model)
    assert model.weight.dtype == torch.bfloat16 and torch.equal(model.weight, ema.shadow["weight"].to(torch.bfloat16))


def test_ema_warmup_forgets_the_init_and_follows_the_step():
    """train.ema_warmup: decay min(d, (1+n)/(10+n)) at update n, so a short run's average is not the random init."""
    from blip3o.train.ema import EMA

    assert EMA([], 0.998).decay_at(0) == 0.998
    warm = EMA([], 0.998, warmup=True)
    assert warm.decay_at(0) == 0.1 and warm.decay_at(90) == 0.91 and warm.decay_at(10 ** 6) == 0.998
    model = torch.nn.Linear(4, 3)
    init = model.weight.detach().clone()
    plain, warm = EMA(model.named_parameters(), 0.998), EMA(model.named_parameters(), 0.998, warmup=True)
    with torch.no_grad():
        model.weight.add_(1.0)
    for step in range(20):
        plain.update(model.named_parameters(), step)
        warm.update(model.named_parameters(), step)
    # the plain average still holds 0.998**20 = 96% of the init; the warmed one under 1e-4 of it
    assert torch.allclose(plain.shadow["weight"] - init, torch.full_like(init, 1 - 0.998 ** 20), atol=1e-5)
    assert torch.allclose(warm.shadow["weight"], model.weight, atol=1e-4)
