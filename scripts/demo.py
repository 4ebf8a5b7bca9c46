"""BLIP3-o Gradio demo: images for a prompt, text answers for questions about an image, image editing.

    python scripts/demo.py CHECKPOINT_DIR                              # http://127.0.0.1:7860 (this machine only)
    python scripts/demo.py outputs/toy/model --port 7861 --device cpu
    python scripts/demo.py CKPT --device cuda --steps 30 --decoder-guidance 3.0
    python scripts/demo.py CKPT --host 0.0.0.0                         # reachable from the network: no auth!
    ssh -L 7860:127.0.0.1:7860 gpu-node                                # view a remote demo safely instead

What it does, by what you fill in:
  * a prompt, no image                    -> ``num_images`` generated images (text -> image);
  * an image and a question               -> a text answer from the backbone (image -> text);
  * an image and a prompt, no question    -> edited images, the prompt being the instruction (image + text -> image).
The Chat tab holds a conversation (blip3o/chat.py): every message may carry an uploaded image, the mode switch
picks what the model does (auto: the backbone decides; text; image; edit: changes the latest picture of the
conversation), with optional reasoning before drawing and interleaved text-and-picture answers; Reset starts over.
Seed 0-10000 (``Randomize`` draws a new one per run and shows it), guidance 0-30 (classifier-free guidance of
the DiT stage; ``--decoder-guidance`` sets the pixel decoder's), 1-8 images. Empty input gives an error message
in the output box.

Unlike the reference app (``share=True``) this never opens a public share link: it binds 127.0.0.1 unless
``--host`` says otherwise. Gradio analytics are off and nothing is downloaded: CHECKPOINT_DIR must be a local
model directory (as training or ``make_tiny_checkpoint`` writes it).

For tests and notebooks, the parts are plain functions:

    from scripts.demo import build_demo, generate
    images, text = generate(pipe, prompt="a red circle", seed=42, guidance=3.0, num_images=2)
    demo = build_demo(pipe)            # a gr.Blocks; demo.launch(server_name="127.0.0.1", ...)
    chat, messages, status = chat_turn(pipe, None, [], "a red circle", mode="image")   # the Chat tab's step
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import random
import sys
from typing import List, Optional, Tuple

# Before gradio / huggingface_hub are imported: no analytics, no version checks, no downloads.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_SSR_MODE", "False")


logger = logging.getLogger("blip3o.demo")

SEED_MIN, SEED_MAX, DEFAULT_SEED = 0, 10000, 42
GUIDANCE_MIN, GUIDANCE_MAX, DEFAULT_GUIDANCE = 0.0, 30.0, 3.0
MAX_IMAGES, DEFAULT_IMAGES = 8, 4

EMPTY_INPUT = "Nothing to do: type a prompt to generate images, or upload an image and ask a question about it."
QUESTION_NEEDS_IMAGE = ("A question needs an image: upload one, or clear the question and type a prompt to "
                        "generate images.")
NO_DECODER = ("This checkpoint has no pixel decoder (diffusion-decoder/), so it cannot make images; it can still "
              "answer questions about an uploaded image.")


class DemoInputError(ValueError):
    """Input the demo cannot act on; the message is meant for the user (the UI shows it)."""


def resolve_seed(seed, randomize: bool = False) -> int:
    """The seed a run uses: a fresh one in [0, 10000] when ``randomize``, else ``seed`` checked."""
    if randomize:
        return random.randint(SEED_MIN, SEED_MAX)
    if seed is None or seed == "":
        return DEFAULT_SEED
    try:
        s = float(seed)
    except (TypeError, ValueError):
        raise DemoInputError(f"The seed must be a whole number from {SEED_MIN} to {SEED_MAX}, got {seed!r}.")
    if s != int(s) or not SEED_MIN <= s <= SEED_MAX:
        raise DemoInputError(f"The seed must be a whole number from {SEED_MIN} to {SEED_MAX}, got {seed!r}.")
    return int(s)


def _check_guidance(guidance) -> float:
    try:
        g = float(DEFAULT_GUIDANCE if guidance is None else guidance)
    except (TypeError, ValueError):
        raise DemoInputError(f"Guidance must be a number from {GUIDANCE_MIN:g} to {GUIDANCE_MAX:g}, got {guidance!r}.")
    if not GUIDANCE_MIN <= g <= GUIDANCE_MAX:
        raise DemoInputError(f"Guidance must be from {GUIDANCE_MIN:g} to {GUIDANCE_MAX:g}, got {g:g}.")
    return g


def _check_num(num_images) -> int:
    try:
        n = float(DEFAULT_IMAGES if num_images is None else num_images)
    except (TypeError, ValueError):
        raise DemoInputError(f"The number of images must be from 1 to {MAX_IMAGES}, got {num_images!r}.")
    if n != int(n) or not 1 <= n <= MAX_IMAGES:
        raise DemoInputError(f"The number of images must be a whole number from 1 to {MAX_IMAGES}, got {num_images!r}.")
    return int(n)


def generate(pipe, prompt: Optional[str] = None, image=None, question: Optional[str] = None,
             seed=DEFAULT_SEED, randomize: bool = False, guidance=DEFAULT_GUIDANCE, num_images=DEFAULT_IMAGES,
             *, steps: Optional[int] = None, decoder_guidance: Optional[float] = None,
             decoder_steps: Optional[int] = None, max_new_tokens: int = 256) -> Tuple[List, str]:
    """One demo run -> (images, text). Raises DemoInputError (a ValueError) for input it cannot act on.

    * image + question       -> ([], the backbone's answer)
    * image + prompt         -> (edited images, a status line)      [editing: the prompt is the instruction]
    * prompt only            -> (generated images, a status line)
    ``image`` is a PIL image (or None). Seed, guidance and the image count are checked against the UI ranges.
    """
    prompt = (prompt or "").strip()
    question = (question or "").strip()
    if image is not None and not hasattr(image, "convert"):
        raise DemoInputError(f"The image must be a PIL image, got {type(image).__name__}.")

    if image is not None and question:
        answer = pipe.understand(image.convert("RGB"), question, max_new_tokens=max_new_tokens)
        answer = answer.strip() if isinstance(answer, str) else str(answer)
        return [], answer or "(the model gave an empty answer)"
    if question and image is None and not prompt:
        raise DemoInputError(QUESTION_NEEDS_IMAGE)
    if not prompt:
        if image is not None:
            raise DemoInputError("An image was given but no question or instruction: ask a question about it, "
                                 "or type an editing instruction in the prompt box.")
        raise DemoInputError(EMPTY_INPUT)

    s = resolve_seed(seed, randomize)
    g = _check_guidance(guidance)
    n = _check_num(num_images)
    if not pipe.has_decoder():
        raise DemoInputError(NO_DECODER)
    if image is not None:
        out = pipe.edit(image.convert("RGB"), prompt, num_images=n, seed=s, guidance_scale=g,
                        num_inference_steps=steps, decoder_guidance_scale=decoder_guidance)
        what = "edited"
    else:
        out = pipe([prompt], num_images_per_prompt=n, seed=s, guidance_scale=g, num_inference_steps=steps,
                   decoder_guidance_scale=decoder_guidance, decoder_num_inference_steps=decoder_steps)
        what = "generated"
    images = list(out.images)
    note = " (the question box was empty, so the prompt was used as an editing instruction)" if image is not None else ""
    return images, f"{len(images)} image(s) {what}, seed {s}, guidance {g:g}{note}."


CHAT_MODES = ("auto", "text", "image", "edit")


def chat_turn(pipe, chat, messages: List[dict], text: Optional[str], image=None, mode: str = "auto",
              reason: bool = False, interleaved: bool = False, *, steps: Optional[int] = None,
              decoder_guidance: Optional[float] = None, decoder_steps: Optional[int] = None,
              max_new_tokens: int = 256) -> Tuple[object, List[dict], str]:
    """One Chat-tab step -> (chat, messages, status). ``chat`` is None on the first turn (a new Blip3oChat is
    made); ``messages`` are ``{"role", "content"}`` dicts whose content is text or a PIL image (the UI turns
    images into gr.Image). Input the chat refuses raises DemoInputError with its one-line reason."""
    from blip3o.chat import ChatError

    if chat is None:
        chat = pipe.chat(num_inference_steps=steps, decoder_guidance_scale=decoder_guidance,
                         decoder_num_inference_steps=decoder_steps, max_new_tokens=max_new_tokens)
    if mode not in CHAT_MODES:
        raise DemoInputError(f"Unknown mode {mode!r}; choose one of {', '.join(CHAT_MODES)}.")
    try:
        reply = chat.send((text or "").strip(), image=image, mode=mode, reason=bool(reason),
                          interleaved=bool(interleaved))
    except ChatError as e:
        raise DemoInputError(str(e)[:1].upper() + str(e)[1:] + ".") from None
    user = chat.history[-2]
    messages = list(messages) + [{"role": "user", "content": p} for p in user.parts]
    messages += [{"role": "assistant", "content": p} for p in reply.parts if not (isinstance(p, str) and not p)]
    if not reply.parts or reply.parts == [""]:
        messages.append({"role": "assistant", "content": "(the model gave an empty answer)"})
    status = f"{reply.mode} turn" + (f"; {reply.notice}" if reply.notice else "")
    return chat, messages, status


def build_demo(pipe, *, steps: Optional[int] = None, decoder_guidance: Optional[float] = None,
               decoder_steps: Optional[int] = None, max_new_tokens: int = 256, title: str = "BLIP3-o"):
    """The Gradio UI around ``generate`` and ``chat_turn`` -> gr.Blocks (not launched). Stable ids for tests:
    Generate tab: #prompt, #image, #question, #seed, #randomize, #guidance, #num_images, #run, #clear, #gallery,
    #answer; Chat tab (#tab_chat): #chatbot, #chat_text, #chat_image, #chat_mode, #chat_reason, #chat_interleaved,
    #chat_send, #chat_reset, #chat_status."""
    import gradio as gr

    def on_run(prompt, image, question, seed, randomize, guidance, num_images):
        try:
            s = resolve_seed(seed, randomize)
        except DemoInputError as e:
            return [], f"Error: {e}", seed
        try:
            images, text = generate(pipe, prompt, image, question, s, False, guidance, num_images, steps=steps,
                                    decoder_guidance=decoder_guidance, decoder_steps=decoder_steps,
                                    max_new_tokens=max_new_tokens)
        except DemoInputError as e:
            return [], f"Error: {e}", s
        except Exception as e:  # shown in the UI instead of gradio's generic "Error" badge
            logger.exception("demo run failed")
            return [], f"Error: {type(e).__name__}: {e}", s
        return images, text, s

    def on_clear():
        return "", None, "", [], ""

    def as_gradio(messages):
        return [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str)
                 else gr.Image(value=m["content"], format="png")} for m in messages]

    def on_chat(chat, messages, text, image, mode, reason, interleaved):
        try:
            chat, messages, status = chat_turn(pipe, chat, messages, text, image, mode, reason, interleaved,
                                               steps=steps, decoder_guidance=decoder_guidance,
                                               decoder_steps=decoder_steps, max_new_tokens=max_new_tokens)
        except DemoInputError as e:
            return chat, messages, as_gradio(messages), f"Error: {e}", text, image
        except Exception as e:  # shown in the UI, the conversation so far is kept
            logger.exception("chat turn failed")
            return chat, messages, as_gradio(messages), f"Error: {type(e).__name__}: {e}", text, image
        return chat, messages, as_gradio(messages), status, "", None

    def on_chat_reset():
        return None, [], [], "New conversation.", "", None

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"# {title}")
        with gr.Tab("Generate", elem_id="tab_generate"):
            _single_turn_ui(gr, on_run, on_clear)
        with gr.Tab("Chat", elem_id="tab_chat"):
            gr.Markdown("A conversation: pictures the model drew earlier (and images you upload) stay in context; "
                        "*edit* changes the latest picture, *auto* lets the model decide.")
            chat_state, messages_state = gr.State(None), gr.State([])
            chatbot = gr.Chatbot(label="Conversation", elem_id="chatbot", height=480)
            with gr.Row():
                chat_text = gr.Textbox(label="Message", placeholder="a red barn at dusk", lines=2, scale=3,
                                       elem_id="chat_text")
                chat_image = gr.Image(label="Image (optional)", type="pil", sources=["upload", "clipboard"],
                                      scale=1, elem_id="chat_image")
            with gr.Row():
                chat_mode = gr.Radio(list(CHAT_MODES), value="auto", label="Mode", elem_id="chat_mode")
                chat_reason = gr.Checkbox(value=False, label="Reason before drawing", elem_id="chat_reason")
                chat_inter = gr.Checkbox(value=False, label="Interleaved answer", elem_id="chat_interleaved")
            with gr.Row():
                send = gr.Button("Send", variant="primary", elem_id="chat_send")
                reset = gr.Button("Reset", elem_id="chat_reset")
            chat_status = gr.Textbox(label="Status", interactive=False, elem_id="chat_status")
            chat_in = [chat_state, messages_state, chat_text, chat_image, chat_mode, chat_reason, chat_inter]
            chat_out = [chat_state, messages_state, chatbot, chat_status, chat_text, chat_image]
            send.click(on_chat, chat_in, chat_out, concurrency_limit=1)
            chat_text.submit(on_chat, chat_in, chat_out, concurrency_limit=1)
            reset.click(on_chat_reset, None, chat_out, queue=False)
    return demo


def _single_turn_ui(gr, on_run, on_clear):
    """The Generate tab: one prompt / question / edit at a time."""
    gr.Markdown("Type a prompt to generate images; upload an image and ask a question for a text answer; "
                "upload an image and type a prompt (no question) to edit it.")
    with gr.Row():
        with gr.Column():
            prompt = gr.Textbox(label="Prompt", placeholder="A photo of a cute cat", lines=2, elem_id="prompt")
            image = gr.Image(label="Image (optional)", type="pil", sources=["upload", "clipboard"],
                             elem_id="image")
            question = gr.Textbox(label="Question about the image", placeholder="What is in the image?",
                                  elem_id="question")
            with gr.Row():
                seed = gr.Slider(SEED_MIN, SEED_MAX, value=DEFAULT_SEED, step=1, label="Seed", elem_id="seed")
                randomize = gr.Checkbox(value=False, label="Randomize seed", elem_id="randomize")
            with gr.Row():
                guidance = gr.Slider(GUIDANCE_MIN, GUIDANCE_MAX, value=DEFAULT_GUIDANCE, step=0.5,
                                     label="Guidance", elem_id="guidance")
                num_images = gr.Slider(1, MAX_IMAGES, value=DEFAULT_IMAGES, step=1, label="Number of images",
                                       elem_id="num_images")
            with gr.Row():
                run = gr.Button("Run", variant="primary", elem_id="run")
                clear = gr.Button("Clear", elem_id="clear")
        with gr.Column():
            gallery = gr.Gallery(label="Images", columns=2, elem_id="gallery", format="png")
            answer = gr.Textbox(label="Answer / status", lines=4, interactive=False, elem_id="answer")
    inputs = [prompt, image, question, seed, randomize, guidance, num_images]
    run.click(on_run, inputs, [gallery, answer, seed], concurrency_limit=1)
    prompt.submit(on_run, inputs, [gallery, answer, seed], concurrency_limit=1)
    clear.click(on_clear, None, [prompt, image, question, gallery, answer], queue=False)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a local model directory (ours, or an official BLIP3o-Model layout)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="default: float32")
    p.add_argument("--cpu-offload", action="store_true", help="keep only the running stage on the GPU")
    p.add_argument("--steps", type=int, default=None, help="DiT sampling steps (default: the checkpoint's)")
    p.add_argument("--decoder-guidance", type=float, default=None, help="pixel decoder CFG (default: its own)")
    p.add_argument("--decoder-steps", type=int, default=None, help="pixel decoder steps (default: its own)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="length limit of text answers")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not os.path.isdir(args.checkpoint):
        print(f"error: checkpoint directory not found: {args.checkpoint}", file=sys.stderr)
        return 2
    if not _is_loopback(args.host):
        logger.warning("binding %s: anyone who can reach this address can use the demo (there is no auth)",
                       args.host)
    from blip3o.pipeline import Blip3oPipeline

    pipe = Blip3oPipeline.from_pretrained(args.checkpoint, device=args.device, dtype=args.dtype)
    if args.cpu_offload:
        pipe.enable_model_cpu_offload()
    if not pipe.has_decoder():
        logger.warning("%s has no pixel decoder: only image questions will work", args.checkpoint)
    demo = build_demo(pipe, steps=args.steps, decoder_guidance=args.decoder_guidance,
                      decoder_steps=args.decoder_steps, max_new_tokens=args.max_new_tokens)
    demo.queue(max_size=16)
    demo.launch(server_name=args.host, server_port=args.port, share=False, ssr_mode=False, mcp_server=False,
                footer_links=[], show_error=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
