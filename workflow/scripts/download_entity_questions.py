"""Fetch the EntityQuestions archive from a URL (http, https, file) or a local path, check it and
move it into place atomically."""

import shutil
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from pathlib import Path

from eqtools.entity_questions import member_name
from eqtools.io import atomic_path, setup_logging, sha256_file
from eqtools.provenance import write_provenance


class DownloadError(RuntimeError):
    pass


OFFLINE_HINT = (
    "If this machine has no internet access, download the archive elsewhere and point the "
    "workflow at the local copy: --config 'dataset={source: /path/to/dataset.zip}' (or set "
    "dataset.source in your config file; file:// URLs work too)."
)


def local_path(source: str) -> Path | None:
    """The filesystem path `source` names, or None for a network URL."""
    parsed = urllib.parse.urlparse(source)
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    if parsed.scheme in ("http", "https", "ftp"):
        return None
    return Path(source).expanduser()


def fetch(source: str, destination: Path, timeout: float) -> None:
    path = local_path(source)
    if path is not None:
        if not path.is_file():
            raise DownloadError(f"dataset.source {source!r}: no such file ({path})")
        shutil.copyfile(path, destination)
        return
    try:
        with (
            urllib.request.urlopen(source, timeout=timeout) as response,
            open(destination, "wb") as out,
        ):
            shutil.copyfileobj(response, out, length=1 << 20)
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DownloadError(
            f"dataset.source {source!r} could not be downloaded: {reason}. {OFFLINE_HINT}"
        ) from None


def check_archive(
    path: Path, source: str, expected_sha256: str | None, relations: list[str]
) -> str:
    """Verify checksum and layout; returns the sha256."""
    digest = sha256_file(path)
    if expected_sha256 and digest != expected_sha256:
        raise DownloadError(
            f"dataset.source {source!r}: sha256 {digest} differs from dataset.sha256 "
            f"{expected_sha256}"
        )
    if not zipfile.is_zipfile(path):
        raise DownloadError(f"dataset.source {source!r} is not a zip archive")
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
            names = set(zf.namelist())
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
        raise DownloadError(f"dataset.source {source!r} is a corrupt zip archive: {e}") from None
    if bad is not None:
        raise DownloadError(
            f"dataset.source {source!r} is a corrupt zip archive (member {bad} fails its CRC)"
        )
    # Test files of every relation are required (the train-subject filter reads them all);
    # prepare_splits names any other missing member.
    missing = [m for r in relations if (m := member_name(r, "test")) not in names]
    if missing:
        raise DownloadError(
            f"dataset.source {source!r} is not the EntityQuestions archive: "
            f"missing {', '.join(missing[:3])}{' and more' if len(missing) > 3 else ''}"
        )
    return digest


def main(smk) -> None:
    log = setup_logging(smk.log[0])
    dataset = smk.config["dataset"]
    source = dataset["source"]
    out = Path(smk.output[0])
    with atomic_path(out) as tmp:
        log.info("fetching %s", source)
        fetch(source, tmp, dataset["timeout_s"])
        digest = check_archive(tmp, source, dataset["sha256"], smk.params.relations)
        log.info("archive ok: %s bytes, sha256 %s", tmp.stat().st_size, digest)
    write_provenance(out, smk, config={"source": source, "sha256": digest}, inputs=[])


if "snakemake" in globals():
    main(snakemake)  # noqa: F821
