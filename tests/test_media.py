"""distill.media: PNG grids, GIF/frames/MP4 video, WAV + spectrogram audio, dispatch and input checks."""

from __future__ import annotations

import os
import stat
import sys
import warnings
import wave

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

from distill import media
from distill.errors import DistillError
from distill.media import kind_of, save_audio, save_grid, save_media, save_prompt_grid, save_video

GREY = 64  # padding and empty cells


def _levels(u: torch.Tensor) -> torch.Tensor:
    """uint8 levels as the [-1, 1] floats that map back to exactly them."""
    return u.float() / 127.5 - 1


def _grid(cells: dict[tuple[int, int], np.ndarray], rows: int, cols: int, h: int, w: int, scale: int, pad: int,
          c: int = 1) -> np.ndarray:
    """The expected canvas, stated independently of distill.media: (H, W) for c = 1, (H, W, c) otherwise."""
    a = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), GREY, dtype=np.uint8)
    for (r, k), v in cells.items():
        y, x = pad + r * (h + pad), pad + k * (w + pad)
        a[y:y + h, x:x + w] = v
    a = a.repeat(scale, 0).repeat(scale, 1)
    return a[..., 0] if c == 1 else a


# ------------------------------------------------------------------------------------------------------- kind_of


@pytest.mark.parametrize("shape, kind", [((2, 1, 8, 8), "image"), ((2, 3, 4, 8, 8), "video"), ((2, 1, 100), "audio")])
def test_kind_of_reads_the_rank(shape, kind):
    assert kind_of(torch.zeros(shape)) == kind


@pytest.mark.parametrize("shape", [(8,), (1, 8), (1, 1, 1, 1, 1, 1)])
def test_kind_of_refuses_other_ranks_naming_shape_and_layouts(shape):
    with pytest.raises(DistillError) as e:
        kind_of(torch.zeros(shape))
    msg = str(e.value)
    assert str(shape) in msg
    assert "[B, C, H, W]" in msg and "[B, C, F, H, W]" in msg and "[B, C, L]" in msg


# ------------------------------------------------------------------------------------------------------- images


def test_grid_module_reexports_the_media_writers():
    from distill.eval import grid

    assert grid.save_grid is media.save_grid and grid.save_prompt_grid is media.save_prompt_grid


def test_save_grid_pixel_layout_grey(tmp_path):
    # two 2x3 images with distinct known levels, scale 2, pad 1, side by side (default nrow = ceil(sqrt(2)) = 2)
    u = torch.tensor([[[0, 10, 20], [30, 40, 50]], [[255, 200, 150], [100, 7, 1]]], dtype=torch.uint8)
    path = save_grid(_levels(u)[:, None], tmp_path / "g.png", scale=2, pad=1)
    img = Image.open(path)
    assert img.mode == "L"
    want = _grid({(0, 0): u[0].numpy()[..., None], (0, 1): u[1].numpy()[..., None]}, 1, 2, 2, 3, 2, 1)
    assert np.array_equal(np.asarray(img), want)


def test_save_grid_pixel_layout_rgb_with_empty_cell(tmp_path):
    # three 1x2 RGB images, two per row: the second row's end is an empty grey cell; values beyond [-1, 1] clamp
    u = torch.arange(3 * 3 * 1 * 2, dtype=torch.uint8).view(3, 3, 1, 2) * 12
    x = _levels(u)
    x[2, 0, 0, 0] = 5.0  # clamps to 255
    path = save_grid(x, tmp_path / "g.png", nrow=2, scale=3, pad=2)
    img = Image.open(path)
    assert img.mode == "RGB"
    expect = u.clone()
    expect[2, 0, 0, 0] = 255
    cells = {divmod(i, 2): expect[i].permute(1, 2, 0).numpy() for i in range(3)}
    assert np.array_equal(np.asarray(img), _grid(cells, 2, 2, 1, 2, 3, 2, c=3))


def test_save_prompt_grid_puts_prompt_p_in_row_p(tmp_path):
    u = (torch.arange(5, dtype=torch.uint8) * 40).view(5, 1, 1, 1).expand(5, 1, 2, 2)
    path = save_prompt_grid(_levels(u), 2, tmp_path / "p.png", scale=1, pad=1)  # prompt 0: 0, 2, 4; prompt 1: 1, 3
    cells = {(0, 0): 0, (0, 1): 80, (0, 2): 160, (1, 0): 40, (1, 1): 120}
    want = _grid({k: np.full((2, 2, 1), v, np.uint8) for k, v in cells.items()}, 2, 3, 2, 2, 1, 1)
    assert np.array_equal(np.asarray(Image.open(path)), want)


def test_save_media_image_makes_folders_and_returns_the_png(tmp_path):
    out = tmp_path / "a" / "b" / "grid.png"
    paths = save_media(torch.zeros(4, 1, 3, 3), out, scale=1)
    assert paths == [out] and out.is_file()
    assert Image.open(out).size == (2 * 4 + 1, 2 * 4 + 1)


# ------------------------------------------------------------------------------------------------------- video

B, F, H, W = 3, 4, 2, 3


def _clips(channels: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, C, F, H, W] flat frames whose uint8 level 20 (b F + t) + 5 (+ c) names clip b, frame t (and channel c)."""
    u = (torch.arange(B * F).view(B, 1, F, 1, 1) * 20 + 5) + torch.arange(channels).view(1, channels, 1, 1, 1)
    u = u.to(torch.uint8).expand(B, channels, F, H, W)
    return _levels(u), u


def test_save_video_gif_has_every_frame_tiled_per_frame(tmp_path, monkeypatch):
    monkeypatch.setattr(media, "_ffmpeg_exe", lambda: None)
    x, u = _clips()
    paths = save_video(x, tmp_path / "v.gif", fps=10, nrow=2, scale=2, pad=1)
    gif, png = tmp_path / "v.gif", tmp_path / "v-frames.png"
    assert paths == [gif, png]
    im = Image.open(gif)
    assert im.n_frames == F
    assert im.size == (2 * (2 * (W + 1) + 1), 2 * (2 * (H + 1) + 1))  # 2 clips per row, 2 rows (one cell empty)
    assert im.info["loop"] == 0 and im.info["duration"] == 100
    for t, frame in enumerate(ImageSequence.Iterator(im)):
        cells = {divmod(b, 2): np.full((H, W, 1), int(u[b, 0, t, 0, 0]), np.uint8) for b in range(B)}
        assert np.array_equal(np.asarray(frame.convert("L")), _grid(cells, 2, 2, H, W, 2, 1)), t


def test_save_video_frames_png_has_a_row_per_clip_and_a_column_per_frame(tmp_path, monkeypatch):
    monkeypatch.setattr(media, "_ffmpeg_exe", lambda: None)
    x, u = _clips(channels=3)
    save_video(x, tmp_path / "v.gif", scale=1, pad=1)
    img = Image.open(tmp_path / "v-frames.png")
    assert img.mode == "RGB" and img.size == (F * (W + 1) + 1, B * (H + 1) + 1)
    cells = {(b, t): u[b, :, t].permute(1, 2, 0).numpy() for b in range(B) for t in range(F)}
    assert np.array_equal(np.asarray(img), _grid(cells, B, F, H, W, 1, 1, c=3))
    assert Image.open(tmp_path / "v.gif").n_frames == F


def test_save_video_default_scale_makes_small_clips_viewable(tmp_path, monkeypatch):
    monkeypatch.setattr(media, "_ffmpeg_exe", lambda: None)
    save_video(torch.zeros(1, 1, 2, 8, 8), tmp_path / "v.gif")
    assert Image.open(tmp_path / "v.gif").size == (8 * 10, 8 * 10)  # 8x8 clips: 8x, like save_grid's default


def test_save_video_without_encoder_skips_mp4_quietly_and_says_so_in_the_list(tmp_path, monkeypatch):
    monkeypatch.setattr(media, "_ffmpeg_exe", lambda: None)
    x, _ = _clips()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paths = save_media(x, tmp_path / "out" / "v.mp4")
    assert paths == [tmp_path / "out" / "v.gif", tmp_path / "out" / "v-frames.png"]
    assert not (tmp_path / "out" / "v.mp4").exists()
    assert all(p.is_file() for p in paths)


def _fake_ffmpeg(tmp_path, rc: int = 0):
    """An ``ffmpeg`` on PATH that records its arguments and copies stdin (the raw frames) to its last argument."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "ffmpeg"
    exe.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{tmp_path}/args"\nfor a; do last="$a"; done\n'
                   f'cat > "$last"\nexit {rc}\n')
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return bindir


@pytest.mark.skipif(sys.platform == "win32", reason="the fake ffmpeg is a shell script")
def test_save_video_pipes_frames_to_ffmpeg_on_path(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # rule out a bundled binary: use PATH's
    monkeypatch.setenv("PATH", str(_fake_ffmpeg(tmp_path)) + os.pathsep + os.environ.get("PATH", ""))
    x, u = _clips()
    paths = save_video(x, tmp_path / "v.mp4", fps=12, nrow=3, scale=1, pad=0)
    assert paths == [tmp_path / "v.gif", tmp_path / "v-frames.png", tmp_path / "v.mp4"]
    args = (tmp_path / "args").read_text().split("\n")
    assert args[args.index("-s") + 1] == f"{3 * W}x{H}" and args[args.index("-r") + 1] == "12"
    assert args[args.index("-pix_fmt") + 1] == "rgb24" and args[-2] == str(tmp_path / "v.mp4")
    raw = np.frombuffer((tmp_path / "v.mp4").read_bytes(), np.uint8).reshape(F, H, 3 * W, 3)
    for t in range(F):  # grey clips go out as RGB, side by side
        want = np.concatenate([np.full((H, W, 3), int(u[b, 0, t, 0, 0]), np.uint8) for b in range(B)], axis=1)
        assert np.array_equal(raw[t], want), t


@pytest.mark.skipif(sys.platform == "win32", reason="the fake ffmpeg is a shell script")
def test_save_video_warns_and_drops_the_mp4_when_ffmpeg_fails(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)
    monkeypatch.setenv("PATH", str(_fake_ffmpeg(tmp_path, rc=1)) + os.pathsep + os.environ.get("PATH", ""))
    x, _ = _clips()
    with pytest.warns(UserWarning, match="could not encode"):
        paths = save_video(x, tmp_path / "v.gif", scale=1)
    assert paths == [tmp_path / "v.gif", tmp_path / "v-frames.png"] and not (tmp_path / "v.mp4").exists()


# ------------------------------------------------------------------------------------------------------- audio


def _read_wav(path) -> tuple[wave._wave_params, np.ndarray]:
    with wave.open(str(path), "rb") as f:
        params = f.getparams()
        data = np.frombuffer(f.readframes(params.nframes), "<i2").reshape(params.nframes, params.nchannels)
    return params, data


def test_save_audio_mono_wav_values_rate_and_gaps(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 50, generator=g) * 2 - 1
    x[0, 0, 0], x[1, 0, 1] = 1.7, -3.0  # clamped to full scale
    paths = save_audio(x, tmp_path / "a.wav", sample_rate=8000, gap=0.01)
    assert paths == [tmp_path / "a.wav", tmp_path / "a-spectrogram.png"]
    p, data = _read_wav(tmp_path / "a.wav")
    assert (p.nchannels, p.sampwidth, p.framerate, p.nframes) == (1, 2, 8000, 50 + 80 + 50)
    got = data[:, 0].astype(np.float64) / 32767
    want = x.clamp(-1, 1).double().numpy()[:, 0]
    assert np.abs(got[:50] - want[0]).max() <= 0.5 / 32767 + 1e-12
    assert np.abs(got[130:] - want[1]).max() <= 0.5 / 32767 + 1e-12
    assert (data[50:130] == 0).all()
    assert data[0, 0] == 32767 and data[131, 0] == -32767


def test_save_audio_stereo_interleaves_channels(tmp_path):
    x = torch.stack([torch.full((10,), 0.5), torch.full((10,), -0.25)])[None]  # [1, 2, 10]
    save_media(x, tmp_path / "s" / "a.wav", sample_rate=22050)
    p, data = _read_wav(tmp_path / "s" / "a.wav")
    assert (p.nchannels, p.framerate, p.nframes) == (2, 22050, 10)
    assert (data[:, 0] == round(0.5 * 32767)).all() and (data[:, 1] == round(-0.25 * 32767)).all()


def test_spectrogram_shape_and_the_tone_in_its_bin(tmp_path):
    sr, n_fft, L, k = 8000, 64, 800, 12  # a full-scale sine at bin k's frequency; a silent clip below it
    tone = torch.sin(2 * torch.pi * k * sr / n_fft * torch.arange(L) / sr)
    x = torch.stack([tone, torch.zeros(L)])[:, None]
    save_audio(x, tmp_path / "a.wav", sample_rate=sr, n_fft=n_fft)
    img = Image.open(tmp_path / "a-spectrogram.png")
    bins, frames = n_fft // 2 + 1, 1 + L // (n_fft // 4)
    assert img.mode == "RGB" and img.size == (frames + 2, 2 * bins + 3)  # one row per clip, 1 grey pixel around
    lum = np.asarray(img.convert("L")).astype(float)
    loud = lum[1:1 + bins, 1:1 + frames]
    quiet = lum[2 + bins:2 + 2 * bins, 1:1 + frames]
    assert (loud.mean(1).argmax()) == bins - 1 - k  # low frequencies at the bottom
    assert quiet.max() < loud.max() and np.ptp(quiet) == 0  # silence is one flat (dark) colour


def test_spectrogram_of_clips_shorter_than_n_fft(tmp_path):
    save_audio(torch.zeros(1, 1, 20), tmp_path / "a.wav", n_fft=512)
    n = 20
    assert Image.open(tmp_path / "a-spectrogram.png").size == (1 + 20 // (n // 4) + 2, n // 2 + 1 + 2)


# ------------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("shape, bad, right", [
    ((1, 1, 4, 4), "x.wav", ".png"),
    ((1, 1, 2, 4, 4), "x.png", ".gif or .mp4"),
    ((1, 1, 16), "x.png", ".wav"),
    ((1, 1, 16), "x", ".wav"),
])
def test_save_media_refuses_a_suffix_that_does_not_fit(tmp_path, shape, bad, right):
    with pytest.raises(DistillError, match=right):
        save_media(torch.zeros(shape), tmp_path / bad)
    assert list(tmp_path.iterdir()) == []


def test_save_media_refuses_other_ranks(tmp_path):
    with pytest.raises(DistillError, match=r"\(4, 4\)"):
        save_media(torch.zeros(4, 4), tmp_path / "x.png")


@pytest.mark.parametrize("x, path, match", [
    (torch.zeros(0, 1, 4, 4), "x.png", "empty"),
    (torch.zeros(0, 1, 2, 4, 4), "x.gif", "empty"),
    (torch.zeros(0, 1, 16), "x.wav", "empty"),
    (torch.zeros(1, 1, 0), "x.wav", "zero-size"),
    (torch.zeros(1, 2, 2, 4, 4), "x.gif", "C = 1 .grey. or 3 .RGB."),
    (torch.zeros(1, 3, 16), "x.wav", "1 .mono. or 2 .stereo."),
    (torch.zeros(1, 2, 4, 4), "x.png", "C = 1 .grey. or 3 .RGB."),
    (torch.tensor([[[0.0, float("nan"), float("inf")]]]), "x.wav", "2 of 3 .* NaN or infinite.*nan_to_num"),
    (torch.full((1, 1, 2, 2, 2), float("nan")), "x.gif", "NaN or infinite"),
    (torch.zeros(1, 1, 4, dtype=torch.int16), "x.wav", "float in \\[-1, 1\\]"),
])
def test_save_media_refuses_bad_samples_with_a_fix(tmp_path, x, path, match):
    with pytest.raises(DistillError, match=match):
        save_media(x, tmp_path / path)


def test_writers_check_their_own_layout(tmp_path):
    with pytest.raises(DistillError, match=r"\[B, C, F, H, W\]"):
        save_video(torch.zeros(1, 1, 4, 4), tmp_path / "x.gif")
    with pytest.raises(DistillError, match=r"\.gif or \.mp4"):
        save_video(torch.zeros(1, 1, 2, 4, 4), tmp_path / "x.png")
    with pytest.raises(DistillError, match=r"\[B, C, L\]"):
        save_audio(torch.zeros(1, 1, 4, 4), tmp_path / "x.wav")
