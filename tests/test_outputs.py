"""outputs.py: a failure leaves the previous output untouched and no scratch files."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.outputs import staged_dir, staged_file


def test_staged_dir_replaces_on_success(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with staged_dir(out) as tmp:
        (tmp / "new.txt").write_text("new")
        assert not (out / "new.txt").exists()
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert oct(out.stat().st_mode & 0o777) != oct(0o700)


def test_staged_dir_keeps_old_output_on_failure(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), staged_dir(out) as tmp:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("boom")
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_staged_dir_new_target_and_interrupt(tmp_path: Path) -> None:
    out = tmp_path / "a" / "out"
    with pytest.raises(KeyboardInterrupt), staged_dir(out) as tmp:
        (tmp / "x").write_text("x")
        raise KeyboardInterrupt
    assert not out.exists()
    assert list((tmp_path / "a").iterdir()) == []


def test_staged_file(tmp_path: Path) -> None:
    out = tmp_path / "f.bin"
    with staged_file(out) as tmp:
        tmp.write_bytes(b"123")
    assert out.read_bytes() == b"123"
    with pytest.raises(OSError), staged_file(out) as tmp:
        tmp.write_bytes(b"partial")
        raise OSError("disk full")
    assert out.read_bytes() == b"123"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]
