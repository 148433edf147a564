"""Bad input, widened: hypothesis-generated values for every /generate parameter, sent through gradio_client
to the launched app. Every call succeeds or gets the app's own clear error, and the server keeps serving.
Also: nothing in a request reaches a file path or a shell.
"""
import ast
import re

import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import ROOT, SESSION_DIR
from settings import MAX_SEED, MAX_STEPS

GOOD = dict(prompt="a lighthouse at dusk", resolution="48x80", seed=1234, randomize_seed=False, steps=2, guidance=3.5,
            negative_prompt="")
# validate() names the parameter at the start of each message it raises, or (a negative prompt for a model
# that takes none, such as the tiny FLUX) says so
APP_ERROR = re.compile(r"^(Prompt |Negative prompt |This flux model takes no negative prompt|Unknown resolution "
                       r"|randomize_seed |Seed |Steps |Guidance )")

# What JSON can carry. NaN, infinities and lone surrogates are refused by the client before sending, so they
# are tested on generate() directly in test_app.py.
scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
           | st.text(max_size=40))
junk = scalars | st.lists(scalars, max_size=3) | st.dictionaries(st.text(max_size=8), scalars, max_size=3)
long_text = st.builds(lambda piece, n: piece * n, st.text(min_size=1, max_size=3), st.integers(500, 20_000))


def mostly(valid, invalid):
    """Valid 4 times in 5, so that most requests get past the earlier checks to the later parameters."""
    return st.integers(0, 4).flatmap(lambda k: invalid if k == 0 else valid)


PARAMETERS = dict(
    prompt=mostly(st.text(max_size=300), long_text | junk),
    resolution=mostly(st.sampled_from(["64x64", "48x80", "80x48"]), st.text(max_size=20) | long_text | junk),
    seed=mostly(st.integers(0, MAX_SEED), st.integers() | st.floats(-1e12, 1e12) | long_text | junk),
    randomize_seed=mostly(st.booleans(), junk),
    steps=mostly(st.integers(1, MAX_STEPS), st.integers(-10, 100) | st.floats(-5, 60) | junk),
    guidance=mostly(st.floats(0, 20), st.floats(-1e6, 1e6) | junk),
    negative_prompt=mostly(st.just(""), st.text(max_size=300) | long_text | junk),  # the tiny FLUX takes none
)


@pytest.fixture(scope="module")
def fuzz_client(client):
    yield client
    path, seed, _ = client.predict(**GOOD, api_name="/generate")  # still serving after everything above
    assert seed == 1234 and Image.open(path).size == (48, 80)


@settings(max_examples=120, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(**PARAMETERS)
def test_generate_api_answers_any_input_with_an_image_or_a_clear_error(fuzz_client, app, **request):
    from gradio_client.exceptions import AppError

    note(repr(request)[:2000])
    try:
        path, seed, details = fuzz_client.predict(**request, api_name="/generate")
    except AppError as err:
        assert APP_ERROR.match(str(err)), str(err)[:500]
        event(f"refused: {str(err).split()[0]}")
        return
    event("served")
    preset = app.PRESETS[request["resolution"]]
    with Image.open(path) as image:
        assert image.size == (preset.width, preset.height)
    assert 0 <= seed <= MAX_SEED and (request["randomize_seed"] or seed == request["seed"])
    assert SAFE_NAME.match(path.rsplit("/", 1)[-1]), path  # the prompt reaches the file name as a slug only
    assert details.startswith(f"{preset.name}, {int(request['steps'])} steps")


SENTINEL = SESSION_DIR / "injected"
SAFE_NAME = re.compile(r"^[^\W_]+(-[^\W_]+)*-seed\d+\.png$")
HOSTILE = ["../../etc/passwd", "/etc/passwd\x00.png", f"$(touch {SENTINEL})", f"; touch {SENTINEL}",
           f"`touch {SENTINEL}`", f"| touch {SENTINEL} &", "{{7*7}} %s %n ${HOME}", "C:\\Windows\\system32\\cmd.exe"]
SKIP = {".venv", ".git", "test-artifacts", ".pytest_cache", "__pycache__", ".gradio", ".aot-cache", ".hypothesis",
        ".ruff_cache"}  # tool caches: a linter run alongside the tests writes there


def _files(root):
    return {p for p in root.rglob("*") if p.is_file() and not SKIP & set(p.relative_to(root).parts)}


def test_request_text_reaches_no_file_path_or_shell(client, app):
    from gradio_client.exceptions import AppError

    temp = SESSION_DIR / "gradio"
    before_repo, before_temp = _files(ROOT), _files(temp)
    for text in HOSTILE:
        path, seed, _ = client.predict(**{**GOOD, "prompt": text}, api_name="/generate")
        with Image.open(path) as image:
            assert seed == 1234 and image.size == (48, 80)
        for name in ("resolution", "seed", "negative_prompt"):
            with pytest.raises(AppError, match=APP_ERROR):
                client.predict(**{**GOOD, name: text}, api_name="/generate")
    assert not SENTINEL.exists()
    assert _files(ROOT) == before_repo
    # the only files a request makes are its PNGs in Gradio's content-addressed cache, named by a slug
    made = _files(temp) - before_temp
    assert made and all(SAFE_NAME.match(p.name) and p.parent.parent == temp for p in made), made


def test_app_code_has_no_file_or_shell_sink():
    """Request handling stays in memory but for its PNG, which Gradio's own cache function writes under a slugged
    name (tested above): app.py imports nothing that runs shells or unpickles, calls no open/eval/exec, and touches
    the file system (pathlib) only at startup: in `_example_prompts` and where the example pictures lie
    (`DEMO_THUMBNAILS`). A change that needs more should come with a test like the one above."""
    tree = ast.parse((ROOT / "app.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"os", "subprocess", "shutil", "tempfile", "pickle", "shlex", "glob"}
    called = {node.func.id for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
    assert not called & {"open", "eval", "exec", "compile", "__import__"}
    startup = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "_example_prompts"
               or isinstance(node, ast.Assign) and [ast.unparse(t) for t in node.targets] == ["DEMO_THUMBNAILS"]]
    assert len(startup) == 2
    paths_anywhere = [node for node in ast.walk(tree) if isinstance(node, ast.Name) and node.id == "Path"]
    paths_at_startup = [node for part in startup for node in ast.walk(part)
                        if isinstance(node, ast.Name) and node.id == "Path"]
    assert sorted(map(id, paths_anywhere)) == sorted(map(id, paths_at_startup)) and paths_at_startup
