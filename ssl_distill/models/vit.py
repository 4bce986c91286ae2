"""Vision Transformer backbone with the DINOv2 state-dict layout.

ViT (Dosovitskiy et al., 2021) as trained by DINOv2 (Oquab et al., 2023): iBOT mask tokens (Zhou et al., 2022),
register tokens (Darcet et al., 2024), LayerScale, bicubic position-embedding interpolation with DINOv2's
``interpolate_offset``. Official DINOv2 checkpoints load with ``strict=True``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ssl_distill.models.attention import check_attn_impl
from ssl_distill.models.layers import FFN_LAYERS, Block, LayerScale, PatchEmbed
from ssl_distill.models.names import VIT_ARCHS, WEIGHT_INITS
from ssl_distill.models.packing import concat_keys, pack_tokens, selected_token_rows, unpack_tokens
from ssl_distill.models.resample import interpolate_pos_embed
from ssl_distill.models.stochastic_depth import DropPlan, is_dropping, resolve_drop_path_mode
from ssl_distill.models.vit_outputs import (
    FeatureDict,
    block_indices,
    dispatch_forward,
    intermediate_outputs,
    output_dict,
)

logger = logging.getLogger(__name__)
_TOKENS = ("cls_token", "pos_embed", "register_tokens", "mask_token")


# Linear-weight init per ``weight_init`` mode (names: models/names.py): timm / DINOv2 (trunc-normal 0.02) and MAE
# (Xavier-uniform)
LINEAR_WEIGHT_INITS: dict[str, Callable[[Tensor], Any]] = {
    "trunc_normal": partial(nn.init.trunc_normal_, std=0.02),
    "xavier": nn.init.xavier_uniform_,
}


def init_linears(model: nn.Module, weight_init: Callable[[Tensor], Any]) -> None:
    """Every Linear of ``model``: ``weight_init`` on the weight, zero bias."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            weight_init(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


class VisionTransformer(nn.Module):
    """ViT backbone; see :func:`forward_features` for the outputs. Satisfies the backbone contract
    (:class:`~ssl_distill.models.contract.Backbone`).

    Tokens are ordered ``[CLS, registers (R), patches (N)]``. The learned position embedding covers CLS and an
    ``img_size / patch_size`` square patch grid and is bicubically interpolated for other input sizes (the CLS
    position is added before the registers are inserted, so registers carry no position). ``head`` is Identity.
    """

    weights_layout = "dinov2"  # state-dict keys: the official DINOv2 layout

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        ffn_bias: bool = True,
        proj_bias: bool = True,
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = False,
        drop_path_mode: str = "auto",
        init_values: float | None = None,
        ffn_layer: str = "mlp",
        num_register_tokens: int = 0,
        interpolate_antialias: bool = False,
        interpolate_offset: float = 0.1,
        attn_impl: str = "auto",
        packed: bool = True,
        grad_checkpointing: bool = False,
        weight_init: str = "trunc_normal",
    ) -> None:
        super().__init__()
        if ffn_layer not in FFN_LAYERS:
            raise ValueError(f"unknown ffn_layer {ffn_layer!r}; choose one of {', '.join(FFN_LAYERS)}")
        check_attn_impl(attn_impl)
        resolve_drop_path_mode(drop_path_mode, drop_path_rate, "cpu")  # a wrong name fails here, not in training
        if num_register_tokens < 0:
            raise ValueError(f"num_register_tokens must be >= 0, got {num_register_tokens}")
        self.num_features = self.embed_dim = embed_dim
        self.num_tokens = 1
        self.n_blocks = depth
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset
        self.packed = packed  # one packed pass over crops of several resolutions (see _run_blocks)
        self.grad_checkpointing = grad_checkpointing  # recompute each block's activations in backward
        self.drop_path_mode = drop_path_mode  # how dropped branches are skipped (DropPlan)

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.num_tokens, embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        )
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))

        if drop_path_uniform:
            dpr = [drop_path_rate] * depth
        else:
            dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth, device="cpu")]
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, proj_bias=proj_bias, ffn_bias=ffn_bias,
                  drop_path=dpr[i], init_values=init_values, ffn_layer=ffn_layer, attn_impl=attn_impl, index=i,
                  drop_path_mode=drop_path_mode)
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Identity()
        self.init_weights(weight_init)

    def init_weights(self, mode: str = "trunc_normal") -> None:
        """Initial weights. ``trunc_normal`` (DINOv2 and timm, the reference): pos_embed trunc-normal(0.02),
        cls/register tokens normal(1e-6), mask token 0, Linear trunc-normal(0.02) with zero bias, the patch
        embedding PyTorch's conv default. ``xavier`` (MAE, He et al. 2022, and lightly's
        ``MaskedVisionTransformerTIMM``): Linear layers and the patch embedding (as the Linear it is)
        Xavier-uniform, the CLS token normal(0.02), the rest as ``trunc_normal``; its residual branches start
        2-4x stronger, which a short run on small data learns from faster (README "Small data"). LayerScale
        gammas keep ``init_values`` either way."""
        if mode not in WEIGHT_INITS:
            raise ValueError(f"unknown weight_init {mode!r}; choose one of {', '.join(WEIGHT_INITS)}")
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=0.02 if mode == "xavier" else 1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        nn.init.zeros_(self.mask_token)
        if mode == "xavier":
            w = self.patch_embed.proj.weight.data
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        init_linears(self, LINEAR_WEIGHT_INITS[mode])

    def set_attn_impl(self, name: str) -> None:
        """Switch the attention kernel of every block (``"auto"``, ``"sdpa"``, ``"xformers"``, ``"math"``)."""
        check_attn_impl(name)
        for blk in self.blocks:
            blk.attn.set_impl(name)

    # ------------------------------------------------- what the optimizer reads (timm's model API)
    def no_weight_decay(self) -> set[str]:
        """Names of the parameters not to decay: the learned tokens, biases, LayerNorm and LayerScale parameters."""
        names = {n for n in _TOKENS if getattr(self, n) is not None}
        for module_name, module in self.named_modules():
            for name, _ in module.named_parameters(recurse=False):
                if name == "bias" or isinstance(module, (nn.LayerNorm, LayerScale)):
                    names.add(f"{module_name}.{name}" if module_name else name)
        return names

    def layer_id(self, name: str) -> int:
        """Depth of parameter ``name`` for layer-wise lr decay: 0 for the patch embedding and the tokens, ``i + 1``
        for block ``i``, ``len(blocks) + 1`` (the largest) for the final norm."""
        if name in _TOKENS or name.startswith("patch_embed."):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return len(self.blocks) + 1

    def fit_pretrained(self, sd: dict[str, Tensor]) -> dict[str, Tensor]:
        """A DINOv2-layout state dict with its position embedding resampled onto this model's grid (the
        reference's bicubic interpolation; a released 518 px model has a 37x37 grid, at 224 px this one 16x16)."""
        pos, want = sd.get("pos_embed"), self.pos_embed
        if pos is None or pos.shape == want.shape or pos.shape[-1] != want.shape[-1]:
            return sd  # nothing to do, or a width mismatch that strict loading reports with its fix
        side = self.patch_embed.grid_size
        resized = interpolate_pos_embed(pos, side, side, self.interpolate_offset, self.interpolate_antialias)
        logger.info("resampled the pretrained position embedding from %d to %d positions (%dx%d grid)",
                    pos.shape[1], resized.shape[1], side, side)
        return {**sd, "pos_embed": resized}

    # ---------------------------------------------------------------- tokens
    def interpolate_pos_encoding(self, x: Tensor, w: int, h: int) -> Tensor:
        """Position embedding ``(1, 1 + N, D)`` for tokens ``x`` ``(B, 1 + N, D)`` of an image with ``w`` rows and
        ``h`` columns of pixels (DINOv2 naming), bicubically resampled from the learned square grid
        (:func:`~ssl_distill.models.resample.interpolate_pos_embed`)."""
        if x.shape[1] - 1 == self.pos_embed.shape[1] - 1 and w == h:
            return self.pos_embed
        return interpolate_pos_embed(self.pos_embed, w // self.patch_size, h // self.patch_size,
                                     self.interpolate_offset, self.interpolate_antialias).to(x.dtype)

    def prepare_tokens_with_masks(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        """Images ``(B, C, H, W)`` (+ bool ``masks`` ``(B, N)``, True = replace by ``mask_token``) -> tokens
        ``(B, 1 + R + N, D)`` ordered ``[CLS, registers, patches]`` with position embeddings added."""
        B, nc, w, h = x.shape
        x = self.patch_embed(x)
        if masks is not None:
            if masks.shape != x.shape[:2]:
                raise ValueError(
                    f"masks must have shape (batch, num_patches) = {tuple(x.shape[:2])}, got {tuple(masks.shape)}"
                )
            if masks.dtype != torch.bool:
                raise TypeError(f"masks must be a bool tensor (True = masked patch), got dtype {masks.dtype}")
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, w, h)
        if self.register_tokens is not None:
            x = torch.cat((x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]), dim=1)
        return x

    def _run_blocks(self, xs: list[Tensor], rows: Tensor | None = None,
                    keys: list[Tensor | None] | None = None) -> list[Tensor] | Tensor:
        """All blocks over a list of token batches (one per resolution).

        With ``packed`` (the default) and several batches, their tokens are concatenated once into a ``(T, D)``
        matrix that every block processes in one pass (norms, linears and MLP over all tokens; attention per
        resolution); otherwise each block runs per batch. With ``grad_checkpointing`` (and autograd recording),
        each block's activations are recomputed in the backward pass instead of stored (the stochastic-depth plan
        is an input of the block, so the recomputation replays the same draws).

        ``rows``: token rows of the packed ``(T, D)`` matrix whose final output is wanted; the last block then
        computes only those (:meth:`Block.forward`) and the result is ``(len(rows), D)``. ``keys``: per batch, the
        samples' stochastic-depth keys (see :meth:`forward_train`), from which the draws of all blocks are made
        once, here (:class:`DropPlan`).
        """
        ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        last = len(self.blocks) - 1
        pack = self.packed and len(xs) > 1
        plan = self._drop_plan(xs, keys, per_sample=len(xs) == 1)
        if pack:
            x, layout = pack_tokens(xs)
            for i, blk in enumerate(self.blocks):
                kwargs = {"rows": rows} if rows is not None and i == last else {}
                x = self._call_block(blk, x, ckpt, layout=layout, plan=plan, **kwargs)
            return x if rows is not None else unpack_tokens(x, layout)
        for blk in self.blocks if rows is None else self.blocks[:last]:
            xs = self._call_block(blk, xs, ckpt, plan=plan)
        if rows is None:
            return xs
        x, layout = pack_tokens(xs)
        return self._call_block(self.blocks[last], x, ckpt, layout=layout, rows=rows, plan=plan)

    def _drop_plan(self, xs: list[Tensor], keys: list[Tensor | None] | None, per_sample: bool) -> DropPlan | None:
        """The stochastic-depth draws of every block for this forward pass (None when nothing drops), for the rows
        the blocks will see: packed ``[(B_i, N_i)]``, or ``[(B, 1)]`` (``per_sample``) for one unpacked batch."""
        rates = {d.stream: d.drop_prob for blk in self.blocks for d in (blk.drop_path1, blk.drop_path2)
                 if is_dropping(d)}
        if not rates:
            return None
        layout = [(x.shape[0], 1 if per_sample else x.shape[1]) for x in xs]
        return DropPlan(rates, layout, concat_keys(keys, len(xs)), xs[0].device, self.drop_path_mode)

    @staticmethod
    def _call_block(blk: nn.Module, x: Any, ckpt: bool, **kwargs: Any) -> Any:
        """``blk(x, **kwargs)`` through ``__call__`` (so FSDP2 / hooks see it), checkpointed if ``ckpt``."""
        if ckpt:
            return checkpoint(blk, x, use_reentrant=False, **kwargs)
        return blk(x, **kwargs)

    def _output_dict(self, x: Tensor, masks: Tensor | None) -> FeatureDict:
        return output_dict(self.norm(x), x, masks, self.num_register_tokens)

    # --------------------------------------------------------------- forward
    def forward_features(self, x: Tensor | list[Tensor], masks: Tensor | list[Tensor | None] | None = None
                         ) -> FeatureDict | list[FeatureDict]:
        """Features of a batch ``x`` ``(B, C, H, W)`` with optional bool ``masks`` ``(B, N)``.

        Returns a dict: ``x_norm_clstoken`` ``(B, D)``, ``x_norm_regtokens`` ``(B, R, D)``,
        ``x_norm_patchtokens`` ``(B, N, D)``, ``x_prenorm`` ``(B, 1 + R + N, D)`` and ``masks``.
        As in the reference, ``x`` may be a list of batches of different resolutions with a matching list of masks
        (entries may be None); the result is then a list of such dicts (:meth:`forward_features_list`).
        """
        if isinstance(x, (list, tuple)):
            return self.forward_features_list(list(x), masks)
        if isinstance(masks, (list, tuple)):
            raise TypeError("a list of masks needs a list of image batches; pass masks as one (B, N) tensor")
        return self.forward_train([x], [masks])[0]

    def forward_features_list(self, x_list: list[Tensor], masks_list: list[Tensor | None] | None = None
                              ) -> list[FeatureDict]:
        """:meth:`forward_features` for a list of batches: one feature dict per batch. Attention runs per
        resolution; everything else runs over the tokens of all batches at once (``packed``)."""
        return self.forward_train(x_list, masks_list)

    def forward_train(
        self, x_list: list[Tensor], masks_list: list[Tensor | None] | None = None,
        select_patches: list[Tensor | None] | None = None, sample_keys: list[Tensor | None] | None = None,
    ) -> list[FeatureDict]:
        """The training forward over a list of crop batches: one dict per batch, as :meth:`forward_features`.

        ``select_patches`` (one entry per batch; None = everything): a 1-D index tensor into the batch's flattened
        ``(B * N)`` patch grid. Only the CLS tokens and those patches are then computed by the last block, and that
        batch's dict holds ``x_norm_clstoken`` ``(B, D)``, ``x_norm_selected_patchtokens`` ``(len(index), D)`` (in
        index order) and ``masks``: the values of ``x_norm_patchtokens.flatten(0, 1)[index]``, with the last
        block's projection and MLP work cut to the rows a loss reads (an empty index keeps the CLS tokens only).

        ``sample_keys`` (one entry per batch, int64 ``(B,)``): the keys of the samples' stochastic-depth draws
        (:func:`~ssl_distill.models.stochastic_depth.sample_keys`), which make them a function of the sample
        rather than of torch's RNG state; None draws from torch's generator.
        """
        if masks_list is None:
            masks_list = [None] * len(x_list)
        for name, value in (("masks", masks_list), ("select_patches", select_patches), ("sample_keys", sample_keys)):
            if value is not None and (not isinstance(value, (list, tuple)) or len(value) != len(x_list)):
                raise ValueError(f"with a list of {len(x_list)} image batches, {name} must be None or a list of the "
                                 "same length (entries may be None)")
        xs = [self.prepare_tokens_with_masks(x, m) for x, m in zip(x_list, masks_list)]
        if select_patches is None:
            return [self._output_dict(x, m) for x, m in zip(self._run_blocks(xs, keys=sample_keys), masks_list)]
        rows, counts = selected_token_rows(xs, select_patches, self.num_register_tokens)
        out = self._run_blocks(xs, rows, sample_keys).split(counts)
        result = []
        for x_out, x_in, m, sel in zip(out, xs, masks_list, select_patches):
            if sel is None:  # everything was kept for this batch
                result.append(self._output_dict(x_out.view(x_in.shape), m))
            else:
                b, x_norm = x_in.shape[0], self.norm(x_out)
                result.append({"x_norm_clstoken": x_norm[:b], "x_norm_selected_patchtokens": x_norm[b:], "masks": m})
        return result

    def forward(
        self, x: Tensor | list[Tensor], masks: Tensor | list[Tensor | None] | None = None, is_training: bool = False,
        **train_options: Any,
    ) -> Tensor | list[Tensor] | FeatureDict | list[FeatureDict]:
        """``head(x_norm_clstoken)`` ``(B, D)`` (head is Identity), or the feature dict(s) when ``is_training``.

        ``train_options`` (``select_patches``, ``sample_keys``; list input and ``is_training=True`` only) go to
        :meth:`forward_train` — through ``forward`` so that DDP / FSDP wrappers see the training call.
        """
        return dispatch_forward(self, x, masks, is_training, train_options, self.head)

    def get_intermediate_layers(
        self,
        x: Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple[Tensor, ...] | tuple[tuple[Tensor, Tensor], ...]:
        """Patch tokens of intermediate blocks, as in DINOv2.

        Args:
            x: images ``(B, C, H, W)``.
            n: int -> the last ``n`` blocks; sequence -> those block indices (output in the given order).
            reshape: return ``(B, D, H/p, W/p)`` maps instead of ``(B, N, D)`` tokens.
            return_class_token: return ``(patch_tokens, cls_token (B, D))`` pairs.
            norm: apply the final LayerNorm to each output.

        Returns:
            a tuple with one entry per requested block (CLS and register tokens stripped from patch outputs).
        """
        wanted = block_indices(n, len(self.blocks))
        tokens = self.prepare_tokens_with_masks(x)
        taken: dict[int, Tensor] = {}
        for i, blk in enumerate(self.blocks[: max(wanted) + 1]):
            tokens = blk(tokens)
            if i in wanted:
                taken[i] = tokens
        return intermediate_outputs(x, [taken[i] for i in wanted], self.norm if norm else None,
                                    self.num_register_tokens, self.patch_size, reshape, return_class_token)

    def get_last_self_attention(self, x: Tensor) -> Tensor:
        """Attention weights ``(B, H, T, T)`` of the last block (T = 1 + R + N), e.g. for CLS attention maps."""
        tokens = self.prepare_tokens_with_masks(x)
        for blk in self.blocks[:-1]:
            tokens = blk(tokens)
        last = self.blocks[-1]
        _, weights = last.attn(last.norm1(tokens), return_attention=True)
        return weights


def _vit(name: str, patch_size: int, kwargs: dict[str, Any]) -> VisionTransformer:
    """Shared factory body: the architecture of ``name`` in the table (models/names.py); ``kwargs`` may override
    it (e.g. ``depth`` in tests)."""
    spec = VIT_ARCHS[name]
    arch = dict(embed_dim=spec.embed_dim, depth=spec.depth, num_heads=spec.num_heads, mlp_ratio=spec.mlp_ratio)
    return VisionTransformer(patch_size=patch_size, **{**arch, **kwargs})


def vit_tiny(patch_size: int = 16, **kwargs: Any) -> VisionTransformer:
    """ViT-Ti: width 192, depth 12, 3 heads."""
    return _vit("vit_tiny", patch_size, kwargs)


def vit_small(patch_size: int = 16, **kwargs: Any) -> VisionTransformer:
    """ViT-S: width 384, depth 12, 6 heads."""
    return _vit("vit_small", patch_size, kwargs)


def vit_base(patch_size: int = 16, **kwargs: Any) -> VisionTransformer:
    """ViT-B: width 768, depth 12, 12 heads."""
    return _vit("vit_base", patch_size, kwargs)


def vit_large(patch_size: int = 16, **kwargs: Any) -> VisionTransformer:
    """ViT-L: width 1024, depth 24, 16 heads."""
    return _vit("vit_large", patch_size, kwargs)


def vit_giant2(patch_size: int = 16, **kwargs: Any) -> VisionTransformer:
    """ViT-g/2 (DINOv2): width 1536, depth 40, 24 heads (64 per head); DINOv2 trains it with
    ``ffn_layer="swiglufused"``."""
    return _vit("vit_giant2", patch_size, kwargs)
