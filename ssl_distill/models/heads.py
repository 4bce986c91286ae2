"""DINO projection head: MLP -> L2-normalised bottleneck -> weight-normalised prototypes.

As in DINO (Caron et al., 2021) and DINOv2 (Oquab et al., 2023). The last layer uses weight normalisation
(Salimans & Kingma, 2016) with parameters named ``weight_g``/``weight_v`` like the official training checkpoints.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _WeightNorm(torch.autograd.Function):
    """``w = g * v / ||v||`` (row-wise) with a hand-written backward.

    With ``65536 x 256`` prototypes every elementwise pass over the weight is a large memory sweep; autograd's
    version of the expression allocates about ten weight-sized buffers per step, this one two (``w`` forward,
    ``grad_v`` backward): ``grad_g = (grad_w . v) / n`` and
    ``grad_v = (g / n) * grad_w - (g * (grad_w . v) / n^3) * v``.
    """

    @staticmethod
    def forward(ctx, g: Tensor, v: Tensor) -> Tensor:  # type: ignore[override]
        norm = torch.linalg.vector_norm(v, dim=1, keepdim=True)
        ctx.save_for_backward(g, v, norm)
        return v * (g / norm)

    @staticmethod
    def backward(ctx, grad_w: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        g, v, norm = ctx.saved_tensors
        with torch.autocast(v.device.type, enabled=False):  # full-precision row dot products
            dot = torch.bmm(grad_w.to(v.dtype).unsqueeze(1), v.unsqueeze(2)).view(-1, 1)  # row-wise grad_w . v
            grad_v = grad_w * (g / norm)
            grad_v.addcmul_(v, g * dot / norm.pow(3), value=-1.0)
        return dot / norm, grad_v


class WeightNormLinear(nn.Module):
    """Bias-free Linear with ``weight = weight_g * weight_v / ||weight_v||`` (row-wise norm).

    Parameters: ``weight_g`` ``(out, 1)`` (filled with 1) and ``weight_v`` ``(out, in)`` (default Linear init), the
    layout ``torch.nn.utils.weight_norm(nn.Linear(in, out, bias=False))`` produces, without its deprecated hooks
    (plain parameters, FSDP friendly). ``(..., in)`` -> ``(..., out)``.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_g = nn.Parameter(torch.empty(out_features, 1))
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))  # nn.Linear's default init
        nn.init.ones_(self.weight_g)

    @property
    def weight(self) -> Tensor:
        """Effective ``(out, in)`` weight; each row has L2 norm ``weight_g`` (see :class:`_WeightNorm`)."""
        return _WeightNorm.apply(self.weight_g, self.weight_v)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def _build_mlp(
    nlayers: int, in_dim: int, bottleneck_dim: int, hidden_dim: int, use_bn: bool, bias: bool
) -> nn.Sequential:
    if nlayers == 1:
        return nn.Sequential(nn.Linear(in_dim, bottleneck_dim, bias=bias))
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim, bias=bias)]
    if use_bn:
        layers.append(nn.BatchNorm1d(hidden_dim))
    layers.append(nn.GELU())
    for _ in range(nlayers - 2):
        layers.append(nn.Linear(hidden_dim, hidden_dim, bias=bias))
        if use_bn:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers.append(nn.GELU())
    layers.append(nn.Linear(hidden_dim, bottleneck_dim, bias=bias))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """DINO / iBOT projection head: ``(B, in_dim)`` -> ``(B, out_dim)`` prototype scores.

    ``mlp`` (``nlayers`` Linear layers with GELU, optional BatchNorm) maps to a ``bottleneck_dim`` vector that is
    L2-normalised and scored against ``out_dim`` weight-normalised prototypes (``last_layer``).
    Keys match DINOv2: ``mlp.0.*, mlp.2.*, mlp.4.*`` (no BN), ``last_layer.weight_g``, ``last_layer.weight_v``.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        mlp_bias: bool = True,
        use_bn: bool = False,
    ) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"DINOHead needs nlayers >= 1, got {nlayers}")
        self.mlp = _build_mlp(nlayers, in_dim, bottleneck_dim, hidden_dim, use_bn, mlp_bias)
        self.mlp.apply(self._init_weights)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        """Names of the parameters not to decay: the biases. BatchNorm weights (``use_bn``) and the prototypes'
        ``weight_g`` are decayed, as in DINOv2."""
        return {name for name, _ in self.named_parameters() if name.rsplit(".", 1)[-1] == "bias"}

    def last_layer_names(self) -> set[str]:
        """The prototypes' parameters (``last_layer``), frozen during the first ``optim.freeze_last_layer_epochs``."""
        return {f"last_layer.{name}" for name, _ in self.last_layer.named_parameters()}

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_dim)`` -> ``(B, out_dim)`` prototype scores."""
        x = self.mlp(x)
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        x = F.normalize(x, p=2, dim=-1, eps=eps)
        return self.last_layer(x)
