"""scripts/demo.py: the plain generate() and chat_turn() functions on the tiny checkpoint, the Chat tab's handlers
over HTTP (gradio_client), and a real browser run of the UI (Debian chromium + chromedriver via selenium): type a
prompt, click Run, an <img> appears in the gallery; in the Chat tab draw, edit, reset."""
import importlib.util
import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"


def _load_demo():
    spec = importlib.util.spec_from_file_location("blip3o_demo_script", ROOT / "scripts" / "demo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


demo_mod = _load_demo()


@pytest.fixture(scope="module")
def pipe(tiny_ckpt):
    from blip3o.pipeline import Blip3oPipeline

    return Blip3oPipeline.from_pretrained(str(tiny_ckpt), device="cpu")


def test_generate_function(pipe):
    from PIL import Image

    images, text = demo_mod.generate(pipe, prompt="a red circle", seed=3, guidance=0.0, num_images=2)
    assert len(images) == 2 and all(isinstance(im, Image.Image) for im in images)
    assert "seed 3" in text
    again, _ = demo_mod.generate(pipe, prompt="a red circle", seed=3, guidance=0.0, num_images=2)
    assert list(images[0].getdata()) == list(again[0].getdata())  # same seed -> same image

    images, answer = demo_mod.generate(pipe, image=images[0], question="What is in the image?")
    assert images == [] and isinstance(answer, str) and answer

    edited, text = demo_mod.generate(pipe, prompt="make it blue", image=again[0], num_images=1, seed=0)
    assert len(edited) == 1 and "edited" in text

    _, text = demo_mod.generate(pipe, prompt="x", randomize=True, num_images=1)
    assert 0 <= int(text.split("seed ")[1].split(",")[0]) <= 10000

    with pytest.raises(demo_mod.DemoInputError, match="Nothing to do"):
        demo_mod.generate(pipe, prompt="  ", question="")
    with pytest.raises(demo_mod.DemoInputError, match="needs an image"):
        demo_mod.generate(pipe, question="what?")
    with pytest.raises(demo_mod.DemoInputError, match="Guidance"):
        demo_mod.generate(pipe, prompt="x", guidance=31)
    with pytest.raises(demo_mod.DemoInputError, match="seed"):
        demo_mod.generate(pipe, prompt="x", seed=10001)


def test_chat_turn_function(pipe):
    """The Chat tab's step: the picture of turn 1 is edited in turn 3; refusals are one-line DemoInputErrors."""
    from PIL import Image

    kw = dict(steps=2, decoder_steps=2, max_new_tokens=4)
    chat, msgs, status = demo_mod.chat_turn(pipe, None, [], "a red circle", mode="image", **kw)
    assert status.startswith("image") and isinstance(msgs[-1]["content"], Image.Image)
    chat, msgs, status = demo_mod.chat_turn(pipe, chat, msgs, "what colour is it?", mode="text", **kw)
    chat, msgs, status = demo_mod.chat_turn(pipe, chat, msgs, "make it blue", mode="edit", **kw)
    assert status.startswith("edit") and isinstance(msgs[-1]["content"], Image.Image)
    assert [m["role"] for m in msgs] == ["user", "assistant"] * 3
    with pytest.raises(demo_mod.DemoInputError, match="needs an image in the conversation"):
        demo_mod.chat_turn(pipe, None, [], "make it blue", mode="edit", **kw)
    with pytest.raises(demo_mod.DemoInputError, match="Empty turn"):
        demo_mod.chat_turn(pipe, chat, msgs, "  ", **kw)


def test_chat_tab_through_the_server(pipe, monkeypatch):
    """The Chat tab's handlers over HTTP (gradio_client): per-session history, an image turn, reset."""
    pytest.importorskip("gradio", reason="gradio not installed (pip install -c constraints.txt gradio)")
    from gradio_client import Client

    demo = demo_mod.build_demo(pipe, steps=2, decoder_steps=2, max_new_tokens=4)
    port = _launch(demo, monkeypatch)
    try:
        c = Client(f"http://127.0.0.1:{port}/", verbose=False)
        conv, status, text, _ = c.predict("a red circle", None, "image", False, False, api_name="/on_chat")
        assert status.startswith("image") and text == "" and len(conv) == 2
        assert conv[1]["role"] == "assistant" and conv[1]["content"][0]["type"] in ("component", "file")
        conv, status, _, _ = c.predict("make it blue", None, "edit", False, False, api_name="/on_chat")
        assert status.startswith("edit") and len(conv) == 4  # the history of this session was kept
        conv, status, text, _ = c.predict("  ", None, "auto", False, False, api_name="/on_chat")
        assert status.startswith("Error") and len(conv) == 4
        conv, status, _, _ = c.predict(api_name="/on_chat_reset")
        assert conv == [] and "New conversation" in status
    finally:
        demo.close()


def test_cli_defaults_bind_loopback():
    args = demo_mod.parse_args(["ckpt"])
    assert args.host == "127.0.0.1" and args.port == 7860
    assert demo_mod._is_loopback("127.0.0.1") and not demo_mod._is_loopback("0.0.0.0")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(demo, monkeypatch, tries: int = 3) -> int:
    """Launch on a free loopback port -> the port. Two of gradio's start-up checks assume an idle machine, and
    on a loaded one (nice 19 next to training runs) they fail with the server fine: the server thread gets 5 s
    to start, else the port is reported taken (a fresh port is tried; a server that started late stays a daemon
    thread until the test process exits), and the page must answer a HEAD within 3 s, else launch() demands
    share=True (the same check, with a minute to answer, replaces it; the tests then use the page anyway)."""
    import gradio.networking
    import httpx

    def url_ok(url):
        try:
            return httpx.head(url, timeout=60).status_code in (200, 302, 307)
        except httpx.HTTPError:
            return False

    monkeypatch.setattr(gradio.networking, "url_ok", url_ok)
    demo.queue()
    for attempt in range(tries):
        port = _free_port()
        try:
            demo.launch(server_name="127.0.0.1", server_port=port, share=False, prevent_thread_lock=True,
                        quiet=True, ssr_mode=False, footer_links=[])
            return port
        except OSError:
            if attempt == tries - 1:
                raise


def _wait_for(browser, seconds, *selectors):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, seconds).until(lambda b: all(b.find_elements(By.CSS_SELECTOR, c) for c in selectors))


def test_browser_prompt_run_shows_image(pipe, tmp_path, monkeypatch):
    chromium, driver = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if not (os.path.exists(chromium) and os.path.exists(driver)):
        pytest.skip("Debian chromium / chromium-driver not installed (apt-get install chromium chromium-driver)")
    pytest.importorskip("gradio", reason="gradio not installed (pip install -c constraints.txt gradio)")
    pytest.importorskip("selenium", reason="selenium not installed (pip install -c constraints.txt selenium)")
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    monkeypatch.setenv("SE_OFFLINE", "true")  # selenium-manager must not look anything up
    demo = demo_mod.build_demo(pipe, steps=2, decoder_steps=2, max_new_tokens=4)  # few steps: CPU time
    port = _launch(demo, monkeypatch)
    browser = None
    try:
        opts = webdriver.ChromeOptions()
        opts.binary_location = chromium
        for a in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,1400",
                  f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}"]:
            opts.add_argument(a)
        browser = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver), options=opts)
        browser.get(f"http://127.0.0.1:{port}/")
        # the page renders in pieces (slowly on a loaded machine): wait for every control the test touches
        _wait_for(browser, 90, "#prompt textarea", "#run", "#answer textarea", "#gallery")
        box = browser.find_element(By.CSS_SELECTOR, "#prompt textarea")
        # empty input first: an error message in the answer box, no image
        browser.find_element(By.CSS_SELECTOR, "#run").click()
        WebDriverWait(browser, 60).until(
            lambda b: "Error" in b.find_element(By.CSS_SELECTOR, "#answer textarea").get_attribute("value"))
        box.send_keys("a red circle")
        browser.find_element(By.CSS_SELECTOR, "#run").click()
        imgs = WebDriverWait(browser, 120).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#gallery img"))
        assert imgs and imgs[0].get_attribute("src")
        status = browser.find_element(By.CSS_SELECTOR, "#answer textarea").get_attribute("value")
        assert "generated" in status, status

        # the Chat tab: draw, then edit the drawing (it comes back through the vision tower), then reset
        browser.find_element(By.XPATH, "//button[@role='tab'][contains(., 'Chat')]").click()
        _wait_for(browser, 60, "#chat_text textarea", "#chat_mode label", "#chat_send", "#chat_reset",
                  "#chat_status textarea", "#chatbot")
        chat_box = browser.find_element(By.CSS_SELECTOR, "#chat_text textarea")
        for mode, text, n_imgs in [("image", "a red circle", 1), ("edit", "make it blue", 2)]:
            browser.find_element(By.XPATH, f"//*[@id='chat_mode']//label[contains(., '{mode}')]").click()
            chat_box.send_keys(text)
            browser.find_element(By.CSS_SELECTOR, "#chat_send").click()
            WebDriverWait(browser, 120).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#chatbot img")) >= n_imgs)
            WebDriverWait(browser, 30).until(lambda b: b.find_element(
                By.CSS_SELECTOR, "#chat_status textarea").get_attribute("value").startswith(mode))
        browser.find_element(By.CSS_SELECTOR, "#chat_reset").click()
        WebDriverWait(browser, 30).until(lambda b: not b.find_elements(By.CSS_SELECTOR, "#chatbot img"))
    finally:
        if browser is not None:
            browser.quit()
        demo.close()
