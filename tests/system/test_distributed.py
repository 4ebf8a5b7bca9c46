"""Multi-process training on CPU (gloo): torchrun + DDP, torchrun + DeepSpeed ZeRO-2 and ZeRO-3, FSDP2 (also with
the joint recipe), kill-and-resume under torchrun, and the ``deepspeed`` launcher. Every run is the real entry point (``python -m blip3o.train``) in
subprocesses on the toy world.

Selective run: ``pytest -m distributed`` (this file and tests/system/test_slurm.py); part of the default run.

Data: 4 shards of 100 samples read in epoch mode (``data.resampled=false``), so within the first epoch every
shard belongs to exactly one rank and the two ranks' sample sets must be disjoint (with the default
``resampled=true`` every rank draws from all shards and keys may repeat across ranks by chance).
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
STEPS = 12  # long enough that the kill in the resume test lands between two checkpoints
SAVE = 4
GRAD_CLIP = 0.5  # not the default 1.0: proves the DeepSpeed json's "auto" is filled from train.max_grad_norm
TIMEOUT = 600  # generous: 2 ranks on a shared 2-core box; the first DeepSpeed run JIT-builds its shm op (~35 s)


def _env():
    env = dict(os.environ)  # conftest.py set HF_HUB_OFFLINE, WANDB_MODE, DS_ACCELERATOR, TORCH_EXTENSIONS_DIR ...
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))  # shm op built once
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # never inherit a group
        env.pop(k, None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_args(toy: Path, out: Path, *overrides, steps=STEPS, save=SAVE):
    return ["-m", "blip3o.train", str(ROOT / "configs" / "toy.yaml"),
            f"data.train_shards={toy / 'train'}", f"data.eval_prompts={toy / 'eval' / 'prompts.jsonl'}",
            f"train.output_dir={out}", f"train.max_steps={steps}", f"train.save_steps={save}",
            "train.logging_steps=1", "train.per_device_train_batch_size=4", f"train.max_grad_norm={GRAD_CLIP}",
            "train.log_sample_keys=true", "data.num_workers=0", "data.resampled=false", "data.shuffle_buffer=50",
            *overrides]


def _torchrun(nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def _run(cmd, log: Path):
    t = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=TIMEOUT)
    log.write_text(proc.stdout)
    assert proc.returncode == 0, f"exit {proc.returncode} after {time.time() - t:.0f}s:\n{proc.stdout[-6000:]}"
    return proc.stdout


def _descendants(pid: int):
    """All live descendants of `pid` (torchrun starts its workers in new sessions: killpg misses them)."""
    children = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _kill_tree(proc: subprocess.Popen):
    """SIGKILL the launcher and every process under it, workers first: a node dying mid-step."""
    victims = _descendants(proc.pid)
    for p in reversed(victims):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.kill(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(60)
    return victims


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _metrics(out: Path):
    """step -> record; the *last* record per step wins (a resumed run appends to metrics.jsonl)."""
    recs = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        recs[r["step"]] = r
    return recs


def _keys(out: Path, rank: int):
    """step -> keys consumed by `rank` (last record per step wins, as above)."""
    recs = {}
    for line in (out / f"keys-rank{rank}.jsonl").read_text().splitlines():
        r = json.loads(line)
        recs[r["step"]] = r["keys"]
    return recs


def _assert_two_ranks_trained(out: Path, steps: int):
    m = _metrics(out)
    assert sorted(m) == list(range(1, steps + 1))
    for r in m.values():
        assert all(map(lambda v: v == v and abs(v) != float("inf"), (r["loss"], r["grad_norm"]))), r
    k0, k1 = _keys(out, 0), _keys(out, 1)
    assert sorted(k0) == sorted(k1) == list(range(1, steps + 1))  # both ranks ran every step
    s0 = [k for ks in k0.values() for k in ks]
    s1 = [k for ks in k1.values() for k in ks]
    assert len(s0) == len(s1) == 4 * steps
    assert not set(s0) & set(s1), "the two ranks consumed overlapping samples: the data is not sharded"
    state = json.loads((out / f"checkpoint-{steps}" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == steps
    assert (out / f"checkpoint-{steps}" / "COMPLETE").is_file()
    assert {"rank0.pt", "rank1.pt"} <= {p.name for p in (out / f"checkpoint-{steps}").iterdir()}
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    return m


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from blip3o.data.toy import write_toy_dataset

    d = tmp_path_factory.mktemp("dist_toy")
    write_toy_dataset(str(d), num=400, seed=0, shard_size=100)
    return d


@pytest.fixture(scope="module")
def ddp_run(toy, tmp_path_factory):
    """The reference: an uninterrupted 2-rank DDP run (shared by the DDP, ZeRO-2 and resume tests)."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    _run(_torchrun() + _train_args(toy, out), out.parent / "log.txt")
    return out


def test_torchrun_ddp_two_ranks(ddp_run):
    """torchrun --standalone --nproc_per_node=2, DDP over gloo: both ranks train every step on disjoint samples,
    losses are finite, a complete checkpoint holds both ranks' state, and the final directory loads with the
    trained weights."""
    from safetensors.torch import load_file

    from blip3o.models.blip3o import Blip3oForConditionalGeneration

    _assert_two_ranks_trained(ddp_run, STEPS)
    model = Blip3oForConditionalGeneration.from_pretrained(str(ddp_run))
    ck = ddp_run / f"checkpoint-{STEPS}"
    trained = load_file(str(ck / "trainable.safetensors"))
    if (ck / "ema.safetensors").is_file():  # with train.ema_decay > 0 the final model holds the EMA weights
        trained.update(load_file(str(ck / "ema.safetensors")))
    sd = model.state_dict()
    assert trained and set(trained) <= set(sd)
    for name, t in trained.items():
        assert sd[name].float().equal(t.float()), name


def test_torchrun_deepspeed_zero2(toy, ddp_run, tmp_path):
    """torchrun 2 ranks with the DeepSpeed engine (configs/deepspeed/zero2.json): both ranks train on disjoint
    samples, and gradient clipping is on with the value of train.max_grad_norm.

    Clipping is checked twice: (a) DeepSpeed stores the config its engine was built from in its checkpoint
    (``mp_rank_00_model_states.pt`` -> ``ds_config``): ``gradient_clipping`` must be 0.5, resolved from "auto";
    (b) behaviourally: the ZeRO-2 run must reproduce the DDP run (which clips with clip_grad_norm_) step by step.
    Measured on configs/toy.yaml (grad norms 0.9-1.8, so the 0.5 clip acts every step): ZeRO-2 and DDP agree to
    <= 3e-7 relative in loss and grad norm over 12 steps (fp32; only reduction order differs), while the same
    ZeRO-2 run with clipping off (train.max_grad_norm=0) differs from DDP by 4.9e-4 relative in the step-3 loss
    and by up to 2.9e-3 later. The 1e-5 tolerance below therefore catches clipping being dropped, or rank-local
    state (e.g. target statistics) diverging between ranks under DeepSpeed.
    """
    import torch

    out = tmp_path / "run"
    _run(_torchrun() + _train_args(toy, out, "train.deepspeed=configs/deepspeed/zero2.json"), tmp_path / "log.txt")
    m = _assert_two_ranks_trained(out, STEPS)
    ds_dir = out / f"checkpoint-{STEPS}" / "deepspeed" / "state"
    assert sorted(p.name for p in ds_dir.glob("zero_pp_rank_*_optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]  # ZeRO shards
    engine_cfg = torch.load(ds_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["ds_config"]
    assert engine_cfg["gradient_clipping"] == GRAD_CLIP
    assert engine_cfg["zero_optimization"]["stage"] == 2
    assert engine_cfg["train_micro_batch_size_per_gpu"] == 4 and engine_cfg["train_batch_size"] == 8
    ref = _metrics(ddp_run)
    for s in range(1, STEPS + 1):
        for k in ("loss", "grad_norm", "lr"):
            assert m[s][k] == pytest.approx(ref[s][k], rel=1e-5, abs=1e-9), (s, k, m[s][k], ref[s][k])
    for r in (0, 1):
        assert _keys(out, r) == _keys(ddp_run, r)  # the same data order under both engines


def test_torchrun_ddp_kill_and_resume(toy, ddp_run, tmp_path):
    """SIGKILL a 2-rank DDP run between checkpoints (the whole process group: agent and workers, no chance to
    save), resume with train.resume_from_checkpoint=latest, and compare with the uninterrupted run.

    Tolerance: exact. On CPU with gloo, fp32, data.num_workers=0 and 2 ranks everything is deterministic: the
    same batches (the loader position is in rank{r}.pt), the same RNG streams (noise, timesteps, CFG dropout;
    restored per rank), the same optimizer/scheduler state, and a 2-rank gloo all-reduce is a single addition
    (commutative, so order cannot matter). Measured: losses, grad norms and final weights are bit-identical.
    With data.num_workers>0 the same holds per rank: the workers are seeded from the loader's own generator, not
    from the training RNG (tested single-process with a worker in tests/integration/test_train.py)."""
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "run"
    cmd = _torchrun() + _train_args(toy, out)
    log = open(tmp_path / "killed.txt", "w")
    victims = []
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + TIMEOUT
        while not (out / f"checkpoint-{SAVE}" / "COMPLETE").is_file():
            assert proc.poll() is None, (tmp_path / "killed.txt").read_text()[-4000:]
            assert time.time() < deadline, "no checkpoint before the timeout"
            time.sleep(0.02)
        victims = _kill_tree(proc)  # both workers and the torchrun agent, mid-run
    finally:
        if proc.poll() is None:
            _kill_tree(proc)
        log.close()
    assert proc.returncode == -signal.SIGKILL
    done = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if (p / "COMPLETE").is_file())
    assert done and done[-1] < STEPS, f"the run finished before it was killed: {done}"
    resume_step = done[-1]
    assert len(victims) >= 2  # the workers were found and killed, not only the agent
    time.sleep(0.5)
    assert not [p for p in victims if _alive(p)]  # nothing of the killed run survives to write into `out`
    killed_steps = max(_metrics(out))
    assert not (out / "model.safetensors").exists()

    stdout = _run(cmd + ["train.resume_from_checkpoint=latest"], tmp_path / "resumed.txt")
    assert f"at step {resume_step}" in stdout
    m, ref = _metrics(out), _metrics(ddp_run)
    assert sorted(m) == list(range(1, STEPS + 1)) and killed_steps >= resume_step
    for s in range(resume_step + 1, STEPS + 1):
        for k in ("loss", "grad_norm", "lr"):
            assert m[s][k] == ref[s][k], (s, k, m[s][k], ref[s][k])
    for r in (0, 1):
        got, want = _keys(out, r), _keys(ddp_run, r)
        assert [got[s] for s in range(resume_step + 1, STEPS + 1)] == [want[s] for s in range(resume_step + 1, STEPS + 1)]
    a, b = load_file(str(out / "model.safetensors")), load_file(str(ddp_run / "model.safetensors"))
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_deepspeed_launcher(toy, tmp_path):
    """The `deepspeed` launcher (which passes --local_rank=N to the module) with 2 CPU processes and ZeRO-2:
    3 steps, both ranks on disjoint samples, a checkpoint and a final model directory."""
    out = tmp_path / "run"
    launcher = Path(sys.executable).parent / "deepspeed"
    if not launcher.is_file():
        pytest.fail(f"deepspeed launcher not found next to {sys.executable}")
    cmd = [sys.executable, str(launcher), "--num_accelerators", "2", "--master_port", str(_free_port()),
           "--module"] + _train_args(toy, out, "train.deepspeed=configs/deepspeed/zero2.json", steps=3, save=3)[1:]
    stdout = _run(cmd, tmp_path / "log.txt")
    assert "--local_rank=1" in stdout  # it really went through the launcher's per-rank spawning
    m = _metrics(out)
    assert sorted(m) == [1, 2, 3]
    k0, k1 = _keys(out, 0), _keys(out, 1)
    assert sorted(k0) == sorted(k1) == [1, 2, 3]
    assert not {k for ks in k0.values() for k in ks} & {k for ks in k1.values() for k in ks}
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    assert (out / "checkpoint-3" / "deepspeed").is_dir() and (out / "model.safetensors").is_file()


def _kill_after_checkpoint(cmd, out: Path, log: Path):
    """Runs `cmd` until checkpoint-SAVE is complete and a later step is logged, then SIGKILLs the whole tree.
    Returns (the checkpoint step `latest` will resume from, the killed run's metrics)."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + TIMEOUT
            while not ((out / f"checkpoint-{SAVE}" / "COMPLETE").is_file() and (out / "metrics.jsonl").is_file()
                       and max(_metrics(out)) > SAVE):
                assert proc.poll() is None, log.read_text()[-4000:]
                assert time.time() < deadline, "no checkpoint before the timeout"
                time.sleep(0.02)
        finally:
            _kill_tree(proc)
    done = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if (p / "COMPLETE").is_file())
    assert done and done[-1] < STEPS, f"the run finished before it was killed: {done}"
    time.sleep(0.5)
    return done[-1], _metrics(out)


def _sharded_engine_run(toy, ddp_run, tmp_path, *engine):
    """A 2-rank run under a sharded engine, SIGKILLed after a checkpoint and resumed from `latest`:
    * exact resume: the steps the killed run logged after its checkpoint are recomputed bit for bit;
    * the engine computes what DDP computes (fp32, CPU: only reduction order differs, <= 1e-5 relative);
    * the final directory is a complete model (full-size weights equal to the last checkpoint's) that
      inference.py loads and samples from."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    cmd = _torchrun() + _train_args(toy, out, *engine)
    resume_step, killed = _kill_after_checkpoint(cmd, out, tmp_path / "killed.txt")
    stdout = _run(cmd + ["train.resume_from_checkpoint=latest"], tmp_path / "resumed.txt")
    assert f"at step {resume_step}" in stdout
    m = _assert_two_ranks_trained(out, STEPS)
    overlap = [s for s in killed if s > resume_step]
    assert overlap
    for s in overlap:
        for k in ("loss", "grad_norm", "lr"):
            assert m[s][k] == killed[s][k], (s, k, m[s][k], killed[s][k])
    ref = _metrics(ddp_run)
    for s in range(1, STEPS + 1):
        for k in ("loss", "grad_norm", "lr"):
            assert m[s][k] == pytest.approx(ref[s][k], rel=1e-5, abs=1e-9), (s, k, m[s][k], ref[s][k])
    for r in (0, 1):
        assert _keys(out, r) == _keys(ddp_run, r)
    final, want = load_file(str(out / "model.safetensors")), load_file(str(ddp_run / "model.safetensors"))
    assert set(final) == set(want)
    for name, t in want.items():
        assert final[name].shape == t.shape, name  # nothing left partitioned (ZeRO-3 used to save 0-size tensors)
        torch_close(final[name], t, name)
    feats = tmp_path / "feats.pt"
    _run([sys.executable, str(ROOT / "inference.py"), str(out), "--prompt", "a red circle", "--num-images", "1",
          "--steps", "2", "--embeddings-only", "--out", str(feats)], tmp_path / "inference.txt")
    assert feats.is_file()
    return out


def torch_close(a, b, name):
    import torch

    torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=1e-6, msg=name)


def test_torchrun_deepspeed_zero3_resume_and_inference(toy, ddp_run, tmp_path):
    """ZeRO-3 partitions the parameters themselves: checkpoints and the final model gather them (layer by layer,
    onto rank 0), resume restores the partitions from DeepSpeed's own files."""
    out = _sharded_engine_run(toy, ddp_run, tmp_path, "train.deepspeed=configs/deepspeed/zero3.json")
    assert (out / f"checkpoint-{STEPS}" / "deepspeed" / "state").is_dir()


def test_torchrun_fsdp_resume_and_inference(toy, ddp_run, tmp_path):
    """FSDP2 (train.fsdp=true): sharded DCP checkpoints (weights + optimizer state, one file per rank), exact
    resume, and a gathered final model directory."""
    out = _sharded_engine_run(toy, ddp_run, tmp_path, "train.fsdp=true")
    ck = out / f"checkpoint-{STEPS}"
    assert sorted(p.name for p in (ck / "fsdp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not (ck / "optimizer.pt").exists() and not (ck / "trainable.safetensors").exists()


def test_torchrun_fsdp_joint_recipe(toy, tmp_path):
    """FSDP with the joint recipe (the backbone is trained too): its decoder layers become FSDP units beside the
    DiT blocks, the sharded checkpoint holds the backbone, and resuming from checkpoint-2 in a fresh output
    directory recomputes steps 3-4 of the unbroken run bit for bit. 4 steps: kept small on purpose."""
    import torch.distributed.checkpoint as dcp

    joint = ("train.fsdp=true", "model.recipe=joint", "model.text_loss_weight=1.0", "train.save_total_limit=2")
    a = tmp_path / "a"
    stdout = _run(_torchrun() + _train_args(toy, a, *joint, steps=4, save=2), tmp_path / "a.txt")
    assert "FSDP: 4 block units" in stdout  # 2 DiT blocks + 2 backbone decoder layers (tiny presets)
    saved = dcp.FileSystemReader(str(a / "checkpoint-2" / "fsdp")).read_metadata().state_dict_metadata
    assert any(k.startswith("model.backbone.") and ".layers.1." in k for k in saved), sorted(saved)[:10]
    assert any(k.startswith("optim.state.backbone.") for k in saved)
    b = tmp_path / "b"
    _run(_torchrun() + _train_args(toy, b, *joint, f"train.resume_from_checkpoint={a / 'checkpoint-2'}", steps=4,
                                   save=2), tmp_path / "b.txt")
    ma, mb = _metrics(a), _metrics(b)
    assert sorted(mb) == [3, 4]
    for s in (3, 4):
        for k in ("loss", "grad_norm", "lr"):
            assert mb[s][k] == ma[s][k], (s, k, mb[s][k], ma[s][k])
    _run([sys.executable, str(ROOT / "inference.py"), str(b), "--prompt", "a red circle", "--num-images", "1",
          "--steps", "2", "--embeddings-only", "--out", str(tmp_path / "f.pt")], tmp_path / "inference.txt")
