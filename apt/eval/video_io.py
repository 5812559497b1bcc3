"""Media I/O for evaluation and streaming: mp4 (PyAV, libx264) and PNG (PIL).

Videos are uint8 frames in THWC layout (time, height, width, RGB). Writing uses libx264 with
yuv420p (the pixel format every player decodes), so width and height must be even. Reading is
streaming: `iter_frames` decodes one frame at a time, so a caller that needs 16 frames of a 2 s
720p clip never holds more than it keeps.

A file PyAV cannot open or decode (corrupt, truncated, not a video, no video stream, no frames)
raises `VideoDecodeError`; evaluators catch it, list the file in their report and skip it.

Legend: T frames, H height, W width, C = 3 channels (RGB).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from PIL import Image

# x264 constant rate factor used for evaluation media: 17 is the usual "visually lossless"
# setting; real and generated sets both go through mp4, so the codec hits them alike.
DEFAULT_CRF = 17


class VideoDecodeError(RuntimeError):
    """A video file could not be opened or decoded (corrupt, truncated, no video stream)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"cannot decode video {path!r}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class VideoInfo:
    """Container metadata of a video file (num_frames may be 0 when the container omits it)."""

    path: str
    fps: float
    num_frames: int
    height: int
    width: int


def _to_numpy_uint8(frames_THWC: object) -> np.ndarray:
    if hasattr(frames_THWC, "detach"):  # torch tensor, without importing torch here
        frames_THWC = frames_THWC.detach().cpu().numpy()  # type: ignore[union-attr]
    arr = np.asarray(frames_THWC)
    if arr.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 in [0, 255], got dtype {arr.dtype}")
    return arr


def write_video(path: str, frames_THWC: object, fps: float = 24.0, *, crf: int = DEFAULT_CRF) -> None:
    """Write uint8 (T, H, W, 3) frames to an mp4 (libx264, yuv420p, constant rate factor `crf`).

    The file is written to a temporary name and renamed, so a crash never leaves a half file
    under the final name.
    """
    frames_THWC = _to_numpy_uint8(frames_THWC)
    if frames_THWC.ndim != 4 or frames_THWC.shape[-1] != 3:
        raise ValueError(f"frames must be (T, H, W, 3), got {frames_THWC.shape}")
    T, H, W, _ = frames_THWC.shape
    if T == 0:
        raise ValueError(f"no frames to write to {path!r}")
    if H % 2 or W % 2:
        raise ValueError(f"libx264/yuv420p needs even height and width, got {H}x{W} for {path!r}")
    import av

    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}.mp4"
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(tmp, mode="w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame_HWC in frames_THWC:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame_HWC), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():  # flush
            container.mux(packet)
    os.replace(tmp, path)


class VideoStreamWriter:
    """An mp4 written frame by frame as frames are made, playable while it grows: a fragmented mp4 (a fragment per
    frame, flushed to disk at once) from libx264 tuned for zero latency (no frames held back), a keyframe every
    second. Unlike ``write_video`` it writes under its final name, so a killed stream leaves a playable file of the
    frames made before the kill. The size is the first frame's (even height and width, as ``write_video``).

        with VideoStreamWriter("out/stream.mp4", fps=8) as video:
            for frame_HWC in frames:
                video.write(frame_HWC)
    """

    def __init__(self, path: str | os.PathLike, *, fps: float, crf: int = DEFAULT_CRF) -> None:
        self.path, self.fps, self.crf = str(path), fps, crf
        self.container = self.stream = None
        self.frames = 0

    def _open(self, H: int, W: int) -> None:
        import av

        if H % 2 or W % 2:
            raise ValueError(f"libx264/yuv420p needs even height and width, got {H}x{W} for {self.path!r}")
        os.makedirs(os.path.dirname(os.path.abspath(self.path)) or ".", exist_ok=True)
        self.container = av.open(self.path, mode="w", format="mp4",
                                 options={"movflags": "frag_every_frame+empty_moov+default_base_moof", "flush_packets": "1"})
        self.stream = self.container.add_stream("libx264", rate=Fraction(self.fps).limit_denominator(1001))
        self.stream.width, self.stream.height, self.stream.pix_fmt = W, H, "yuv420p"
        self.stream.options = {"crf": str(self.crf), "tune": "zerolatency", "g": str(max(1, round(self.fps)))}

    def write(self, frame_HWC: object) -> None:
        import av

        frame = _to_numpy_uint8(frame_HWC)
        if frame.ndim != 3 or frame.shape[-1] != 3:
            raise ValueError(f"a frame must be (H, W, 3), got {frame.shape}")
        if self.container is None:
            self._open(*frame.shape[:2])
        elif frame.shape[:2] != (self.stream.height, self.stream.width):
            raise ValueError(f"frame {self.frames} is {frame.shape[0]}x{frame.shape[1]}, the video {self.stream.height}x{self.stream.width}")
        for packet in self.stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
            self.container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        if self.container is None:
            return
        for packet in self.stream.encode():  # flush
            self.container.mux(packet)
        self.container.close()
        self.container = None

    def __enter__(self) -> VideoStreamWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open(path: str):  # -> av.container.InputContainer
    import av

    if not os.path.isfile(path):
        raise FileNotFoundError(f"video file not found: {path!r}")
    try:
        container = av.open(path, mode="r")
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as e:
        raise VideoDecodeError(path, f"{type(e).__name__}: {e}") from e
    if not container.streams.video:
        container.close()
        raise VideoDecodeError(path, "no video stream")
    return container


def video_info(path: str) -> VideoInfo:
    """Container metadata (fps, frame count, size) without decoding frames."""
    with _open(path) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.base_rate or 0
        return VideoInfo(
            path=path,
            fps=float(rate),
            num_frames=int(stream.frames or 0),
            height=int(stream.codec_context.height),
            width=int(stream.codec_context.width),
        )


def iter_frames(path: str, *, max_frames: int | None = None) -> Iterator[np.ndarray]:
    """Yield decoded frames one at a time as uint8 (H, W, 3) RGB arrays.

    Raises `VideoDecodeError` if the file cannot be opened, a packet cannot be decoded, or the
    file holds no frames at all. Frames decoded before a mid-file error have been yielded.
    """
    import av

    if max_frames is not None and max_frames <= 0:
        return
    container = _open(path)
    count = 0
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            yield frame.to_ndarray(format="rgb24")
            count += 1
            if max_frames is not None and count >= max_frames:
                return
    except av.FFmpegError as e:
        raise VideoDecodeError(path, f"after {count} frames: {type(e).__name__}: {e}") from e
    finally:
        container.close()
    if count == 0:
        raise VideoDecodeError(path, "no decodable frames")


def read_video(path: str, max_frames: int | None = None) -> np.ndarray:
    """Decode a whole video (or its first `max_frames`) into a uint8 (T, H, W, 3) array."""
    frames = list(iter_frames(path, max_frames=max_frames))
    return np.stack(frames)


def iter_clips(
    path: str, *, num_frames: int, stride: int = 1, step: int | None = None
) -> Iterator[np.ndarray]:
    """Yield (num_frames, H, W, 3) clips of frames `start + i * stride`, start = 0, step, 2*step...

    `step` defaults to num_frames * stride (non-overlapping clips). Only the frames of the
    clips still open are kept in memory.
    """
    if num_frames < 1 or stride < 1:
        raise ValueError(f"num_frames and stride must be >= 1, got {num_frames}, {stride}")
    step = num_frames * stride if step is None else step
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    span = (num_frames - 1) * stride + 1
    open_clips: dict[int, list[np.ndarray]] = {}
    for i, frame_HWC in enumerate(iter_frames(path)):
        if i % step == 0:
            open_clips[i] = []
        for start in list(open_clips):
            if (i - start) % stride == 0:
                open_clips[start].append(frame_HWC)
            if i - start == span - 1:
                yield np.stack(open_clips.pop(start))


def write_png(path: str, image_HWC: object) -> None:
    """Write a uint8 (H, W, 3) RGB image as PNG."""
    image_HWC = _to_numpy_uint8(image_HWC)
    if image_HWC.ndim != 3 or image_HWC.shape[-1] != 3:
        raise ValueError(f"image must be (H, W, 3), got {image_HWC.shape}")
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    Image.fromarray(image_HWC, mode="RGB").save(path, format="PNG")


def read_png(path: str) -> np.ndarray:
    """Read a PNG as uint8 (H, W, 3) RGB; any other format (JPEG...) is a ValueError."""
    with Image.open(path) as img:
        if img.format != "PNG":
            raise ValueError(
                f"{path!r} is {img.format}, not PNG: evaluation images must be lossless PNG "
                "(JPEG artifacts shift FID, Parmar et al. 2022)"
            )
        return np.asarray(img.convert("RGB"))
