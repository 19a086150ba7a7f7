"""The oneDNN linear path (hymamba.ops.linear): same maths as F.linear, forward and backward,
chosen only where it applies, invisible to tracers, compilers, exporters and FLOP counters."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

import hymamba
from hymamba.apps.flops import count_macs
from hymamba.models.fuse import optimize_for_inference
from hymamba.ops.linear import (FastLinear, gelu_linear, layer_norm_linear, linear, linear_impl_for,
                                 onednn_linear_available)

from conftest import load_case

pytestmark = pytest.mark.skipif(not onednn_linear_available()[0], reason=str(onednn_linear_available()[1]))


def _inputs(shape, k=160, n=192, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, k, generator=gen)
    w = torch.randn(n, k, generator=gen) / k**0.5
    b = torch.randn(n, generator=gen) if bias else None
    return x, w, b


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 49), (2, 5, 11)])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_gradients_match_f_linear(shape, bias) -> None:
    x, w, b = _inputs(shape, bias=bias)
    leaves = [t.clone().requires_grad_() for t in (x, w) + ((b,) if bias else ())]
    refs = [t.detach().clone().requires_grad_() for t in leaves]
    assert linear_impl_for(leaves[0], leaves[1], "onednn") == "onednn"
    got = linear(leaves[0], leaves[1], leaves[2] if bias else None, impl="onednn")
    want = F.linear(refs[0], refs[1], refs[2] if bias else None)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got.grad_fn is not None and "OneDNN" in type(got.grad_fn).__name__
    grad = torch.randn_like(want)
    got.backward(grad)
    want.backward(grad)
    for a, r in zip(leaves, refs):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-4, atol=1e-4)


def test_non_contiguous_input_and_partial_gradients() -> None:
    x, w, b = _inputs((64,), k=130)
    xt = x.t().contiguous().t()  # same values, transposed strides
    assert not xt.is_contiguous()
    torch.testing.assert_close(linear(xt, w, b, impl="onednn"), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    wg = w.clone().requires_grad_()  # input without grad, weight with: only the weight gets one
    linear(x, wg, b, impl="onednn").sum().backward()
    torch.testing.assert_close(wg.grad, torch.ones(w.shape[0], 64) @ x, rtol=1e-4, atol=1e-4)


def test_auto_choice() -> None:
    x, w, b = _inputs((4,), k=256, n=256)
    assert linear_impl_for(x, w) == "onednn"
    assert linear_impl_for(x, w[:64]) == "torch"  # small GEMMs stay in MKL
    assert linear_impl_for(x.double(), w.double()) == "torch"
    assert linear_impl_for(x.bfloat16(), w.bfloat16()) == "torch"
    assert linear_impl_for(x, w, "torch") == "torch"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear_impl_for(x, w) == "torch"  # autocast must see F.linear to cast it
        assert linear_impl_for(x, w, "onednn") == "torch"
    with torch.device("cpu"):  # any torch-function mode (FLOP counters, ...) sees F.linear
        assert linear_impl_for(x, w) == "torch"


def test_environment_override(monkeypatch) -> None:
    x, w, _ = _inputs((4,), k=256, n=256)
    monkeypatch.setenv("HYMAMBA_LINEAR_IMPL", "torch")
    assert linear_impl_for(x, w) == "torch"
    assert linear_impl_for(x, w, "onednn") == "onednn"  # an explicit argument wins
    monkeypatch.setenv("HYMAMBA_LINEAR_IMPL", "fastest")
    with pytest.raises(ValueError, match="HYMAMBA_LINEAR_IMPL='fastest'.*expected one of"):
        linear(x, w)


def test_clear_errors() -> None:
    x, w, _ = _inputs((4,))
    with pytest.raises(RuntimeError, match="CPU float32 tensors only.*float64.*impl='auto'"):
        linear(x.double(), w.double(), impl="onednn")
    with pytest.raises(ValueError, match="one of"):
        linear(x, w, impl="mkl")
    with pytest.raises(ValueError, match="one of"):
        FastLinear(4, 4, impl="mkl")
    with pytest.raises(ValueError, match="linear_impl must be one of"):
        hymamba.create_model("test_mambavision", linear_impl="mkl")


def test_prepacked_weights_follow_changes_and_survive_copies() -> None:
    layer = FastLinear(160, 192, impl="onednn")
    x = torch.randn(3, 10, 160)
    layer.prepacked = True
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
        assert layer._packed is not None
        layer.weight.mul_(-2.0)  # an in-place change must repack, not serve stale weights
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert clone._packed is None and clone.prepacked
        with torch.no_grad():
            torch.testing.assert_close(clone(x), layer(x), rtol=0, atol=0)
    assert sorted(layer.state_dict()) == ["bias", "weight"]
    # with gradients the packed copy is bypassed and the weight gets its gradient
    layer(x).sum().backward()
    assert layer.weight.grad is not None


def test_official_fixture_through_onednn_linear() -> None:
    """The fixture model with every linear layer on oneDNN: outputs and gradients still match."""
    case = load_case("tiny_b")
    exp = case["tensors"]
    model = hymamba.MambaVision(**case["config"], linear_impl="onednn")
    hymamba.load_checkpoint(model, case["checkpoint_path"], strict=True)
    model.eval()
    x = exp["input"].float()
    with torch.no_grad():
        torch.testing.assert_close(model(x), exp["logits"].float(), rtol=0, atol=1e-4)
        packed = optimize_for_inference(model)
        torch.testing.assert_close(packed(x), exp["logits"].float(), rtol=0, atol=1e-4)
    assert all(m.prepacked for m in packed.modules() if isinstance(m, FastLinear))
    (model(x) * exp["loss_weight"].float()).sum().backward()
    for n, p in model.named_parameters():
        ref = exp[f"grad.{n}"]
        torch.testing.assert_close(p.grad, ref, rtol=1e-3, atol=1e-4 * float(ref.abs().max()) + 1e-7, msg=n)


def test_tracers_compilers_and_counters_see_f_linear() -> None:
    torch.manual_seed(0)
    model = hymamba.create_model("test_mambavision", linear_impl="onednn").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
        traced = torch.jit.trace(model, x, check_trace=False)
    assert "mkldnn::_linear_pointwise" not in str(traced.inlined_graph)
    torch.testing.assert_close(traced(x), want, rtol=1e-5, atol=1e-5)
    exported = torch.export.export(model, (x,))
    assert "_linear_pointwise" not in str(exported.graph)
    torch.testing.assert_close(exported.module()(x), want, rtol=1e-5, atol=1e-5)
    macs_onednn, _ = count_macs(model, (3, 64, 64))
    model.set_linear_impl("torch")
    assert count_macs(model, (3, 64, 64))[0] == macs_onednn


def test_model_linear_impl_plumbing() -> None:
    model = hymamba.create_model("test_mambavision", linear_impl="torch", num_classes=5)
    layers = [m for m in model.modules() if isinstance(m, FastLinear)]
    assert layers and all(m.impl == "torch" for m in layers)
    model.reset_classifier(7)
    assert isinstance(model.head, FastLinear) and model.head.impl == "torch"
    model.set_linear_impl("onednn")
    assert all(m.impl == "onednn" for m in model.modules() if isinstance(m, FastLinear))


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps for backward while running fn()."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


@pytest.mark.parametrize("impl", ["auto", "onednn"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_recomputing_compositions_same_gradients_less_memory(impl: str, dtype: torch.dtype) -> None:
    """norm -> fc1 -> GELU -> fc2 through layer_norm_linear + gelu_linear against stock layers."""
    if impl == "onednn" and dtype == torch.float64:
        pytest.skip("oneDNN linear is float32 only")
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(32).to(dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5), norm.bias.uniform_(-0.5, 0.5)
    fc1, fc2 = FastLinear(32, 128, impl=impl).to(dtype), FastLinear(128, 32, impl=impl).to(dtype)
    params = [*norm.parameters(), *fc1.parameters(), *fc2.parameters()]
    x = torch.randn(3, 10, 32, dtype=dtype) * 2 + 1
    x_a, x_b = x.clone().requires_grad_(), x.clone().requires_grad_()
    got, saved_fused = _saved_bytes(lambda: gelu_linear(layer_norm_linear(x_a, norm, fc1, impl), fc2, impl))
    assert "GeluLinear" in type(got.grad_fn).__name__
    grads_fused = torch.autograd.grad(got, [x_a, *params], torch.ones_like(got))
    want, saved_plain = _saved_bytes(lambda: fc2(F.gelu(fc1(norm(x_b)))))
    grads_plain = torch.autograd.grad(want, [x_b, *params], torch.ones_like(want))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    for a, b in zip(grads_fused, grads_plain):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    # exactly one hidden-width (GELU output) and one input-width (LayerNorm output) tensor fewer
    assert saved_plain - saved_fused == 3 * 10 * (128 + 32) * x.element_size()


def test_recomputing_compositions_are_plain_elsewhere(monkeypatch) -> None:
    norm, fc1, fc2 = torch.nn.LayerNorm(32), FastLinear(32, 128), FastLinear(128, 32)
    x = torch.randn(4, 32, requires_grad=True)
    assert "LayerNormLinear" in type(layer_norm_linear(x, norm, fc1).grad_fn).__name__
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gelu_linear(layer_norm_linear(x, norm, fc1), fc2)
    assert out.dtype == torch.bfloat16 and "GeluLinear" not in type(out.grad_fn).__name__
    with torch.no_grad():
        assert gelu_linear(layer_norm_linear(x, norm, fc1), fc2).grad_fn is None
    assert "LayerNormLinear" not in type(layer_norm_linear(x, norm, fc1, "torch").grad_fn).__name__
    monkeypatch.setenv("HYMAMBA_LINEAR_IMPL", "torch")  # stock layers process-wide
    assert "GeluLinear" not in type(gelu_linear(x @ torch.ones(32, 128), fc2).grad_fn).__name__


def test_model_training_keeps_less_for_backward_same_gradients() -> None:
    torch.manual_seed(0)
    model = hymamba.create_model("test_mambavision", drop_path_rate=0.0).double().train()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    from hymamba.models.layers import Block

    block_inputs = []
    for m in model.modules():
        if isinstance(m, Block):
            m.register_forward_hook(lambda mod, args, out: block_inputs.append(args[0].numel()))
    results = {}
    for impl in ("auto", "torch"):
        model.set_linear_impl(impl)
        model.zero_grad()
        out, saved = _saved_bytes(lambda: model(x))
        out.square().sum().backward()
        results[impl] = (saved, {n: p.grad.clone() for n, p in model.named_parameters()})
    # per token block: the two LayerNorm outputs and the MLP's GELU output (4x wide) are not kept
    per_pass = sum(block_inputs) // 2
    assert results["torch"][0] - results["auto"][0] == per_pass * (1 + 1 + 4) * 8
    for n, g in results["torch"][1].items():
        torch.testing.assert_close(results["auto"][1][n], g, rtol=1e-10, atol=1e-12, msg=n)


def test_meta_device_training_forward() -> None:
    """Shape inference on the meta device (no autocast there) goes through the same code."""
    model = hymamba.create_model("test_mambavision", num_classes=3).to("meta").train()
    out = model(torch.randn(2, 3, 64, 64, device="meta", requires_grad=True))
    assert out.shape == (2, 3) and out.device.type == "meta"


def test_torch_func_transforms_see_plain_layers() -> None:
    """torch.func.grad (per-sample gradients, meta-learning) works through the model."""
    torch.manual_seed(0)
    # eval: BatchNorm's running-stat updates are in-place, which torch.func.grad refuses
    model = hymamba.create_model("test_mambavision", num_classes=3, linear_impl="onednn").eval()
    params = {n: p.detach() for n, p in model.named_parameters()}
    x = torch.randn(2, 3, 64, 64)

    def loss(p):
        return torch.func.functional_call(model, p, (x,)).square().sum()

    grads = torch.func.grad(loss)(params)
    loss(dict(model.named_parameters())).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-5, msg=n)


def test_double_backward_gradient_penalty() -> None:
    """create_graph=True (gradient penalties, R1 regularisation): the custom backwards are built
    from differentiable ops, so second-order gradients match the stock layers'."""
    torch.manual_seed(0)
    model = hymamba.create_model("test_mambavision", num_classes=3, drop_path_rate=0.0).train()
    x = torch.randn(2, 3, 64, 64)
    results = {}
    for impl in ("onednn", "torch"):
        model.set_linear_impl(impl)
        model.zero_grad()
        xi = x.clone().requires_grad_()
        # the flash-attention CPU kernel has no double backward (stock PyTorch); the math one has
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            (gx,) = torch.autograd.grad(model(xi).square().sum(), xi, create_graph=True)
        gx.square().sum().backward()
        # train-mode BatchNorm couples every parameter to the input gradient: none is expected to
        # be left without a second-order gradient, so none is skipped
        assert [n for n, p in model.named_parameters() if p.grad is None] == [], impl
        results[impl] = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert results["onednn"].keys() == results["torch"].keys() == dict(model.named_parameters()).keys()
    scale = max(float(g.abs().max()) for g in results["torch"].values())
    for n, g in results["torch"].items():  # (conv biases before a BatchNorm have ~0 gradients)
        torch.testing.assert_close(results["onednn"][n], g, rtol=1e-3, atol=1e-5 * scale, msg=n)
