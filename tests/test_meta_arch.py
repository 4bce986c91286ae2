"""SSLMetaArch.compute_losses against the DINOv2 formulas, written with explicit loops over crops, images and tokens.

The reference runs each crop through the plain ``forward_features`` (no packing, no token selection), builds the
teacher targets from the formulas (centring: softmax((t - c) / T) with the EMA centre; Sinkhorn-Knopp: the
reference's normalisations in the probability domain), and sums the terms as the recipe defines them: student
global crop i against teacher crop 1 - i (the swap), every local crop against both teacher crops, all DINO terms
divided by their number; KoLeo per global crop; iBOT per image as the mean over its masked tokens, averaged over all
images. Losses and the gradients of every student parameter must agree.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from ssl_distill.config import load_config
from ssl_distill.data.collate import HOST_KEYS
from ssl_distill.train.meta_arch import SSLMetaArch

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"
STUDENT_TEMP, TEACHER_TEMP, MOMENTUM = 0.1, 0.05, 0.9
B, N = 3, 16  # images per batch; patches per 32 px global crop with patch 8
MASKED = [[0, 5, 6, 9], [], [15], [1, 2, 3, 4, 8, 12, 13], [7, 10], []]  # per global crop image i * B + b


def _meta(centering: str, n_local: int, separate_head: bool) -> SSLMetaArch:
    cfg = load_config(TINY, [
        f"train.centering={centering}", f"crops.local_crops_number={n_local}", f"ibot.separate_head={separate_head}",
        "dino.head_n_prototypes=48", "ibot.head_n_prototypes=40", "student.layerscale=0.5", "dino.loss_weight=0.7",
        "ibot.loss_weight=1.3", "dino.koleo_loss_weight=0.2",
    ])
    torch.manual_seed(0)
    meta = SSLMetaArch(cfg)
    with torch.no_grad():  # a teacher that differs from the student, so that every pairing matters
        for p in meta.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return meta


def _batch(n_local: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(2 * B, N, dtype=torch.bool)
    for row, tokens in enumerate(MASKED):
        masks[row, tokens] = True
    counts = masks.sum(1).clamp(min=1)
    return {
        "global_crops": torch.randn(2 * B, 3, 32, 32, generator=g),
        "local_crops": torch.randn(n_local * B, 3, 16, 16, generator=g) if n_local else torch.empty(0),
        "masks": masks,
        "mask_indices": masks.flatten().nonzero().flatten(),
        "masks_weight": (1.0 / counts).unsqueeze(1).expand_as(masks)[masks],
    }


# ---------------------------------------------------------------- the formulas
def cross_entropy(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``-sum_k t_k log softmax(s / student_temp)_k`` for one row pair."""
    return -(t * torch.log_softmax(s / STUDENT_TEMP, dim=-1)).sum()


def sinkhorn(logits: torch.Tensor, temp: float, iterations: int = 3) -> torch.Tensor:
    """DINOv2's ``sinkhorn_knopp_teacher``: ``(B, K)`` -> ``(B, K)`` with normalised prototypes, then samples."""
    q = torch.exp(logits / temp).t()
    n_prototypes, n_samples = q.shape
    q = q / q.sum()
    for _ in range(iterations):
        for k in range(n_prototypes):
            q[k] = q[k] / q[k].sum() / n_prototypes
        for b in range(n_samples):
            q[:, b] = q[:, b] / q[:, b].sum() / n_samples
    return (q * n_samples).t()


def koleo(x: torch.Tensor) -> torch.Tensor:
    """``-mean_b log ||x_b - x_nn(b)||`` over L2-normalised rows, ``nn(b)`` the other row of largest dot product."""
    x = x / x.norm(dim=1, keepdim=True)
    terms = []
    for b in range(len(x)):
        others = [c for c in range(len(x)) if c != b]
        nearest = max(others, key=lambda c: float(x[b].detach() @ x[c].detach()))
        terms.append(-torch.log((x[b] - x[nearest]).norm() + 1e-8))
    return sum(terms) / len(terms)


def _teacher(meta: SSLMetaArch, batch: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Teacher logits per global crop: CLS ``(B, K)`` and every patch ``(B, N, K')``."""
    head = meta.teacher.ibot_head if meta.ibot_separate_head else meta.teacher.dino_head
    cls, patches = [], []
    with torch.no_grad():
        for crop in batch["global_crops"].chunk(2):
            out = meta.teacher.backbone.forward_features(crop)
            cls.append(meta.teacher.dino_head(out["x_norm_clstoken"]))
            patches.append(head(out["x_norm_patchtokens"]))
    return cls, patches


def _masked_rows(patches: list[torch.Tensor]) -> list[tuple[int, int, int, torch.Tensor]]:
    """``(crop, image, token, logits)`` of every masked token, crop-major as the batch's masks."""
    return [(i, b, n, patches[i][b, n]) for i in range(2) for b in range(B) for n in MASKED[i * B + b]]


def _targets(meta: SSLMetaArch, batch: dict, centres: tuple[torch.Tensor, torch.Tensor] | None):
    """Teacher probabilities: CLS per crop ``[(B, K)] * 2`` and ``{(crop, image, token): (K',)}``."""
    cls, patches = _teacher(meta, batch)
    rows = _masked_rows(patches)
    if centres is not None:  # centring + sharpening
        dino_c, ibot_c = centres
        cls_t = [torch.softmax((c - dino_c) / TEACHER_TEMP, dim=-1) for c in cls]
        patch_t = {(i, b, n): torch.softmax((r - ibot_c) / TEACHER_TEMP, dim=-1) for i, b, n, r in rows}
    else:  # Sinkhorn-Knopp over the global batch: the 2B CLS rows, and the M masked tokens
        cls_t = list(sinkhorn(torch.cat(cls).double(), TEACHER_TEMP).float().chunk(2))
        q = sinkhorn(torch.stack([r for *_, r in rows]).double(), TEACHER_TEMP).float()
        patch_t = {(i, b, n): q[m] for m, (i, b, n, _) in enumerate(rows)}
    return cls_t, patch_t


def reference_losses(meta: SSLMetaArch, batch: dict, centres: tuple[torch.Tensor, torch.Tensor] | None) -> dict:
    cfg = meta.cfg
    n_local = cfg.crops.local_crops_number
    cls_t, patch_t = _targets(meta, batch, centres)
    student, ibot_head = meta.student, meta.student.ibot_head if meta.ibot_separate_head else meta.student.dino_head
    masks = batch["masks"].chunk(2)
    s_cls, s_patches = [], []
    for crop, mask in zip(batch["global_crops"].chunk(2), masks):
        out = student.backbone.forward_features(crop, masks=mask)
        s_cls.append(out["x_norm_clstoken"])
        s_patches.append(out["x_norm_patchtokens"])
    s_global = [student.dino_head(c) for c in s_cls]
    s_local = [student.dino_head(student.backbone.forward_features(crop)["x_norm_clstoken"])
               for crop in (batch["local_crops"].chunk(n_local) if n_local else [])]
    n_terms = 2 * 1 + 2 * n_local  # (student global i, teacher 1 - i) pairs + (local j, teacher i) pairs
    dino_global = sum(sum(cross_entropy(cls_t[1 - i][b], s_global[i][b]) for b in range(B)) / B
                      for i in range(2)) / n_terms
    dino_local = sum(sum(cross_entropy(cls_t[i][b], s[b]) for b in range(B)) / B
                     for s in s_local for i in range(2)) / n_terms
    image_losses = []
    for i in range(2):
        for b in range(B):
            tokens = MASKED[i * B + b]
            terms = [cross_entropy(patch_t[i, b, n], ibot_head(s_patches[i][b, n])) for n in tokens]
            image_losses.append(sum(terms) / len(terms) if terms else torch.zeros(()))
    ibot = sum(image_losses) / (2 * B)  # images without masked tokens count as 0
    kol = cfg.dino.koleo_loss_weight * sum(koleo(c) for c in s_cls)  # per global crop, never across crops
    total = cfg.dino.loss_weight * (dino_global + dino_local) + kol + cfg.ibot.loss_weight * ibot
    out = {"dino_global_crops_loss": dino_global, "koleo_loss": kol, "ibot_loss": ibot, "total_loss": total}
    if n_local:
        out["dino_local_crops_loss"] = dino_local
    return out


def _centres_after(meta: SSLMetaArch, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The EMA centres after one update from zero with ``batch``: mean of the 2B teacher CLS logits, and the
    global mean of the masked tokens' teacher logits, each times (1 - momentum)."""
    cls, patches = _teacher(meta, batch)
    masked = torch.stack([r for *_, r in _masked_rows(patches)])
    return (1 - MOMENTUM) * torch.cat(cls).mean(0), (1 - MOMENTUM) * masked.mean(0)


def _grads(meta: SSLMetaArch, total: torch.Tensor) -> dict[str, torch.Tensor]:
    meta.zero_grad(set_to_none=True)
    total.backward()
    grads = {n: p.grad.clone() for n, p in meta.student.named_parameters() if p.grad is not None}
    assert all(p.grad is None for p in meta.teacher.parameters())
    return grads


@pytest.mark.parametrize("centering, n_local, separate_head", [
    ("centering", 2, False), ("centering", 0, True), ("sinkhorn_knopp", 2, True), ("sinkhorn_knopp", 0, False),
])
def test_compute_losses_matches_the_formulas(centering, n_local, separate_head):
    meta = _meta(centering, n_local, separate_head)
    batch, centres = _batch(n_local, seed=1), None
    if centering == "centering":  # a first step leaves the centre update pending; the second step applies it
        first = _batch(n_local, seed=2)
        centres = _centres_after(meta, first)
        meta.compute_losses(first, TEACHER_TEMP)
    total, losses = meta.compute_losses(batch, TEACHER_TEMP)
    if centres is not None:
        torch.testing.assert_close(meta.objective.dino_loss.center[0], centres[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(meta.objective.ibot_patch_loss.center.reshape(-1), centres[1], rtol=1e-5,
                                   atol=1e-6)
    got_grads = _grads(meta, total)
    expected = reference_losses(meta, batch, centres)
    assert sorted(losses) == sorted(expected)  # the same terms, dino_local_crops_loss only with local crops
    for key, value in expected.items():
        torch.testing.assert_close(losses[key], value.detach(), rtol=2e-5, atol=1e-6, msg=key)
    expected_grads = _grads(meta, expected["total_loss"])
    assert sorted(got_grads) == sorted(expected_grads)
    for name, grad in expected_grads.items():
        scale = float(grad.abs().max())
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-3, atol=1e-4 * scale + 1e-9, msg=name)
    assert math.isfinite(float(total.detach()))


def test_the_crop_swap_and_the_term_count_matter():
    """The reference above is sharp enough to notice a missing swap or a wrong number of DINO terms."""
    meta = _meta("sinkhorn_knopp", 2, False)
    batch = _batch(2, seed=3)
    _, losses = meta.compute_losses(batch, TEACHER_TEMP)
    expected = reference_losses(meta, batch, None)
    cls, _ = _teacher(meta, batch)
    targets = list(sinkhorn(torch.cat(cls).double(), TEACHER_TEMP).float().chunk(2))
    with torch.no_grad():
        s_global = [meta.student.dino_head(meta.student.backbone.forward_features(c, masks=m)["x_norm_clstoken"])
                    for c, m in zip(batch["global_crops"].chunk(2), batch["masks"].chunk(2))]
    unswapped = sum(sum(cross_entropy(targets[i][b], s_global[i][b]) for b in range(B)) / B for i in range(2)) / 6
    assert not torch.allclose(unswapped, losses["dino_global_crops_loss"], rtol=1e-3)
    wrong_count = expected["dino_global_crops_loss"] * 6 / 7
    assert not torch.allclose(wrong_count, losses["dino_global_crops_loss"], rtol=1e-3)


def test_the_batch_reaches_the_step_under_the_loader_keys():
    """``_to_device`` moves the tensors and renames nothing; the host-only keys stay behind, the stochastic-depth
    keys (from the positions) are added."""
    meta = _meta("centering", 2, False)
    batch = {**_batch(2, seed=1), "positions": torch.arange(8, 8 + B), "n_broken": torch.tensor([1])}
    moved = meta._to_device(batch)
    assert set(moved) == set(batch) - set(HOST_KEYS) | {"drop_path_keys"}
    for key in set(batch) - set(HOST_KEYS):
        assert torch.equal(moved[key], batch[key]), key
    assert [keys.shape for keys in moved["drop_path_keys"]] == [(2 * B,), (2 * B,)]
