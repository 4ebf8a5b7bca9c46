"""benchmarks/dit_mfu.py runs on CPU with the tiny preset and reports finite figures."""
import importlib.util
import json
import math

from tests.conftest import ROOT


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dit_mfu_tiny_cpu(tmp_path, capsys):
    mfu = _load("dit_mfu", ROOT / "benchmarks" / "dit_mfu.py")
    out = tmp_path / "mfu.json"
    assert mfu.main(["--preset", "tiny", "--steps", "2", "--device", "cpu", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    for k in ("step_s", "samples_per_s", "tflops", "mfu", "mfu_6nt", "train_flops_per_sample_dit", "peak_tflops"):
        assert math.isfinite(res[k]) and res[k] > 0, (k, res[k])
    assert [s["batch"] for s in res["sampling"]] == [2, 8]
    for s in res["sampling"]:
        assert math.isfinite(s["images_per_s"]) and s["images_per_s"] > 0 and s["steps"] == 30
    printed = capsys.readouterr().out
    assert "MFU" in printed and "images/s" in printed
    assert json.loads(printed.split("json: ", 1)[1])["preset"] == "tiny"


def test_dit_mfu_with_backbone_and_flop_count(tmp_path):
    import torch

    from blip3o.models.dit import build_dit

    mfu = _load("dit_mfu", ROOT / "benchmarks" / "dit_mfu.py")
    out = tmp_path / "mfu.json"
    assert mfu.main(["--preset", "tiny", "--steps", "1", "--device", "cpu", "--with-backbone", "--no-sampling",
                     "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["train_flops_per_sample_backbone"] > 0 and math.isfinite(res["mfu"])
    # The analytic count at the official 8B size (meta device: no memory): every Linear weight is classified,
    # and the per-token term is close to (below) the 6*N*T rule of thumb, which also counts adaLN per token.
    with torch.device("meta"):
        dit = build_dit("official_8b")
    f = mfu.dit_flops(dit, 64, 64)
    linear = sum(m.weight.numel() for m in dit.modules() if isinstance(m, torch.nn.Linear))
    assert f["p_img"] + f["p_ctx"] + f["p_once"] == linear
    assert f["params"] == 1_365_010_336
    assert 0.8 * f["six_n_t"] < f["train"] < f["six_n_t"]


def test_chat_latency_tiny_cpu(tmp_path, capsys):
    bench = _load("chat_latency", ROOT / "benchmarks" / "chat_latency.py")
    out = tmp_path / "chat.json"
    assert bench.main(["--repeats", "1", "--warmup", "0", "--steps", "1", "--decoder-steps", "1", "--max-new-tokens", "2",
                       "--json", str(out)]) == 0
    res = json.loads(out.read_text())["turns"]
    assert {k: v["images"] for k, v in res.items()} == {"text": 0, "image": 1, "edit": 1, "reason + image": 1,
                                                        "interleaved (2 images)": 2}
    assert all(math.isfinite(v["median_s"]) and v["median_s"] > 0 for v in res.values())
    assert "load average" in capsys.readouterr().out
