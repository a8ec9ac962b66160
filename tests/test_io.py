"""Atomic writes: complete or absent, with an ordinary file mode."""

from __future__ import annotations

import os
import stat

import pytest

from voxplain.io import atomic_path, write_text


def test_atomic_write_has_the_mode_of_an_ordinarily_created_file(tmp_path):
    reference = tmp_path / "plain.txt"
    reference.write_text("x")  # created the ordinary way, under the current umask
    write_text(tmp_path / "atomic.txt", "x")
    assert stat.S_IMODE(os.stat(tmp_path / "atomic.txt").st_mode) == stat.S_IMODE(
        os.stat(reference).st_mode)


def test_a_failed_write_leaves_neither_the_file_nor_a_temporary(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "table.tsv") as temporary:
            temporary.write_text("half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
