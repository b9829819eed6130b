"""Trainer options for speed and scale: trackers, a half-precision teacher, bf16 on a CPU, torch.compile, gradient
checkpointing."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

from distill.recipe import load_recipe
from distill.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
CONSISTENCY = ROOT / "recipes" / "digits" / "consistency.yaml"


def _trainer(tmp_path, teacher, *extra):
    over = [f"teacher={teacher}", "method.iters=3", "method.num_steps=10", "method.sample_steps=[1]",
            "trainer.batch_size=8", "trainer.log_every=1", "eval.protocol=null", "trainer.progress=false",
            "trainer.checkpoint_every=0", *extra]
    return Trainer(load_recipe(CONSISTENCY, over), tmp_path)


def _weights(t: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in t.method.student.state_dict().items()}


def test_tensorboard_event_file_is_written_and_read_back(tmp_path, tiny_teacher, one_thread):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _trainer(tmp_path, tiny_teacher, "trainer.log_with=[tensorboard]").fit()
    events = list((tmp_path / "logs").rglob("events.out.tfevents.*"))
    assert events, list(tmp_path.rglob("*"))
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    loss = acc.Scalars("student/loss")
    assert [e.step for e in loss] == [1, 2, 3] and all(torch.isfinite(torch.tensor([e.value for e in loss])))
    assert (tmp_path / "metrics.jsonl").is_file()  # metrics.jsonl stays


def test_half_precision_teacher_and_its_cpu_warning(tmp_path, tiny_teacher, one_thread, monkeypatch):
    import distill.training.speed

    # a CPU with native bf16 (AVX512-BF16, AMX) runs it fast: no warning there
    monkeypatch.setattr(distill.training.speed, "cpu_has_native", lambda dtype: True)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _trainer(tmp_path / "native", tiny_teacher, "trainer.teacher_dtype=bf16")
    assert not any("meant for GPUs" in str(w.message) for w in seen)
    monkeypatch.setattr(distill.training.speed, "cpu_has_native", lambda dtype: False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        t = _trainer(tmp_path, tiny_teacher, "trainer.teacher_dtype=bf16")
    assert any("meant for GPUs" in str(w.message) and "avx512_bf16" in str(w.message) for w in seen)
    assert next(t.method.teacher.parameters()).dtype == torch.bfloat16
    assert next(t.method.student.parameters()).dtype == torch.float32
    result = t.fit()
    assert all(v == v for v in result["last"].values())  # finite losses from a bf16 teacher's targets


def test_cpu_bf16_steps_run_short_attention_in_fp32(tmp_path, tiny_teacher, one_thread, monkeypatch):
    import distill.training.speed
    from distill.precision import ShortAttentionFP32

    monkeypatch.setattr(distill.training.speed, "cpu_has_native", lambda dtype: True)
    t = _trainer(tmp_path, tiny_teacher, "trainer.mixed_precision=bf16")
    assert isinstance(t.attention_mode, ShortAttentionFP32)
    result = t.fit()
    # the tiny UNet attends over its 4x4 map (16 tokens) in each of the student's, the target's and the
    # teacher's forwards: every one went through the fp32 path, in each of the 3 steps
    assert t.attention_mode.calls >= 3 * 3
    assert all(v == v for v in result["last"].values())
    assert not isinstance(_trainer(tmp_path / "fp32", tiny_teacher).attention_mode, ShortAttentionFP32)


def test_compile_and_gradient_checkpointing_train_like_the_plain_loop(tmp_path, tiny_teacher, one_thread):
    fast = ["method.optimizer.lr=1e-3", "method.optimizer.warmup_steps=0"]
    plain = _trainer(tmp_path / "plain", tiny_teacher, *fast)
    plain.fit()
    ckpt = _trainer(tmp_path / "ckpt", tiny_teacher, *fast, "trainer.gradient_checkpointing=true")
    assert ckpt.method.student.inner.net.is_gradient_checkpointing
    ckpt.fit()
    compiled = _trainer(tmp_path / "compiled", tiny_teacher, *fast, "trainer.compile=eager")
    compiled.fit()
    ref = _weights(plain)
    for other in (ckpt, compiled):
        got = _weights(other)
        assert got.keys() == ref.keys()  # compiled in place: the same parameter names (and checkpoints)
        for k, v in ref.items():
            torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-5)
    moved = max((ref[k] - v).abs().max().item() for k, v in _untrained(tiny_teacher).items())
    assert moved > 1e-4  # the runs did train


def _untrained(teacher) -> dict[str, torch.Tensor]:
    from distill.denoisers import ConsistencyDenoiser
    from distill.pipelines import load_denoiser

    return {k: v for k, v in ConsistencyDenoiser(load_denoiser(teacher)).state_dict().items()}


def test_unknown_tracker_is_refused(tiny_teacher):
    from distill.errors import ConfigError

    with pytest.raises(ConfigError, match="log_with: 'tensorbored' not among"):
        load_recipe(CONSISTENCY, [f"teacher={tiny_teacher}", "trainer.log_with=[tensorbored]"])


@pytest.mark.parametrize("world,preset,expected", [(None, None, None), ("2", None, "PASSIVE"), ("2", "ACTIVE", "ACTIVE"),
                                                   ("1", "PASSIVE", "PASSIVE")])
def test_console_script_lets_threads_sleep_in_multi_process_runs(monkeypatch, world, preset, expected):
    """The `distill` command sets OMP_WAIT_POLICY=PASSIVE before torch loads when it is one of several processes
    (spinning idle threads starve the other ranks on shared cores), leaves GNU OpenMP's default to a process alone
    (faster there), and never overrides the user's setting."""
    from distill import cli

    for var in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    if world is not None:
        monkeypatch.setenv("WORLD_SIZE", world)
    if preset is None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", preset)
    monkeypatch.setattr(cli, "main", lambda argv=None: 0)
    assert cli.entry() == 0
    assert os.environ.get("OMP_WAIT_POLICY") == expected


def test_native_half_precision_is_read_from_the_cpu_flags(monkeypatch, tmp_path):
    from distill import trainer

    real = Path.read_text
    for flags, bf16 in (("fpu sse avx2 avx512f", False), ("fpu avx2 avx512f avx512_bf16", True), ("fp asimd bf16", True)):
        info = f"processor : 0\nflags\t\t: {flags}\n"
        monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: info if str(self) == "/proc/cpuinfo" else real(self, *a, **k))
        assert trainer.cpu_has_native("bf16") is bf16, flags
        assert trainer.cpu_has_native("fp16") is False
