"""A video family's output: the pipeline's frames as a `Clip`, encoded as an MP4 with PyAV.

H.264 in yuv420p: the pair every browser plays, and the one Gradio's `gr.Video` serves as it is (it re-encodes only
what its `video_is_playable` rejects: an .mp4 of another codec). yuv420p halves the colour planes, so both sides must
be even; every preset's are multiples of the family's token size.

A family whose pipeline makes a sound track (LTX-2) gets it in the same file: AAC, as diffusers' own `encode_video`
writes it and every browser plays it, at the vocoder's sample rate.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CODEC, PIXELS = "libx264", "yuv420p"
AUDIO_CODEC = "aac"
AUDIO_LAYOUTS = {1: "mono", 2: "stereo"}  # by channel count


@dataclass
class Clip:
    """Frames made by one request, with the facts that travel back with them (as a PIL image's `info`)."""

    frames: np.ndarray  # (frames, height, width, 3), uint8 RGB
    info: dict = field(default_factory=dict)
    sound: tuple[np.ndarray, int] | None = None  # (samples: (channels, count) floats in [-1, 1], sample rate)

    @classmethod
    def of(cls, frames, sound: tuple[np.ndarray, int] | None = None) -> Clip:
        """From a video pipeline's frames: floats in [0, 1], (frames, height, width, 3); and its sound track, if any
        (aot.model.Model.sound)."""
        return cls(np.round(np.clip(np.asarray(frames), 0, 1) * 255).astype(np.uint8), sound=sound)


def encode(clip: Clip, fps: int, path: Path, title: str = "", comment: str = "") -> Path:
    """Writes `clip` to `path` as an H.264 MP4 at `fps`, with its sound track as AAC if it has one, its prompt and seed
    in the container's metadata."""
    import av

    count, height, width, _ = clip.frames.shape
    with av.open(str(path), mode="w") as container:
        container.metadata.update(title=title, comment=comment)
        stream = container.add_stream(CODEC, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, PIXELS
        frames = [av.VideoFrame.from_ndarray(frame, format="rgb24") for frame in clip.frames]
        streams = [(stream, frames)]
        if clip.sound is not None:
            samples, rate = clip.sound
            layout = AUDIO_LAYOUTS[samples.shape[0]]
            audio = container.add_stream(AUDIO_CODEC, rate=rate, layout=layout)
            track = av.AudioFrame.from_ndarray(np.ascontiguousarray(np.clip(samples, -1, 1), dtype=np.float32),
                                               format="fltp", layout=layout)
            track.sample_rate, track.pts = rate, 0
            streams.append((audio, [track]))  # the encoder cuts it into AAC's frames of 1024 samples
        for encoder, items in streams:
            for item in [*items, None]:  # None: the encoder's buffered frames
                for packet in encoder.encode(item):
                    container.mux(packet)
    return path


def save(clip: Clip, folder: str, name: str, fps: int, title: str = "", comment: str = "") -> str:
    """`clip` encoded into a folder of its own under `folder` (Gradio's upload folder, which it serves from), as
    `name`.mp4, so that two requests' files never meet."""
    directory = Path(folder) / uuid.uuid4().hex
    directory.mkdir(parents=True)
    return str(encode(clip, fps, directory / f"{name}.mp4", title, comment))
