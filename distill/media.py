"""Samples as files a person can look at or listen to: PNG grids, animated GIF (and MP4), WAV with a spectrogram.

The library's sample layouts, all float in [-1, 1]:

- image batch ``[B, C, H, W]`` -> one PNG grid (:func:`save_grid`, :func:`save_prompt_grid`);
- video batch ``[B, C, F, H, W]`` (F frames) -> animated GIF of the clips tiled per frame, a ``<stem>-frames.png``
  strip (a row per clip, a column per frame) and, when an encoder is found, an MP4 (:func:`save_video`);
- audio batch ``[B, C, L]`` (L samples) -> one 16-bit PCM WAV and a ``<stem>-spectrogram.png`` (:func:`save_audio`).

:func:`save_media` picks the writer from the tensor's rank (:func:`kind_of`) and returns every path it wrote.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import wave
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from distill.errors import DistillError

__all__ = ["MediaKind", "kind_of", "save_audio", "save_grid", "save_media", "save_prompt_grid", "save_video"]

MediaKind = Literal["image", "video", "audio"]

_KIND_BY_RANK: dict[int, MediaKind] = {4: "image", 5: "video", 3: "audio"}
_RANK: dict[str, int] = {kind: rank for rank, kind in _KIND_BY_RANK.items()}
_LAYOUT: dict[str, str] = {"image": "[B, C, H, W]", "video": "[B, C, F, H, W]", "audio": "[B, C, L]"}
_SUFFIXES: dict[str, tuple[str, ...]] = {"image": (".png",), "video": (".gif", ".mp4"), "audio": (".wav",)}
_CHANNELS: dict[str, tuple[int, ...]] = {"image": (1, 3), "video": (1, 3), "audio": (1, 2)}
_CHANNEL_NAMES: dict[str, str] = {"image": "1 (grey) or 3 (RGB)", "video": "1 (grey) or 3 (RGB)",
                                  "audio": "1 (mono) or 2 (stereo)"}
# Grid padding and empty cells; dark grey so a black sample still shows its edge.
_PAD_GREY = 64
# Spectrogram floor below a full-scale sine: the usual 80 dB display range, below which little is audible next to it.
_DB_RANGE = 80.0


# ---------------------------------------------------------------------------------------------------------------------
# layout and validation


def kind_of(x: torch.Tensor) -> MediaKind:
    """The media kind of a sample batch from its rank: 4 dims ``[B, C, H, W]`` -> ``"image"``, 5 dims
    ``[B, C, F, H, W]`` -> ``"video"``, 3 dims ``[B, C, L]`` -> ``"audio"``. Any other rank raises
    :class:`~distill.errors.DistillError` naming the shape and the three accepted layouts."""
    shape = tuple(getattr(x, "shape", ()))
    kind = _KIND_BY_RANK.get(len(shape)) if hasattr(x, "shape") else None
    if kind is None:
        what = f"shape {shape}" if hasattr(x, "shape") else f"a {type(x).__name__}"
        raise DistillError(
            f"cannot tell whether samples of {what} are images, video or audio: distill takes an image batch "
            f"{_LAYOUT['image']}, a video batch {_LAYOUT['video']} or an audio batch {_LAYOUT['audio']} (float in "
            f"[-1, 1]); add the missing batch or channel dimension, e.g. x.unsqueeze(0) for a single sample.")
    return kind


def _check(x: torch.Tensor, kind: MediaKind) -> None:
    """Raise a :class:`DistillError` unless ``x`` is a non-empty, finite float batch of ``kind``'s layout with a
    channel count that kind can be written with."""
    if not isinstance(x, torch.Tensor):
        raise DistillError(f"{kind} samples must be a torch.Tensor {_LAYOUT[kind]}; got a {type(x).__name__}. "
                           f"Convert it with torch.as_tensor(x).")
    if x.ndim != _RANK[kind]:
        raise DistillError(f"{kind} samples are {_LAYOUT[kind]}; got shape {tuple(x.shape)} "
                           f"(which reads as {kind_of(x) if x.ndim in _KIND_BY_RANK else 'no known layout'}). "
                           f"Pass a {kind} batch, or call save_media to dispatch on the rank.")
    if not x.is_floating_point():
        raise DistillError(f"{kind} samples are float in [-1, 1]; got dtype {x.dtype}. Convert first, e.g. "
                           f"x.float() / 127.5 - 1 for uint8 pixels or x.float() / 32768 for int16 audio.")
    if x.shape[0] == 0:
        raise DistillError(f"the {kind} batch is empty (shape {tuple(x.shape)}); pass at least one sample.")
    if x.numel() == 0:
        raise DistillError(f"the {kind} batch {_LAYOUT[kind]} has a zero-size dimension (shape {tuple(x.shape)}); "
                           f"every sample needs at least one channel, {'frame, ' if kind == 'video' else ''}"
                           f"{'sample' if kind == 'audio' else 'row and column'}.")
    if x.shape[1] not in _CHANNELS[kind]:
        raise DistillError(f"{kind} samples {_LAYOUT[kind]} need C = {_CHANNEL_NAMES[kind]} channels; got C = "
                           f"{x.shape[1]} (shape {tuple(x.shape)}). Check the channel axis is dim 1"
                           f"{', and decode latents to pixels first' if kind != 'audio' else ''}.")
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise DistillError(f"{bad} of {x.numel()} {kind} sample values are NaN or infinite (shape "
                           f"{tuple(x.shape)}): the sampler or decoder diverged. Fix the model or its step count, or "
                           f"replace them with torch.nan_to_num(x) to look at the rest.")


def _check_suffix(path: Path, kind: MediaKind) -> None:
    """Raise unless ``path``'s suffix is one ``kind`` is written as (case-insensitive)."""
    ok = _SUFFIXES[kind]
    if path.suffix.lower() not in ok:
        names = " or ".join(ok)
        raise DistillError(f"{path} has {'suffix ' + repr(path.suffix) if path.suffix else 'no suffix'}, but the "
                           f"samples are {kind} {_LAYOUT[kind]}, which is written as {names}; use e.g. "
                           f"{path.with_suffix(ok[0])}.")


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """Any shape in [-1, 1] as uint8 of the same shape ([-1, 1] -> [0, 255], clamped, rounded)."""
    return ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


# ---------------------------------------------------------------------------------------------------------------------
# images


def _uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] as uint8 (N, C, H, W)."""
    if images.ndim != 4:
        raise DistillError(f"a sample grid takes images (N, C, H, W); got shape {tuple(images.shape)}.")
    return _to_uint8(images)


def _canvas(cells: dict[tuple[int, int], np.ndarray], rows: int, cols: int, scale: int, pad: int) -> np.ndarray:
    """``cells`` ({(row, col): uint8 image (C, H, W)}, all one shape) tiled on a ``rows x cols`` canvas, uint8
    (rows (H + pad) + pad, cols (W + pad) + pad, C) times ``scale`` in both axes; empty cells and the padding are
    dark grey."""
    c, h, w = next(iter(cells.values())).shape
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), _PAD_GREY, dtype=np.uint8)
    for (r, col), img in cells.items():
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        canvas[top : top + h, left : left + w] = img.transpose(1, 2, 0)
    # nearest-neighbour upscaling keeps 8x8 digits crisp where a viewer's smoothing would blur them
    return canvas.repeat(scale, 0).repeat(scale, 1)


def _pil(canvas: np.ndarray):
    """A uint8 (H, W, C) canvas as a PIL image: mode L for C = 1, RGB for C = 3."""
    from PIL import Image

    return Image.fromarray(canvas[..., 0] if canvas.shape[2] == 1 else canvas)


def _write(cells: dict[tuple[int, int], np.ndarray], shape: tuple[int, int, int, int], path: str | Path,
           scale: int, pad: int) -> Path:
    """Write ``cells`` ({(row, col): image (C, H, W)}) on a ``shape`` = (rows, cols, ...) canvas as a PNG (the format
    follows ``path``'s suffix); empty cells and the padding are dark grey."""
    img = _pil(_canvas(cells, shape[0], shape[1], scale, pad))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int = 8, pad: int = 1) -> Path:
    """Write images (N, C, H, W) in [-1, 1] as one PNG grid; each pixel becomes ``scale x scale``.

    ``nrow`` images per row (default ceil(sqrt(N))), ``pad`` grey pixels between and around them. C = 1 gives a
    grayscale PNG, C = 3 an RGB one. Values outside [-1, 1] are clamped; unlike :func:`save_media` this does not
    refuse non-finite values, so an evaluation still writes the grid of a diverged student."""
    x = _uint8(images)
    n = len(x)
    if n == 0:
        raise DistillError(f"a sample grid needs at least one image; got shape {tuple(images.shape)}.")
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    return _write({divmod(i, nrow): x[i] for i in range(n)}, (rows, nrow, 0, 0), path, scale, pad)


def save_prompt_grid(images: torch.Tensor, n_prompts: int, path: str | Path, rows: int = 8, cols: int = 8,
                     scale: int = 8, pad: int = 1) -> Path:
    """Write samples of a prompt set as a PNG grid with one prompt per row: sample i was made for prompt
    ``i % n_prompts`` (the harness's order), so row p holds samples p, p + P, p + 2P, ... of prompt p. Shows the
    first ``rows`` prompts with up to ``cols`` samples each (a prompt with fewer leaves its row's end empty).
    Images (N, C, H, W) in [-1, 1], grayscale (C = 1) or RGB (C = 3); each pixel becomes ``scale x scale``."""
    if n_prompts < 1 or rows < 1 or cols < 1:
        raise DistillError(f"a prompt grid needs at least one prompt, row and column; got n_prompts={n_prompts}, "
                           f"rows={rows}, cols={cols}.")
    x = _uint8(images)
    n = len(x)
    if n == 0:
        raise DistillError("a prompt grid needs at least one sample.")
    shown = min(rows, n_prompts, n)
    per = min(cols, math.ceil(n / n_prompts))
    cells = {(p, j): x[p + j * n_prompts] for p in range(shown) for j in range(per) if p + j * n_prompts < n}
    return _write(cells, (shown, per, 0, 0), path, scale, pad)


# ---------------------------------------------------------------------------------------------------------------------
# video


def _auto_scale(h: int, w: int) -> int:
    """Upscale factor that makes a cell's shorter side at least 64 pixels (8 for 8x8 clips, 1 from 64x64 up)."""
    return max(1, math.ceil(64 / min(h, w)))


def _ffmpeg_exe() -> str | None:
    """Path of an ffmpeg binary to encode MP4 with: imageio-ffmpeg's (with imageio installed), else ``ffmpeg`` on
    PATH, else None."""
    try:
        import imageio  # noqa: F401  (imageio's MP4 support is imageio-ffmpeg; both present means its binary is ours)
        import imageio_ffmpeg

        exe = imageio_ffmpeg.get_ffmpeg_exe()  # raises RuntimeError (older) or returns None when it finds none
        if exe:
            return str(exe)
    except Exception:  # noqa: BLE001 - any failure to find the bundled binary just means "try PATH"
        pass
    return shutil.which("ffmpeg")


def _encode_mp4(frames: list[np.ndarray], path: Path, fps: float, exe: str) -> bool:
    """Pipe uint8 RGB frames (H, W, 3) to ``exe`` as raw video and encode H.264 MP4 at ``path``; False (with a
    warning, and no partial file) when ffmpeg fails."""
    h, w = frames[0].shape[:2]
    cmd = [exe, "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", f"{fps:g}",
           "-i", "-", "-an",
           # yuv420p (what players accept) halves chroma resolution, so it needs even sides: pad odd ones with grey
           "-vf", f"pad=ceil(iw/2)*2:ceil(ih/2)*2:0:0:0x{_PAD_GREY:02x}{_PAD_GREY:02x}{_PAD_GREY:02x}",
           "-c:v", "libx264", "-pix_fmt", "yuv420p", str(path)]
    data = b"".join(np.ascontiguousarray(f).tobytes() for f in frames)
    try:
        done = subprocess.run(cmd, input=data, capture_output=True, timeout=600)
        ok, why = done.returncode == 0 and path.is_file(), done.stderr.decode(errors="replace").strip()
    except (OSError, subprocess.SubprocessError) as exc:
        ok, why = False, str(exc)
    if not ok:
        path.unlink(missing_ok=True)
        tail = why.splitlines()[-1] if why else "no message"
        warnings.warn(f"{exe} could not encode {path} ({tail}); the GIF and frames PNG are written.", stacklevel=3)
    return ok


def save_video(x: torch.Tensor, path: str | Path, fps: float = 8.0, nrow: int | None = None,
               scale: int | None = None, pad: int = 1) -> list[Path]:
    """Write a video batch ``x`` [B, C, F, H, W] (F frames, C = 1 or 3, float in [-1, 1]) for viewing.

    ``path`` ends in ``.gif`` or ``.mp4``; beside it (same folder and stem) this writes:

    - ``<stem>.gif``: an animated GIF, looping forever at ``fps``, whose frame f tiles the B clips' frame f in a grid
      of ``nrow`` clips per row (default ceil(sqrt(B))), ``pad`` grey pixels between and around them;
    - ``<stem>-frames.png``: every frame at once, a row per clip and a column per frame (B rows, F columns);
    - ``<stem>.mp4`` (H.264) when an encoder is found: imageio + imageio-ffmpeg's bundled binary or ``ffmpeg`` on
      PATH. Without one the MP4 is skipped without a warning: the returned list, which names only the files
      written, says so.

    Each pixel becomes ``scale x scale`` (default: enough for a 64-pixel shorter side per clip). GIF caveats:
    RGB frames are quantised to 256 colours each, and Pillow merges identical consecutive frames into one longer
    frame (a still clip plays the same but has fewer GIF frames). Returns the written paths, GIF first.
    """
    _check(x, "video")
    path = Path(path)
    _check_suffix(path, "video")
    if not fps > 0:
        raise DistillError(f"fps must be positive; got {fps}.")
    b, c, f, h, w = x.shape
    scale = scale or _auto_scale(h, w)
    nrow = nrow or math.ceil(math.sqrt(b))
    if scale < 1 or pad < 0 or nrow < 1:
        raise DistillError(f"a video grid needs scale >= 1, pad >= 0 and nrow >= 1; got scale={scale}, pad={pad}, "
                           f"nrow={nrow}.")
    v = _to_uint8(x)  # (B, C, F, H, W)
    rows = math.ceil(b / nrow)
    frames = [_canvas({divmod(i, nrow): v[i, :, t] for i in range(b)}, rows, nrow, scale, pad) for t in range(f)]
    strip = _canvas({(i, t): v[i, :, t] for i in range(b) for t in range(f)}, b, f, scale, pad)

    path.parent.mkdir(parents=True, exist_ok=True)
    gif, mp4, png = path.with_suffix(".gif"), path.with_suffix(".mp4"), path.with_name(f"{path.stem}-frames.png")
    images = [_pil(fr) for fr in frames]
    # GIF stores delays in hundredths of a second and Pillow truncates milliseconds to them: round instead
    duration = max(10, round(100 / fps) * 10)
    images[0].save(gif, save_all=True, append_images=images[1:], duration=duration, loop=0)
    _pil(strip).save(png)
    written = [gif, png]
    exe = _ffmpeg_exe()
    rgb = [fr if c == 3 else np.repeat(fr, 3, axis=2) for fr in frames]
    if exe is not None and _encode_mp4(rgb, mp4, fps, exe):
        written.append(mp4)
    return written


# ---------------------------------------------------------------------------------------------------------------------
# audio


def _colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape) as uint8 RGB (..., 3) through matplotlib's viridis: perceptually uniform with
    lightness rising monotonically, so loud is bright also in greyscale print."""
    from matplotlib import colormaps

    return colormaps["viridis"](np.clip(values, 0.0, 1.0), bytes=True)[..., :3]


def _spectrogram(x: torch.Tensor, n_fft: int) -> np.ndarray:
    """Log-magnitude spectrogram colours of audio ``x`` (B, C, L): uint8 (B, 3, n // 2 + 1, 1 + L // (n // 4)) with
    n = min(n_fft, L), lowest frequency in the last row. Channels are averaged (one row per clip). Levels are
    absolute: 0 dB is a full-scale sine and the scale ends 80 dB below it, so a quiet clip looks quiet."""
    mono = x.detach().double().cpu().clamp(-1, 1).mean(1)  # (B, L)
    n = min(n_fft, mono.shape[1])
    window = torch.hann_window(n, dtype=mono.dtype)
    spec = torch.stft(mono, n, hop_length=max(1, n // 4), window=window, center=True, return_complex=True).abs()
    # a sine of amplitude A peaks at A * sum(window) / 2 in its bin: divide that out so the sine reads A
    db = 20 * torch.log10((spec / (window.sum() / 2)).clamp_min(10 ** (-_DB_RANGE / 20)))
    level = ((db + _DB_RANGE) / _DB_RANGE).flip(1).numpy()  # (B, bins, frames), low frequencies at the bottom
    return _colormap(level).transpose(0, 3, 1, 2)


def save_audio(x: torch.Tensor, path: str | Path, sample_rate: int = 16000, gap: float = 0.25,
               n_fft: int = 512) -> list[Path]:
    """Write an audio batch ``x`` [B, C, L] (C = 1 mono or 2 stereo, L samples, float in [-1, 1], clamped) as one
    16-bit PCM WAV at ``path`` (``.wav``) and a spectrogram ``<stem>-spectrogram.png`` beside it.

    The WAV plays the B clips one after another with ``gap`` seconds of silence between them (none after the last),
    so a batch is one file to listen through: it has B L + (B - 1) round(gap sample_rate) frames of C channels.

    The spectrogram has one row per clip (channels averaged): the log-magnitude STFT (Hann window of
    n = min(n_fft, L) samples, hop n // 4), n // 2 + 1 pixels high with low frequencies at the bottom and
    1 + L // (n // 4) pixels wide, through a viridis colour map from 80 dB below a full-scale sine (dark) to
    full scale (bright); clips are separated by 1 grey pixel. Returns ``[wav, spectrogram png]``.
    """
    _check(x, "audio")
    path = Path(path)
    _check_suffix(path, "audio")
    if int(sample_rate) != sample_rate or sample_rate < 1:
        raise DistillError(f"sample_rate must be a positive whole number of Hz; got {sample_rate}.")
    if not gap >= 0 or n_fft < 1:
        raise DistillError(f"gap must be >= 0 seconds and n_fft >= 1; got gap={gap}, n_fft={n_fft}.")
    b, c, length = x.shape
    # 32767 (not 32768) so +1 and -1 map symmetrically and +1 does not overflow int16
    pcm = (x.detach().double().cpu().clamp(-1, 1) * 32767).round().to(torch.int16).numpy()  # (B, C, L)
    silence = np.zeros((round(gap * sample_rate), c), dtype="<i2")
    parts: list[np.ndarray] = []
    for i in range(b):
        if i:
            parts.append(silence)
        parts.append(pcm[i].T.astype("<i2"))  # (L, C): WAV interleaves channels per frame, little-endian
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(c)
        f.setsampwidth(2)
        f.setframerate(int(sample_rate))
        f.writeframes(np.ascontiguousarray(np.concatenate(parts)).tobytes())

    spec = _spectrogram(x, n_fft)
    png = path.with_name(f"{path.stem}-spectrogram.png")
    _pil(_canvas({(i, 0): spec[i] for i in range(b)}, b, 1, 1, 1)).save(png)
    return [path, png]


# ---------------------------------------------------------------------------------------------------------------------
# dispatch

MEDIA_SUFFIX: dict[str, str] = {"image": ".png", "video": ".gif", "audio": ".wav"}  # the default file of each kind


def save_media(x: torch.Tensor, path: str | Path, **kw) -> list[Path]:
    """Write samples ``x`` in the form that fits their layout (see :func:`kind_of`) and return every path written.

    - image [B, C, H, W] -> ``path`` must end in ``.png``: :func:`save_grid` (``nrow``, ``scale``, ``pad``);
    - video [B, C, F, H, W] -> ``.gif`` or ``.mp4``: :func:`save_video` (``fps``, ``nrow``, ``scale``, ``pad``);
    - audio [B, C, L] -> ``.wav``: :func:`save_audio` (``sample_rate``, ``gap``, ``n_fft``).

    A suffix that does not fit the kind raises :class:`DistillError` naming the right one (nothing is renamed
    silently); so do empty batches, non-finite values and unsupported channel counts. Parent folders are created.
    """
    kind = kind_of(x)
    path = Path(path)
    _check_suffix(path, kind)
    if kind == "video":
        return save_video(x, path, **kw)
    if kind == "audio":
        return save_audio(x, path, **kw)
    _check(x, "image")
    return [save_grid(x, path, **kw)]
