"""The real AoT path on CPU: capture, export, AOTInductor compile through spaces, install, dispatch."""
import pytest
import torch

import optimization
from aot.programs import ShapeDispatch
from conftest import Compiled, rel_err

TOLERANCE = 1e-4  # fp32, compiled vs eager


@pytest.mark.parametrize("fixture", ["compiled_model", "compiled_blocks"])
def test_compiled_matches_eager_for_every_preset(fixture, request):
    compiled = request.getfixturevalue(fixture)
    outputs = compiled.run()
    assert set(outputs) == {p.name for p in compiled.model.presets}
    for name, out in outputs.items():
        assert torch.isfinite(out).all()
        assert rel_err(out, compiled.eager[name]) <= TOLERANCE, name


@pytest.mark.parametrize("fixture", ["compiled_model", "compiled_blocks"])
def test_every_forward_is_a_compiled_program(fixture, request):
    compiled = request.getfixturevalue(fixture)
    transformer = compiled.pipe.transformer
    dispatchers = [m.forward for m in transformer.modules() if isinstance(m.__dict__.get("forward"), ShapeDispatch)]
    if compiled.settings.aot_scope == "model":
        assert dispatchers == [transformer.forward]
    else:  # every block of both repeated classes, and nothing else
        blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
        assert sorted(map(id, dispatchers)) == sorted(id(b.forward) for b in blocks)
        # each block has its own loaded instance of its list's package, bound to its weights once
        instances = [program.model for d in dispatchers for _, program, _ in d.programs]
        assert len({id(m) for m in instances}) == len(instances) == 2 * len(blocks)
        assert len({str(m.archive_file) for m in instances}) == 4  # 2 block classes x 2 program shapes
    # portrait and landscape have the same token count, so they share one program
    assert compiled.report.programs == [{"image_tokens": 15, "resolutions": ["48x80", "80x48"]},
                                        {"image_tokens": 16, "resolutions": ["64x64"]}]
    # every dispatcher holds both programs, in token order, each labelled with the resolutions it serves
    assert all([label for _, _, label in d.programs] == ["48x80, 80x48", "64x64"] for d in dispatchers)


def _weight_tensors(compiled: Compiled) -> list[torch.Tensor]:
    """Every tensor any installed program reads, plus the module's own parameters and buffers."""
    tensors = list(compiled.pipe.transformer.state_dict().values())
    for module in compiled.pipe.transformer.modules():
        dispatch = module.__dict__.get("forward")
        if isinstance(dispatch, ShapeDispatch):
            for _, program, _ in dispatch.programs:
                tensors += list(program.weights.values())
    return tensors


@pytest.mark.parametrize("fixture", ["compiled_model", "compiled_blocks"])
def test_programs_share_one_copy_of_the_weights(fixture, request):
    compiled = request.getfixturevalue(fixture)
    params = compiled.pipe.transformer.state_dict().values()
    one_copy = sum(t.untyped_storage().nbytes() for t in {t.untyped_storage().data_ptr(): t for t in params}.values())
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in _weight_tensors(compiled)}
    assert sum(storages.values()) == one_copy
    assert len(_weight_tensors(compiled)) > 2 * len(params)  # the programs really hold references


@pytest.mark.parametrize("fixture", ["compiled_model", "compiled_blocks"])
def test_changing_a_weight_in_place_changes_every_preset(fixture, request):
    compiled = request.getfixturevalue(fixture)
    before = compiled.run()
    weight = compiled.pipe.transformer.single_transformer_blocks[0].proj_out.weight
    with torch.no_grad():
        weight.mul_(1.5)
        try:
            after = compiled.run()
        finally:
            weight.div_(1.5)
    for name in before:
        assert rel_err(after[name], before[name]) > 1e-3, name
    restored = compiled.run()
    for name in before:
        assert rel_err(restored[name], before[name]) <= 1e-6, name


def test_dispatch_picks_the_program_for_the_shape(compiled_model):
    dispatch = compiled_model.pipe.transformer.forward
    calls = []
    originals = list(dispatch.programs)
    dispatch.programs = [(signature, (lambda *a, _p=program, _l=label, **k: (calls.append(_l), _p(*a, **k))[1]), label)
                         for signature, program, label in originals]
    try:
        outputs = compiled_model.run()
    finally:
        dispatch.programs = originals
    assert calls == ["64x64", "48x80, 80x48", "48x80, 80x48"]  # 64x64, 48x80, 80x48 in preset order
    assert rel_err(outputs["80x48"], compiled_model.eager["80x48"]) <= TOLERANCE


@pytest.mark.parametrize("fixture", ["compiled_model", "compiled_blocks"])
def test_unknown_shape_is_refused_before_the_transformer(fixture, request):
    compiled = request.getfixturevalue(fixture)
    args, kwargs = compiled.inputs["64x64"]
    kwargs = dict(kwargs, hidden_states=kwargs["hidden_states"][:, :12], img_ids=kwargs["img_ids"][:12])
    # the message names the inputs' shapes (12 image tokens) and the resolutions that have programs
    with pytest.raises(optimization.UnsupportedShape,
                       match=r"no compiled program for inputs .*hidden_states \[1, 12, \d+\]"
                             r".* \(compiled for: 48x80, 80x48; 64x64\)$"):
        with torch.inference_mode():
            compiled.pipe.transformer(*args, **kwargs)


@pytest.mark.parametrize("fixture", ["compiled_model", "compiled_blocks"])
def test_pipeline_latents_match_eager(fixture, request):
    compiled = request.getfixturevalue(fixture)
    assert rel_err(compiled.latents(), compiled.eager_latents) <= TOLERANCE


def test_dynamic_shape_program_serves_every_preset_and_refuses_outside_its_range():
    compiled = Compiled(dynamic_shapes=1, aot_scope="model")
    assert compiled.report.programs == [{"image_tokens": "15..32", "resolutions": ["64x64", "48x80", "80x48"]}]
    for name, out in compiled.run().items():
        assert rel_err(out, compiled.eager[name]) <= TOLERANCE, name
    dispatch = compiled.pipe.transformer.forward
    args, kwargs = compiled.inputs["64x64"]

    def inputs_with(tokens: int) -> tuple[tuple, dict]:
        hidden, ids = kwargs["hidden_states"], kwargs["img_ids"]
        return args, dict(kwargs, hidden_states=hidden.new_zeros(hidden.shape[0], tokens, hidden.shape[2]),
                          img_ids=ids.new_zeros(tokens, ids.shape[1]))

    assert dispatch.program_for(*inputs_with(20)) is dispatch.program_for(*inputs_with(32))
    with pytest.raises(optimization.UnsupportedShape):
        dispatch.program_for(*inputs_with(33))


def test_compiled_program_is_loaded_once_not_per_request(compiled_model, monkeypatch):
    """Gradio runs each request in a fresh contextvars context; the programs must not reload there."""
    import contextvars
    import threading

    loads = []
    real_load = torch._inductor.aoti_load_package
    monkeypatch.setattr(torch._inductor, "aoti_load_package", lambda *a, **k: (loads.append(a), real_load(*a, **k))[1])
    outputs = {}

    def request():
        outputs.update(contextvars.Context().run(compiled_model.run))

    for _ in range(2):
        thread = threading.Thread(target=request)
        thread.start()
        thread.join()
    assert loads == []
    assert rel_err(outputs["64x64"], compiled_model.eager["64x64"]) <= TOLERANCE


def test_compile_failure_with_a_custom_attention_backend_retries_with_sdpa(monkeypatch, tmp_path):
    """A hub attention kernel that torch.export cannot trace must cost the attention choice, not the compile."""
    real = optimization.compile_program
    backends = []

    def compile_program(model, scope, preset, served, out_dir, inductor_configs):
        backend = model.pipe.transformer.transformer_blocks[0].attn.processor._attention_backend
        backends.append(backend)
        if backend != "native":
            raise RuntimeError(f"cannot export attention backend {backend}")
        return real(model, scope, preset, served, out_dir, inductor_configs)

    monkeypatch.setattr(optimization, "compile_program", compile_program)
    compiled = Compiled(attention="_native_math", presets="small=32x32", aot_scope="model", aot_cache_dir=tmp_path)
    assert backends == ["_native_math", "native"]
    assert (compiled.report.compile, compiled.report.attention) == ("aoti", "sdpa")
    assert any("AoT compile with _native_math failed" in f and f.endswith("using sdpa")
               for f in compiled.report.fallbacks)
    assert rel_err(compiled.run()["32x32"], compiled.eager["32x32"]) <= TOLERANCE
