"""Blip3oChat on the tiny random checkpoint: generated images come back through the vision tower, reasoning
reaches the query prompt, classification follows forced likelihoods, interleaved answers keep their order, the
history budget drops the oldest image first, bad input gets one line; the CLI (--chat-script, --chat,
--classify, --reason, --interleaved) and GenEval/DPG --rewrite."""
import contextlib
import io
import json

import pytest
import torch
from PIL import Image

from tests.conftest import ROOT

FAST = dict(num_inference_steps=2, decoder_num_inference_steps=2, max_new_tokens=4, reason_max_new_tokens=4)


@pytest.fixture(scope="module")
def pipe(tiny_ckpt):
    from blip3o.pipeline import Blip3oPipeline

    return Blip3oPipeline.from_pretrained(str(tiny_ckpt), device="cpu")


@contextlib.contextmanager
def vision_inputs(pipe):
    """Records the pixel values every call of the backbone's vision tower receives."""
    seen = []
    h = pipe.model.backbone.model.visual.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    try:
        yield seen
    finally:
        h.remove()


@contextlib.contextmanager
def query_prompts(pipe):
    """Records the token ids the queries read (every image generation goes through encode_condition)."""
    seen, m = [], pipe.model
    orig = m.encode_condition

    def spy(input_ids, *a, **kw):
        seen.append(input_ids[0].tolist())
        return orig(input_ids, *a, **kw)

    m.encode_condition = spy
    try:
        yield seen
    finally:
        del m.encode_condition


@contextlib.contextmanager
def lm_head_edit(pipe, edit):
    """Runs ``edit(logits) -> logits`` on every output of the backbone's lm_head while the block is open."""
    h = pipe.model.backbone.lm_head.register_forward_hook(lambda mod, inp, out: edit(out.clone()))
    try:
        yield
    finally:
        h.remove()


def forced_text(pipe, text):
    """Makes the backbone's generate write ``text`` (then end the turn): one forced token per lm_head call."""
    tok = pipe.model.tokenizer
    target = tok(text, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
    step = [0]

    def edit(out):
        out[:, -1, target[min(step[0], len(target) - 1)]] += 1e4
        step[0] += 1
        return out

    return lm_head_edit(pipe, edit)


def boosted(pipe, word, by=30.0):
    """Raises the backbone's logits of ``word``'s tokens everywhere: its likelihood as an answer is forced up."""
    ids = pipe.model.tokenizer(word, add_special_tokens=False)["input_ids"]

    def edit(out):
        out[..., ids] += by
        return out

    return lm_head_edit(pipe, edit)


def pixels(pipe, *images):
    from blip3o.models.understanding import load_image_processor

    return load_image_processor(pipe.model)(images=list(images), return_tensors="pt")["pixel_values"]


def test_turn3_vision_tower_sees_turn1_generated_image_and_edits_chain(pipe):
    chat = pipe.chat(seed=0, **FAST)
    first = chat.send("a red circle", mode="image")
    assert first.mode == "image" and len(first.images) == 1
    a = first.images[0]
    with vision_inputs(pipe) as seen:
        assert chat.send("what colour is the shape?", mode="text").mode == "text"
        edit = chat.send("now make it blue", mode="edit")
    assert torch.equal(seen[0], pixels(pipe, a))  # turn 2 answers about turn 1's image
    assert torch.equal(seen[1], pixels(pipe, a))  # turn 3 edits it (moved into the edit turn: seen once)
    b = edit.images[0]
    with vision_inputs(pipe) as seen:
        chat.send("and make it smaller", mode="edit")  # a chain: edits the latest result, with A as context
    assert torch.equal(seen[0], pixels(pipe, a, b))
    assert [t.role for t in chat.history] == ["user", "assistant"] * 4


def test_reasoning_reaches_the_query_prompt(pipe):
    tok = pipe.model.tokenizer
    reasoning = "a yellow banana on the left"
    with forced_text(pipe, reasoning), query_prompts(pipe) as prompts:
        out = pipe(["the fruit monkeys like"], reason=True, num_inference_steps=2, decoder_num_inference_steps=2)
    assert out.reasoning == [reasoning]
    assert "the fruit monkeys like\n" + reasoning in tok.decode(prompts[-1])
    chat = pipe.chat(**dict(FAST, reason_max_new_tokens=16))
    with forced_text(pipe, reasoning), query_prompts(pipe) as prompts:
        r = chat.send("the fruit monkeys like", mode="image", reason=True)
    assert r.reasoning == reasoning and r.text == reasoning and len(r.images) == 1
    assert "the fruit monkeys like\n" + reasoning in tok.decode(prompts[-1])


def test_classify_returns_the_forced_label_in_one_forward(pipe):
    img = Image.new("RGB", (56, 56), (200, 30, 30))
    labels = ["cat", "dog", "bird", "red square"]
    calls = []
    h = pipe.model.backbone.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        with boosted(pipe, "dog"), vision_inputs(pipe) as seen:
            ranking = pipe.classify(img, labels)
    finally:
        h.remove()
    assert ranking[0][0] == "dog" and len(calls) == 1 and len(seen) == 1  # one forward, one vision pass
    # batching is exact: a label scores the same alone, and in any order
    plain = dict(pipe.classify(img, labels))
    assert dict(pipe.classify(img, labels[::-1])) == pytest.approx(plain, abs=1e-4)
    assert pipe.classify(img, ["red square"])[0][1] == pytest.approx(plain["red square"], abs=1e-4)


def test_auto_mode_follows_the_backbones_choice(pipe):
    chat = pipe.chat(**FAST)
    with boosted(pipe, "words"):  # the scored answer "words" gets the forced likelihood
        r = chat.send("hello there")
    assert r.mode == "text" and set(r.route_scores) == {"picture", "words"}  # no image yet: no edit choice
    with boosted(pipe, "picture"):
        r = chat.send("a blue square")
    assert r.mode == "image" and len(r.images) == 1
    with boosted(pipe, "edit"):
        r = chat.send("make it red")
    assert r.mode == "edit" and set(r.route_scores) == {"picture", "edit", "words"}


def test_interleaved_output_keeps_its_order(pipe):
    tok = pipe.model.tokenizer
    answer = "Barns are red. <image>a red barn</image> The sky is blue. <image>a blue sky</image> Done."
    chat = pipe.chat(**dict(FAST, max_new_tokens=40))
    with forced_text(pipe, answer), query_prompts(pipe) as prompts, vision_inputs(pipe) as seen:
        r = chat.send("tell me about barns", interleaved=True)
    kinds = ["text" if isinstance(p, str) else "image" for p in r.parts]
    assert kinds == ["text", "image", "text", "image", "text"]
    assert [r.parts[0], r.parts[2], r.parts[4]] == ["Barns are red.", "The sky is blue.", "Done."]
    assert r.prompts == ["a red barn", "a blue sky"] and r.mode == "interleaved"
    assert "a red barn" in tok.decode(prompts[0]) and "a blue sky" in tok.decode(prompts[1])
    assert "The sky is blue." in tok.decode(prompts[1])  # the answer so far is the second picture's context
    assert len(seen) == 1 and torch.equal(seen[0], pixels(pipe, r.images[0]))  # and so is the first picture


def test_history_budget_drops_the_oldest_image_first(pipe):
    from blip3o.chat import DROPPED_IMAGE, HistoryBudgetError

    red, green, blue = (Image.new("RGB", (56, 56), c) for c in [(220, 30, 30), (30, 160, 50), (30, 60, 220)])
    chat = pipe.chat(max_images=2, **FAST)
    assert chat.send("this is red", image=red, mode="text").notice is None
    chat.send("this is green", image=green, mode="text")
    with vision_inputs(pipe) as seen:
        r = chat.send("and blue?", image=blue, mode="text")
    assert "dropped the 1 oldest image" in r.notice
    assert chat.history[0].parts[0] == DROPPED_IMAGE and chat.history[2].images == [green]
    assert torch.equal(seen[0], pixels(pipe, green, blue))

    strict = pipe.chat(max_images=1, truncate=False, **FAST)
    strict.send("red", image=red, mode="text")
    with pytest.raises(HistoryBudgetError, match="over budget") as e:
        strict.send("green", image=green, mode="text")
    assert "\n" not in str(e.value) and len(strict.history) == 2  # nothing dropped, nothing added


def test_bad_input_gets_one_line(pipe, tmp_path):
    from blip3o.chat import ChatError

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    chat = pipe.chat(**FAST)
    cases = [
        (lambda: chat.send("make it blue", mode="edit"), "edit turn needs an image"),
        (lambda: pipe.classify(Image.new("RGB", (56, 56)), []), "non-empty list of labels"),
        (lambda: pipe.classify(bad, ["cat"]), "cannot read image"),
        (lambda: chat.send("what is this?", image=bad), "cannot read image"),
        (lambda: chat.send("x", mode="paint"), "unknown mode"),
        (lambda: chat.send("  "), "empty turn"),
    ]
    for fn, msg in cases:
        with pytest.raises(ChatError, match=msg) as e:
            fn()
        assert "\n" not in str(e.value)
    assert chat.history == []


@contextlib.contextmanager
def loaded(pipe):
    """Entry points get the already-loaded tiny pipeline (loading itself is covered by test_inference.py)."""
    from unittest import mock

    from blip3o.pipeline import Blip3oPipeline

    with mock.patch.object(Blip3oPipeline, "from_pretrained", lambda *a, **k: pipe):
        yield


def run_cli(pipe, *argv):
    import importlib.util

    spec = importlib.util.spec_from_file_location("blip3o_inference_cli", ROOT / "inference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), loaded(pipe):
        rc = mod.main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def test_cli_chat_script_writes_transcript_and_images(pipe, tiny_ckpt, tmp_path):
    Image.new("RGB", (56, 56), (30, 60, 220)).save(tmp_path / "blue.png")
    turns = [{"text": "a red circle", "mode": "image"}, {"text": "what colour is it?", "mode": "text"},
             {"text": "now make it blue", "mode": "edit"}, {"text": "and this one?", "image": str(tmp_path / "blue.png")},
             {"text": "a green square", "mode": "image", "reason": True}]
    script = tmp_path / "turns.jsonl"
    script.write_text("\n".join(json.dumps(t) for t in turns) + "\n")
    out = tmp_path / "chat"
    rc, stdout, err = run_cli(pipe, tiny_ckpt, "--chat-script", script, "--out-dir", out, "--steps", 2, "--decoder-steps", 2,
                              "--max-new-tokens", 4)
    assert rc == 0, err
    lines = [json.loads(l) for l in (out / "transcript.jsonl").read_text().splitlines()]
    assert [l["mode"] for l in lines[:3]] == ["image", "text", "edit"] and len(lines) == 5
    for l in lines:
        for name in l["images"]:
            assert Image.open(out / name).size == (64, 64)
    assert len(lines[0]["images"]) == 1 and lines[1]["images"] == []
    assert "reasoning" in lines[4] and (out / lines[4]["images"][0]).with_suffix(".reasoning.txt").is_file()


def test_cli_interactive_chat(pipe, tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("/mode image\na red circle\n/mode edit\nmake it blue\n/reset\n"
                                                 "/mode edit\nmake it green\n/quit\n"))
    rc, stdout, err = run_cli(pipe, tiny_ckpt, "--chat", "--out-dir", tmp_path / "c", "--steps", 2, "--decoder-steps", 2)
    assert rc == 0, err
    assert len(list((tmp_path / "c").glob("*.png"))) == 2
    assert "edit turn needs an image" in stdout  # after /reset, reported and the loop goes on


def test_cli_classify_reason_interleaved(pipe, tiny_ckpt, tmp_path):
    rc, stdout, err = run_cli(pipe, tiny_ckpt, "--image", ROOT / "tests" / "data" / "blue.png", "--classify", "cat, dog,bird")
    assert rc == 0, err
    ranked = [l.split()[0] for l in stdout.strip().splitlines()]
    assert sorted(ranked) == ["bird", "cat", "dog"]
    rc, stdout, err = run_cli(pipe, tiny_ckpt, "--prompt", "a red circle", "--reason", "--out", tmp_path / "r.png",
                              "--steps", 2, "--decoder-steps", 2, "--max-new-tokens", 4)
    assert rc == 0, err
    assert (tmp_path / "r.png").is_file() and (tmp_path / "r.reasoning.txt").is_file()
    rc, stdout, err = run_cli(pipe, tiny_ckpt, "--prompt", "tell me about circles", "--interleaved", "--out",
                              tmp_path / "answer.md", "--steps", 2, "--decoder-steps", 2, "--max-new-tokens", 4)
    assert rc == 0, err
    assert (tmp_path / "answer.md").is_file()


@pytest.mark.parametrize("argv,message", [
    (["--classify", " , ", "--image", "{blue}"], "non-empty list of labels"),
    (["--classify", "cat,dog"], "--classify needs --image"),
    (["--classify", "cat", "--image", "{bad}"], "cannot read image"),
    (["--chat-script", "{edit_first}", "--out-dir", "{tmp}/o"], "edit turn needs an image"),
    (["--chat-script", "{bad_image}", "--out-dir", "{tmp}/o"], "cannot read image"),
    (["--chat-script", "{edit_first}"], "--chat-script needs --out-dir"),
])
def test_cli_chat_errors_are_one_line(pipe, tiny_ckpt, tmp_path, argv, message):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    (tmp_path / "e.jsonl").write_text(json.dumps({"text": "make it blue", "mode": "edit"}) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "what?", "image": str(bad)}) + "\n")
    fmt = dict(blue=ROOT / "tests" / "data" / "blue.png", bad=bad, edit_first=tmp_path / "e.jsonl",
               bad_image=tmp_path / "b.jsonl", tmp=tmp_path)
    rc, stdout, err = run_cli(pipe, tiny_ckpt, *[a.format(**fmt) for a in argv])
    assert rc == 2 and message in err.strip().splitlines()[-1]


def test_geneval_and_dpg_rewrite_use_reasoning(pipe, tiny_ckpt, tmp_path):
    from blip3o.eval import dpg, geneval

    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"tag": "single_object", "prompt": "a photo of a cat"}) + "\n")
    with loaded(pipe):
        assert geneval.main([str(tiny_ckpt), "--prompts", str(p), "--out", str(tmp_path / "g"), "--n-samples", "1",
                             "--steps", "2", "--rewrite"]) == 0
    assert json.loads((tmp_path / "g" / "generation_settings.json").read_text())["rewrite"] is True
    assert (tmp_path / "g" / "00000" / "reasoning.txt").is_file()
    d = tmp_path / "dpg.jsonl"
    d.write_text(json.dumps({"name": "a1", "prompt": "a red circle"}) + "\n")
    with loaded(pipe):
        assert dpg.main([str(tiny_ckpt), "--prompts", str(d), "--out", str(tmp_path / "d"), "--n-samples", "1",
                         "--steps", "2", "--rewrite"]) == 0
    assert (tmp_path / "d" / "a1.reasoning.txt").is_file()
    assert json.loads((tmp_path / "d" / "generation_settings.json").read_text())["rewrite"] is True
