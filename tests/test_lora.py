"""LoRAs on the tiny FLUX pipeline (aot/lora.py): made here with peft, fused at startup (LORAS) and switched per request
(LORA_CHOICES) through the real AoT path, against eager diffusers with the same LoRAs loaded; the cache key; the
refusals; the app's `lora` argument."""
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import optimization
from aot import lora, programs
from aot.cache import cache_key
from aot.families import family_named
from aot.model import build_tiny
from aot.programs import capture_inputs
from aot.quantize import WeightOnlyLinear, quantize_
from aot.report import Report
from aot.streaming import tensor_parts
from conftest import ROOT, cpu, eager_outputs, rel_err, settings_for, tiny_model
from settings import LORA_DEFAULTS_KEY, LoraSpec, parse_loras

TOLERANCE = 1e-4  # fp32, compiled vs eager, as tests/test_optimization.py
PRESETS = "small=32x32"  # one program of 4 image tokens: the compile these tests need is the cheapest there is
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_out", "ff.net.2"]


def make_lora(folder: Path, name: str, seed: int, family: str = "flux", rank: int = 4, text_encoder: bool = False,
              defaults: dict | None = None) -> Path:
    """A LoRA of random, non-zero matrices for the family's tiny pipeline, saved as diffusers saves one."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = build_tiny(family_named(family))
    torch.manual_seed(seed)
    targets = TARGETS if family == "flux" else ["to_q", "to_k", "to_v"]
    pipe.transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets,
                                            init_lora_weights=False))
    layers = {"transformer_lora_layers": get_peft_model_state_dict(pipe.transformer)}
    if text_encoder:
        pipe.text_encoder.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
        layers["text_encoder_lora_layers"] = get_peft_model_state_dict(pipe.text_encoder)
    folder.mkdir(parents=True, exist_ok=True)
    type(pipe).save_lora_weights(folder, weight_name=f"{name}.safetensors", **layers)
    path = folder / f"{name}.safetensors"
    if defaults:  # the key this template reads a distillation LoRA's defaults from
        save_file(load_file(path), path, metadata={LORA_DEFAULTS_KEY: json.dumps(defaults)})
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("loras")
    return {"fused": make_lora(folder, "fused", 1, defaults={"steps": 3, "guidance": 2.0}),
            "a": make_lora(folder, "a", 2), "b": make_lora(folder, "b", 3, rank=8),
            "text": make_lora(folder, "text", 4, text_encoder=True)}


def _env(files) -> dict:
    return dict(presets=PRESETS, aot_scope="model", loras=f"{files['fused']}=0.8",
                lora_choices=f"{files['a']},{files['b']}=0.5;name=bee")


def _reference(files) -> tuple[dict, dict]:
    """Eager diffusers with the same LoRAs loaded as adapters (not fused): the transformer's captured call and its
    output with the fused LoRA alone ("none") and with each choice beside it."""
    model = tiny_model(presets=PRESETS)
    pipe = model.pipe
    pipe.load_lora_weights(str(files["fused"].parent), weight_name=files["fused"].name, adapter_name="fused")
    pipe.set_adapters(["fused"], [0.8])
    preset = model.presets[0]
    inputs = {preset.name: capture_inputs(model, pipe.transformer, preset)}
    outputs = {"none": eager_outputs(pipe, inputs)}
    for choice, scale in (("a", 1.0), ("bee", 0.5)):
        path = files[choice[0]]
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=choice)
        pipe.set_adapters(["fused", choice], [0.8, scale])
        outputs[choice] = eager_outputs(pipe, inputs)
    return inputs, outputs


@pytest.fixture(scope="module")
def served(files):
    """The tiny pipeline with one LoRA fused and two to switch, AoT-compiled on the CPU (the fused LoRA is in the
    cache key: this compiles), beside eager diffusers' outputs."""
    inputs, reference = _reference(files)
    settings = settings_for(**_env(files))
    model = tiny_model(**_env(files))
    base = {name: p.detach().clone() for name, p in model.pipe.transformer.named_parameters()}
    report = optimization.optimize_pipeline_(model, settings)
    assert report.compile == "aoti" and report.fallbacks == [], report.fallbacks
    return dict(model=model, report=report, inputs=inputs, reference=reference, base=base)


def test_entries_parse_and_bad_ones_say_what_to_write():
    assert parse_loras("org/repo:w.safetensors@abc=0.5;steps=8;guidance=1, ./x.safetensors", "LORAS") == (
        LoraSpec("org/repo", "w.safetensors", "abc", 0.5, steps=8, guidance=1.0), LoraSpec("./x.safetensors"))
    assert [s.name for s in parse_loras("org/repo:w.safetensors,./y.safetensors;name=y2", "LORA_CHOICES")] == [
        "w", "y2"]
    for text, message in [("org/repo=big", "scale 'big' is not a number"), ("org/repo;steps=8", "not one of name"),
                          ("org/repo@", "give LORA_CHOICES as"), ("a/b.safetensors,c/b.safetensors", "must be unique"),
                          ("org/none.safetensors", "not 'none'"), ("org/repo=0", "non-zero")]:
        with pytest.raises(ValueError, match=message):
            parse_loras(text, "LORA_CHOICES")
    with pytest.raises(ValueError, match="option 'name=x' is not one of steps=..., guidance=..."):
        settings_for(loras="org/repo;name=x")


def test_fused_lora_matches_eager_diffusers_and_sets_its_defaults(served, files):
    model, report = served["model"], served["report"]
    out = eager_outputs(model.pipe, served["inputs"])
    for name, expected in served["reference"]["none"].items():
        assert rel_err(out[name], expected) <= TOLERANCE, name
    # fused, then unloaded: the compiled modules are plain Linear layers with the LoRA in their weights
    assert not any("lora" in name for name, _ in model.pipe.transformer.named_parameters())
    fused, = report.loras
    assert (fused["name"], fused["scale"], fused["layers"], fused["rank"]) == ("fused", 0.8, 10, 4)
    assert fused["sha256"] == lora._sha256(files["fused"]) and fused["text_encoders"] == []
    assert fused["defaults"] == {"steps": 3, "guidance": 2.0} and model.defaults.steps == 3  # its file's metadata
    assert model.defaults.guidance == 2.0


def test_each_choice_is_switched_into_the_compiled_program_and_compiles_nothing(served, monkeypatch):
    model, inputs, reference = served["model"], served["inputs"], served["reference"]
    choices = lora.choices_of(model)
    assert choices.names == ["none", "a", "bee"]
    compiles, loads = sum(programs.COMPILES.values()), []
    real_load = torch._inductor.aoti_load_package
    monkeypatch.setattr(torch._inductor, "aoti_load_package", lambda *a, **k: (loads.append(a), real_load(*a, **k))[1])
    outputs = {}
    for choice in ("a", "bee", "none", "bee"):
        with lora.using(model, choice):
            outputs[choice] = eager_outputs(model.pipe, inputs)
        for name, expected in reference[choice].items():
            assert rel_err(outputs[choice][name], expected) <= TOLERANCE, (choice, name)
    for name in inputs:  # a switch changes the result, and "none" is the fused base again
        assert rel_err(outputs["a"][name], outputs["none"][name]) > 1e-2
        assert rel_err(outputs["bee"][name], outputs["a"][name]) > 1e-2
    assert choices.current == "bee" and choices.switches == 4
    assert sum(programs.COMPILES.values()) == compiles and loads == []  # nothing compiled, nothing reloaded
    # the switch wrote into the weights the programs bind: the same tensors as before it
    dispatch = model.pipe.transformer.forward
    bound = {t.data_ptr() for _, program, _ in dispatch.programs for t in program.weights.values()}
    assert {p.data_ptr() for p in model.pipe.transformer.parameters()} <= bound
    entries = {c["name"]: c for c in served["report"].lora_choices}
    assert entries["bee"]["scale"] == 0.5 and entries["bee"]["rank"] == 8 and entries["a"]["host_bytes"] > 0
    memory = served["report"].memory["lora_choices"]
    assert memory["device_bytes"] == 0 and memory["host_bytes"] > memory["base_host_bytes"] > 0


def test_cache_key_follows_the_fused_lora_file_and_scale_and_nothing_else(files, tmp_path):
    def key(spec: str | None, path: Path | None = None) -> dict:
        model, report = tiny_model(), Report(device="cpu", dtype="float32")
        if spec is not None:
            lora.fuse_(model, settings_for(loras=spec), report, None)
        return cache_key(model.pipe, "flux", "tiny-flux", None, report, cpu(), "model", 16, False, "", {})

    plain = key(None)
    assert "loras" not in plain  # no LoRA: every other program's key is as it was
    copy = tmp_path / "copy.safetensors"
    shutil.copy(files["a"], copy)
    with_a = key(str(copy))
    assert with_a != plain and with_a == key(str(files["a"]))  # the file's content, not its path
    assert key(f"{copy}=0.5") != with_a
    shutil.copy(files["b"], copy)
    assert key(str(copy)) != with_a


@pytest.mark.parametrize("case, message", [
    ("renamed", r"2 of its 10 layers names a Linear layer of this FluxTransformer2DModel \(e.g. '.*\.attn\.to_nope'\)"
                ": its keys do not match the model's modules"),
    ("z-image", r"none of its \d+ layers names a Linear layer .* a LoRA for another model family"),
    ("corrupt", "not a readable LoRA file"),
    ("rank", "rank 8 at .* is over LORA_MAX_RANK=4"),
    ("text-choice", "changes text_encoder too, and a LORA_CHOICES entry changes the transformer only"),
    ("defaults", "its 'aot_space.defaults' metadata is not a JSON object of steps and guidance"),
])
def test_a_bad_lora_is_refused_at_startup_naming_the_file(files, tmp_path, monkeypatch, case, message):
    path = tmp_path / f"{case}.safetensors"
    if case == "renamed":
        state = load_file(files["a"])
        save_file({k.replace(".attn.to_q.", ".attn.to_nope."): v for k, v in state.items()}, path)
    elif case == "z-image":
        path = make_lora(tmp_path, case, 5, family="z-image")
    elif case == "corrupt":
        path.write_bytes(files["a"].read_bytes()[:300])
    elif case == "defaults":
        save_file(load_file(files["a"]), path, metadata={LORA_DEFAULTS_KEY: '{"cfg": "off"}'})
    elif case == "rank":
        monkeypatch.setattr(lora, "LORA_MAX_RANK", 4)
        path = files["b"]
    else:
        path = files["text"]
    env = {"lora_choices" if case == "text-choice" else "loras": str(path)}
    with pytest.raises(lora.LoraRefused, match=message) as refused:
        optimization.optimize_pipeline_(tiny_model(**env), settings_for(**env))
    assert str(path) in str(refused.value)


def test_a_fused_lora_with_text_encoder_layers_changes_the_text_encoder_too(files):
    model, report = tiny_model(), Report(device="cpu", dtype="float32")
    before = {n: p.clone() for n, p in model.pipe.text_encoder.named_parameters()}
    lora.fuse_(model, settings_for(loras=str(files["text"])), report, None)
    after = dict(model.pipe.text_encoder.named_parameters())
    assert report.loras[0]["text_encoders"] == ["text_encoder"] and set(after) == set(before)  # fused, unloaded
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(".q_proj." in n or ".v_proj." in n for n in changed)


def test_choices_switch_quantized_weights_in_their_own_layout(files):
    """int8 through the product's quantize_; fp8 as torchao lays it out (its quantize_ refuses a CPU, so the weights
    are made Float8Tensors here directly): a switch writes the choice quantized as the base is, and back."""
    from torchao.quantization import Float8Tensor

    model, report = tiny_model(), Report(device="cpu", dtype="float32")
    settings = settings_for(lora_choices=str(files["a"]))
    lora.fuse_(model, settings, report, None)
    eager = tiny_model()
    eager.pipe.load_lora_weights(str(files["a"].parent), weight_name=files["a"].name)
    eager.pipe.fuse_lora()
    eager.pipe.unload_lora_weights()
    fp8 = "transformer_blocks.0.attn.to_q"  # fp8 here, int8 everywhere else
    for pipe in (model.pipe, eager.pipe):
        layer = pipe.transformer.get_submodule(fp8)
        quantize_(pipe.transformer, "int8")
        layer.weight = torch.nn.Parameter(Float8Tensor.from_hp(layer.weight.detach()), requires_grad=False)
        parent, _, name = fp8.rpartition(".")
        setattr(pipe.transformer.get_submodule(parent), name, layer)
    transformer = model.pipe.transformer
    before = {n: [t.clone() for t in tensor_parts(p)] for n, p in transformer.named_parameters()}
    lora.serve_choices_(model, report)
    with lora.using(model, "a"):
        fused = dict(eager.pipe.transformer.named_parameters())
        for name, p in transformer.named_parameters():
            for got, want in zip(tensor_parts(p), tensor_parts(fused[name])):
                assert torch.equal(got, want), name
    assert isinstance(transformer.get_submodule(fp8).weight, Float8Tensor)
    assert isinstance(transformer.get_submodule("transformer_blocks.0.attn.to_k"), WeightOnlyLinear)
    with lora.using(model, "none"):
        for name, p in transformer.named_parameters():
            assert all(torch.equal(a, b) for a, b in zip(tensor_parts(p), before[name])), name


@pytest.fixture(scope="module")
def lora_app(served, files, tmp_path_factory):
    """The app started with the served fixture's settings: it loads that fixture's programs from the cache."""
    from gradio_client import Client

    env = {key.upper(): value for key, value in _env(files).items()}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        spec = importlib.util.spec_from_file_location("app_with_loras", ROOT / "app.py")
        app = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(app)
    app.demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    yield app, Client(app.demo.local_url, verbose=False)
    app.demo.close()


def test_the_app_serves_each_choice_and_refuses_an_undeclared_one(lora_app):
    from gradio_client.exceptions import AppError

    app, client = lora_app
    status = client.predict(api_name="/status")
    assert status["compile_source"] == "loaded from cache" and status["defaults"]["steps"] == 3
    assert [entry["name"] for entry in status["loras"]] == ["fused"]
    assert [entry["name"] for entry in status["lora_choices"]] == ["a", "bee"]
    compiles = status["compiles"]
    request = dict(prompt="a lighthouse", resolution="32x32", seed=7, steps=2)
    images = {}
    for choice in ("none", "a", "none"):
        path, _, details = client.predict(**request, lora=choice, api_name="/generate")
        images.setdefault(choice, []).append(Path(path).read_bytes())
        assert ("LoRA a" in details) == (choice == "a")
    assert images["none"][0] == images["none"][1] != images["a"][0]
    with pytest.raises(AppError, match=r"Unknown LoRA 'sepia'. Choices: none, a, bee."):
        client.predict(**request, lora="sepia", api_name="/generate")
    path, _, details = client.predict(**request, lora="bee", api_name="/generate")
    assert "LoRA bee" in details and Path(path).is_file()
    assert client.predict(api_name="/status")["compiles"] == compiles  # a switch compiles nothing
    banner = app._status_markdown()
    assert "LoRAs fused:" in banner and "`fused`" in banner and "LoRAs to switch per request:" in banner


# --- two experts (Wan 2.2 A14B): a LORAS entry names the expert it is for ------------------------------------------

def _deltas(path: Path, scale: float) -> dict[str, torch.Tensor]:
    """What a LoRA file adds to each Linear's weight when fused at `scale`, from its matrices alone (rank = alpha)."""
    state = load_file(path)
    return {key.removeprefix("transformer.").removesuffix(".lora_A.weight"):
            scale * state[key.replace("lora_A", "lora_B")] @ state[key]
            for key in state if key.endswith(".lora_A.weight")}


def test_each_expert_takes_the_loras_its_entries_name_and_one_guidance_for_both(tmp_path):
    high = make_lora(tmp_path, "high", 11, family="wan", defaults={"steps": 4, "guidance": 1.0})
    low = make_lora(tmp_path, "low", 12, family="wan")
    env = dict(model_id="tiny-wan", loras=f"{high};expert=high,{low}=0.5;expert=low,{low}=0.25;expert=both")
    model, report = tiny_model(**env), Report(device="cpu", dtype="float32")
    assert model.defaults.guidance_2 is not None and model.defaults.guidance_2 != 1.0  # CFG on the second expert
    experts = ("transformer", "transformer_2")
    base = {e: {n: p.detach().clone() for n, p in getattr(model.pipe, e).named_parameters()} for e in experts}
    lora.fuse_(model, settings_for(**env), report, None)
    expected = {"transformer": [_deltas(high, 1.0), _deltas(low, 0.25)],
                "transformer_2": [_deltas(low, 0.5), _deltas(low, 0.25)]}
    for expert in experts:
        params = dict(getattr(model.pipe, expert).named_parameters())
        assert set(params) == set(base[expert])  # fused, then unloaded: plain Linear layers again
        touched = set().union(*expected[expert])
        for name, before in base[expert].items():
            layer = name.removesuffix(".weight")
            delta = sum(d[layer] for d in expected[expert] if layer in d) if layer in touched else 0
            assert torch.allclose(params[name], before + delta, atol=1e-6), (expert, name)
        assert touched and all(name.endswith((".to_q", ".to_k", ".to_v")) for name in touched)
    assert [entry["expert"] for entry in report.loras] == ["high", "low", "both"]
    # a distillation LoRA's guidance is both experts': 1.0 turns CFG off in each, so a step is one call per expert
    assert (model.defaults.steps, model.defaults.guidance, model.defaults.guidance_2) == (4, 1.0, 1.0)
    assert model.batch_one_calls(model.defaults.guidance) == 1

    def key(loras: str) -> dict:
        m, r = tiny_model(model_id="tiny-wan", loras=loras), Report(device="cpu", dtype="float32")
        lora.fuse_(m, settings_for(model_id="tiny-wan", loras=loras), r, None)
        return cache_key(m.pipe, "wan", "tiny-wan", None, r, cpu(), "blocks", 16, False, "", {})

    assert key(f"{low};expert=high") != key(f"{low};expert=low")  # the expert is in the programs' key


@pytest.mark.parametrize("env, message", [
    (dict(model_id="tiny-wan", loras="{low}"), r"has two experts, .* say which this LoRA is for with ;expert=high"),
    (dict(model_id="tiny-wan", loras="{low};expert=low", lora_choices="{low}"),
     "LORA_CHOICES .* are switched in one transformer's weights and are not built for two yet"),
    (dict(loras="{flux};expert=high"), ";expert=high is for a pipeline of two experts, and FluxPipeline has one"),
])
def test_experts_are_named_where_there_are_two_and_only_there(tmp_path, files, env, message):
    low = make_lora(tmp_path, "low", 12, family="wan")
    env = {k: v.format(low=low, flux=files["a"]) for k, v in env.items()}
    with pytest.raises(lora.LoraRefused, match=message):
        lora.fuse_(tiny_model(**env), settings_for(**env), Report(device="cpu", dtype="float32"), None)
    with pytest.raises(ValueError, match="expert=middle is not one of high, low, both"):
        settings_for(loras=f"{low};expert=middle")
