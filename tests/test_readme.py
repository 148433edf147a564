"""The README's client snippet, run as written against the local default (the demo model, as `python app.py` serves
it) launched in this process: only its local address is replaced by the test server's. The demo must draw what the
snippet asks, judged by assets/shapes.py."""
import contextlib
import io
import re

from PIL import Image

from assets import shapes
from conftest import ROOT
from test_browser import demo_app  # noqa: F401 - a fixture: app.py with no MODEL_ID, served beside the tiny app

README_URL = "http://127.0.0.1:7860/"


def _client_snippet() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.DOTALL)
    [snippet] = [block for block in blocks if "from gradio_client import Client" in block]
    return snippet


def test_readme_client_snippet_runs_as_written_and_the_demo_draws_its_prompt(demo_app):  # noqa: F811
    snippet = _client_snippet()
    assert snippet.count(f'Client("{README_URL}")') == 1, "the snippet's address changed: update this test"
    namespace = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(snippet.replace(README_URL, demo_app.demo.local_url), "README.md", "exec"), namespace)

    status, resolution = namespace["status"], namespace["resolution"]
    assert status["model_id"] == "demo" and status["demo_model"] is True and status["weights"] == "trained"
    assert resolution == "128x128" == status["resolutions"][0]
    assert namespace["seed"] == 42  # the seed sent, with randomize_seed left at its default
    with Image.open(namespace["image_path"]) as image:
        prompt = image.info["prompt"]
        assert image.size == (128, 128)
        assert shapes.judge(image.convert("RGB"), shapes.things_in(prompt)) == {
            "colour": True, "shape": True, "position": True}, prompt
    # every word of the prompt is the demo's own: no note
    assert namespace["details"].startswith(f"128x128, {status['defaults']['steps']} steps")
    assert "note" not in namespace["details"]
    assert f"{namespace['image_path']} 42 128x128, " in printed.getvalue()
