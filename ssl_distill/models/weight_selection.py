"""Weight selection: start a narrower, shallower ViT from a subset of a bigger trained ViT's weights.

Xu, Zhuang, Liu et al. 2024, "Initializing Models with Larger Ones" (ICLR 2024): every weight of the small model is
an element of the corresponding weight of the large one, chosen by *uniform* selection (evenly spaced indices) and
*consistently* (the same residual-stream channels in every layer, so the channels a block writes are the ones the
next reads); a shallower student takes the teacher's *first* blocks ("first-N layer selection", the paper's best).
Attention keeps whole heads (the student's head width must equal the teacher's: 64 in every ViT-S/B/L/g), so each
selected head computes exactly what it computed in the teacher up to the dropped channels. The paper reports that
this initialisation speeds up and improves the training of the small model; here it is the ``distill.student_init
= teacher_selection`` option (the student of a distillation starts from its teacher).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ssl_distill.models.resample import interpolate_pos_embed


class WeightSelectionError(ValueError):
    """The two models cannot be related by weight selection (the message names the difference)."""


def _even(n: int, m: int) -> Tensor:
    """``m`` evenly spaced indices in ``range(n)``, first and last included (``m <= n``)."""
    return torch.linspace(0, n - 1, m).round().long()


def selected_channels(big_dim: int, small_dim: int) -> Tensor:
    """The teacher's residual-stream channels the student keeps, in order (``small_dim`` evenly spaced)."""
    return _even(big_dim, small_dim)


def _check(big: nn.Module, small: nn.Module) -> None:
    problems = []
    if big.embed_dim // big.num_heads != small.embed_dim // small.num_heads:
        problems.append(f"head width {big.embed_dim // big.num_heads} vs {small.embed_dim // small.num_heads}")
    if small.embed_dim > big.embed_dim or small.n_blocks > big.n_blocks or small.num_heads > big.num_heads:
        problems.append(f"the student ({small.n_blocks} blocks x {small.embed_dim}) is not smaller than the teacher "
                        f"({big.n_blocks} x {big.embed_dim})")
    if big.patch_size != small.patch_size:
        problems.append(f"patch size {big.patch_size} vs {small.patch_size}")
    if type(big.blocks[0].mlp) is not type(small.blocks[0].mlp):
        problems.append(f"feed-forward {type(big.blocks[0].mlp).__name__} vs {type(small.blocks[0].mlp).__name__}")
    if small.num_register_tokens > big.num_register_tokens:
        problems.append(f"{small.num_register_tokens} registers vs the teacher's {big.num_register_tokens}")
    if problems:
        raise WeightSelectionError("cannot initialise the student by weight selection from the teacher: "
                                   + "; ".join(problems))


def _hidden_width(ffn: nn.Module) -> int:
    """Hidden width of an ``Mlp`` (fc1) or ``SwiGLUFFNFused`` (w12 stacks the two gates)."""
    return ffn.fc1.out_features if hasattr(ffn, "fc1") else ffn.w12.out_features // 2


@torch.no_grad()
def select_weights(big: nn.Module, small: nn.Module) -> dict[str, Tensor]:
    """The state dict for ``small`` selected from ``big`` (two :class:`~ssl_distill.models.vit.
    DinoVisionTransformer`); raises :class:`WeightSelectionError` when they differ in head width, patch size or
    feed-forward type, or ``small`` is not smaller. Position embeddings are resampled to ``small``'s grid."""
    _check(big, small)
    d_big, d = big.embed_dim, small.embed_dim
    chan = selected_channels(d_big, d)
    head_dim = d_big // big.num_heads
    heads = _even(big.num_heads, small.num_heads)
    head_chan = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads.tolist()])
    qkv_rows = torch.cat([head_chan + j * d_big for j in range(3)])
    big_hidden = _hidden_width(big.blocks[0].mlp)
    hidden = _even(big_hidden, _hidden_width(small.blocks[0].mlp))
    sel = {"chan": chan, "qkv_rows": qkv_rows, "head_chan": head_chan, "hidden": hidden,
           "w12_rows": torch.cat([hidden, hidden + big_hidden])}
    big_sd = big.state_dict()
    out: dict[str, Tensor] = {}
    missing = [n for n in small.state_dict() if n not in big_sd and not n.startswith("blocks.")]
    missing += [n for n in small.state_dict() if n.startswith("blocks.") and n not in big_sd]
    if missing:
        raise WeightSelectionError(f"the teacher has no {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"
                                   " (LayerScale, biases or registers differ)")
    for name, target in small.state_dict().items():
        src = big_sd[name]
        if name.startswith("blocks."):
            src = _select_block_tensor(name, src, sel)
        elif name == "register_tokens":
            src = src[:, _even(big.num_register_tokens, small.num_register_tokens)][..., chan]
        elif name == "pos_embed":
            src = src[..., chan]
            if src.shape != target.shape:
                side = small.patch_embed.grid_size
                src = interpolate_pos_embed(src, side, side, small.interpolate_offset, small.interpolate_antialias)
        else:  # cls/mask tokens, patch embedding (output channels), final norm
            src = src.index_select(0 if name.startswith("patch_embed") else src.dim() - 1, chan)
        if src.shape != target.shape:  # pragma: no cover - a layout this module does not know
            raise WeightSelectionError(f"weight selection of {name}: got {tuple(src.shape)}, "
                                       f"the student needs {tuple(target.shape)}")
        out[name] = src.clone()
    return out


def _select_block_tensor(name: str, src: Tensor, sel: dict[str, Tensor]) -> Tensor:
    """One tensor of block i of the student from block i of the teacher (first-N layer selection)."""
    chan = sel["chan"]
    rows = None
    if ".attn.qkv." in name:
        rows = sel["qkv_rows"]
    elif ".mlp.fc1." in name:
        rows = sel["hidden"]
    elif ".mlp.w12." in name:
        rows = sel["w12_rows"]
    if rows is not None:  # input projections: selected outputs (heads / hidden units) x selected channels
        src = src[rows]
        return src[:, chan] if src.dim() == 2 else src
    if name.endswith(".attn.proj.weight"):
        return src[chan][:, sel["head_chan"]]
    if name.endswith((".mlp.fc2.weight", ".mlp.w3.weight")):
        return src[chan][:, sel["hidden"]]
    return src.index_select(src.dim() - 1, chan)  # norms, LayerScale gammas, output biases
