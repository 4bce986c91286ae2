"""DINO, iBOT and KoLeo losses against independent loop computations (single process)."""

from __future__ import annotations

import math

import pytest
import torch

from ssl_distill.losses import DINOLoss, KoLeoLoss, iBOTPatchLoss

# ---------------------------------------------------------------- independent references (explicit loops)


def loop_log_softmax(row: list[float], temp: float) -> list[float]:
    z = [v / temp for v in row]
    m = max(z)
    lse = m + math.log(sum(math.exp(v - m) for v in z))
    return [v - lse for v in z]


def loop_softmax(row: list[float], temp: float) -> list[float]:
    return [math.exp(v) for v in loop_log_softmax(row, temp)]


def loop_cross_term(t_row: list[float], s_row: list[float], temp: float) -> float:
    """sum_k t_k * log_softmax(s / temp)_k"""
    return sum(t * ls for t, ls in zip(t_row, loop_log_softmax(s_row, temp)))


def loop_sinkhorn_reference(logits: list[list[float]], temp: float, n_iter: int, b_total: float) -> list[list[float]]:
    """The DINOv2 reference algorithm, element by element, in float64 (may overflow to inf/nan)."""
    n_b, n_k = len(logits), len(logits[0])
    q = [[_exp(logits[b][k] / temp) for b in range(n_b)] for k in range(n_k)]  # K x B
    total = sum(sum(row) for row in q)
    q = [[_div(v, total) for v in row] for row in q]
    for _ in range(n_iter):
        for k in range(n_k):
            r = sum(q[k])
            q[k] = [_div(_div(v, r), n_k) for v in q[k]]
        for b in range(n_b):
            c = sum(q[k][b] for k in range(n_k))
            for k in range(n_k):
                q[k][b] = _div(_div(q[k][b], c), b_total)
    return [[q[k][b] * b_total for k in range(n_k)] for b in range(n_b)]


def _div(a: float, b: float) -> float:
    """IEEE division (0/0 -> nan, x/0 -> +-inf) instead of Python's ZeroDivisionError."""
    if b == 0:
        return math.nan if a == 0 or math.isnan(a) else math.copysign(math.inf, a)
    return a / b


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def loop_center_ema(batches: list[torch.Tensor], momentum: float) -> list[float]:
    """Per-class EMA of the batch mean; each batch is a list of (K,) rows."""
    n_k = len(batches[0][0])
    center = [0.0] * n_k
    for batch in batches:
        mean = [sum(float(row[k]) for row in batch) / len(batch) for k in range(n_k)]
        center = [c * momentum + m * (1 - momentum) for c, m in zip(center, mean)]
    return center


def assert_close(actual: torch.Tensor, expected, atol: float = 1e-6, rtol: float = 1e-5) -> None:
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual.double(), expected, atol=atol, rtol=rtol)


# ---------------------------------------------------------------- DINO


def test_dino_forward_matches_loop_over_pairs():
    torch.manual_seed(0)
    n_b, n_k, temp = 4, 7, 0.1
    students = [torch.randn(n_b, n_k, dtype=torch.float64) for _ in range(3)]
    teachers = [torch.softmax(torch.randn(n_b, n_k, dtype=torch.float64), -1) for _ in range(2)]
    expected = 0.0
    for s in students:
        for t in teachers:
            expected -= sum(loop_cross_term(t[b].tolist(), s[b].tolist(), temp) for b in range(n_b)) / n_b
    loss = DINOLoss(n_k, student_temp=temp)(students, teachers)
    assert_close(loss, expected, atol=1e-10)
    stacked = DINOLoss(n_k, student_temp=temp)(torch.stack(students), torch.stack(teachers))
    assert_close(stacked, expected, atol=1e-10)


def test_dino_center_ema_is_lazy_over_two_updates():
    torch.manual_seed(1)
    n_k, m, temp = 5, 0.9, 0.07
    loss = DINOLoss(n_k, center_momentum=m)
    assert loss.center.shape == (1, n_k)
    assert not loss.center.any()
    b1, b2, probe = torch.randn(6, n_k), torch.randn(6, n_k) * 3 + 1, torch.randn(2, n_k)

    loss.update_center(b1)
    assert not loss.center.any(), "the update must wait for the next softmax_center_teacher"
    out = loss.softmax_center_teacher(probe, temp)
    c1 = loop_center_ema([b1], m)
    assert_close(loss.center[0], c1)
    for i in range(2):  # the softmax used the freshly updated centre
        assert_close(out[i], loop_softmax([probe[i, k].item() - c1[k] for k in range(n_k)], temp))

    loss.update_center(b2)
    assert_close(loss.center[0], c1)
    loss.apply_center_update()
    loss.apply_center_update()  # idempotent
    assert_close(loss.center[0], loop_center_ema([b1, b2], m))


def test_dino_sinkhorn_matches_loop_reference():
    torch.manual_seed(2)
    logits = torch.randn(6, 5)
    temp = 0.5
    out = DINOLoss(5).sinkhorn_knopp_teacher(logits, temp)
    assert out.dtype == torch.float32
    assert out.shape == (6, 5)
    assert_close(out, loop_sinkhorn_reference(logits.double().tolist(), temp, 3, b_total=6))
    # The last step normalises each sample: rows of the output sum to exactly 1.
    assert_close(out.sum(dim=1), [1.0] * 6)


def test_sinkhorn_prototype_marginals_converge_to_uniform():
    """After 3 rounds only sample sums are exact; with many rounds every prototype also gets B / K."""
    torch.manual_seed(3)
    logits = torch.randn(8, 4)
    three = DINOLoss(4).sinkhorn_knopp_teacher(logits, 0.3)
    many = DINOLoss(4).sinkhorn_knopp_teacher(logits, 0.3, n_iterations=200)
    assert_close(many.sum(dim=0), [8 / 4] * 4, atol=1e-4)
    assert_close(many.sum(dim=1), [1.0] * 8)
    softmax_gap = (torch.softmax(logits / 0.3, -1).sum(0) - 2).abs().max()
    assert (three.sum(dim=0) - 2).abs().max() < softmax_gap


def test_dino_sinkhorn_wide_range_logits_match_float64_reference():
    """logits / temp spans +-300: float32 exp overflows/underflows; the float64 reference stays finite."""
    torch.manual_seed(4)
    logits = torch.randn(6, 5) * 0.5 + torch.tensor([-30.0, 30.0, 0.0, 25.0, -20.0])
    temp = 0.1
    naive = torch.exp(logits / temp)
    assert not torch.isfinite(naive).all() or (naive == 0).any()
    out = DINOLoss(5).sinkhorn_knopp_teacher(logits, temp)
    assert_close(out, loop_sinkhorn_reference(logits.double().tolist(), temp, 3, b_total=6), atol=1e-5)


def test_dino_sinkhorn_huge_logits_stay_finite():
    """Reference gives inf/nan; per-prototype shifts cancel in the algorithm, so compare to the shifted logits."""
    torch.manual_seed(5)
    moderate = torch.randn(6, 5)
    offsets = torch.tensor([1e4, -3e4, 2e4, 5e3, -1e4])
    temp = 0.04
    huge_reference = loop_sinkhorn_reference((moderate + offsets).double().tolist(), temp, 3, b_total=6)
    assert not all(math.isfinite(v) for row in huge_reference for v in row)
    out = DINOLoss(5).sinkhorn_knopp_teacher(moderate + offsets, temp)
    assert torch.isfinite(out).all()
    assert_close(out.sum(dim=1), [1.0] * 6)
    assert_close(out, loop_sinkhorn_reference(moderate.double().tolist(), temp, 3, b_total=6), atol=1e-3)
    # Extreme sharpness: every sample still gets a proper distribution (the reference would give 0/0).
    sharp = DINOLoss(5).sinkhorn_knopp_teacher(moderate * 1000, 0.04)
    assert torch.isfinite(sharp).all()
    assert_close(sharp.sum(dim=1), [1.0] * 6)


# ---------------------------------------------------------------- iBOT


def _masks() -> torch.Tensor:
    return torch.tensor(
        [[1, 0, 1, 1, 0], [0, 0, 0, 0, 0], [0, 1, 0, 0, 1], [1, 1, 1, 1, 1]], dtype=torch.bool
    )  # image 1 has no masked token


def _batch_weights(masks: torch.Tensor) -> torch.Tensor:
    """The per-token weights a batch carries (``masks_weight``): 1 / the masked tokens of the token's image."""
    return torch.tensor([1.0 / int(row.sum()) for row in masks for m in row if m], dtype=torch.float64)


def _ibot_data(seed: int):
    torch.manual_seed(seed)
    masks = _masks()
    n_b, n_n, n_k = masks.shape[0], masks.shape[1], 6
    s = torch.randn(n_b, n_n, n_k, dtype=torch.float64)
    t = torch.softmax(torch.randn(n_b, n_n, n_k, dtype=torch.float64), -1)
    return s, t, masks


def test_ibot_forward_matches_loop():
    s, t, masks = _ibot_data(10)
    temp = 0.1
    per_image = []
    for b in range(masks.shape[0]):
        terms = [
            loop_cross_term(t[b, n].tolist(), s[b, n].tolist(), temp) for n in range(masks.shape[1]) if masks[b, n]
        ]
        per_image.append(sum(terms) / max(len(terms), 1))
    expected = -sum(per_image) / len(per_image)
    loss = iBOTPatchLoss(6, student_temp=temp)(s[masks], t[masks], masks, _batch_weights(masks))
    assert_close(loss, expected, atol=1e-10)


def test_ibot_forward_masked_matches_loop():
    s, t, masks = _ibot_data(11)
    temp = 0.1
    loss_fn = iBOTPatchLoss(6, student_temp=temp)
    s_m, t_m = s[masks], t[masks]  # (M, K) in row-major order
    expected = 0.0
    for b in range(masks.shape[0]):
        count = int(masks[b].sum())
        for n in range(masks.shape[1]):
            if masks[b, n]:
                expected -= loop_cross_term(t[b, n].tolist(), s[b, n].tolist(), temp) / count
    expected /= masks.shape[0]
    assert_close(loss_fn.forward_masked(s_m, t_m, masks, _batch_weights(masks)), expected, atol=1e-10)


def test_ibot_forward_masked_custom_weights_and_row_count():
    s, t, masks = _ibot_data(12)
    temp = 0.1
    loss_fn = iBOTPatchLoss(6, student_temp=temp)
    s_m, t_m = s[masks], t[masks]
    n_m = s_m.shape[0]
    # Rows beyond the masked tokens (e.g. padding) are refused rather than silently counted.
    s_pad = torch.cat([s_m, 50 * torch.randn(3, 6, dtype=torch.float64)])
    t_pad = torch.cat([t_m, torch.softmax(torch.randn(3, 6, dtype=torch.float64), -1)])
    with pytest.raises(ValueError, match="exactly the masked tokens"):
        loss_fn.forward_masked(s_pad, t_pad, masks, _batch_weights(masks))
    # Custom weights.
    w = torch.rand(n_m, dtype=torch.float64)
    expected = (
        -sum(w[m].item() * loop_cross_term(t_m[m].tolist(), s_m[m].tolist(), temp) for m in range(n_m)) / masks.shape[0]
    )
    got = loss_fn.forward_masked(s_m, t_m, masks, masks_weight=w)
    assert_close(got, expected, atol=1e-10)


def test_ibot_center_ema_and_softmax():
    torch.manual_seed(13)
    n_k, m, temp = 4, 0.9, 0.07
    loss = iBOTPatchLoss(n_k, center_momentum=m)
    assert loss.center.shape == (1, 1, n_k)
    b1, b2 = torch.randn(3, 5, n_k), torch.randn(3, 5, n_k) + 2
    token_means = [[b[i].mean(0) for i in range(b.shape[0])] for b in (b1, b2)]  # per-image mean over tokens

    loss.update_center_masked(b1.flatten(0, 1))  # every image has 5 tokens: the token mean = the mean of image means
    assert not loss.center.any()
    out = loss.softmax_center_teacher(b2, temp)
    c1 = loop_center_ema([token_means[0]], m)
    assert_close(loss.center.reshape(-1), c1)
    assert out.shape == b2.shape
    assert_close(out[1, 2], loop_softmax([b2[1, 2, k].item() - c1[k] for k in range(n_k)], temp))
    flat = loss.softmax_center_teacher(b2[0], temp)  # (M, K) input keeps its shape
    assert flat.shape == (5, n_k)
    assert_close(flat, out[0])

    loss.update_center_masked(b2.flatten(0, 1))
    loss.apply_center_update()
    assert_close(loss.center.reshape(-1), loop_center_ema(token_means, m))
    with pytest.raises(ValueError, match=r"expects \(M, 4\) logits"):
        loss.update_center_masked(b2)


def test_ibot_sinkhorn_matches_loop_reference():
    torch.manual_seed(14)
    logits = torch.randn(9, 6)
    out = iBOTPatchLoss(6).sinkhorn_knopp_teacher(logits, 0.2)
    assert_close(out, loop_sinkhorn_reference(logits.double().tolist(), 0.2, 3, b_total=9))


def test_center_survives_state_dict_round_trip():
    loss = DINOLoss(3)
    loss.update_center(torch.ones(2, 3))
    state = loss.state_dict()  # applies the pending update first
    assert_close(state["center"][0], [0.1, 0.1, 0.1])
    fresh = DINOLoss(3)
    fresh.update_center(torch.full((2, 3), 100.0))
    fresh.load_state_dict(state)  # drops the stale pending update
    fresh.apply_center_update()
    assert_close(fresh.center[0], [0.1, 0.1, 0.1])


# ---------------------------------------------------------------- KoLeo


def loop_koleo(x: torch.Tensor, eps: float = 1e-8) -> float:
    rows = x.double().tolist()
    normed = []
    for r in rows:
        norm = max(math.sqrt(sum(v * v for v in r)), eps)
        normed.append([v / norm for v in r])
    total = 0.0
    for i, xi in enumerate(normed):
        best, best_j = -math.inf, -1
        for j, xj in enumerate(normed):
            dot = sum(a * b for a, b in zip(xi, xj))
            if j != i and dot > best:
                best, best_j = dot, j
        d = math.sqrt(sum((a - b + 1e-8) ** 2 for a, b in zip(xi, normed[best_j])))
        total += -math.log(d + eps)
    return total / len(rows)


def test_koleo_matches_loop_nearest_neighbour():
    torch.manual_seed(20)
    x = torch.randn(7, 5) * 3
    loss = KoLeoLoss()(x)
    assert loss.dtype == torch.float32
    assert_close(loss, loop_koleo(x))
    # Antipodal pair: the only neighbour has dot -1 and must not tie with the excluded diagonal.
    v = torch.randn(1, 5)
    assert_close(KoLeoLoss()(torch.cat([v, -v])), -math.log(2.0 + 1e-8))


def test_koleo_is_fp32_under_autocast_and_for_half_inputs():
    torch.manual_seed(21)
    x = torch.randn(6, 16)
    ref = KoLeoLoss()(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = KoLeoLoss()(x)
    assert got.dtype == torch.float32
    assert_close(got, ref, atol=1e-6, rtol=1e-6)
    x_bf16 = x.bfloat16()
    assert_close(KoLeoLoss()(x_bf16), loop_koleo(x_bf16.float()))


def test_koleo_duplicated_rows_finite_value_and_grad():
    torch.manual_seed(22)
    x = torch.randn(4, 8)
    x[2] = x[0]
    x.requires_grad_(True)
    loss = KoLeoLoss()(x)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(x.grad).all()
    assert_close(loss, loop_koleo(x.detach()), rtol=1e-4)


def test_koleo_rejects_batch_of_one():
    with pytest.raises(ValueError, match="at least 2 samples"):
        KoLeoLoss()(torch.randn(1, 4))


def test_ibot_center_masked_uses_global_token_mean():
    from ssl_distill.losses import iBOTPatchLoss

    torch.manual_seed(0)
    loss = iBOTPatchLoss(6, center_momentum=0.75)
    tokens = torch.randn(11, 6)
    loss.update_center_masked(tokens)
    loss.apply_center_update()
    expected = 0.25 * tokens.double().mean(0, keepdim=True)  # 0.75 * 0 + 0.25 * mean
    torch.testing.assert_close(loss.center.double().reshape(1, 6), expected, rtol=1e-6, atol=1e-7)
    before = loss.center.clone()
    loss.update_center_masked(torch.empty(0, 6))  # no masked tokens anywhere: no update
    loss.apply_center_update()
    assert torch.equal(loss.center, before)


# --------------------------------------------------------------------- fused soft cross-entropy, weight norm
def test_soft_cross_entropy_matches_the_naive_formula_and_its_gradient():
    from ssl_distill.losses.soft_ce import _SoftCrossEntropy, soft_cross_entropy

    g = torch.Generator().manual_seed(0)
    s = (torch.randn(7, 300, generator=g) * 5).requires_grad_()
    t = torch.rand(7, 300, generator=g) ** 3  # not normalised: the identity must not assume rows sum to 1
    w = torch.randn(7, generator=g)
    got = soft_cross_entropy(s, t, 0.1)
    (got * w).sum().backward()
    grad = s.grad.clone()
    s.grad = None
    ref = -(t * torch.log_softmax(s / 0.1, dim=-1)).sum(-1)
    (ref * w).sum().backward()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad, s.grad, rtol=1e-5, atol=1e-5 * s.grad.abs().max().item())
    # float64: the hand-written gradient equals autograd's on the naive formula to ~1e-12.
    s64 = torch.randn(3, 11, dtype=torch.float64, generator=g, requires_grad=True)
    t64 = torch.rand(3, 11, dtype=torch.float64, generator=g)
    (got64,) = torch.autograd.grad(_SoftCrossEntropy.apply(s64, t64, 0.07).sum(), s64)
    (ref64,) = torch.autograd.grad(-(t64 * torch.log_softmax(s64 / 0.07, dim=-1)).sum(), s64)
    torch.testing.assert_close(got64, ref64, rtol=1e-10, atol=1e-10)
    # The backward reuses the saved softmax in place, so a second backward is refused, not silently wrong.
    out = soft_cross_entropy(s, t, 0.1).sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()
    with pytest.raises(ValueError, match="same"):
        soft_cross_entropy(s, t[:, :5])


def test_weight_norm_linear_weight_and_gradients():
    from ssl_distill.models.heads import WeightNormLinear, _WeightNorm

    torch.manual_seed(0)
    layer = WeightNormLinear(8, 5)
    with torch.no_grad():
        layer.weight_g.uniform_(0.5, 2.0)
    ref = layer.weight_g * layer.weight_v / layer.weight_v.norm(dim=1, keepdim=True)
    torch.testing.assert_close(layer.weight, ref)
    torch.testing.assert_close(layer.weight.norm(dim=1, keepdim=True), layer.weight_g.detach())
    g64 = torch.rand(5, 1, dtype=torch.float64, requires_grad=True)
    v64 = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_WeightNorm.apply, (g64, v64))
