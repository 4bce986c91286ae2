"""The backbone contract: everything training, evaluation and the hub may ask of a backbone, in one place.

Two implementations: our :class:`~ssl_distill.models.vit.VisionTransformer` (the official DINOv2 state-dict
layout) and :class:`~ssl_distill.models.timm_vit.TimmViT` (timm's ViT family, ``student.arch=timm/<name>``). The
rest of the code reaches a backbone only through these members (docs/ARCHITECTURE.md "What the training code asks
of a backbone"); a new backbone that offers them trains, checkpoints, exports and evaluates unchanged.

Who reads what:

* the training step (``train/meta_arch.py``, ``train/distill_arch.py``): :meth:`Backbone.forward` with
  ``is_training=True`` and a list of crop batches (multi-crop; iBOT ``masks`` replace patch embeddings with
  ``mask_token``; ``select_patches``: the patch tokens a loss reads; ``sample_keys``: the keyed stochastic-depth
  draws, so a resume replays them), ``embed_dim`` for the heads, ``mask_token`` (its device is the model's);
* optimizer groups (``train/optim.py``): :meth:`no_weight_decay`, :meth:`layer_id` and ``n_blocks`` (layer-wise
  lr decay), ``patch_embed`` (its parameters take ``optim.patch_embed_lr_mult``);
* FSDP2 and activation checkpointing (``train/setup.py``): ``blocks``, the units that are sharded, and
  ``grad_checkpointing``;
* continued pretraining and the hub (``train/pretrained.py``, ``hub/resolve.py``): ``weights_layout`` (which
  state-dict layout files are converted to) and :meth:`fit_pretrained`;
* evaluation and attention maps (``eval/``, ``viz/``): :meth:`forward_features`, :meth:`get_intermediate_layers`,
  :meth:`get_last_self_attention`, ``patch_size`` and ``num_register_tokens``.

Feature dicts (one per crop batch) hold ``x_norm_clstoken`` ``(B, D)`` and ``masks``, plus either
``x_norm_patchtokens`` ``(B, N, D)``, ``x_norm_regtokens`` ``(B, R, D)`` and ``x_prenorm`` ``(B, 1 + R + N, D)``, or,
for a batch with ``select_patches``, ``x_norm_selected_patchtokens`` ``(len(index), D)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

from ssl_distill.models.vit_outputs import FeatureDict

__all__ = ["Backbone", "FeatureDict", "StateDict", "check_backbone"]
StateDict = dict[str, Tensor]


@runtime_checkable
class Backbone(Protocol):
    """A ViT backbone as the rest of ssl_distill uses it (see the module docstring). Tokens are ordered
    ``[CLS, registers (R), patches (N)]``; images ``(B, 3, H, W)`` of any size that is a multiple of
    ``patch_size``."""

    embed_dim: int
    patch_size: int
    num_register_tokens: int
    n_blocks: int
    blocks: nn.Module  # iterable of the transformer blocks: FSDP2 units, activation-checkpointing units
    patch_embed: nn.Module  # its parameters (``patch_embed.*``) learn at optim.patch_embed_lr_mult
    mask_token: nn.Parameter  # iBOT's learned token, ``(1, D)``
    grad_checkpointing: bool  # recompute each block's activations in the backward pass
    weights_layout: str  # "dinov2" or "timm": the layout of state_dict(); files are converted to it

    def forward(self, x: Tensor | list[Tensor], masks: Any = None, is_training: bool = False,
                **train_options: Any) -> Any:
        """``(B, D)`` CLS features; with ``is_training`` the feature dict(s); ``train_options``
        (``select_patches``, ``sample_keys``) go to :meth:`forward_train` (through ``forward``, so DDP / FSDP
        wrappers see the training call)."""
        ...

    def forward_train(self, x_list: list[Tensor], masks_list: list[Tensor | None] | None = None,
                      select_patches: list[Tensor | None] | None = None,
                      sample_keys: list[Tensor | None] | None = None) -> list[FeatureDict]:
        """One feature dict per crop batch; ``masks_list`` bool ``(B, N)`` per batch (True = masked);
        ``select_patches`` 1-D indices into a batch's flattened ``(B * N)`` patch grid;
        ``sample_keys`` int64 ``(B,)`` per batch: stochastic-depth keys (block ``i``'s branch ``b`` draws with
        stream ``2 i + b``, :mod:`~ssl_distill.models.stochastic_depth`)."""
        ...

    def forward_features(self, x: Tensor | list[Tensor], masks: Any = None) -> FeatureDict | list[FeatureDict]:
        """The feature dict of a batch (or one per batch of a list)."""
        ...

    def get_intermediate_layers(self, x: Tensor, n: int | Sequence[int] = 1, reshape: bool = False,
                                return_class_token: bool = False, norm: bool = True) -> tuple:
        """Patch tokens (and CLS tokens) of the last ``n`` blocks or of the blocks listed, as in DINOv2."""
        ...

    def get_last_self_attention(self, x: Tensor) -> Tensor:
        """The last block's attention weights ``(B, heads, T, T)``, ``T = 1 + R + N``."""
        ...

    def no_weight_decay(self) -> set[str]:
        """Parameter names not to decay (tokens, biases, norms, LayerScale)."""
        ...

    def layer_id(self, name: str) -> int:
        """Depth of parameter ``name`` for layer-wise lr decay: 0 patch embedding and tokens, ``i + 1`` block
        ``i``, ``n_blocks + 1`` the final norm."""
        ...

    def fit_pretrained(self, sd: StateDict) -> StateDict:
        """A state dict in :attr:`weights_layout` made loadable for continued pretraining: the position embedding
        resampled onto this backbone's grid (and what else the layout needs, e.g. a classifier dropped)."""
        ...


def check_backbone(model: Any) -> Backbone:
    """``model`` if it offers the whole contract, else a TypeError naming the missing members."""
    missing = [name for name in _MEMBERS if not hasattr(model, name)]
    if missing:
        raise TypeError(f"{type(model).__name__} is not a backbone: it lacks {', '.join(missing)} "
                        "(ssl_distill/models/contract.py lists what a backbone offers)")
    return model


_MEMBERS = ("embed_dim", "patch_size", "num_register_tokens", "n_blocks", "blocks", "patch_embed", "mask_token",
            "grad_checkpointing", "weights_layout", "forward", "forward_train", "forward_features",
            "get_intermediate_layers", "get_last_self_attention", "no_weight_decay", "layer_id", "fit_pretrained")
