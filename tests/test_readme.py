"""The README's client snippet, run as written against the app launched in this process: only its local address
is replaced by the test server's."""
import contextlib
import io
import re

from PIL import Image

from conftest import ROOT

README_URL = "http://127.0.0.1:7860/"


def _client_snippet() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.DOTALL)
    [snippet] = [block for block in blocks if "from gradio_client import Client" in block]
    return snippet


def test_readme_client_snippet_runs_as_written(client, app):
    snippet = _client_snippet()
    assert snippet.count(f'Client("{README_URL}")') == 1, "the snippet's address changed: update this test"
    namespace = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(snippet.replace(README_URL, app.demo.local_url), "README.md", "exec"), namespace)

    status, resolution = namespace["status"], namespace["resolution"]
    assert status["model_id"] == "tiny" and resolution == "64x64" == status["resolutions"][0]
    assert namespace["seed"] == 42  # the seed sent, with randomize_seed left at its default
    with Image.open(namespace["image_path"]) as image:
        assert image.size == (64, 64) and image.info["prompt"].startswith("a tiny astronaut")
    assert namespace["details"].startswith(f"64x64, {status['defaults']['steps']} steps")
    assert f"{namespace['image_path']} 42 64x64, " in printed.getvalue()
