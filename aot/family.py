"""The types of a model family entry (`aot/families/`): what differs between FLUX.1, FLUX.2, Qwen-Image, Z-Image, ..."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable


class Guidance(enum.Enum):
    EMBEDDED = "embedded"  # distilled guidance fed to the transformer as an embedding (FLUX.1-dev, FLUX.2 [dev])
    # true classifier-free guidance: the transformer on a negative prompt too, in a second call (Qwen-Image) or as the
    # same call's second batch (LTX-2: `Family.cfg_batched`)
    CFG = "cfg"
    NONE = "none"  # timestep-distilled turbo/schnell models: no guidance at all


class Text(enum.Enum):
    FIXED = "fixed"  # the pipeline pads the prompt embeddings to max_sequence_length: one text length
    DYNAMIC = "dynamic"  # the length varies with the prompt: the programs' text axis is dynamic


@dataclass(frozen=True)
class Defaults:
    steps: int
    guidance: float
    guidance_kind: Guidance
    max_sequence_length: int  # text tokens the transformer sees at most (FIXED: always)
    # A second expert's guidance at the default (Wan 2.2 A14B's low-noise one); a request's other guidance sets both
    guidance_2: float | None = None
    # Why a request cannot change the steps, where it cannot (a distilled recipe's fixed sigma schedules); "": it can
    fixed_steps: str = ""


@dataclass(frozen=True)
class Video:
    """What a video family's output is: frames, encoded as an MP4 at `fps`."""

    fps: int  # the frame rate the model was trained at: the page's and the API's default
    max_frames: int  # the most frames a preset may ask for (the released model's longest clip)
    # The VAE folds this many frames into one latent frame after the first: a frame count is frame_step * k + 1
    frame_step: int = 4
    # The sound track's sample rate, from the loaded pipeline, where the pipeline returns one beside the frames
    # (its result's `audio`: LTX-2's vocoder output); None: a silent video
    audio_rate: Callable[[object], int] | None = None

    def latent_frames(self, frames: int) -> int:
        return (frames - 1) // self.frame_step + 1


# An image-to-video entry's input fields (Wan 2.2 I2V, LTX-2 I2V): one image, the video's first frame, which the
# pipeline's `video_processor.preprocess` stretches to the output's height and width, whatever its aspect ratio
FIRST_FRAME_INPUT = dict(
    max_images=1, min_images=1, first_frame=True, resizes_inputs=True,
    resized_to="the requested resolution, stretched to it: pick the one nearest the image's aspect ratio",
)


@dataclass(frozen=True)
class TwoStage:
    """A family's distilled two-stage recipe (RECIPE=distilled; LTX-2's): stage 1 draws the video at 1/`scale` of the
    requested width and height on a fixed sigma schedule, a latent upsampler makes its latents `scale` times larger
    on each side, and stage 2 refines them at the requested size on a shorter fixed schedule. The model is distilled
    to run without guidance: each step is one transformer call of batch one. A preset names the output's size; each
    stage's size is a program of its own."""

    # Each stage's sigma schedule (its steps are its length), read from diffusers when asked: importing it at startup
    # would import diffusers with the families
    schedules: Callable[[], tuple[tuple[float, ...], tuple[float, ...]]]
    presets: str  # the native outputs, "LABEL=WxHxF,...": sides multiples of the family's `multiple` x `scale`
    tiny_presets: str  # the tiny pipeline's, each stage 1 still a size its VAE decodes
    defaults: Callable[[object], Defaults]  # no guidance; both schedules' steps, fixed
    call_args: dict  # pipeline arguments for both stages, over the family's own `call_args`
    # (pipeline, source, revision) -> the latent upsampling pipeline over the pipeline's VAE, loaded from the source's
    # `upsampler_folder`; it refuses an upsampler that does not fit (ValueError)
    load_upsampler: Callable[[object, str, str | None], object]
    build_tiny_upsampler: Callable[[object], object]  # the tiny pipeline's, from it: offline, random weights
    # The chain, (model, prompt, output preset, generator, images=input images, **pipeline arguments) -> stage 2's
    # pipeline result
    run: Callable[..., object]
    upsampler_folder: str = "latent_upsampler"
    upsampler_repo: str = ""  # a repository whose `upsampler_folder` holds one, named where none is found
    scale: int = 2

    @property
    def steps(self) -> tuple[int, ...]:
        return tuple(map(len, self.schedules()))


@dataclass(frozen=True)
class RealSize:
    """The released model's sizes, as we read its published configs: the benchmarks build it from these with random
    weights in place of the tiny pipeline's models (benchmarks/lib.py). The app never reads them."""

    params_b: float  # the released transformer's parameters, billions: what a build from `transformer` must count
    transformer: dict  # keyword arguments of the family's transformer class
    # pipeline component -> {config section (None: the top level): sizes}, over the tiny encoder's own config
    text_encoders: dict = field(default_factory=dict)
    vae: dict | None = None  # keyword arguments of the VAE class; None: its defaults are the released VAE's
    scheduler: dict | None = None  # keyword arguments of the scheduler class, where the tiny one's differ
    pipeline: dict = field(default_factory=dict)  # the pipeline's own config (FLUX.2 [klein] 4B: is_distilled)
    # Other pipeline components that shape the transformer's call or the output: component -> keyword arguments of
    # the tiny one's class (LTX-2's text connectors, audio VAE and vocoder)
    components: dict = field(default_factory=dict)
    text_tokens: int | None = None  # the released tokenizer's length, where the tiny one's is shorter
    # A two-stage recipe's latent upsampler (`Family.distilled`): keyword arguments of the tiny one's class
    upsampler: dict | None = None


@dataclass(frozen=True)
class Family:
    name: str  # MODEL_ID=tiny-<name> builds its tiny pipeline
    pipelines: tuple[str, ...]  # diffusers pipeline class names served by this entry
    presets: str  # native resolutions, "LABEL=WxH,..."
    tiny_presets: str  # the tiny pipeline's resolutions (same aspect ratios, a few tokens each)
    multiple: int  # pixels per image token along each side: image sides must be multiples of it
    text: Text
    defaults: Callable[[object], Defaults]  # from the loaded pipeline's config (dev vs schnell, ...)
    build_tiny: Callable[[], object]  # a random-weight pipeline of this family, built offline in fp32
    prompt_tokens: Callable[[object, str], int]  # tokens of `prompt` that the transformer's text encoder reads
    # Which pipelines of its `pipelines` classes it serves, where two entries share a class (WanPipeline: Wan 2.2
    # TI2V-5B's own entry); None: all of them
    serves: Callable[[object], bool] | None = None
    # Why a pipeline it would serve by class is refused, if so (Wan 2.1's I2V beside Wan 2.2's): startup stops with it
    unserved: Callable[[object], str | None] | None = None
    # Something the user should know about a prompt that is served anyway (FLUX: CLIP reads only 77 tokens)
    prompt_note: Callable[[object, str], str | None] | None = None
    # Whether two presets with the same number of image tokens can share one compiled program: True where
    # the image's layout reaches the transformer as tensor values (FLUX's position ids), False where it is
    # baked into the program as Python ints (a (frames, height, width) tuple, a latent's spatial shape).
    shares_programs_by_token_count: bool = True
    # One step's time against FLUX.1-dev's at the same token count (eager, H100/H200, RESULTS.md run 12): the
    # ZeroGPU duration estimated for a request, before any is measured, scales with it (aot/zerogpu.py `step_work`)
    step_cost: float = 1.0
    negative_prompt_arg: str | None = None  # Guidance.CFG: the pipeline argument for the negative prompt
    # Guidance.CFG: the pipeline runs the negative and the positive prompt through the transformer as one call of batch
    # two (LTX-2), not as two calls of batch one: the same work a step (aot/model.py `Model.step_calls`)
    cfg_batched: bool = False
    # Guidance.CFG: why the pipeline runs CFG at every guidance, 1 and below included, where it does (LTX-2: the sound
    # track's own guidance stays above 1); None: at guidance above 1 only
    cfg_always: str | None = None
    guidance_arg: str = "guidance_scale"  # the pipeline argument that takes the guidance value
    # Families whose programs can take a dynamic image-token axis (DYNAMIC_SHAPES, `dynamic_tokens`): marks it (a Dim)
    # in a captured call's kwargs, given the text tokens the call carries beside the image's (FIXED: its padded
    # length), which a block's rotary tables hold too
    dynamic_spec: Callable[[dict, object, int], dict] | None = None
    # Text.DYNAMIC: torch.export's dynamic_shapes (keyed by argument name) for a captured call (args, kwargs)
    # of the transformer or of one block, the text axis dynamic up to `length` tokens
    text_spec: Callable[[tuple, dict, int], dict] | None = None
    # Linear layers (name fragments) that fp8 leaves in bf16: those whose rows are a dynamic text axis, which
    # cuBLAS' fp8 GEMM inside an AOT program refused at run time (Qwen-Image on an H200, RESULTS.md run 12)
    keep_bf16: tuple[str, ...] = ()
    # Its regional programs' sequence axis is dynamic over image and text tokens alike (Z-Image pads both into
    # one sequence): one program serves every preset, and any other size too
    one_program: bool = False
    # Why only regional programs work for this family, if so: AOT_SCOPE=model then compiles blocks, reported
    regional_only: str | None = None
    # Its inputs beside the prompt: none (text to image), or at most this many images (an editing family). The page
    # and the API are built from this: an image input each, and /status lists it
    max_images: int = 0
    min_images: int = 0  # the inputs a call needs: 1 where the pipeline cannot draw from the prompt alone
    image_arg: str = "image"  # the pipeline argument that takes them
    min_image_side: int = 0  # the smallest input side the pipeline takes, where it refuses more than aot/images.py
    # The served preset an input image of (width, height) is resized to: the family mirrors its pipeline's own
    # resize, so that the reference tokens, and with them the program that serves an edit, are known before the call
    image_size: Callable[[int, int, tuple], object] | None = None
    resized_to: str = ""  # that rule in words, for /status
    # The area the pipeline scales a larger input down to, each side then cut down to whole tokens, a smaller input
    # only cut (FLUX.2): no input maps to more tokens than this area holds
    input_area: int | None = None
    # Whether the input is the video's first frame (image to video): the pipeline resizes it to the requested output's
    # size and it conditions the output's own tokens (Wan: latent channels beside the noise), adding none; `image_size`
    # is then unused
    first_frame: bool = False
    # Whether the pipeline resizes each input itself, by the rule `image_size` (or `first_frame`) mirrors, with no way
    # to turn it off (Qwen-Image-Edit): the inputs then go in as checked, since a resize of ours would be resized again
    resizes_inputs: bool = False
    # Text tokens each input image adds at most to the text stream (Qwen-Image-Edit: its vision tokens inside the
    # prompt), from the loaded pipeline: the programs' dynamic text axis covers the prompt's and these
    image_text_tokens: Callable[[object], int] | None = None
    # Extra pipeline arguments for an output of (width, height) (Kontext: its own rescale and resize turned off)
    call_args: Callable[[int, int], dict] | None = None
    # Why this family's programs always take a dynamic image-token axis (DYNAMIC_SHAPES or not), if they do
    dynamic_tokens: str | None = None
    # A video family: its presets carry a frame count (WxHxF) and it returns frames; None: it returns an image
    video: Video | None = None
    # The pipeline argument that takes the second expert's guidance (Wan 2.2 A14B's low-noise `transformer_2`)
    guidance_2_arg: str | None = None
    # The transformer call's activation peak per token, where a video's tens of thousands of tokens make the image
    # figure (aot/memory.py, measured on FLUX.1-dev with its VAE) several times too high; None: that figure
    activation_bytes_per_token: int | None = None
    # Its distilled two-stage recipe, served with RECIPE=distilled (`TwoStage`); None: the family has none
    distilled: TwoStage | None = field(default=None, compare=False)
    real_size: RealSize | None = field(default=None, compare=False)  # for the benchmarks only (dicts: not hashed)

    def image_tokens(self, width: int, height: int) -> int:
        return (width // self.multiple) * (height // self.multiple)

    def tokens(self, preset) -> int:
        """The tokens a preset's output carries: its image's, times its latent frames for a video."""
        frames = self.video.latent_frames(preset.frames) if self.video and preset.frames else 1
        return frames * self.image_tokens(preset.width, preset.height)

    def program_shape(self, preset, scope: str) -> int | tuple[int, ...]:
        """What tells two presets' programs apart: the token count, or the token grid itself. Blocks see token
        sequences (the grid reaches them as rotary tensors), so regional programs go by the token count."""
        tokens = self.tokens(preset)
        if self.shares_programs_by_token_count or scope == "blocks":
            return tokens
        grid = (preset.width // self.multiple, preset.height // self.multiple)
        return (*grid, preset.frames) if preset.frames else grid
