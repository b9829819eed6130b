"""bf16 on a CPU: attention over short sequences runs in fp32 (distill.precision), in the trainer's steps."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distill.precision import ShortAttentionFP32, short_attention_fp32


def _qkv(tokens: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 2, tokens, 8, generator=gen) for _ in range(3)]


def test_short_attention_runs_in_fp32_under_bf16_autocast():
    q, k, v = _qkv(16)
    exact = F.scaled_dot_product_attention(q, k, v)
    with torch.autocast("cpu", torch.bfloat16):
        plain = F.scaled_dot_product_attention(q, k, v)
        with ShortAttentionFP32() as mode:
            fp32 = F.scaled_dot_product_attention(q, k, v)
            by_name = F.scaled_dot_product_attention(query=q, key=k, value=v)
    assert mode.calls == 2
    # autocast's dtype out, as autocast would give, but computed in fp32: only the final rounding to bf16 is left
    assert plain.dtype == fp32.dtype == by_name.dtype == torch.bfloat16
    assert torch.equal(fp32, exact.to(torch.bfloat16)) and torch.equal(by_name, fp32)
    assert not torch.equal(plain, fp32)  # the bf16 kernel computes in bf16 and differs


def test_long_attention_and_fp32_runs_pass_through():
    q, k, v = _qkv(16)
    with torch.autocast("cpu", torch.bfloat16), ShortAttentionFP32(max_tokens=8) as mode:
        long = F.scaled_dot_product_attention(q, k, v)
    with ShortAttentionFP32() as outside:
        fp32 = F.scaled_dot_product_attention(q, k, v)
    assert mode.calls == 0 and outside.calls == 0
    with torch.autocast("cpu", torch.bfloat16):
        assert torch.equal(long, F.scaled_dot_product_attention(q, k, v))
    assert torch.equal(fp32, F.scaled_dot_product_attention(q, k, v))


def test_float_attention_mask_is_cast_with_the_inputs():
    q, k, v = _qkv(4)
    mask = torch.zeros(4, 4).masked_fill(torch.ones(4, 4).triu(1).bool(), float("-inf"))
    with torch.autocast("cpu", torch.bfloat16), ShortAttentionFP32() as mode:
        out = F.scaled_dot_product_attention(q, k, v, mask.to(torch.bfloat16))
    assert mode.calls == 1
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, is_causal=True).to(torch.bfloat16))


def test_only_cpu_bf16_gets_the_mode():
    assert isinstance(short_attention_fp32(torch.device("cpu"), "bf16"), ShortAttentionFP32)
    assert not isinstance(short_attention_fp32(torch.device("cpu"), "no"), ShortAttentionFP32)
    assert not isinstance(short_attention_fp32(torch.device("cuda"), "bf16"), ShortAttentionFP32)
