"""kernels.py: the packed Linear equals PyTorch's, and gradients still flow through it."""
import pytest
import torch

from cit_backbone.kernels import PackedLinear, pack_linears

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN is not in this torch")


def linear() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(48, 80, bias=False).requires_grad_(False)


def test_a_packed_linear_equals_pytorchs_in_inference():
    plain = linear()
    packed = PackedLinear.of(plain)
    for shape in [(8, 48), (8, 1, 48), (3, 7, 48)]:
        x = torch.randn(*shape)
        with torch.inference_mode():
            torch.testing.assert_close(packed(x), plain(x), rtol=1e-5, atol=1e-5)


def test_gradients_flow_through_a_packed_linear_into_its_input():
    """Training backpropagates through the frozen LM into a connector: oneDNN's packed linear has no backward,
    so an input that needs a gradient must take PyTorch's own path."""
    plain = linear()
    packed = PackedLinear.of(plain)
    x = torch.randn(4, 48, requires_grad=True)
    (grad_packed,) = torch.autograd.grad(packed(x).square().sum(), x)
    (grad_plain,) = torch.autograd.grad(plain(x).square().sum(), x)
    torch.testing.assert_close(grad_packed, grad_plain)


def test_a_packed_bfloat16_linear_equals_pytorchs_in_inference():
    """--dtype bfloat16 packs the LM's weights too: the same numbers as F.linear in bfloat16, within its rounding."""
    plain = linear().to(torch.bfloat16)
    packed = PackedLinear.of(plain)
    assert packed.packed.dtype == torch.bfloat16
    for shape in [(8, 48), (3, 7, 48)]:
        x = torch.randn(*shape, dtype=torch.bfloat16)
        with torch.inference_mode():
            torch.testing.assert_close(packed(x), plain(x), rtol=1.6e-2, atol=1e-2)


def test_pack_linears_swaps_fp32_and_bf16_linears_and_keeps_tied_weights_tied():
    model = torch.nn.Sequential(torch.nn.Embedding(80, 48), torch.nn.Linear(48, 80, bias=False),
                                torch.nn.Linear(48, 80).to(torch.bfloat16), torch.nn.Linear(48, 80).to(torch.float16))
    model[1].weight = model[0].weight  # an LM head tied to the embedding
    assert pack_linears(model) == 2
    assert isinstance(model[1], PackedLinear) and model[1].weight is model[0].weight
    assert isinstance(model[2], PackedLinear)
    assert type(model[3]) is torch.nn.Linear  # float16 stays as it was (no packed CPU kernel for it here)
