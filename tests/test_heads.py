"""DINOHead and WeightNormLinear: key layout, weight normalisation, L2-normalised bottleneck."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssl_distill.models import DINOHead, WeightNormLinear


def _shapes(m: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def test_key_layout_matches_dinov2() -> None:
    head = DINOHead(32, 100, nlayers=3, hidden_dim=48, bottleneck_dim=16)
    assert _shapes(head) == {
        "mlp.0.weight": (48, 32), "mlp.0.bias": (48,),
        "mlp.2.weight": (48, 48), "mlp.2.bias": (48,),
        "mlp.4.weight": (16, 48), "mlp.4.bias": (16,),
        "last_layer.weight_g": (100, 1), "last_layer.weight_v": (100, 16),
    }  # fmt: skip
    assert isinstance(head.mlp[1], nn.GELU)
    assert isinstance(head.mlp[3], nn.GELU)


def test_nlayers1_bn_and_no_bias_variants() -> None:
    h1 = DINOHead(32, 10, nlayers=1, hidden_dim=48, bottleneck_dim=16)
    assert _shapes(h1) == {"mlp.0.weight": (16, 32), "mlp.0.bias": (16,),
                           "last_layer.weight_g": (10, 1), "last_layer.weight_v": (10, 16)}
    hb = DINOHead(32, 10, nlayers=3, hidden_dim=48, bottleneck_dim=16, use_bn=True)
    assert [type(m) for m in hb.mlp] == [nn.Linear, nn.BatchNorm1d, nn.GELU, nn.Linear, nn.BatchNorm1d, nn.GELU,
                                         nn.Linear]
    assert {"mlp.1.running_mean", "mlp.4.running_var", "mlp.6.weight"} <= set(hb.state_dict())
    assert hb(torch.randn(4, 32)).shape == (4, 10)
    hn = DINOHead(32, 10, nlayers=2, hidden_dim=48, bottleneck_dim=16, mlp_bias=False)
    assert set(hn.state_dict()) == {"mlp.0.weight", "mlp.2.weight", "last_layer.weight_g", "last_layer.weight_v"}
    with pytest.raises(ValueError, match="nlayers"):
        DINOHead(32, 10, nlayers=0)


def test_init() -> None:
    torch.manual_seed(0)
    head = DINOHead(256, 64, hidden_dim=512, bottleneck_dim=128)
    for i in (0, 2, 4):
        assert torch.count_nonzero(head.mlp[i].bias) == 0
        assert abs(head.mlp[i].weight.std().item() - 0.02) < 0.003
    assert torch.equal(head.last_layer.weight_g, torch.ones(64, 1))


def test_weight_norm_rows_and_reference_parametrization() -> None:
    torch.manual_seed(0)
    wn = WeightNormLinear(16, 6)
    with torch.no_grad():
        wn.weight_g.uniform_(0.5, 2.0)
    w = wn.weight
    for r in range(6):
        torch.testing.assert_close(w[r].norm(), wn.weight_g[r, 0])
    # independent reference: torch's own weight-norm parametrization with the same g and v
    ref = torch.nn.utils.parametrizations.weight_norm(nn.Linear(16, 6, bias=False))
    with torch.no_grad():
        ref.parametrizations.weight.original0.copy_(wn.weight_g)
        ref.parametrizations.weight.original1.copy_(wn.weight_v)
    x = torch.randn(5, 16)
    torch.testing.assert_close(wn(x), ref(x))
    wn(x).sum().backward()
    assert wn.weight_g.grad is not None
    assert wn.weight_v.grad is not None


def test_forward_normalises_bottleneck_before_last_layer() -> None:
    torch.manual_seed(0)
    head = DINOHead(32, 20, hidden_dim=48, bottleneck_dim=16)
    x = torch.randn(7, 32)
    seen = {}
    head.last_layer.register_forward_pre_hook(lambda m, inp: seen.update(z=inp[0]))
    out = head(x)
    assert out.shape == (7, 20)
    # explicit: mlp by hand, divide by the L2 norm, weight = g * v / ||v|| row by row
    h = F.gelu(x @ head.mlp[0].weight.T + head.mlp[0].bias)
    h = F.gelu(h @ head.mlp[2].weight.T + head.mlp[2].bias)
    z = h @ head.mlp[4].weight.T + head.mlp[4].bias
    z = z / z.pow(2).sum(-1, keepdim=True).sqrt()
    torch.testing.assert_close(seen["z"], z)
    torch.testing.assert_close(seen["z"].norm(dim=-1), torch.ones(7))
    v, g = head.last_layer.weight_v, head.last_layer.weight_g
    W = torch.stack([g[r, 0] * v[r] / v[r].pow(2).sum().sqrt() for r in range(20)])
    torch.testing.assert_close(out, z @ W.T)
    # prototypes have unit norm at init, so scores are cosines in [-1, 1]
    assert out.abs().max() <= 1 + 1e-5
