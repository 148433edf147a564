"""The demo model's world, drawn by this file alone: plain shapes in plain colours, their captions, the
combinations held out of training, and the judge that reads a generated image back into those facts.

A scene is one or two objects (a shape, a colour, a position) on a plain background. A caption says the same
facts in one of several wordings. When a caption names no background, the scene has the default one (white,
or black behind a white object), so a caption fixes its image up to a little jitter in size and place: that
keeps the model's flow nearly straight, which is what lets 4 Euler steps draw it.
"""
from __future__ import annotations

import functools
import itertools
import math
import random
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

COLOURS = {  # RGB, 0-255; the first eight are object colours, grey is a background only
    "red": (220, 40, 40), "green": (40, 170, 70), "blue": (40, 90, 220), "yellow": (250, 220, 40),
    "orange": (250, 140, 30), "purple": (140, 60, 190), "white": (245, 245, 245), "black": (25, 25, 25),
    "grey": (128, 128, 128),
}
OBJECT_COLOURS = tuple(COLOURS)[:8]
SHAPES = ("circle", "square", "triangle")
POSITIONS = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75),
             "centre": (0.5, 0.5)}  # where an object's box is centred, as fractions of width and height
# An object and its background differ by at least this (RGB distance): red/orange, yellow/orange, blue/purple
# (80-110 apart) never sit on each other, so the judge can tell an object from its background.
MIN_CONTRAST = 120.0
OPPOSITE_POSITIONS = (("left", "right"), ("right", "left"), ("top", "bottom"), ("bottom", "top"))  # of two objects
ONE_SIZE, TWO_SIZE = (0.14, 0.19), (0.10, 0.13)  # half the object's box, as a fraction of the shorter side
ONE_JITTER, TWO_JITTER = 0.03, 0.02  # how far a centre strays from its position, as a fraction of each side
TWO_OBJECTS = 0.3  # share of training scenes with two objects
NAMED_BACKGROUND = 0.5  # share of training captions that name the background

POSITION_WORDS = {
    "left": ("on the left", "at the left", "on the left side"),
    "right": ("on the right", "at the right", "on the right side"),
    "top": ("at the top", "near the top", "on the top"),
    "bottom": ("at the bottom", "near the bottom", "on the bottom"),
    "centre": ("in the centre", "in the center", "in the middle"),
}
ONE_TEMPLATES = ("{obj} {pos}", "{obj} {pos}", "{obj}, {pos}", "{pos}, {obj}", "a picture of {obj} {pos}",
                 "a drawing of {obj} {pos}", "{colour} {shape} {pos}", "one {colour} {shape} {pos}")
TWO_TEMPLATES = ("{one} and {two}", "{one}, {two}", "{one} with {two}")
BACKGROUND_TEMPLATES = ("{text} on {bg} background", "{text}, {bare} background", "{text} against {bg} background")
# Every word a caption can use: the tokenizers give each one a token of its own
VOCABULARY = tuple(sorted(set(re.findall(r"[a-z]+", re.sub(r"\{\w+\}", " ", " ".join(
    [*COLOURS, *SHAPES, "a", "an", *itertools.chain(*POSITION_WORDS.values()), *ONE_TEMPLATES, *TWO_TEMPLATES,
     *BACKGROUND_TEMPLATES]))))))

# Prompts shown as examples; their (colour, shape, position) triples are never held out
EXAMPLE_PROMPTS = (
    "a red circle on the left",
    "a blue square at the top",
    "a yellow triangle in the centre on a purple background",
    "an orange circle at the bottom on a blue background",
    "a green triangle on the right",
    "a white square in the middle on a black background",
    "a purple circle on the left and a yellow square on the right",
    "a black triangle at the top and a red circle at the bottom",
)
HELD_OUT_COUNT = 16  # of the 8 x 3 x 5 = 120 (colour, shape, position) triples
HELD_OUT_SEED = 14


@dataclass(frozen=True)
class Thing:
    colour: str
    shape: str
    position: str

    @property
    def words(self) -> str:
        return f"{article(self.colour)} {self.colour} {self.shape}"


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass(frozen=True)
class Placed:
    thing: Thing
    x: float  # centre, as fractions of width and height
    y: float
    size: float  # half the box, as a fraction of the shorter side


@dataclass(frozen=True)
class Scene:
    objects: tuple[Placed, ...]
    background: str
    names_background: bool  # whether its caption says the background


def default_background(colours) -> str:
    return "black" if "white" in colours else "white"


@functools.cache
def backgrounds_for(colours: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(bg for bg in COLOURS if all(math.dist(COLOURS[bg], COLOURS[c]) >= MIN_CONTRAST for c in colours))


def things_in(prompt: str) -> list[Thing]:
    """The objects a prompt in the plain wording asks for ('a red circle on the left and ...')."""
    things = []
    for part in re.sub(r" (on|against) an? \w+ background$", "", prompt.lower()).split(" and "):
        words = part.split()
        colour = next(w for w in words if w in OBJECT_COLOURS)
        shape = next(w for w in words if w in SHAPES)
        position = next(p for p, phrases in POSITION_WORDS.items() if any(ph in part for ph in phrases))
        things.append(Thing(colour, shape, position))
    return things


def _example_things() -> set[Thing]:
    return {t for prompt in EXAMPLE_PROMPTS for t in things_in(prompt)}


def held_out() -> frozenset[Thing]:
    """(colour, shape, position) triples that no training scene draws: a seeded shuffle, taking each triple
    unless that would leave one of its pairs (colour+shape, colour+position, shape+position) never seen."""
    everything = [Thing(*t) for t in itertools.product(OBJECT_COLOURS, SHAPES, POSITIONS)]
    examples = _example_things()
    candidates = [t for t in everything if t not in examples]
    random.Random(HELD_OUT_SEED).shuffle(candidates)
    chosen: set[Thing] = set()

    def pairs(t: Thing):
        return {("cs", t.colour, t.shape), ("cp", t.colour, t.position), ("sp", t.shape, t.position)}

    for thing in candidates:
        if len(chosen) == HELD_OUT_COUNT:
            break
        seen = set().union(*(pairs(t) for t in everything if t not in chosen and t != thing))
        if pairs(thing) <= seen:
            chosen.add(thing)
    return frozenset(chosen)


def sample_scene(rng: random.Random, held: frozenset[Thing]) -> Scene:
    """A training scene: one or two objects, none of them a held-out triple."""
    count = 2 if rng.random() < TWO_OBJECTS else 1
    size, jitter = (ONE_SIZE, ONE_JITTER) if count == 1 else (TWO_SIZE, TWO_JITTER)
    while True:
        colours = tuple(rng.sample(OBJECT_COLOURS, count))
        positions = rng.sample(tuple(POSITIONS), 1) if count == 1 else rng.choice(OPPOSITE_POSITIONS)
        things = [Thing(c, rng.choice(SHAPES), p) for c, p in zip(colours, positions)]
        if count == 2 and math.dist(COLOURS[colours[0]], COLOURS[colours[1]]) < MIN_CONTRAST:
            continue  # two close colours touching would read as one object
        if any(t in held for t in things):
            continue
        names_background = rng.random() < NAMED_BACKGROUND
        background = rng.choice(backgrounds_for(colours)) if names_background else default_background(colours)
        if background not in backgrounds_for(colours):
            continue  # the default background is too close to one of the objects (white and black objects)
        placed = tuple(Placed(t, POSITIONS[t.position][0] + rng.uniform(-jitter, jitter),
                              POSITIONS[t.position][1] + rng.uniform(-jitter, jitter), rng.uniform(*size))
                       for t in things)
        return Scene(placed, background, names_background)


def caption(scene: Scene, rng: random.Random) -> str:
    """The scene's facts in one of several wordings."""
    def one(thing: Thing, template: str) -> str:
        return template.format(obj=thing.words, colour=thing.colour, shape=thing.shape,
                               pos=rng.choice(POSITION_WORDS[thing.position]))

    things = [p.thing for p in scene.objects]
    if len(things) == 1:
        text = one(things[0], rng.choice(ONE_TEMPLATES))
    else:
        text = rng.choice(TWO_TEMPLATES).format(one=one(things[0], "{obj} {pos}"), two=one(things[1], "{obj} {pos}"))
    if scene.names_background:
        text = rng.choice(BACKGROUND_TEMPLATES).format(text=text, bg=f"{article(scene.background)} {scene.background}",
                                                        bare=scene.background)
    if rng.random() < 0.25:
        text = text[0].upper() + text[1:]
    if rng.random() < 0.2:
        text += "."
    return text


def plain_caption(things: list[Thing], background: str | None = None) -> str:
    """The plainest wording: 'a red circle on the left[ and ...][ on a blue background]'."""
    text = " and ".join(f"{t.words} {POSITION_WORDS[t.position][0]}" for t in things)
    return f"{text} on {article(background)} {background} background" if background else text


def draw(scenes: list[Scene], width: int, height: int, device="cpu") -> torch.Tensor:
    """The scenes as images, (N, 3, height, width) in [-1, 1], edges anti-aliased over one pixel."""
    params, background = scene_tensors(scenes, width, height)
    return rasterize(params.to(device), background.to(device), width, height)


def scene_tensors(scenes: list[Scene], width: int, height: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 2, 8) objects (present, shape index, x, y, half size in pixels, r, g, b) and (N, 3) backgrounds."""
    side = min(width, height)
    absent = [0.0] * 8
    rows = [[[1.0, SHAPES.index(p.thing.shape), p.x * width, p.y * height, p.size * side, *COLOURS[p.thing.colour]]
             for p in scene.objects] + [absent] * (2 - len(scene.objects)) for scene in scenes]
    return torch.tensor(rows), torch.tensor([COLOURS[s.background] for s in scenes], dtype=torch.float32)


def rasterize(params: torch.Tensor, background: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """`scene_tensors`' output as images on its device."""
    n, device = len(params), params.device
    xs = torch.arange(width, device=device) + 0.5
    ys = torch.arange(height, device=device) + 0.5
    dx = xs.view(1, 1, 1, width) - params[..., 2, None, None]
    dy = ys.view(1, 1, height, 1) - params[..., 3, None, None]
    size = params[..., 4, None, None]
    circle = torch.sqrt(dx**2 + dy**2) - size
    square = torch.maximum(dx.abs(), dy.abs()) - size
    # apex at the top of the box, base along its bottom: half-planes of the base and the two sides
    triangle = torch.maximum(dy - size, (2 * dx.abs() - (dy + size)) / math.sqrt(5))
    shape = params[..., 1, None, None]
    distance = torch.where(shape == 0, circle, torch.where(shape == 1, square, triangle))  # < 0 inside
    alpha = (0.5 - distance).clamp(0, 1) * params[..., 0, None, None]  # (N, 2, H, W)
    image = background.view(n, 3, 1, 1).expand(n, 3, height, width)
    for j in range(params.shape[1]):
        a = alpha[:, j, None]
        image = image * (1 - a) + params[:, j, 5:8, None, None] * a
    return image / 127.5 - 1


# The judge: reads a generated image back into (colour, shape, position) facts, with no model of its own.
FOREGROUND = MIN_CONTRAST / 2  # a pixel this far (RGB) from the background is part of an object
MIN_OBJECT_SHARE = 0.003  # of the image's pixels: smaller colour groups are specks, not objects
SECOND_OBJECT_SHARE = 0.25  # a second object has at least this share of the first one's pixels


@dataclass(frozen=True)
class Found:
    colour: str
    shape: str
    position: str
    pixels: int


def _as_pixels(image) -> torch.Tensor:
    """(H, W, 3) float 0-255 from a PIL image, a uint8/float array (H, W, 3) or a float tensor (3, H, W) in [-1, 1]."""
    if isinstance(image, torch.Tensor):
        return ((image.float().clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0)
    return torch.as_tensor(np.asarray(image, dtype=np.float32))


def _shape_of(ys: torch.Tensor, xs: torch.Tensor) -> str:
    """A triangle (apex up) has a third of its pixels' worth in the top half of its box; a square fills its box,
    a circle fills pi/4 of it."""
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    fill = len(ys) / float((y1 - y0 + 1) * (x1 - x0 + 1))
    middle = (y0 + y1) / 2
    top, bottom = int((ys < middle).sum()), int((ys > middle).sum())
    if top < 0.6 * max(bottom, 1):
        return "triangle"
    return "square" if fill > 0.89 else "circle"


def _position_of(ys: torch.Tensor, xs: torch.Tensor, height: int, width: int) -> str:
    """The position nearest the centre of the object's box."""
    x = (xs.min() + xs.max() + 1) / 2 / width
    y = (ys.min() + ys.max() + 1) / 2 / height
    return min(POSITIONS, key=lambda p: (POSITIONS[p][0] - x) ** 2 + (POSITIONS[p][1] - y) ** 2)


def _components(mask: torch.Tensor) -> list[torch.Tensor]:
    """The 8-connected regions of a boolean (H, W) mask, as masks, largest first."""
    height, width = mask.shape
    label = torch.where(mask, torch.arange(1, height * width + 1, dtype=torch.float32).view(height, width), 0.0)
    while True:  # every pixel takes the largest label among its neighbours until nothing changes
        grown = F.max_pool2d(label[None, None], 3, 1, 1)[0, 0] * mask
        if torch.equal(grown, label):
            break
        label = grown
    ids, counts = label[mask].unique(return_counts=True)
    return [label == ids[i] for i in counts.argsort(descending=True)]


def find_objects(image) -> list[Found]:
    """The objects in an image, largest first (at most two).

    Background: the median colour of the outermost pixels. Objects: the connected regions of pixels at least
    FOREGROUND from it, shrunk by one pixel (so blended edges do not join neighbours), then grown back within the
    foreground. An object's colour is the object colour nearest most of its pixels; its position the one nearest
    its box's centre; its shape from how much of its box it fills and how its pixels split between the box's
    top and bottom halves.
    """
    pixels = _as_pixels(image)
    height, width, _ = pixels.shape
    border = torch.cat([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = border.median(dim=0).values
    foreground = (pixels - background).norm(dim=-1) > FOREGROUND
    core = -F.max_pool2d(-foreground[None, None].float(), 3, 1, 1)[0, 0] > 0.5
    palette = torch.tensor([COLOURS[c] for c in OBJECT_COLOURS], dtype=torch.float32)
    nearest = torch.cdist(pixels.reshape(-1, 3), palette).argmin(dim=1).reshape(height, width)
    found = []
    for region in _components(core)[:2]:
        count = int(region.sum())
        if count < MIN_OBJECT_SHARE * height * width or (found and count < SECOND_OBJECT_SHARE * found[0].pixels):
            break
        colour = OBJECT_COLOURS[int(nearest[region].mode().values)]
        grown = F.max_pool2d(region[None, None].float(), 3, 1, 1)[0, 0] > 0.5
        ys, xs = torch.nonzero(grown & foreground, as_tuple=True)
        found.append(Found(colour, _shape_of(ys, xs), _position_of(ys, xs, height, width), count))
    return found


def judge(image, things: list[Thing]) -> dict[str, bool]:
    """Whether the image shows each of `things` right: per fact (colour, shape, position), over all of them.
    Objects are matched to things by colour first, then by position (the largest object for a single thing)."""
    found = find_objects(image)
    if len(things) == 1:
        got = found[:1]
    else:
        got = [next((f for f in found if f.colour == t.colour), None) or
               next((f for f in found if f.position == t.position), None) for t in things]
    right = {"colour": True, "shape": True, "position": True}
    for thing, obj in itertools.zip_longest(things, got):
        if thing is None:
            continue
        for fact in right:
            right[fact] &= obj is not None and getattr(obj, fact) == getattr(thing, fact)
    return right


def evaluation_set(things) -> list[tuple[str, list[Thing]]]:
    """Prompts for the figures: each thing on its default background and on two named ones (a seeded choice),
    in the plainest wording."""
    rng = random.Random(HELD_OUT_SEED + 1)
    cases = []
    for thing in sorted(things, key=lambda t: (t.colour, t.shape, t.position)):
        cases.append((plain_caption([thing]), [thing]))
        options = [bg for bg in backgrounds_for((thing.colour,)) if bg != default_background([thing.colour])]
        for bg in rng.sample(options, 2):
            cases.append((plain_caption([thing], bg), [thing]))
    return cases


def seen_sample(held: frozenset[Thing], count: int = HELD_OUT_COUNT) -> list[Thing]:
    """As many trained triples as are held out, for comparison: a seeded choice."""
    seen = [Thing(*t) for t in itertools.product(OBJECT_COLOURS, SHAPES, POSITIONS) if Thing(*t) not in held]
    return random.Random(HELD_OUT_SEED + 2).sample(seen, count)


def two_object_set(held: frozenset[Thing], count: int = 12) -> list[tuple[str, list[Thing]]]:
    """Two trained objects at opposite positions, on the default background: a seeded choice."""
    rng = random.Random(HELD_OUT_SEED + 3)
    cases = []
    while len(cases) < count:
        positions = rng.choice(OPPOSITE_POSITIONS)
        colours = tuple(rng.sample(OBJECT_COLOURS, 2))
        things = [Thing(c, rng.choice(SHAPES), p) for c, p in zip(colours, positions)]
        if (math.dist(COLOURS[colours[0]], COLOURS[colours[1]]) >= MIN_CONTRAST and not any(t in held for t in things)
                and default_background(colours) in backgrounds_for(colours)):
            cases.append((plain_caption(things), things))
    return cases
