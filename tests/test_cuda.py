"""CUDA numerics: every attention kernel against the math kernel, and a bf16 training step against fp32.

Marked ``cuda``: they run on a GPU (``pytest -m cuda``, skipped without one), or on the CPU with
``SSL_DISTILL_CUDA_TESTS_ON_CPU=1`` (the GPU check's dry run), where CUDA-only kernels are skipped.

Tolerances. Every kernel is compared with a float64 evaluation of the same module (the "math" kernel in fp64) on
the same inputs and weights, and its error is bounded by the error of the straightforward implementation in the
same precision (flash-attention's own test criterion, Dao et al. 2022):

* bf16 (autocast): ``err(kernel) <= 2 x err(math kernel in bf16) + eps_bf16 x max|ref|`` for outputs, ``3 x`` for
  gradients (the backward pass rounds through one more product). A kernel that computes the right thing in bf16 is
  about as accurate as the plain bf16 computation; a wrong one (a packing, masking or scaling bug) is off by O(1).
* fp32 (no autocast, TF32 off), the attention module alone: the worst-case rounding bound of attention's two
  products, ``(Dh + N) x u32 x max|ref|`` with ``u32 = 2^-24`` (a sum of ``n`` products has relative error <=
  ``n u``), 1.5 times that for gradients. TF32 (``u = 2^-11``) would exceed it, so an fp32 kernel that silently
  used TF32 fails. The whole backbone in fp32: the relative bound above with ``eps_fp32`` (its error is dominated by
  the linears, the same for every kernel).

Measured on the CPU (torch 2.14.1, flash and math SDPA): the worst error is 2 % of its bound for the fp32 module,
50 % for the fp32 backbone and 25-36 % in bf16.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from cuda_utils import REPO, cuda_test_device
from torch.nn.attention import SDPBackend, sdpa_kernel

from ssl_distill.config import load_config
from ssl_distill.data.collate import collate_data_and_cast
from ssl_distill.data.masking import MaskingGenerator
from ssl_distill.models import attention as attn_mod
from ssl_distill.models.attention import Attention
from ssl_distill.models.vit import VisionTransformer
from ssl_distill.train.meta_arch import SSLMetaArch

pytestmark = pytest.mark.cuda

# kernel name -> (our attention impl, the SDPA backend it is forced to)
KERNELS: dict[str, tuple[str, SDPBackend | None]] = {
    "sdpa-flash": ("sdpa", SDPBackend.FLASH_ATTENTION),
    "sdpa-efficient": ("sdpa", SDPBackend.EFFICIENT_ATTENTION),
    "sdpa-cudnn": ("sdpa", SDPBackend.CUDNN_ATTENTION),
    "sdpa-math": ("sdpa", SDPBackend.MATH),
    "xformers": ("xformers", None),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# packed multi-resolution tokens: 2 images x 2 global crops of 16 x 16 patches + CLS, 2 x 8 local crops of 7 x 7 + CLS
LAYOUT = [(4, 257), (16, 50)]


@pytest.fixture
def device():
    dev = cuda_test_device()
    if dev.type == "cuda":  # fp32 means fp32 here, also for the reference products
        old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        yield dev
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    else:
        yield dev


def _skip_unsupported(kernel: str, dtype: torch.dtype, device: torch.device) -> None:
    impl, backend = KERNELS[kernel]
    if impl == "xformers":
        if device.type != "cuda":
            pytest.skip("xFormers runs on CUDA only")
        if attn_mod._xformers_ops() is None:
            pytest.skip("xformers is not installed")
        return
    if device.type != "cuda" and backend in (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        pytest.skip(f"{kernel} is a CUDA kernel")
    if device.type == "cuda" and backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION) \
            and dtype == torch.float32:
        pytest.skip(f"{kernel} supports fp16/bf16 inputs only")


def _run(fn, kernel: str | None, dtype: torch.dtype, device: torch.device):
    """``fn()`` with the kernel's SDPA backend forced and, for bf16, under autocast (as training runs)."""
    backend = KERNELS[kernel][1] if kernel else None
    with contextlib.ExitStack() as stack:
        if backend is not None:
            stack.enter_context(sdpa_kernel([backend]))
        stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16))
        try:
            return fn()
        except RuntimeError as err:
            if kernel == "sdpa-cudnn" and "No available kernel" in str(err):
                pytest.skip(f"cuDNN attention is not available in this build: {str(err)[:200]}")
            raise


def _forward_backward(module: torch.nn.Module, inputs: list[torch.Tensor], loss_fn) -> dict[str, torch.Tensor]:
    """Outputs and gradients (inputs and parameters) as float64 on the CPU, keyed by name."""
    for t in inputs:
        t.grad = None
    module.zero_grad(set_to_none=True)
    outs = loss_fn(module, inputs)
    sum(((o.double() * w).sum() for o, w in outs.values()), torch.zeros((), dtype=torch.float64,
                                                                         device=inputs[0].device)).backward()
    result = {f"out:{k}": o.detach().double().cpu() for k, (o, _) in outs.items()}
    result.update({f"grad:input{i}": t.grad.double().cpu() for i, t in enumerate(inputs) if t.grad is not None})
    result.update({f"grad:{n}": p.grad.double().cpu() for n, p in module.named_parameters() if p.grad is not None})
    return result


def _check_against_reference(got: dict, lowp: dict, ref: dict, dtype: torch.dtype,
                             fp32_bound_terms: int | None = None) -> None:
    """Every output and gradient of ``got`` within its bound around ``ref`` (see the module docstring): relative to
    the error of the plain computation ``lowp`` in the same precision, or, for fp32 with ``fp32_bound_terms = Dh +
    N``, the worst-case rounding bound of attention's two products."""
    assert got.keys() == ref.keys()
    failures = []
    for key, r in ref.items():
        scale = float(r.abs().max())
        err = float((got[key] - r).abs().max())
        factor = 2.0 if key.startswith("out:") else 3.0
        if dtype == torch.float32 and fp32_bound_terms is not None:
            bound = (factor / 2) * fp32_bound_terms * 2.0**-24 * scale
        else:
            bound = factor * float((lowp[key] - r).abs().max()) + torch.finfo(dtype).eps * scale
        if not err <= bound:
            failures.append(f"{key}: max error {err:.3g} > bound {bound:.3g} (max |ref| {scale:.3g})")
    assert not failures, "\n".join(failures)


def _packed_attention_loss(module: Attention, inputs: list[torch.Tensor]) -> dict:
    (x,) = inputs
    out = module(x, layout=LAYOUT)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return {"attention": (out, weights.to(x.device))}


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_attention_kernel_matches_math_on_packed_crops(kernel: str, dtype_name: str, device) -> None:
    dtype = DTYPES[dtype_name]
    _skip_unsupported(kernel, dtype, device)
    torch.manual_seed(0)
    dim, heads = 256, 4
    module = Attention(dim, heads, qkv_bias=True, impl="math").to(device)
    x = torch.randn(sum(b * n for b, n in LAYOUT), dim, device=device, requires_grad=True)
    reference = copy.deepcopy(module).double()
    x64 = x.detach().double().requires_grad_()
    ref = _forward_backward(reference, [x64], _packed_attention_loss)
    lowp = _run(lambda: _forward_backward(module, [x], _packed_attention_loss), None, dtype, device)
    module.set_impl(KERNELS[kernel][0])
    got = _run(lambda: _forward_backward(module, [x], _packed_attention_loss), kernel, dtype, device)
    _check_against_reference(got, lowp, ref, dtype, fp32_bound_terms=max(n for _, n in LAYOUT) + dim // heads)


def _small_vit(device: torch.device) -> VisionTransformer:
    torch.manual_seed(0)
    # 112 px global crops: 8 x 8 patches + CLS = 65 tokens, one past a 64-row kernel tile; 42 px local: 3 x 3 + CLS.
    return VisionTransformer(img_size=112, patch_size=14, embed_dim=256, depth=2, num_heads=4, init_values=1.0,
                             attn_impl="math").to(device)


def _crops_and_masks(device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    global_crops = torch.randn(4, 3, 112, 112, generator=g)
    local_crops = torch.randn(8, 3, 42, 42, generator=g)
    masks = torch.rand(4, 64, generator=g) < 0.3
    masks[2:] = False  # half of the global crops masked, as iBOT does
    select = masks.flatten().nonzero()[:, 0]
    return [global_crops.to(device), local_crops.to(device)], masks.to(device), select.to(device)


def _backbone_loss(model: VisionTransformer, inputs: list[torch.Tensor]) -> dict:
    global_crops, local_crops, masks, select = inputs[0], inputs[1], inputs[2], inputs[3]
    outs = model([global_crops, local_crops], masks=[masks, None], is_training=True,
                 select_patches=[select, torch.empty(0, dtype=torch.long, device=select.device)])
    tensors = {"global_cls": outs[0]["x_norm_clstoken"], "masked_patches": outs[0]["x_norm_selected_patchtokens"],
               "local_cls": outs[1]["x_norm_clstoken"]}
    g = torch.Generator().manual_seed(2)
    return {k: (v, torch.randn(v.shape, generator=g, dtype=torch.float64).to(v.device)) for k, v in tensors.items()}


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_backbone_kernel_matches_math_with_packed_crops_and_masks(kernel: str, dtype_name: str, device) -> None:
    """The whole training forward (packed global + local crops, iBOT masks, last block on selected rows) and its
    backward with each kernel, against the fp64 math model; bounds as in the module docstring."""
    dtype = DTYPES[dtype_name]
    _skip_unsupported(kernel, dtype, device)
    model = _small_vit(device).train()
    crops, masks, select = _crops_and_masks(device)
    reference = copy.deepcopy(model).double()
    ref = _forward_backward(reference, [crops[0].double().requires_grad_(), crops[1].double().requires_grad_(),
                                        masks, select], _backbone_loss)
    inputs = [crops[0].clone().requires_grad_(), crops[1].clone().requires_grad_(), masks, select]
    lowp = _run(lambda: _forward_backward(model, inputs, _backbone_loss), None, dtype, device)
    model.set_attn_impl(KERNELS[kernel][0])
    got = _run(lambda: _forward_backward(model, inputs, _backbone_loss), kernel, dtype, device)
    _check_against_reference(got, lowp, ref, dtype)


def _tiny_step_config():
    # LayerScale 1.0: with the tiny config's 1e-5 the random-init CLS tokens are near-duplicates and KoLeo's
    # -log(nearest distance) turns any rounding into large relative changes (see test_train_engine).
    return load_config(str(REPO / "configs" / "tiny_cpu.yaml"), [
        "student.layerscale=1.0", "student.drop_path_rate=0.1", "train.batch_size_per_gpu=8"])


def _batch(cfg, n: int = 8) -> dict:
    g = torch.Generator().manual_seed(0)
    c = cfg.crops
    samples = [({"global_crops": [torch.randn(3, c.global_crops_size, c.global_crops_size, generator=g)
                                  for _ in range(2)],
                 "local_crops": [torch.randn(3, c.local_crops_size, c.local_crops_size, generator=g)
                                 for _ in range(c.local_crops_number)]}, None) for _ in range(n)]
    side = c.global_crops_size // cfg.student.patch_size
    torch.manual_seed(0)
    return collate_data_and_cast(samples, (0.1, 0.5), 0.5, torch.float32,
                                 mask_generator=MaskingGenerator(side, max_num_patches=0.5 * side * side))


def _step(meta: SSLMetaArch, batch: dict, dtype: torch.dtype | None) -> tuple[dict, dict]:
    meta.autocast_dtype = dtype
    torch.manual_seed(1)  # the same stochastic-depth draws in both runs
    losses = meta.forward_backward(batch, teacher_temp=0.07)
    grads = {name: torch.cat([p.grad.double().flatten().cpu() for p in part.parameters() if p.grad is not None])
             for name, part in meta.student.items()}
    return {k: float(v) for k, v in losses.items()}, grads


def test_training_step_bf16_autocast_matches_fp32(device) -> None:
    """One full step (teacher, packed student, heads, DINO + iBOT + KoLeo, backward) under bf16 autocast against
    the same step in fp32, from the same weights and batch.

    bf16 keeps 8 significant bits (unit roundoff 2^-9 = 0.2 %): each product in the network rounds its output at
    that level and the errors add up over the blocks, then the student softmax at temperature 0.1 multiplies logit
    errors by 10. The losses (cross-entropies of about log(512) = 6.2 at init) may therefore move by a few tenths
    of a percent; we allow 1 % of the total loss. Gradients must keep their direction (cosine >= 0.99, an angle
    under 8 degrees) and their norm within 5 %, per part (backbone, head). A step with a broken kernel, a missing
    fp32 island (softmax, losses, KoLeo) or an overflowing cast misses these by far. Measured on the CPU: losses
    within 0.02 % of the total, gradient cosines 0.99994 and norms within 0.3 %.
    """
    cfg = _tiny_step_config()
    torch.manual_seed(0)
    meta32 = SSLMetaArch(cfg).to(device).train()
    meta16 = copy.deepcopy(meta32)
    batch = _batch(cfg)
    losses32, grads32 = _step(meta32, batch, None)
    losses16, grads16 = _step(meta16, batch, torch.bfloat16)
    assert losses16.keys() == losses32.keys()
    total = abs(losses32["total_loss"])
    for key, value in losses32.items():
        assert abs(losses16[key] - value) <= 0.01 * total, (key, losses16[key], value)
    for part, g32 in grads32.items():
        g16 = grads16[part]
        cos = float(torch.dot(g16, g32) / (g16.norm() * g32.norm()))
        rel = float((g16.norm() - g32.norm()).abs() / g32.norm())
        assert cos >= 0.99, (part, cos, rel)
        assert rel <= 0.05, (part, cos, rel)
