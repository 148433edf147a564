"""A video family's output: the pipeline's frames as a `Clip`, encoded as an MP4 with PyAV.

H.264 in yuv420p: the pair every browser plays, and the one Gradio's `gr.Video` serves as it is (it re-encodes only
what its `video_is_playable` rejects: an .mp4 of another codec). yuv420p halves the colour planes, so both sides must
be even; every preset's are multiples of the family's token size.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CODEC, PIXELS = "libx264", "yuv420p"


@dataclass
class Clip:
    """Frames made by one request, with the facts that travel back with them (as a PIL image's `info`)."""

    frames: np.ndarray  # (frames, height, width, 3), uint8 RGB
    info: dict = field(default_factory=dict)

    @classmethod
    def of(cls, frames) -> Clip:
        """From a video pipeline's frames: floats in [0, 1], (frames, height, width, 3)."""
        return cls(np.round(np.clip(np.asarray(frames), 0, 1) * 255).astype(np.uint8))


def encode(clip: Clip, fps: int, path: Path, title: str = "", comment: str = "") -> Path:
    """Writes `clip` to `path` as an H.264 MP4 at `fps`, its prompt and seed in the container's metadata."""
    import av

    count, height, width, _ = clip.frames.shape
    with av.open(str(path), mode="w") as container:
        container.metadata.update(title=title, comment=comment)
        stream = container.add_stream(CODEC, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, PIXELS
        for frame in clip.frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # the encoder's buffered frames
            container.mux(packet)
    return path


def save(clip: Clip, folder: str, name: str, fps: int, title: str = "", comment: str = "") -> str:
    """`clip` encoded into a folder of its own under `folder` (Gradio's upload folder, which it serves from), as
    `name`.mp4, so that two requests' files never meet."""
    directory = Path(folder) / uuid.uuid4().hex
    directory.mkdir(parents=True)
    return str(encode(clip, fps, directory / f"{name}.mp4", title, comment))
