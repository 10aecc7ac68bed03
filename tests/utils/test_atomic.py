import pytest

from dist_dpc.utils.atomic import atomic_write


def test_a_failed_write_leaves_the_old_file_whole_and_no_temporary(tmp_path):
    target = tmp_path / "sub" / "state.json"
    atomic_write(target, lambda tmp: tmp.write_text("good"))
    assert target.read_text() == "good"

    def crash(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, crash)
    assert target.read_text() == "good"
    assert sorted(p.name for p in target.parent.iterdir()) == ["state.json"]
    atomic_write(target, lambda tmp: tmp.write_text("new"))
    assert target.read_text() == "new"
