"""scripts/demo.py: the plain generate() function on the tiny checkpoint, and a real browser run of the UI
(Debian chromium + chromedriver via selenium): type a prompt, click Run, an <img> appears in the gallery."""
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


def test_cli_defaults_bind_loopback():
    args = demo_mod.parse_args(["ckpt"])
    assert args.host == "127.0.0.1" and args.port == 7860
    assert demo_mod._is_loopback("127.0.0.1") and not demo_mod._is_loopback("0.0.0.0")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    port = _free_port()
    demo = demo_mod.build_demo(pipe)
    demo.queue()
    demo.launch(server_name="127.0.0.1", server_port=port, share=False, prevent_thread_lock=True, quiet=True,
                ssr_mode=False, footer_links=[])
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
        box = WebDriverWait(browser, 90).until(lambda b: b.find_element(By.CSS_SELECTOR, "#prompt textarea"))
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
    finally:
        if browser is not None:
            browser.quit()
        demo.close()
