"""Malicious pickles are refused, never run, and the refusal names what they would import, whatever torch's wording.

The classic ``__reduce__`` payloads (``os.system``, ``subprocess.Popen``, ``builtins.eval``) in a zip ``torch.save``
file, a legacy (non-zip) ``torch.save`` file and bare pickles of protocols 0, 2 and 5 (protocol 4+ names globals with
STACK_GLOBAL, which torch's own refusal does not name).
"""

from __future__ import annotations

import builtins
import io
import os
import pickle
import subprocess
from pathlib import Path

import pytest
import torch
from cli_utils import one_line_error

from ssl_distill.checkpoint_format import WeightsFileError, read_weights_file
from ssl_distill.pickle_scan import unsafe_globals


class _Payload:
    """Runs ``call(*args)`` when unpickled (what an attacker ships inside a ``.pth``)."""

    def __init__(self, call: object, args: tuple) -> None:
        self.call, self.args = call, args

    def __reduce__(self) -> tuple:
        return self.call, self.args


def _payloads(marker: Path) -> dict[str, _Payload]:
    """Expected refused global -> a payload that would create ``marker`` if it ever ran."""
    return {
        f"{os.system.__module__}.system": _Payload(os.system, (f"touch {marker}",)),
        "subprocess.Popen": _Payload(subprocess.Popen, (["touch", str(marker)],)),
        "builtins.eval": _Payload(builtins.eval, (f"open({str(marker)!r}, 'w').close()",)),
    }


def _files(tmp_path: Path, payload: _Payload) -> dict[str, Path]:
    """The payload beside a tensor in every container a weights file comes in."""
    obj = {"cls_token": torch.zeros(1, 1, 8), "extra": payload}
    files = {"zip": tmp_path / "zip.pth", "legacy": tmp_path / "legacy.pth"}
    torch.save(obj, files["zip"])
    torch.save(obj, files["legacy"], _use_new_zipfile_serialization=False)
    for protocol in (0, 2, 5):
        files[f"pickle{protocol}"] = tmp_path / f"pickle{protocol}.pth"
        files[f"pickle{protocol}"].write_bytes(pickle.dumps(payload, protocol=protocol))
    return files


@pytest.mark.parametrize("which", [0, 1, 2])
def test_classic_payloads_are_refused_by_name_and_never_run(tmp_path: Path, which: int) -> None:
    marker = tmp_path / "pwned"
    name, payload = list(_payloads(marker).items())[which]
    for kind, path in _files(tmp_path, payload).items():
        assert name in unsafe_globals(path), kind
        with pytest.raises(WeightsFileError) as err:
            read_weights_file(path)
        message = str(err.value)
        assert f"holds Python objects besides tensors ({name})" in message, (kind, message)
        assert "arbitrary code" in message and "is it a complete" not in message, (kind, message)
        assert not marker.exists(), kind


def test_the_cli_refusal_is_one_line_and_files_of_tensors_name_nothing(tmp_path: Path, capsys) -> None:
    marker = tmp_path / "pwned"
    path = _files(tmp_path, _payloads(marker)["subprocess.Popen"])["legacy"]
    line = one_line_error(capsys, ["convert", str(path), str(tmp_path / "out.pth")])
    assert "(subprocess.Popen)" in line and "arbitrary code" in line
    assert not marker.exists()
    plain = {"w": torch.ones(3), "meta": {"epoch": 3, "name": "x", "shape": torch.Size([3]), "set": {1, 2}}}
    for legacy in (False, True):
        buf = io.BytesIO()
        torch.save(plain, buf, _use_new_zipfile_serialization=not legacy)
        (tmp_path / "plain.pth").write_bytes(buf.getvalue())
        assert unsafe_globals(tmp_path / "plain.pth") == []
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x80\x05garbage that is no pickle")
    assert unsafe_globals(garbage) == []
    with pytest.raises(WeightsFileError, match="is it a complete PyTorch"):
        read_weights_file(garbage)
