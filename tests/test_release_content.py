"""hotswap/releases/content.py: the digest `deploy --if-changed` compares releases by."""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

from hotswap.releases import content
from hotswap.releases.release import SKIPPED_AT_TOP


def a_release(folder: Path) -> Path:
    (folder / "data" / "store").mkdir(parents=True)
    (folder / "srv.ini").write_text("[uwsgi]\n")
    (folder / "srv.py").write_text("app = None\n")
    (folder / "data" / "store" / "terms-v1.lmdb").write_bytes(b"\0" * 100)
    (folder / "data" / "store" / "current").symlink_to("terms-v1.lmdb")
    return folder


def test_a_copy_and_an_unpacked_tarball_have_the_same_digest(tmp_path: Path):
    release = a_release(tmp_path / "v1")
    copy = tmp_path / "copy"
    shutil.copytree(release, copy, symlinks=True)
    with tarfile.open(tmp_path / "v1.tar", "w") as archive:
        archive.add(release, arcname=".")
    unpacked = tmp_path / "unpacked"
    with tarfile.open(tmp_path / "v1.tar") as archive:
        archive.extractall(unpacked, filter="data")
    (copy / "srv.py").touch()  # a new mtime is not new content
    assert content.digest(release) == content.digest(copy) == content.digest(unpacked)


def test_what_python_or_a_run_writes_beside_the_release_is_not_content(tmp_path: Path):
    release = a_release(tmp_path / "v1")
    before = content.digest(release, SKIPPED_AT_TOP)
    (release / "__pycache__").mkdir()
    (release / "__pycache__" / "srv.cpython-311.pyc").write_bytes(b"pyc")
    (release / "run").mkdir()
    (release / "run" / "store.switch").touch()
    assert content.digest(release, SKIPPED_AT_TOP) == before


def test_a_changed_byte_a_new_file_or_a_new_link_target_is_new_content(tmp_path: Path):
    release = a_release(tmp_path / "v1")
    digests = {content.digest(release)}
    (release / "srv.py").write_text("app = 1\n")
    digests.add(content.digest(release))
    (release / "extra.txt").write_text("")
    digests.add(content.digest(release))
    (release / "data" / "store" / "current").unlink()
    (release / "data" / "store" / "current").symlink_to("terms-v2.lmdb")
    digests.add(content.digest(release))
    assert len(digests) == 4
