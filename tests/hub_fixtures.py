"""Shared helpers for the tests/test_hub_*.py files (import them: ``from hub_fixtures import ...``)."""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial tokens, position embeddings, norms and LayerScale so every converted tensor matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, p in model.named_parameters():
            if k.endswith(("gamma", "lambda1")) or ("norm" in k and k.endswith("weight")):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif "token" in k or "pos" in k or "norm" in k:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval()


def assert_sd_equal(a: dict, b: dict) -> None:
    """Same keys, shapes and values, bit for bit."""
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def assert_same_tokens(ours: dict, theirs: torch.Tensor, registers: int, atol: float = 1e-4) -> None:
    """Our ``forward_features`` dict against another library's normalised tokens ``(B, 1 + R + N, D)``."""
    torch.testing.assert_close(ours["x_norm_clstoken"], theirs[:, 0], atol=atol, rtol=atol)
    torch.testing.assert_close(ours["x_norm_regtokens"], theirs[:, 1 : 1 + registers], atol=atol, rtol=atol)
    torch.testing.assert_close(ours["x_norm_patchtokens"], theirs[:, 1 + registers :], atol=atol, rtol=atol)


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def serve_directory(root: Path) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 serving the files under ``root`` (a mirror: ``<model>/<file>``); yields its
    base URL."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def allow_stand_in_weights(monkeypatch) -> None:
    """Let small stand-in files (shallow models, a few bytes) take the place of official weights: the size floor
    of a complete official file (the fp32 data of its parameters) is lifted for the calling test only."""
    from ssl_distill.hub.registry import LinearHeadEntry, ModelEntry

    for entry_type in (ModelEntry, LinearHeadEntry):
        monkeypatch.setattr(entry_type, "min_size", property(lambda self: 0))
