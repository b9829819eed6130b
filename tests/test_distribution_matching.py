"""Distribution matching distillation (DMD2): its gradient, what each network sees, resume and export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distill.recipe import load_recipe
from distill.methods.distribution_matching import distribution_matching_loss
from distill.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "digits" / "distribution_matching.yaml"
TINY = ["trainer.batch_size=8", "trainer.progress=false", "eval.protocol=null", "trainer.checkpoint_every=0",
        "trainer.threads=1", "trainer.log_every=1"]


def _trainer(tmp_path, teacher, *overrides) -> Trainer:
    return Trainer(load_recipe(RECIPE, [f"teacher={teacher}", *TINY, *overrides]), tmp_path)


def gaussian_denoiser(mu: torch.Tensor, s2: float):
    """The exact x0 estimate E[x0 | x] for x0 ~ N(mu, s2 I), x = x0 + sigma eps: mu + s2 / (s2 + sigma^2) (x - mu)."""

    def D(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        k = s2 / (s2 + sigma**2)
        return mu + k[:, None] * (x - mu)

    return D


def test_the_generator_gradient_is_the_distribution_matching_direction():
    """Two Gaussians with one covariance: data N(mu_r, s2), generator samples N(mu_f, s2). The denoisers are known in
    closed form, so the score difference is (mu_r - mu_f) sigma^2 / (s2 + sigma^2) for every x: DMD's gradient on each
    sample must be its negative, divided by DMD's per-sample normaliser mean|x - D_real(x_t)|."""
    g = torch.Generator().manual_seed(0)
    d, s2 = 6, 0.5
    mu_r, mu_f = torch.randn(d, generator=g), torch.randn(d, generator=g)
    x = (mu_f + s2**0.5 * torch.randn(32, d, generator=g)).requires_grad_(True)
    sigma = torch.rand(32, generator=g) * 3 + 0.1
    x_t = x.detach() + sigma[:, None] * torch.randn(32, d, generator=g)
    real, fake = gaussian_denoiser(mu_r, s2)(x_t, sigma), gaussian_denoiser(mu_f, s2)(x_t, sigma)
    distribution_matching_loss(x, real, fake).backward()
    shift = (mu_r - mu_f)[None] * (sigma**2 / (s2 + sigma**2))[:, None]  # real - fake, the same for every x
    norm = (x.detach() - real).abs().mean(1, keepdim=True)
    expected = -shift / norm / x.numel()
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-9)
    # descending the loss moves every sample towards the data's mean
    assert ((x.detach() - 0.1 * x.grad * x.numel() - mu_r).norm(dim=1) < (x.detach() - mu_r).norm(dim=1)).all()


def test_the_fake_denoiser_sees_only_generator_samples_and_the_teacher_stays_frozen(tmp_path, tiny_teacher,
                                                                                   one_thread):
    t = _trainer(tmp_path, tiny_teacher, "method.iters=4", "method.fake_updates=2")
    seen = []
    t.method.fake.register_forward_hook(lambda m, a, kw, o: seen.append(a[0].detach().clone()), with_kwargs=True)
    real = []
    orig = t.data.batch

    def spy(*a, **k):
        out = orig(*a, **k)
        real.append(out[0]["image"].clone())
        return out

    t.data.batch = spy
    teacher = {k: v.clone() for k, v in t.method.teacher.state_dict().items()}
    assert not any(p.requires_grad for p in t.method.teacher.parameters())
    t.fit()
    data = torch.cat(real)
    for x in seen:  # the fake denoiser's inputs are noised generator samples, never (noised) data
        assert not any(torch.allclose(x, data[i : i + len(x)], atol=1e-3) for i in range(0, len(data), len(x)))
    assert all(torch.equal(v, t.method.teacher.state_dict()[k]) for k, v in teacher.items())


def test_every_network_moves_and_resume_is_exact(tmp_path, tiny_teacher, one_thread):
    """Three networks (generator, fake denoiser with its GAN head, the frozen teacher), two optimizers, an EMA:
    N steps in one go equal N/2, a resume, N/2 more, bitwise."""
    from distill.checkpoint import list_checkpoints, load_checkpoint

    over = ["method.iters=6", "method.fake_updates=2", "method.gan_weight=0.01", "method.student_steps=2",
            "method.sample_steps=[1, 2]", "method.ema_decay=0.5", "trainer.checkpoint_every=3",
            "method.student_optimizer.lr=1e-3", "method.fake_optimizer.lr=1e-3"]
    a = _trainer(tmp_path / "a", tiny_teacher, *over)
    before = {n: p.detach().clone() for n, p in a.method.named_parameters() if p.requires_grad}
    a.fit()
    after = dict(a.method.named_parameters())
    assert [n for n, p in before.items() if torch.equal(p, after[n].detach())] == []
    b = _trainer(tmp_path / "b", tiny_teacher, *over)
    b.tc.max_steps = 3
    b.fit()
    _trainer(tmp_path / "b", tiny_teacher, *over).fit()
    ka = load_checkpoint(list_checkpoints(tmp_path / "a" / "checkpoints")[-1])
    kb = load_checkpoint(list_checkpoints(tmp_path / "b" / "checkpoints")[-1])
    assert set(ka["modules"]) == {"student", "fake", "student_ema"} and set(ka["optimizers"]) == {"student", "fake"}
    for name, mod in ka["modules"].items():
        for k, v in mod.items():
            assert torch.equal(v, kb["modules"][name][k]), (name, k)
    assert ka["state"]["method"] == kb["state"]["method"]


def test_export_samples_in_stock_diffusers(tmp_path, tiny_teacher, one_thread):
    from distill.export import parity

    t = _trainer(tmp_path, tiny_teacher, "method.iters=2", "method.fake_updates=1", "method.student_steps=4",
                 "method.sample_steps=[1, 2, 4]")
    t.fit()
    for k, diff in parity(tmp_path / "model", n=4).items():
        assert diff <= 1e-4, (k, diff)


def test_bad_configs_are_refused(tiny_teacher):
    from distill.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        load_recipe(RECIPE, [f"teacher={tiny_teacher}", "method.t_range=[0.9, 0.1]", "method.sample_steps=[8]",
                             "method.fake_updates=0"])
    msg = str(err.value)
    assert "t_range" in msg and "sample_steps" in msg and "fake_updates" in msg


def test_step_cycle_sets_which_generator_step_each_update_trains(tmp_path, tiny_teacher):
    """Backward simulation trains step k = 0, 1, 2, 3, 0, ... by default; step_cycle weights the steps (here the
    1-step map from pure noise gets half of the updates); a step outside the generator's is refused."""
    from distill.errors import ConfigError

    def ks(method, n):
        out = []
        for u in range(n):
            method.generator_updates = u
            out.append(method.step_k())
        return out

    plain = _trainer(tmp_path / "a", tiny_teacher, "method.student_steps=4", "method.sample_steps=[1, 4]").method
    assert ks(plain, 6) == [0, 1, 2, 3, 0, 1]
    cyc = _trainer(tmp_path / "b", tiny_teacher, "method.student_steps=4", "method.sample_steps=[1, 4]",
                   "method.step_cycle=[0, 1, 0, 2, 0, 3]").method
    assert ks(cyc, 7) == [0, 1, 0, 2, 0, 3, 0]
    with pytest.raises(ConfigError, match="step_cycle"):
        load_recipe(RECIPE, [f"teacher={tiny_teacher}", "method.student_steps=4", "method.step_cycle=[0, 4]"])
    with pytest.raises(ConfigError, match="backward_simulation: true"):
        load_recipe(RECIPE, [f"teacher={tiny_teacher}", "method.step_cycle=[0, 1]", "method.backward_simulation=false"])
