"""Helpers for tests of the ``ssl-distill`` commands."""

from __future__ import annotations

from collections.abc import Sequence

from ssl_distill.cli import main


def one_line_error(capsys, argv: Sequence[str]) -> str:
    """Run ``ssl-distill argv``, require exit status 2 with exactly one line on stderr, and return that line."""
    rc = main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1, err
    return err[0]
