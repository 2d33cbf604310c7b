"""outputs.py: a failure leaves the previous output untouched and no scratch files."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.outputs import staged_dir, write_text_atomic


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


def test_write_text_atomic_replaces_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "metrics.json"
    write_text_atomic(out, "old")
    write_text_atomic(out, "new")
    assert out.read_text() == "new"

    def full_disk(self: Path, target: Path) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "replace", full_disk)
    with pytest.raises(OSError, match="No space"):
        write_text_atomic(out, "half")
    assert out.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]  # no scratch file left
