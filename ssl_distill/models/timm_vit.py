"""timm's ViT family behind the backbone contract (``student.arch=timm/<model name>``).

:class:`TimmViT` builds ``timm.create_model(name, pretrained=False, dynamic_img_size=True, num_classes=0, ...)``
and takes its parts as its own, so its ``state_dict()`` is timm's (plus ``mask_token``) and a timm weights file
loads as it is. What it adds (:class:`~ssl_distill.models.contract.Backbone`):

* iBOT's ``mask_token`` ``(1, D)``, a learned parameter that replaces masked patch embeddings before the position
  embedding is added, as in our ViT;
* any crop size (timm's dynamic image size: the position embedding is resampled per input size, RoPE models such
  as EVA-02 compute their rotary embedding for the grid);
* stochastic depth keyed by ``(seed, sample position, crop, block)`` like our ViT: timm's ``drop_path1/2`` are
  replaced by our :class:`~ssl_distill.models.stochastic_depth.DropPath` (streams ``2 i`` and ``2 i + 1``), which
  apply the forward pass's :class:`~ssl_distill.models.stochastic_depth.DropPlan`; timm's blocks compute a branch
  for every sample, so dropped branches are multiplied by 0 (``"mask"`` mode, the same draws as our ViT);
* layer ids for layer-wise lr decay, ``no_weight_decay``, intermediate layers and last-block attention.

Supported: models with a class token whose blocks are a sequence taking ``(B, T, D)`` tokens (timm's
``VisionTransformer``: ``vit_*``, ``deit3_*``, ``vit_*_dinov2``; ``Eva``: ``eva02_*``). Crop batches of different
sizes run one after the other (no packing).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ssl_distill.models.contract import FeatureDict, StateDict
from ssl_distill.models.names import timm_problem
from ssl_distill.models.stochastic_depth import DropPath, DropPlan
from ssl_distill.models.vit import LINEAR_WEIGHT_INITS, init_linears
from ssl_distill.models.vit_outputs import (
    block_indices,
    dispatch_forward,
    intermediate_outputs,
    output_dict,
    selected_outputs,
)

logger = logging.getLogger(__name__)
_TOKENS = ("cls_token", "reg_token", "pos_embed", "mask_token")
_STEM = ("patch_embed.", "norm_pre.", "rope.")
_HEADLESS = ("head", "head_drop", "fc_norm", "attn_pool")  # the classifier side, unused by a backbone


def create_timm_model(name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True, **kwargs)``; an unknown
    name or a model that is not one of timm's ViTs is a ValueError saying so (the config checks the same first)."""
    import timm

    problem = timm_problem(name)
    if problem is not None:
        raise ValueError(f"student.arch: {problem}")
    return timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True, **kwargs)


class TimmViT(nn.Module):
    """A timm ViT as a :class:`~ssl_distill.models.contract.Backbone` (see the module docstring).

    Args:
        name: timm model name (``vit_small_patch16_224``).
        img_size: the learned position grid's image size (``crops.global_crops_size``).
        patch_size, depth: override the model's (0 / None keeps timm's).
        drop_path_rate, drop_path_uniform: stochastic depth per block (uniform, or rising linearly from 0).
        weight_init: ``"trunc_normal"`` keeps timm's initialisation; ``"xavier"`` re-initialises every Linear and
            the patch embedding Xavier-uniform (MAE's, as :meth:`VisionTransformer.init_weights`).
        timm_kwargs: more arguments for ``timm.create_model``.
    """

    weights_layout = "timm"  # state-dict keys: timm's, plus mask_token

    def __init__(self, name: str, img_size: int = 224, patch_size: int | None = None, depth: int | None = None,
                 drop_path_rate: float = 0.0, drop_path_uniform: bool = False, weight_init: str = "trunc_normal",
                 **timm_kwargs: Any) -> None:
        super().__init__()
        kwargs = dict(img_size=img_size, **timm_kwargs)
        if patch_size:
            kwargs["patch_size"] = patch_size
        if depth:
            kwargs["depth"] = depth
        model = create_timm_model(name, **kwargs)
        self._adopt(name, model)
        self.timm_name = name
        self.grad_checkpointing = False
        self.mask_token = nn.Parameter(torch.zeros(1, self.embed_dim))
        self._install_drop_path(drop_path_rate, drop_path_uniform)
        if weight_init != "trunc_normal":
            w = self.patch_embed.proj.weight.data
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            init_linears(self, LINEAR_WEIGHT_INITS[weight_init])

    def _adopt(self, name: str, model: nn.Module) -> None:
        """Take ``model``'s parts (modules and direct parameters) as this module's, under timm's names."""
        problems = [what for what, bad in (
            ("no class token", getattr(model, "cls_token", None) is None),
            ("no sequence of blocks", not isinstance(getattr(model, "blocks", None), (nn.Sequential, nn.ModuleList))),
            ("no patch embedding", not hasattr(getattr(model, "patch_embed", None), "proj")),
            ("attention pooling", getattr(model, "attn_pool", None) is not None),
            ("a distillation token", getattr(model, "dist_token", None) is not None),
        ) if bad]
        if problems:
            raise ValueError(f"student.arch: timm/{name} has {', '.join(problems)}; use a timm ViT with a class token "
                             "(vit_*, deit3_*, vit_*_dinov2, eva02_*)")
        fc_norm = getattr(model, "fc_norm", None)
        # avg-pool models (eva02_*) normalise after pooling: their fc_norm is the final norm, applied per token
        keep = {"fc_norm"} if isinstance(model.norm, nn.Identity) and fc_norm is not None \
            and not isinstance(fc_norm, nn.Identity) else set()
        for child_name, child in model.named_children():
            if child_name not in _HEADLESS or child_name in keep:
                self.add_module(child_name, child)
        for pname, param in model.named_parameters(recurse=False):
            self.register_parameter(pname, param)
        if getattr(model, "reg_token", None) is None:
            self.register_parameter("reg_token", None)
        self.pos_embed: nn.Parameter | None = getattr(model, "pos_embed", None)
        self.num_prefix_tokens = int(model.num_prefix_tokens)
        self.num_register_tokens = self.num_prefix_tokens - 1
        self.no_embed_class = bool(model.no_embed_class)
        self.rope_mixed = bool(getattr(model, "rope_mixed", False))
        if not hasattr(self, "rope"):
            self.rope = None
        self.embed_dim = self.num_features = int(model.embed_dim)
        self.n_blocks = len(self.blocks)
        self.num_heads = int(self.blocks[0].attn.num_heads)
        self.patch_size = int(self.patch_embed.patch_size[0])

    def _install_drop_path(self, rate: float, uniform: bool) -> None:
        """Our keyed DropPath in place of timm's in every block with a positive rate (streams ``2 i``, ``2 i + 1``,
        as our ViT's blocks)."""
        rates = [rate] * self.n_blocks if uniform else torch.linspace(0, rate, self.n_blocks).tolist()
        for i, (blk, p) in enumerate(zip(self.blocks, rates)):
            blk.drop_path1 = DropPath(p, stream=2 * i) if p > 0 else nn.Identity()
            blk.drop_path2 = DropPath(p, stream=2 * i + 1) if p > 0 else nn.Identity()

    @property
    def final_norm(self) -> nn.Module:
        """The LayerNorm after the last block: timm's ``norm``, or ``fc_norm`` for avg-pool models."""
        fc_norm = self._modules.get("fc_norm")
        return fc_norm if fc_norm is not None else self.norm

    # ------------------------------------------------- what the optimizer reads
    def no_weight_decay(self) -> set[str]:
        """The tokens, every bias and every 1-D parameter (norms, LayerScale gammas): timm/BEiT practice."""
        return {n for n, p in self.named_parameters()
                if n in _TOKENS or n.startswith("rope.") or n.endswith(".bias") or p.ndim <= 1}

    def layer_id(self, name: str) -> int:
        """0 for the patch embedding, tokens and stem; ``i + 1`` for block ``i``; ``n_blocks + 1`` after."""
        if name in _TOKENS or name.startswith(_STEM):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.n_blocks + 1

    def fit_pretrained(self, sd: StateDict) -> StateDict:
        """A timm-layout state dict with its position embedding resampled onto this model's grid (timm's
        resampling, as its forward uses)."""
        from timm.layers import resample_abs_pos_embed

        pos = sd.get("pos_embed")
        if pos is None or self.pos_embed is None or pos.shape == self.pos_embed.shape:
            return sd
        prefix = 0 if self.no_embed_class else self.num_prefix_tokens
        side = int((pos.shape[1] - prefix) ** 0.5)
        grid = list(self.patch_embed.grid_size)
        logger.info("resampled the pretrained position embedding from a %dx%d to a %dx%d grid", side, side, *grid)
        return {**sd, "pos_embed": resample_abs_pos_embed(pos, grid, [side, side], prefix)}

    # ---------------------------------------------------------------- tokens
    def prepare_tokens_with_masks(self, x: Tensor, masks: Tensor | None = None) -> tuple[Tensor, Any]:
        """Images ``(B, C, H, W)`` (+ bool ``masks`` ``(B, N)``, True = ``mask_token``) -> tokens
        ``(B, 1 + R + N, D)`` with position embeddings, and the rotary embedding of the grid (None without)."""
        from timm.layers import resample_abs_pos_embed

        if x.ndim != 4 or x.shape[-2] % self.patch_size or x.shape[-1] % self.patch_size:
            raise ValueError(f"expected images (B, C, H, W) with H and W multiples of the patch size {self.patch_size}"
                             f", got shape {tuple(x.shape)}")
        x = self.patch_embed(x)  # (B, h, w, D): timm's dynamic image size
        B, h, w, D = x.shape
        if masks is not None:
            if masks.shape != (B, h * w) or masks.dtype != torch.bool:
                raise ValueError(f"masks must be a bool tensor of shape (batch, num_patches) = {(B, h * w)}, got "
                                 f"{masks.dtype} {tuple(masks.shape)}")
            x = torch.where(masks.view(B, h, w, 1), self.mask_token.to(x.dtype).view(1, 1, 1, D), x)
        x = x.reshape(B, h * w, D)
        prefix = [self.cls_token.expand(B, -1, -1)]
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(B, -1, -1))
        if self.pos_embed is not None:
            pos = resample_abs_pos_embed(self.pos_embed, new_size=(h, w), old_size=self.patch_embed.grid_size,
                                         num_prefix_tokens=0 if self.no_embed_class else self.num_prefix_tokens)
            if self.no_embed_class:
                x = torch.cat(prefix + [x + pos], dim=1)
            else:
                x = torch.cat(prefix + [x], dim=1) + pos
        else:
            x = torch.cat(prefix + [x], dim=1)
        rope = self.rope.get_embed(shape=(h, w)) if self.rope is not None else None
        return self.norm_pre(x), rope

    def _run_block(self, i: int, x: Tensor, rope: Any, plan: DropPlan | None) -> Tensor:
        """Block ``i`` on ``x`` with the stochastic-depth ``plan`` in its DropPaths for this call only (a
        checkpointed block's recomputation calls this again, so it replays the same draws)."""
        blk = self.blocks[i]
        drops = [d for d in (blk.drop_path1, blk.drop_path2) if isinstance(d, DropPath)]
        for d in drops:
            d.step_plan = plan
        try:
            if rope is None:
                return blk(x)
            return blk(x, rope=rope[i] if self.rope_mixed else rope)
        finally:
            for d in drops:
                d.step_plan = None

    def _run_blocks(self, x: Tensor, rope: Any, keys: Tensor | None, upto: int | None = None,
                    taken: dict[int, Tensor] | None = None) -> Tensor:
        """Blocks ``0 .. upto - 1`` (all by default); ``taken`` collects each block's output when given."""
        rates = {d.stream: d.drop_prob for blk in self.blocks for d in (blk.drop_path1, blk.drop_path2)
                 if isinstance(d, DropPath) and d.active}
        plan = DropPlan(rates, [(x.shape[0], 1)], keys, x.device, "mask") if rates else None
        ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for i in range(self.n_blocks if upto is None else upto):
            if ckpt:
                x = checkpoint(self._run_block, i, x, rope, plan, use_reentrant=False)
            else:
                x = self._run_block(i, x, rope, plan)
            if taken is not None:
                taken[i] = x
        return x

    # --------------------------------------------------------------- forward
    def forward_train(self, x_list: list[Tensor], masks_list: list[Tensor | None] | None = None,
                      select_patches: list[Tensor | None] | None = None,
                      sample_keys: list[Tensor | None] | None = None) -> list[FeatureDict]:
        """See :meth:`ssl_distill.models.contract.Backbone.forward_train`; each crop batch runs on its own."""
        n = len(x_list)
        for arg, value in (("masks", masks_list), ("select_patches", select_patches), ("sample_keys", sample_keys)):
            if value is not None and (not isinstance(value, (list, tuple)) or len(value) != n):
                raise ValueError(f"with a list of {n} image batches, {arg} must be None or a list of the same length "
                                 "(entries may be None)")
        masks_list = masks_list or [None] * n
        out = []
        for i, (x, m) in enumerate(zip(x_list, masks_list)):
            tokens, rope = self.prepare_tokens_with_masks(x, m)
            tokens = self._run_blocks(tokens, rope, sample_keys[i] if sample_keys is not None else None)
            sel = select_patches[i] if select_patches is not None else None
            if sel is None:
                out.append(output_dict(self.final_norm(tokens), tokens, m, self.num_register_tokens))
            else:
                out.append(selected_outputs(self.final_norm(tokens), sel, m, self.num_register_tokens))
        return out

    def forward_features(self, x: Tensor | list[Tensor], masks: Any = None) -> FeatureDict | list[FeatureDict]:
        """The feature dict of a batch ``(B, C, H, W)`` (or one per batch of a list), as our ViT's."""
        if isinstance(x, (list, tuple)):
            return self.forward_train(list(x), masks)
        return self.forward_train([x], [masks])[0]

    def forward(self, x: Tensor | list[Tensor], masks: Any = None, is_training: bool = False,
                **train_options: Any) -> Any:
        """CLS features ``(B, D)``, or the feature dict(s) with ``is_training`` (see the contract)."""
        return dispatch_forward(self, x, masks, is_training, train_options)

    def get_intermediate_layers(self, x: Tensor, n: int | Sequence[int] = 1, reshape: bool = False,
                                return_class_token: bool = False, norm: bool = True) -> tuple:
        """Patch tokens (and CLS tokens) of intermediate blocks, as our ViT's ``get_intermediate_layers``."""
        wanted = block_indices(n, self.n_blocks)
        tokens, rope = self.prepare_tokens_with_masks(x)
        taken: dict[int, Tensor] = {}
        self._run_blocks(tokens, rope, None, upto=max(wanted) + 1, taken=taken)
        return intermediate_outputs(x, [taken[i] for i in wanted], self.final_norm if norm else None,
                                    self.num_register_tokens, self.patch_size, reshape, return_class_token)

    def get_last_self_attention(self, x: Tensor) -> Tensor:
        """The last block's attention weights ``(B, heads, T, T)``: timm's own attention, run unfused once with
        the softmax output read where its attention dropout receives it."""
        tokens, rope = self.prepare_tokens_with_masks(x)
        tokens = self._run_blocks(tokens, rope, None, upto=self.n_blocks - 1)
        attn = self.blocks[-1].attn
        seen: list[Tensor] = []
        handle = attn.attn_drop.register_forward_hook(lambda _m, inp, _out: seen.append(inp[0]))
        fused, attn.fused_attn = attn.fused_attn, False
        try:
            self._run_block(self.n_blocks - 1, tokens, rope, None)
        finally:
            attn.fused_attn = fused
            handle.remove()
        return seen[0]


def timm_backbone(arch_name: str, **kwargs: Any) -> TimmViT:
    """``TimmViT`` for ``student.arch = timm/<name>`` (see :func:`ssl_distill.models.build.backbone_kwargs`)."""
    return TimmViT(arch_name, **kwargs)
