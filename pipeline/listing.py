"""Listing: every input under a prefix or in a list file, a page at a time, with its key, URI and
any output-name collision. The first stage of both jobs (``list_images`` as a Ray Data task) and
what training streams its keys from (``iter_entries``).

The listing walks the prefix one folder at a time (or reads the list file line by line) and yields
pages of keys, so neither the driver nor any task ever holds the whole key set.
"""

from __future__ import annotations

import itertools
import posixpath
from collections.abc import Iterator

import numpy as np

from pipeline import storage
from pipeline.naming import contains, key_digests, output_key_for
from pipeline.storage import LIST_FILE_SUFFIXES


def is_list_file(fs, path: str) -> bool:
    return path.lower().endswith(LIST_FILE_SUFFIXES) and storage.isfile(fs, path)


def _list_file_entry(list_dir_uri: str, line: str) -> tuple[str, str]:
    """``(key, uri)`` of one list-file line: a key relative to the list file's folder, or a full URI
    / absolute path whose key is its path without the protocol (``s3://b/x.jpg`` -> ``b/x.jpg``)."""
    if "://" in line:
        return line.split("://", 1)[1].lstrip("/"), line
    if line.startswith("/"):
        return line.lstrip("/"), line
    return line, posixpath.join(list_dir_uri.rstrip("/"), line)


def _walk_prefix(fs, root: str, exclude: tuple[str, ...]) -> Iterator[list[str]]:
    """Pages of object paths under ``root`` (``storage.iter_object_pages``; a file: itself)."""
    if storage.isfile(fs, root):
        yield [root]
        return
    yield from storage.iter_object_pages(fs, root, exclude)


def _output_name(key: str, output_format: str | None) -> str:
    """The key that ``key``'s output is written at, when that differs from ``key`` (it is then
    always ``key`` plus a suffix), else ""."""
    if output_format is None:
        return ""
    out_key = output_key_for(key, output_format)[0]
    return out_key if out_key != key else ""


def _with_collisions(entries: Iterator[tuple[str, str]], output_format: str | None):
    """``(key, uri, collides_with)`` of sorted ``(key, uri)`` entries, holding only a few keys.

    ``cat.jpg`` is written as ``cat.jpg.png``; if ``cat.jpg.png`` is an input too, it keeps that
    name (its output is itself) and ``cat.jpg`` becomes an ``output_collision`` error row, instead
    of one completion silently replacing the other. An output name is its key plus a suffix, so in
    sorted order it comes after the key, with only keys that extend the key in between: a key is
    held back only while the keys listed next extend it (a chain of a few keys at most). That
    finds every collision without a set of all keys.
    """
    held: list[list[str]] = []  # [key, uri, output name, collides_with], each extending the one before
    for key, uri in entries:
        while held and not key.startswith(held[-1][0]):
            k, u, _, c = held.pop()
            yield k, u, c
        for entry in held:
            if entry[2] == key:
                entry[3] = key
        out_name = _output_name(key, output_format)
        if out_name:
            held.append([key, uri, out_name, ""])
        else:
            yield key, uri, ""
    while held:
        k, u, _, c = held.pop()
        yield k, u, c


def _printable(key: str) -> str:
    """Local file names may not be UTF-8; show their bytes escaped. The backslash makes such a key
    unsafe, so it becomes an ``unsafe_key`` error row instead of breaking the Arrow block."""
    try:
        key.encode("utf-8")
        return key
    except UnicodeEncodeError:
        return key.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def iter_entries(
    source: str,
    endpoint_url: str | None = None,
    exclude: tuple[str, ...] = (),
    output_format: str | None = None,
) -> Iterator[tuple[str, str, str]]:
    """``(relative key, URI, collides_with)`` of every input under ``source``, a prefix or a list
    file; ``collides_with`` (with an ``output_format``) is the input whose key is this one's output
    name, else ""."""
    fs, root = storage.filesystem(source, endpoint_url)
    fs.invalidate_cache()  # listings are cached per filesystem instance, shared in a process
    if is_list_file(fs, root):
        list_dir = storage.keys_root(source)

        def listed_keys() -> Iterator[tuple[str, str]]:
            with fs.open(root, "rt", encoding="utf-8") as lines:
                for raw in lines:
                    line = raw.strip()
                    if line and not line.startswith("#"):
                        yield _list_file_entry(list_dir, line)

        # A first pass takes every listed key's 16-byte digest (in a NumPy array: 41 bytes a key in
        # all, in this task only), so a duplicate and an output collision are found wherever in the
        # file the other key is listed.
        chunks, chunk = [], []
        for key, _ in listed_keys():
            chunk.append(key)
            if len(chunk) == 65536:
                chunks.append(key_digests(chunk))
                chunk = []
        digests = np.concatenate([*chunks, key_digests(chunk)])
        distinct, first_index = np.unique(digests, return_index=True)
        first = np.zeros(len(digests), dtype=bool)
        first[first_index] = True
        del digests, first_index
        for i, (key, uri) in enumerate(listed_keys()):
            out_name = _output_name(key, output_format)
            collides = out_name if out_name and contains(distinct, key_digests([out_name]))[0] else ""
            # A key listed twice is done once: later copies get an empty URI (a ``duplicate_key`` row).
            yield (key, uri, collides) if first[i] else (key, "", collides)
        return
    excluded = tuple(storage.filesystem(u, endpoint_url)[1] for u in exclude)
    keys = (
        # The URI too: a manifest row (an Arrow string) cannot hold the surrogates of such a name.
        (_printable(storage.relative_key(root, path)), _printable(storage.full_uri(fs, path)))
        for paths in _walk_prefix(fs, root, excluded)
        for path in paths
    )
    yield from _with_collisions(keys, output_format)


def list_images(
    batch: dict[str, np.ndarray],
    *,
    page_rows: int = 1000,
    endpoint_url: str | None = None,
    exclude: tuple[str, ...] = (),
    output_format: str | None = None,
    layout: str = "files",
    pack: tuple[str, int] | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """ListImages stage: ``{"source": [uri]}`` -> pages of ``{"key", "uri", "collides_with"}`` rows.

    ``exclude``: URIs (the output and manifest prefixes) never listed as inputs, so an output
    prefix nested inside the input prefix is not read back as images. ``output_format``: the
    job's, to find inputs whose output name is another input's key (``_collision``). ``layout``
    webdataset / parquet: the shards instead (``pipeline.shard_layout.shard_entries``). ``pack``
    ``(shard layout, size)``: the images grouped in listing order into shards to write, a row each
    (``_packs``).
    """
    from pipeline.shard_layout import shard_entries

    for source in batch["source"]:
        if pack is not None:
            yield from _packs(iter_entries(source, endpoint_url, exclude, None), *pack, page_rows)
            continue
        if layout == "files":
            entries = iter_entries(source, endpoint_url, exclude, output_format)
        else:
            entries = ((key, uri, "") for key, uri in shard_entries(source, layout, endpoint_url, exclude))
        while page := list(itertools.islice(entries, page_rows)):
            keys, uris, collides = zip(*page, strict=True)
            yield {
                "key": np.array(keys, dtype=object),
                "uri": np.array(uris, dtype=object),
                "collides_with": np.array(collides, dtype=object),
            }


PACK_SEPARATOR = "\0"  # between a pack's keys (and URIs) in one string: no key holds a NUL


def _packs(
    entries: Iterator[tuple[str, str, str]], layout: str, size: int, page_rows: int
) -> Iterator[dict[str, np.ndarray]]:
    """Pages of packs: ``{"key": shard name, "uri": "", "members", "member_uris", "identity"}``,
    each the next ``size`` listed images (a list file's duplicate keeps its empty URI)."""
    from pipeline.shard_layout import pack_identity, pack_name

    index, rows = 0, []
    while chunk := list(itertools.islice(entries, size)):
        keys, uris = [k for k, _, _ in chunk], [u for _, u, _ in chunk]
        name = pack_name(index, layout)
        rows.append((name, PACK_SEPARATOR.join(keys), PACK_SEPARATOR.join(uris), pack_identity(name, keys)))
        index += 1
        if len(rows) == page_rows:
            yield _pack_page(rows)
            rows = []
    if rows:
        yield _pack_page(rows)


def _pack_page(rows: list[tuple[str, str, str, str]]) -> dict[str, np.ndarray]:
    names, members, uris, identities = zip(*rows, strict=True)
    return {
        "key": np.array(names, dtype=object),
        "uri": np.array([""] * len(rows), dtype=object),
        "collides_with": np.array([""] * len(rows), dtype=object),
        "members": np.array(members, dtype=object),
        "member_uris": np.array(uris, dtype=object),
        "identity": np.array(identities, dtype=object),
    }
