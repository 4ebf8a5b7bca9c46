"""The repo's real slurm.sh on a real single-node Slurm cluster on localhost (munged + slurmctld + slurmd from
Debian packages, everything in a temp dir; recipe: docs/decisions.md, "Environment"; scripts in tests/system/slurm/).

``sbatch --wait --ntasks=2 --ntasks-per-node=2 --cpus-per-task=1`` with ``NPROC_PER_NODE=1``: srun starts two
torchrun agents that rendezvous over c10d like two nodes would, each with one trainer process (gloo).
(``--ntasks-per-node=2`` overrides slurm.sh's ``#SBATCH --ntasks-per-node=1``, which is right for real multi-node
runs; without it Slurm rejects 2 tasks on the single node: "Requested node configuration is not available".)
Skipped only when not root or the Slurm/munge binaries are missing (CI's .ci/run installs them). Selective run:
``pytest -m slurm``.
"""
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.slurm]

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent / "slurm"
BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "scancel", "scontrol", "sinfo")
JOB_TIMEOUT = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _daemon_pids(d: Path):
    pids = []
    for f in (d / "slurmd.pid", d / "slurmctld.pid", d / "munge" / "munged.pid"):
        if f.is_file() and f.read_text().strip().isdigit():
            pids.append(int(f.read_text()))
    return pids


def _logs(d: Path) -> str:
    return "".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((d / "log").glob("*.log")))


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A private Slurm cluster for the session; every daemon (and any job) is gone when it ends."""
    missing = [b for b in BINARIES if not shutil.which(b) and not Path("/usr/sbin", b).is_file()]
    if os.geteuid() != 0:
        pytest.skip("the localhost Slurm cluster needs root (SlurmUser=root, munged as root)")
    if missing:
        pytest.skip(f"Slurm/munge binaries missing ({', '.join(missing)}): "
                    "apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge")
    d = tmp_path_factory.mktemp("slurm")
    os.chmod(d, 0o755)  # munged wants o+x on its socket's directory chain (the script also passes --force)
    # Free ports, so concurrent sessions on one machine do not collide on the recipe's fixed 16817/16818.
    env = dict(os.environ, CTLD_PORT=str(_free_port()), SLURMD_PORT=str(_free_port()))
    out = subprocess.run(["bash", str(HERE / "start_local_slurm.sh"), str(d)], env=env,
                         capture_output=True, text=True, timeout=120)
    pids = _daemon_pids(d)
    if out.returncode != 0:
        subprocess.run(["bash", str(HERE / "stop_local_slurm.sh"), str(d)], timeout=60)
        pytest.fail(f"slurm start failed: {out.stderr}\n{_logs(d)}")
    env = dict(os.environ, SLURM_CONF=str(d / "slurm.conf"))
    try:
        yield {"env": env, "dir": d}
    finally:
        # Jobs first (a timed-out test may leave one running: its slurmstepd would outlive slurmd), then the
        # daemons by PID file, then check that nothing we started is still alive.
        subprocess.run(["scancel", "--full", "--user=root"], env=env, capture_output=True, timeout=30)
        for _ in range(50):
            q = subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True, timeout=30)
            if q.returncode != 0 or not q.stdout.strip():
                break
            time.sleep(0.2)
        subprocess.run(["bash", str(HERE / "stop_local_slurm.sh"), str(d)], timeout=60)
        survivors = [p for p in pids + _daemon_pids(d) if _alive(p)]
        assert not survivors, f"Slurm daemons still alive after stop: {survivors}"


def test_slurm_sh_two_agent_rendezvous(slurm_cluster, tmp_path):
    """sbatch --wait runs slurm.sh: two srun tasks -> two torchrun agents (c10d rendezvous, 1 process each) ->
    a 2-rank DDP run of the toy config. Exit code 0, both ranks trained every step on disjoint samples, a
    complete checkpoint written by a world of 2, and a final model directory."""
    from blip3o.data.toy import write_toy_dataset

    toy = tmp_path / "toy"
    write_toy_dataset(str(toy), num=400, seed=0, shard_size=100)
    out = tmp_path / "run"
    steps = 4
    env = dict(slurm_cluster["env"], NPROC_PER_NODE="1", OUTPUT_FOLDER=str(out), MASTER_PORT=str(_free_port()),
               OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        env.pop(k, None)
    log = tmp_path / "slurm-%j.out"
    cmd = ["sbatch", "--wait", "--ntasks=2", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=10", f"--output={log}",
           "--job-name=blip3o-test", str(ROOT / "slurm.sh"), str(ROOT / "configs" / "toy.yaml"),
           f"data.train_shards={toy / 'train'}", f"data.eval_prompts={toy / 'eval' / 'prompts.jsonl'}",
           f"train.max_steps={steps}", "train.save_steps=2", "train.logging_steps=1",
           "train.per_device_train_batch_size=4", "train.log_sample_keys=true", "data.num_workers=0",
           "data.resampled=false", "data.shuffle_buffer=50"]
    t = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while proc.poll() is None:
            # sbatch --wait waits forever on a job Slurm can never start (e.g. too few CPUs configured): fail fast.
            q = subprocess.run(["squeue", "-h", "-o", "%T %r"], env=env, capture_output=True, text=True, timeout=30)
            for state, reason in (l.split(maxsplit=1) for l in q.stdout.splitlines() if l.strip()):
                if state == "PENDING" and reason not in ("None", "Priority", "Resources"):
                    raise AssertionError(f"job cannot start: Reason={reason}\n{_logs(slurm_cluster['dir'])}")
            if time.time() - t > JOB_TIMEOUT:
                raise AssertionError(f"sbatch --wait still running after {JOB_TIMEOUT}s")
            time.sleep(1.0)
    except AssertionError as e:
        subprocess.run(["scancel", "--name=blip3o-test"], env=env, timeout=30)
        proc.wait(60)
        pytest.fail(f"{e}\n" + "".join(p.read_text()[-5000:] for p in tmp_path.glob("slurm-*.out")))
    stdout, stderr = proc.communicate()
    job_log = "".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    assert proc.returncode == 0, (f"sbatch exit {proc.returncode} after {time.time() - t:.0f}s\n{stderr}\n"
                                  f"{job_log[-6000:]}\n{_logs(slurm_cluster['dir'])}")
    assert "Submitted batch job" in stdout

    m = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        m[r["step"]] = r
    assert sorted(m) == list(range(1, steps + 1))
    assert all(r["loss"] == r["loss"] and abs(r["loss"]) < float("inf") for r in m.values())
    keys = {}
    for rank in (0, 1):
        recs = [json.loads(l) for l in (out / f"keys-rank{rank}.jsonl").read_text().splitlines()]
        assert [r["step"] for r in recs] == list(range(1, steps + 1)), f"rank {rank} did not train every step"
        keys[rank] = {k for r in recs for k in r["keys"]}
    assert len(keys[0]) == len(keys[1]) == 4 * steps and not keys[0] & keys[1]
    ck = out / f"checkpoint-{steps}"
    assert (ck / "COMPLETE").is_file() and (ck / "rank0.pt").is_file() and (ck / "rank1.pt").is_file()
    assert json.loads((ck / "trainer_state.json").read_text())["world_size"] == 2
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
