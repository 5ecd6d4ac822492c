import io
import zipfile

import pytest
from download_entity_questions import DownloadError, check_archive, fetch, local_path

from helpers import FIXTURE_ZIP

RELATIONS = ["P17", "P36", "P495", "P26", "P50", "P407", "P20"]


def test_local_path_forms(tmp_path):
    assert local_path("https://example.org/x.zip") is None
    assert local_path(f"file://{tmp_path}/x.zip") == tmp_path / "x.zip"
    assert local_path(str(tmp_path / "x.zip")) == tmp_path / "x.zip"


def test_fetch_local_copy(tmp_path):
    out = tmp_path / "out.zip"
    fetch(FIXTURE_ZIP.as_uri(), out, timeout=5)
    assert out.read_bytes() == FIXTURE_ZIP.read_bytes()


def test_missing_local_file(tmp_path):
    with pytest.raises(DownloadError, match="no such file"):
        fetch(str(tmp_path / "nope.zip"), tmp_path / "out.zip", timeout=5)


def test_unreachable_url_says_how_to_use_a_local_copy(tmp_path):
    # port 9 (discard) on loopback: nothing listens, the connection is refused at once
    with pytest.raises(DownloadError) as err:
        fetch("http://127.0.0.1:9/dataset.zip", tmp_path / "out.zip", timeout=5)
    assert "could not be downloaded" in str(err.value)
    assert "dataset={source: /path/to/dataset.zip}" in str(err.value)


def test_check_archive_accepts_fixture():
    assert len(check_archive(FIXTURE_ZIP, "src", None, RELATIONS)) == 64


def test_sha256_mismatch(tmp_path):
    with pytest.raises(DownloadError, match="differs from dataset.sha256"):
        check_archive(FIXTURE_ZIP, "src", "0" * 64, RELATIONS)


def test_not_a_zip(tmp_path):
    bad = tmp_path / "bad.zip"
    bad.write_text("<html>404</html>")
    with pytest.raises(DownloadError, match="not a zip archive"):
        check_archive(bad, "src", None, RELATIONS)


def test_truncated_zip(tmp_path):
    bad = tmp_path / "bad.zip"
    bad.write_bytes(FIXTURE_ZIP.read_bytes()[:-2000])
    with pytest.raises(DownloadError, match="not a zip archive|corrupt"):
        check_archive(bad, "src", None, RELATIONS)


def test_zip_with_wrong_content(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("readme.txt", "hello")
    bad = tmp_path / "other.zip"
    bad.write_bytes(buf.getvalue())
    with pytest.raises(
        DownloadError, match="not the EntityQuestions archive: missing dataset/test/P17.test.json"
    ):
        check_archive(bad, "src", None, RELATIONS)


def test_member_fails_crc(tmp_path):
    data = bytearray(FIXTURE_ZIP.read_bytes())
    data[200] ^= 0xFF  # inside the first member's compressed data
    bad = tmp_path / "crc.zip"
    bad.write_bytes(bytes(data))
    with pytest.raises(DownloadError, match="corrupt zip archive"):
        check_archive(bad, "src", None, RELATIONS)
