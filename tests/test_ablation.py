"""The paper's ablations as model options: token-mixer variants and hybrid attention patterns.
The defaults are the official model (the fixture tests check that); here each variant is checked
against an independent, plainly written composition of the same layers."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import hymamba
from hymamba.apps.flops import count_macs
from hymamba.models.layers import Attention, MambaVisionMixer, depthwise_conv_same
from hymamba.models.options import ATTENTION_PATTERNS, MIXER_VARIANTS, attention_block_indices
from hymamba.ops import selective_scan_ref


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("length", [1, 2, 3, 49])
def test_causal_depthwise_conv(k: int, length: int) -> None:
    x, w = torch.randn(2, length, 6, dtype=torch.float64), torch.randn(6, k, dtype=torch.float64)
    ref = F.conv1d(F.pad(x.transpose(1, 2), (k - 1, 0)), w[:, None], groups=6).transpose(1, 2)
    torch.testing.assert_close(depthwise_conv_same(x, w, causal=True), ref)


def test_attention_patterns() -> None:
    assert attention_block_indices(8) == [4, 5, 6, 7]  # the official layout
    assert attention_block_indices(5) == [3, 4]
    assert attention_block_indices(5, "first_half") == [0, 1]
    assert attention_block_indices(5, "interleave") == [1, 3]
    assert attention_block_indices(4, "mamba_only") == [] and attention_block_indices(3, "attention_only") == [0, 1, 2]
    for depth in range(1, 12):  # the ablation compares equal numbers of attention blocks
        counts = {len(attention_block_indices(depth, p)) for p in ("last_half", "first_half", "interleave")}
        assert counts == {depth // 2}
    with pytest.raises(ValueError, match="attention_pattern must be one of"):
        attention_block_indices(4, "random")


def _plain_mixer(m: MambaVisionMixer, h: torch.Tensor) -> torch.Tensor:
    """The mixer written out with F.conv1d in (B, C, L) layout, as the paper describes it."""
    half = m.d_inner // 2
    xz = F.linear(h, m.in_proj.weight).transpose(1, 2)  # (B, C, L)
    x, z = xz[:, :half], xz[:, half:]
    k = m.conv1d_x.kernel_size[0]
    if m.variant == "causal_conv":  # Mamba's own: width 4, with bias
        assert k == 4 and m.conv1d_x.bias is not None
        x = F.silu(F.conv1d(F.pad(x, (k - 1, 0)), m.conv1d_x.weight, m.conv1d_x.bias, groups=half))
    else:
        x = F.silu(F.conv1d(x, m.conv1d_x.weight, padding="same", groups=half))
    if m.variant in ("concat", "gated"):
        z = F.silu(F.conv1d(z, m.conv1d_z.weight, padding="same", groups=half))
    else:
        z = F.silu(z)
    dbl = F.linear(x.transpose(1, 2), m.x_proj.weight)
    dt, b, c = torch.split(dbl, [m.dt_rank, m.d_state, m.d_state], dim=-1)
    delta = F.linear(dt, m.dt_proj.weight, m.dt_proj.bias).transpose(1, 2)
    # as the official code: A, D and the dt bias go to the scan in float32
    y = selective_scan_ref(x, delta, -torch.exp(m.A_log.float()), b.transpose(1, 2), c.transpose(1, 2),
                           m.D.float(), delta_bias=m.dt_proj.bias.float(), delta_softplus=True)
    out = torch.cat([y, z], dim=1) if m.variant == "concat" else y * z
    return F.linear(out.transpose(1, 2), m.out_proj.weight)


@pytest.mark.parametrize("variant", MIXER_VARIANTS)
def test_mixer_variants_match_plain_composition(variant: str) -> None:
    torch.manual_seed(0)
    m = MambaVisionMixer(32, variant=variant).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    h = torch.randn(3, 17, 32, dtype=torch.float64)
    torch.testing.assert_close(m(h), _plain_mixer(m, h), rtol=1e-9, atol=1e-10)
    has_z_conv = variant in ("concat", "gated")
    assert hasattr(m, "conv1d_z") == has_z_conv
    assert m.out_proj.in_features == (32 if variant == "concat" else 16)


@pytest.mark.parametrize("pattern", ATTENTION_PATTERNS)
@pytest.mark.parametrize("variant", MIXER_VARIANTS)
def test_every_combination_builds_and_trains(variant: str, pattern: str) -> None:
    model = hymamba.create_model("test_mambavision", num_classes=4, mixer_variant=variant,
                                 attention_pattern=pattern)
    official = hymamba.create_model("test_mambavision", num_classes=4)
    for level in (2, 3):
        depth = len(model.levels[level].blocks)
        want = attention_block_indices(depth, pattern)
        got = [i for i, b in enumerate(model.levels[level].blocks) if isinstance(b.mixer, Attention)]
        assert got == want
    # parameters: each mixer without the symmetric branch loses conv1d_z and half of out_proj
    mixers = [m for m in model.modules() if isinstance(m, MambaVisionMixer)]
    n_attn = sum(isinstance(m, Attention) for m in model.modules())
    assert n_attn + len(mixers) == sum(len(model.levels[i].blocks) for i in (2, 3))
    if pattern in ("last_half", "first_half", "interleave"):
        lost = {"concat": lambda m: 0, "gated": lambda m: m.d_model // 2 * m.d_model,
                "regular_conv": lambda m: m.d_model // 2 * (m.d_model + 3),
                # Mamba's width-4 conv with bias: 5 parameters per channel instead of 3 (+ 3 on z)
                "causal_conv": lambda m: m.d_model // 2 * (m.d_model + 1)}[variant]
        n_model, n_official = (sum(p.numel() for p in x.parameters()) for x in (model, official))
        assert n_official - n_model == sum(lost(m) for m in mixers)
    x = torch.randn(2, 3, 64, 64)
    loss = F.cross_entropy(model(x), torch.tensor([0, 3]))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert count_macs(model.eval(), (3, 64, 64))[0] > 0


def test_clear_errors() -> None:
    with pytest.raises(ValueError, match="mixer_variant must be one of"):
        hymamba.create_model("test_mambavision", mixer_variant="mamba2")
    with pytest.raises(ValueError, match="attention_pattern must be one of"):
        hymamba.create_model("test_mambavision", attention_pattern="random")
