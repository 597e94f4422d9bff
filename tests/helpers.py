"""Small helpers shared by the test modules."""

from __future__ import annotations


def write_objects(root: str, files: dict[str, bytes], endpoint_url: str | None = None) -> None:
    """Put ``files`` (relative key -> bytes) under ``root``, any fsspec URI."""
    from pipeline import storage

    fs, base = storage.filesystem(root, endpoint_url)
    for key, data in files.items():
        storage.atomic_write_bytes(fs, storage.join_key(base, key), data)
