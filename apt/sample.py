"""``python -m apt sample``: write one PNG (and GIF for clips) per prompt, plus a grid of all."""

from __future__ import annotations

import re
from pathlib import Path

from apt.inference import load_generator
from apt.media import save_samples


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "prompt"


def sample_to_dir(checkpoint: str, prompts: list[str], *, steps: int | None, cfg_scale: float | None, seed: int, frames: int | None, out: str) -> list[Path]:
    """Every argument is checked before the model runs; each error names the argument."""
    for i, p in enumerate(prompts):
        if not p.strip():
            raise ValueError(f"--prompt {i + 1} is empty")
    for name, value in (("--steps", steps), ("--frames", frames)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if cfg_scale is not None and cfg_scale < 0:
        raise ValueError(f"--cfg-scale must be >= 0 (1 = no guidance), got {cfg_scale}")
    gen = load_generator(checkpoint)
    check_prompt_lengths(gen, prompts)
    if frames is not None:
        gen.net.check_input_shape((1, gen.config.data.channels, frames, gen.height, gen.width))
    seeds = [seed + i for i in range(len(prompts))]
    x = gen.generate_tensor(prompts, seeds, steps=steps, cfg_scale=cfg_scale, frames=frames)
    out_dir = Path(out)
    paths: list[Path] = []
    for i, p in enumerate(prompts):
        paths += save_samples(x[i : i + 1], out_dir / f"{i:03d}-{_slug(p)}")
    if len(prompts) > 1:
        paths += save_samples(x, out_dir / "grid")
    return paths


def check_prompt_lengths(gen, prompts: list[str]) -> None:
    """A prompt longer than the text encoder's ``text.max_length`` tokens is refused, not cut: the model would
    silently ignore the rest."""
    limit = gen.config.text.max_length
    for i, p in enumerate(prompts):
        n = len(gen.text_encoder.tokenizer(p, truncation=False)["input_ids"])
        if n > limit:
            raise ValueError(f"--prompt {i + 1} is {n} tokens ({len(p)} characters); this model reads at most text.max_length={limit} "
                             "tokens and would ignore the rest: shorten it")


GIF_MAX_FRAMES = 512
"""``python -m apt stream`` writes stream.gif only up to this many frames (a GIF is held whole; the mp4 is not)."""


def stream_to_dir(checkpoint: str, prompts: list[str], *, frames: int, switch_at: list[int], seed: int, out: str,
                  steps: int | None = None, cfg_scale: float | None = None, scale: int | None = None, fps: float = 8.0,
                  cache_layout: tuple[int, int] | None = None, progress_every: float = 10.0) -> dict:
    """``python -m apt stream``: stream a causal run's video chunk by chunk, writing every frame the moment it is decoded,
    as a PNG (``out/frames/000000.png``, ...) and into ``out/stream.mp4`` (a fragmented mp4, playable while it grows:
    ``apt.eval.video_io.VideoStreamWriter``), and for streams of at most ``GIF_MAX_FRAMES`` frames a GIF of the whole at
    the end (memory stays constant however long the stream). ``prompts[k + 1]`` takes over at frame ``switch_at[k]``
    (the cache is re-built under it: ``apt.streaming.StreamSession.set_prompt``). Returns the timings: seconds to the
    first frame (after the model is loaded and the first prompt encoded, until the frame is decoded), frames per second
    (writing included). ``scale``: nearest-neighbour enlargement of the written frames (default: toy frames to about 128
    pixels, real frames as they are, ``apt.media.display_scale``);
    ``fps``: the playback rate of the mp4 and GIF; ``cache_layout``: split the rolling cache as (sink_chunks,
    window_chunks) (``apt.inference.load_generator``). A line of progress (frames so far, their rate) every
    ``progress_every`` seconds (0: none)."""
    import time

    from apt.eval.video_io import VideoStreamWriter
    from apt.media import display_scale, enlarge, save_animation, save_png
    from apt.streaming import StreamSession

    if frames < 1:
        raise ValueError(f"--frames must be >= 1, got {frames}")
    if fps <= 0:
        raise ValueError(f"--fps must be > 0, got {fps}")
    for i, p in enumerate(prompts):
        if not p.strip():
            raise ValueError(f"--prompt {i + 1} is empty")
    if len(switch_at) != len(prompts) - 1 or sorted(switch_at) != switch_at or any(not 0 < f < frames for f in switch_at):
        raise ValueError(f"--switch-at needs one increasing frame index in (0, {frames}) per extra --prompt; got {switch_at} for {len(prompts)} prompts")
    gen = load_generator(checkpoint, cache_layout=cache_layout)
    session = StreamSession(gen, prompts[0], seed=seed, steps=steps, cfg_scale=cfg_scale)
    frame_dir = Path(out) / "frames"
    frame_dir.mkdir(parents=True, exist_ok=True)
    gif = [] if frames <= GIF_MAX_FRAMES else None
    made, shape, switches, t0, first = 0, None, list(zip(switch_at, prompts[1:])), time.perf_counter(), None
    last_line = t0
    with VideoStreamWriter(Path(out) / "stream.mp4", fps=fps) as video:
        while made < frames:
            if switches and made >= switches[0][0]:
                session.set_prompt(switches.pop(0)[1])  # at the next chunk boundary at or after the asked frame
            chunk = session.next_chunk()[0]  # (3, t, H, W)
            k = display_scale(*chunk.shape[2:], target=128) if scale is None else scale
            for f in range(chunk.shape[1]):
                if made == frames:
                    break
                img = enlarge(((chunk[:, f].permute(1, 2, 0).float().clamp(-1, 1) + 1) * 127.5).round().byte().numpy(), k)
                if first is None:  # the frame is made; writing it (and opening the encoder) is not part of the latency
                    first, shape = time.perf_counter() - t0, list(img.shape)
                save_png(img, frame_dir / f"{made:06d}.png")
                video.write(img)
                if gif is not None:
                    gif.append(img)
                made += 1
            now = time.perf_counter()
            if progress_every and now - last_line >= progress_every:
                print(f"[stream] {made}/{frames} frames, {made / (now - t0):.1f} frames per second", flush=True)
                last_line = now
    seconds = time.perf_counter() - t0
    if gif is not None:
        save_animation(gif, Path(out) / "stream.gif", fps=fps)
    return {"frames": made, "first_frame_seconds": first, "seconds": seconds, "fps": made / seconds, "chunks": session.chunks_made,
            "out": str(out), "frame_shape": shape, "gif": None if gif is None else str(Path(out) / "stream.gif")}
