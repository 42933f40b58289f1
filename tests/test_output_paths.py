"""Output paths are checked before work starts: real file-system cases, nothing created."""

import os

import pytest

from zoo.errors import OutputPathError
from zoo.output_paths import check_writable_dir, check_writable_file


def test_writable_locations_pass_and_nothing_is_created(tmp_path):
    target = tmp_path / "a" / "b" / "out.json"
    assert check_writable_file(target, "--json") == target
    assert check_writable_dir(tmp_path / "runs" / "x", "output_dir") == tmp_path / "runs" / "x"
    assert list(tmp_path.iterdir()) == []  # the probe leaves nothing behind


def test_a_file_in_the_way_is_named(tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    with pytest.raises(OutputPathError, match=r"afile is a file, not a folder\); choose another --out"):
        check_writable_file(blocker / "x.png", "--out")
    with pytest.raises(OutputPathError, match="it is a file, not a folder; choose another output_dir"):
        check_writable_dir(blocker, "output_dir")
    with pytest.raises(OutputPathError, match="choose another output_dir"):
        check_writable_dir(blocker / "sub", "output_dir")
    assert blocker.read_text() == "x"


def test_a_folder_given_as_file_is_refused(tmp_path):
    with pytest.raises(OutputPathError, match="it is a folder; give a file name"):
        check_writable_file(tmp_path, "--json")


def test_unwritable_places_are_refused(tmp_path):
    # /proc refuses new files even to root, for whom os.access always says yes.
    with pytest.raises(
        OutputPathError, match=r"cannot write --json /proc/zoo/e\.json \(/proc: .+\); choose another --json"
    ):
        check_writable_file("/proc/zoo/e.json", "--json")
    with pytest.raises(OutputPathError, match="choose another output_dir"):
        check_writable_dir("/proc/foo", "output_dir")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.geteuid() != 0:  # root writes into a read-only-mode folder anyway
            with pytest.raises(OutputPathError, match="Permission denied"):
                check_writable_file(locked / "x.png", "--out")
    finally:
        locked.chmod(0o700)
