"""What ``--images`` holds: one object per image (``files``), WebDataset tar shards
(``webdataset``) or Parquet files with image bytes (``parquet``), and the shards it names.

The layout is what the listing finds, unless ``--input-format`` forces it: any ``.tar`` makes it
``webdataset`` (an img2dataset WebDataset folder also holds a metadata ``{shard}.parquet`` and a
``{shard}_stats.json`` beside each tar: there the tars are the data); else ``.parquet`` files and no
images make it ``parquet``. A brace pattern (``shards/{00000..00999}.tar``) names its shards
itself; a name it expands to that does not exist becomes a ``not_found`` row.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator

from pipeline import storage

LAYOUTS = ("files", "webdataset", "parquet")
SHARD_SUFFIXES = {"webdataset": ".tar", "parquet": ".parquet"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif")
STATS_SUFFIX = "_stats.json"  # img2dataset's per-shard statistics, beside the shard


def expand(pattern: str) -> list[str]:
    from braceexpand import braceexpand

    return list(braceexpand(pattern))


def layout_of_names(names: list[str]) -> str:
    lowered = [n.lower() for n in names]
    if any(n.endswith(".tar") for n in lowered):
        return "webdataset"
    if any(n.endswith(".parquet") for n in lowered) and not any(n.endswith(IMAGE_SUFFIXES) for n in lowered):
        return "parquet"
    return "files"


def detect_layout(images: str, endpoint_url: str | None = None, forced: str = "auto") -> str:
    """``forced`` unless ``auto``; else the layout of a brace pattern's names or of the first
    page the listing finds under the prefix (one request). A list file lists image objects."""
    if forced != "auto":
        return forced
    if storage.is_brace_pattern(images):
        return layout_of_names(expand(images)[:1000])
    fs, root = storage.filesystem(images, endpoint_url)
    if images.lower().endswith(storage.LIST_FILE_SUFFIXES) or storage.isfile(fs, root):
        return layout_of_names([root]) if not images.lower().endswith(storage.LIST_FILE_SUFFIXES) else "files"
    try:
        first = next(storage.iter_object_pages(fs, root), [])
    except FileNotFoundError:
        first = []
    return layout_of_names(first)


def is_shard(path: str, layout: str) -> bool:
    name = posixpath.basename(path)
    return name.lower().endswith(SHARD_SUFFIXES[layout]) and not name.startswith("_")


def shard_entries(
    source: str, layout: str, endpoint_url: str | None = None, exclude: tuple[str, ...] = ()
) -> Iterator[tuple[str, str]]:
    """``(shard key, URI)`` of every shard ``source`` names: a brace pattern's names (existing or
    not: the read stage finds the missing ones), or the layout's files under a prefix."""
    if storage.is_brace_pattern(source):
        root = storage.keys_root(source)
        for uri in expand(source):
            yield storage.relative_key(root, uri), uri
        return
    fs, root = storage.filesystem(source, endpoint_url)
    fs.invalidate_cache()
    if storage.isfile(fs, root):
        yield posixpath.basename(root), storage.full_uri(fs, root)
        return
    excluded = tuple(storage.filesystem(u, endpoint_url)[1] for u in exclude)
    for page in storage.iter_object_pages(fs, root, excluded):
        for path in page:
            if is_shard(path, layout):
                yield storage.relative_key(root, path), storage.full_uri(fs, path)


def pack_name(index: int, layout: str) -> str:
    """The name of the ``index``-th shard that packing files makes: ``00000.tar``, ``00001.tar``, ..."""
    return f"{index:05d}{SHARD_SUFFIXES[layout]}"


def packs_files(input_layout: str, output_layout: str) -> bool:
    """Whether a run with these layouts packs one object per image into shards."""
    return input_layout == "files" and output_layout in SHARD_SUFFIXES


def pack_identity(name: str, keys) -> str:
    """What a packed shard is, for a resume: its name and which images it holds (a digest of their
    sorted keys). An image added to or gone from the listing changes the packs from there on, and a
    rerun then redoes those instead of skipping a name that now means other images."""
    import hashlib

    digest = hashlib.blake2b("\n".join(sorted(keys)).encode("utf-8", "surrogatepass"), digest_size=16)
    return f"{name}{_IDENTITY_SEPARATOR}{digest.hexdigest()}"


def shard_of_identity(identity: str) -> str:
    """The shard name in a ``pack_identity`` (a name that is no identity: itself)."""
    return identity.partition(_IDENTITY_SEPARATOR)[0]


_IDENTITY_SEPARATOR = "\0"


def shard_stem(shard_key: str) -> str:
    """A shard's key without its extension: ``sub/00000.tar`` -> ``sub/00000``."""
    return shard_key.rsplit(".", 1)[0] if "." in posixpath.basename(shard_key) else shard_key


def stats_key(shard_key: str) -> str:
    """img2dataset's name for a shard's statistics: ``00000.tar`` -> ``00000_stats.json``."""
    return shard_stem(shard_key) + STATS_SUFFIX


def output_shard_key(shard_key: str, input_layout: str, output_layout: str) -> str | None:
    """The key of an input shard's output shard under ``--output``: the same name when the layout
    is kept, the same stem with the other layout's suffix when converted (``00000.tar`` ->
    ``00000.parquet``); None for ``files``, whose output is a folder ``{stem}/``."""
    if output_layout == input_layout:
        return shard_key
    if output_layout == "files":
        return None
    return shard_stem(shard_key) + SHARD_SUFFIXES[output_layout]


def completion_marker(shard_key: str, input_layout: str, output_layout: str) -> str:
    """The object whose presence says an input shard's output is whole (what a resume checks):
    the output shard, or for ``files`` its ``{stem}_stats.json``, written after every file."""
    return output_shard_key(shard_key, input_layout, output_layout) or stats_key(shard_key)
