"""Out of memory is one line naming the failed allocation, the memory free and the keys to lower (issue 26 item 10),
not an allocator traceback: a real `ssl-distill train` process whose head cannot be allocated, and the CUDA message
as PyTorch words it."""

from __future__ import annotations

import torch
from train_utils import TINY, run_train, tiny_overrides

from ssl_distill.config import load_config
from ssl_distill.train.memory import is_out_of_memory, out_of_memory_line


def test_train_that_cannot_allocate_says_so_in_one_line(tmp_path, photo_folder):
    # 2^33 prototypes: the first of the head's tensors (tens of GiB and more) is refused by the CPU allocator at once
    proc = run_train(tmp_path / "run", tiny_overrides(photo_folder, **{"dino.head_n_prototypes": 2**33}))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr[-3000:]
    line = errors[0]
    assert "out of memory on the CPU (host RAM): an allocation of " in line
    assert " GiB failed with " in line
    assert " free (vit_tiny/8, train.batch_size_per_gpu=8, " in line
    assert "dino.head_n_prototypes" in line
    assert "train.batch_size_per_gpu" in line


def test_cuda_out_of_memory_is_recognised_and_explained():
    exc = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.50 GiB. GPU 0 has a total capacity of "
                                 "79.19 GiB of which 1.20 GiB is free.")
    cfg = load_config(TINY, [])
    assert is_out_of_memory(exc)
    line = out_of_memory_line(exc, cfg)
    assert line.startswith("out of memory on the GPU: an allocation of 3.5 GiB failed")
    assert "train.precision=bf16" in line
    assert "train.batch_size_per_gpu=16" in line
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
