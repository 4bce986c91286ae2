"""What the GPU check runs on, and whether the carried xFormers wheel works there (step ``env`` of gpu_check.sh).

Writes ``env.json``: Python, torch (+ its CUDA, cuDNN and NCCL versions), the GPU (name, capability, memory,
multiprocessors), which SDPA kernels are enabled, the versions of the packages the check uses, and ``nvidia-smi``'s
view of the card. With ``--probe-xformers DIR`` it imports xFormers from ``DIR`` in a separate process and runs one
bf16 forward + backward of ``memory_efficient_attention`` against PyTorch's SDPA on the GPU; when that works it
creates ``xformers_usable`` next to the JSON, and gpu_check.sh puts ``DIR`` on the path of the later steps (then
``attn_impl=auto`` means xFormers, as it would for a user who installed it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "torchvision", "timm", "numpy", "omegaconf", "submitit", "lightly", "opencv-python-headless",
            "scikit-learn", "scikit-image", "pytest", "triton", "xformers")

PROBE = """
import torch, xformers, xformers.ops as xops
q, k, v = (torch.randn(4, 257, 16, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
out = xops.memory_efficient_attention(q, k, v)
out.float().square().sum().backward()
ref = torch.nn.functional.scaled_dot_product_attention(*(t.detach().transpose(1, 2) for t in (q, k, v)))
err = (out.detach() - ref.transpose(1, 2)).abs().max().item()
print(f"xformers {xformers.__version__}, C++/CUDA library loaded: {xformers._has_cpp_library}, "
      f"max |xformers - sdpa| {err:.3g}")
assert err < 0.05 and all(t.grad is not None and t.grad.isfinite().all() for t in (q, k, v)), err
"""


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def torch_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available":
                            torch.cuda.is_available(), "cudnn": torch.backends.cudnn.version()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}", memory_gib=props.total_memory / 2**30,
                    multiprocessors=props.multi_processor_count, bf16=torch.cuda.is_bf16_supported(),
                    nccl=str(torch.cuda.nccl.version()))
        b = torch.backends.cuda
        info["sdpa_enabled"] = {name: getattr(b, f"{fn}_sdp_enabled", lambda: None)() for name, fn in (
            ("flash", "flash"), ("efficient", "mem_efficient"), ("cudnn", "cudnn"), ("math", "math"))}
    return info


def nvidia_smi() -> str | None:
    query = "name,driver_version,memory.total,clocks.max.sm,clocks.sm,power.limit,temperature.gpu"
    try:
        proc = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv"], capture_output=True,
                              text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"unavailable: {err}"
    return (proc.stdout or proc.stderr).strip()


def probe_xformers(site: str) -> dict[str, Any]:
    """Import and run xFormers from ``site`` in a fresh process (a broken build cannot take this one down)."""
    if not Path(site).is_dir() or not any(Path(site).iterdir()):
        return {"usable": False, "reason": f"no xFormers wheel was installed in {site}"}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([site, os.environ.get("PYTHONPATH", "")]))
    try:
        proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, env=env)
    except subprocess.TimeoutExpired:
        return {"usable": False, "reason": "the probe did not finish in 120 s"}
    text = (proc.stdout + proc.stderr).strip()
    return {"usable": proc.returncode == 0, "reason": text[-2000:]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the JSON file to write")
    p.add_argument("--probe-xformers", metavar="DIR", default=None, help="xFormers installed here (--target)")
    args = p.parse_args(argv)
    env: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform(),
                           "cpu_count": os.cpu_count(), "packages": versions(), **torch_info(),
                           "nvidia_smi": nvidia_smi()}
    if args.probe_xformers:
        env["xformers_probe"] = probe_xformers(args.probe_xformers)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(env, indent=2) + "\n")
    marker = out.parent / "xformers_usable"
    if env.get("xformers_probe", {}).get("usable"):
        marker.touch()
    print(json.dumps(env, indent=2))
    return env


if __name__ == "__main__":
    main()
