"""LTX-2, on its tiny random-weight pipeline (MODEL_ID=tiny-ltx2): one transformer denoising a video and its sound
track together, AoT-compiled on CPU at block scope (the default); compiled matches eager at every preset on both
streams.

One compile per program for the module: `ltx2` is compiled once and every test reads it.
"""
import pytest
import torch

from aot.families import LTX2
from aot.programs import ShapeDispatch
from conftest import Compiled, rel_err

TOLERANCE = 1e-4  # fp32, compiled vs eager
PROMPT = "a drum rolling down stairs"


class LTX2Compiled(Compiled):
    """tiny-ltx2 after `optimize_pipeline_`, with the transformer's eager video and audio outputs at every preset and
    a whole run's latents, recorded before."""

    def __init__(self):
        super().__init__(model_id="tiny-ltx2")

    def check_model(self) -> None:
        assert self.model.family.name == "ltx2"

    def record_eager(self) -> None:
        self.eager_streams = self.run_streams()
        self.eager_latents = self.latents()

    def run_streams(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The transformer's (video, audio) outputs at every preset's captured call."""
        with torch.inference_mode():
            return {preset: tuple(t.clone() for t in self.pipe.transformer(*args, **kwargs)[:2])
                    for preset, (args, kwargs) in self.inputs.items()}

    def latents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Two steps at the first preset, as (video, audio) latents."""
        generator = torch.Generator().manual_seed(5)
        with torch.inference_mode():
            result = self.model(PROMPT, self.model.presets[0], steps=2, generator=generator, output_type="latent")
        return result.frames, result.audio


@pytest.fixture(scope="module")
def ltx2() -> LTX2Compiled:
    return LTX2Compiled()


def test_compiled_matches_eager_at_every_preset_on_both_streams(ltx2):
    assert ltx2.report.compile == "aoti" and ltx2.report.compile_scope == "blocks", ltx2.report.fallbacks
    compiled = ltx2.run_streams()
    assert set(compiled) == {p.name for p in ltx2.model.presets}
    for preset, streams in compiled.items():
        for stream, out, eager in zip(("video", "audio"), streams, ltx2.eager_streams[preset]):
            assert torch.isfinite(out).all() and rel_err(out, eager) <= TOLERANCE, (preset, stream)
    for out, eager in zip(ltx2.latents(), ltx2.eager_latents):
        assert rel_err(out, eager) <= TOLERANCE


def test_every_block_runs_one_program_per_video_token_count(ltx2):
    # one block class carries both streams: its programs are all there is (no audio-only block list)
    assert list(ltx2.report.cache_keys) and ltx2.pipe.transformer._repeated_blocks == ["LTX2VideoTransformerBlock"]
    blocks = ltx2.pipe.transformer.transformer_blocks
    patched = [m for m in ltx2.pipe.transformer.modules() if isinstance(m.__dict__.get("forward"), ShapeDispatch)]
    assert sorted(map(id, patched)) == sorted(map(id, blocks))
    # 96x64x9 and 64x96x9 are 2 latent frames of 6 tokens, 64x64x9 of 4; each with the same 9 audio tokens
    assert ltx2.report.programs == [{"image_tokens": 8, "resolutions": ["64x64x9"]},
                                    {"image_tokens": 12, "resolutions": ["96x64x9", "64x96x9"]}]


def test_presets_are_8k_plus_1_frames_at_multiples_of_32():
    from settings import check_frames, parse_presets

    presets = parse_presets(LTX2.presets, LTX2.multiple)
    check_frames(presets, LTX2.video, "ltx2")
    assert [LTX2.tokens(p) for p in presets] == [16 * 24 * 16] * 2  # 121 frames: 16 latent frames of 24x16 tokens
    with pytest.raises(ValueError, match=r"must be 8k\+1 .* at most 121"):
        check_frames(parse_presets("a=768x512x77", 32), LTX2.video, "ltx2")
    with pytest.raises(ValueError, match="multiples of 32"):
        parse_presets("a=784x512x121", 32)

