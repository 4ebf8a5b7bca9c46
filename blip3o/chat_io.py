"""Conversations on files and terminals: chat scripts and their transcripts, the interactive loop, Markdown answers.

    python inference.py CKPT --chat --out-dir chat_out/                      # interactive (type /help)
    python inference.py CKPT --chat-script turns.jsonl --out-dir DIR          # DIR/transcript.jsonl + images
    python inference.py CKPT --prompt "how are barns built?" --interleaved --out answer.md

A chat script has one user turn per line: ``{"text": "...", "image": "optional path", "mode": "auto|text|image|edit",
"reason": false, "interleaved": false}`` (only ``text`` or ``image`` is required). The transcript has one line per
model turn: ``{"turn", "user", "mode", "text", "images": [file names in DIR], "reasoning", "notice",
"route_scores"}`` (the last three only when present); a turn's reasoning is also saved beside its image as
``turnNN_K.reasoning.txt``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Sequence

from blip3o.chat import MODES, ChatError, ChatReply

SCRIPT_KEYS = {"text", "image", "mode", "reason", "interleaved"}
HELP = ("commands: /mode auto|text|image|edit, /image PATH (attach to the next message), /reason on|off, "
        "/interleaved on|off, /reset, /quit")


def read_chat_script(path) -> List[dict]:
    p = Path(path)
    if not p.is_file():
        raise ChatError(f"chat script not found: {p}")
    turns = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise ChatError(f"{p} line {n}: not a JSON object") from None
        if not isinstance(row, dict) or not (row.get("text") or row.get("image")):
            raise ChatError(f"{p} line {n}: needs 'text' or 'image'")
        if set(row) - SCRIPT_KEYS:
            raise ChatError(f"{p} line {n}: unknown keys {sorted(set(row) - SCRIPT_KEYS)}; use {sorted(SCRIPT_KEYS)}")
        if row.get("mode", "auto") not in MODES:
            raise ChatError(f"{p} line {n}: mode must be one of {', '.join(MODES)}")
        turns.append(row)
    if not turns:
        raise ChatError(f"{p} has no turns")
    return turns


def save_reply(reply: ChatReply, out_dir: Path, stem: str) -> List[str]:
    """Writes the reply's images as ``{stem}_{k}.png`` (and the reasoning beside them); returns the file names."""
    names = []
    for k, im in enumerate(reply.images):
        name = f"{stem}_{k}.png"
        im.save(out_dir / name)
        if reply.reasoning is not None:
            (out_dir / name).with_suffix(".reasoning.txt").write_text(reply.reasoning + "\n")
        names.append(name)
    return names


def run_chat_script(chat, turns: Sequence[dict], out_dir) -> int:
    """Plays the user turns in order, writing ``out_dir/transcript.jsonl`` line by line; returns the turn count.
    A turn the chat refuses raises ChatError naming the turn (the transcript keeps the turns before it)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "transcript.jsonl", "w") as f:
        for i, t in enumerate(turns):
            try:
                r = chat.send(t.get("text", ""), image=t.get("image"), mode=t.get("mode", "auto"),
                              reason=bool(t.get("reason")), interleaved=bool(t.get("interleaved")))
            except ChatError as e:
                raise ChatError(f"turn {i + 1}: {e}") from None
            rec = {"turn": i + 1, "user": t.get("text", ""), "mode": r.mode, "text": r.text,
                   "images": save_reply(r, out, f"turn{i + 1:02d}")}
            for k in ("reasoning", "notice", "route_scores"):
                if getattr(r, k) is not None:
                    rec[k] = getattr(r, k)
            f.write(json.dumps(rec) + "\n")
            f.flush()
    return len(turns)


def write_markdown(sections: Sequence[tuple], md_path) -> Path:
    """``[(user text, ChatReply)]`` -> Markdown with the images as ``{stem}_{k:02d}.png`` beside it."""
    md = Path(md_path)
    md.parent.mkdir(parents=True, exist_ok=True)
    lines, k = [], 0
    for prompt, reply in sections:
        lines.append(f"**User:** {prompt}\n")
        for p in reply.parts:
            if isinstance(p, str):
                lines.append(p + "\n")
            else:
                name = f"{md.stem}_{k:02d}.png"
                p.save(md.parent / name)
                lines.append(f"![{reply.prompts[min(k, len(reply.prompts) - 1)] if reply.prompts else ''}]({name})\n")
                k += 1
    md.write_text("\n".join(lines))
    return md


def interactive(chat, out_dir, stdin=None, stdout=None) -> int:
    """A terminal loop: each line is a user message; images go to ``out_dir``; errors are reported, not fatal."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mode, image, reason, interleaved, n = "auto", None, False, False, 0
    say = lambda s: print(s, file=stdout, flush=True)  # noqa: E731
    say(f"chatting (mode {mode}); {HELP}")
    for line in stdin:
        line = line.strip()
        if not line:
            continue
        cmd, _, arg = line.partition(" ")
        if cmd == "/quit":
            break
        if cmd == "/help":
            say(HELP)
        elif cmd == "/mode" and arg in MODES:
            mode = arg
            say(f"mode {mode}")
        elif cmd == "/image":
            image = arg.strip() or None
            say(f"next message carries {image}")
        elif cmd in ("/reason", "/interleaved") and arg in ("on", "off"):
            reason = arg == "on" if cmd == "/reason" else reason
            interleaved = arg == "on" if cmd == "/interleaved" else interleaved
            say(f"{cmd[1:]} {arg}")
        elif cmd == "/reset":
            chat.reset()
            say("history cleared")
        elif cmd.startswith("/"):
            say(f"unknown command {line!r}; {HELP}")
        else:
            try:
                r = chat.send(line, image=image, mode=mode, reason=reason, interleaved=interleaved)
            except ChatError as e:
                say(f"error: {e}")
                continue
            finally:
                image = None
            n += 1
            if r.notice:
                say(f"(note: {r.notice})")
            names = save_reply(r, out, f"turn{n:02d}")
            say(f"[{r.mode}] {r.text}".rstrip())
            for name in names:
                say(f"  image: {out / name}")
    return 0
