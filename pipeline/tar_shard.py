"""WebDataset tar shards: the samples of a tar by the ``webdataset`` library's rules, and a shard
written back with the same members in the same order.

A member's sample key is its path up to the first dot of its base name, its extension the rest
(``a/b/000017.mask.png`` -> key ``a/b/000017``, extension ``mask.png``), as
``webdataset.tariterators.base_plus_ext`` splits it; names without a dot belong to no sample. A
sample's members are contiguous: a key seen again after other keys is an error of that sample
(``split_key``), never merged silently, and a sample holding one extension twice is an error too
(the library raises on it). Directories and members that belong to no sample pass through.

Reading never raises on content: a damaged tar keeps every complete member before the damage and
says where it stopped (``TarContents.damage``).
"""

from __future__ import annotations

import io
import re
import tarfile
from dataclasses import dataclass, field

# webdataset.tariterators.base_plus_ext
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
MASK_EXTENSION = "mask.png"  # ``{key}.mask.png``: the sample's hole mask (white = hole)


def key_and_extension(name: str) -> tuple[str | None, str | None]:
    match = _KEY_EXT.match(name)
    return (match.group(1), match.group(2)) if match else (None, None)


@dataclass
class Member:
    info: tarfile.TarInfo  # its header (name, mode, mtime, owner), written back as it was
    data: bytes

    @property
    def name(self) -> str:
        return self.info.name


@dataclass
class TarSample:
    key: str
    members: list[Member] = field(default_factory=list)
    error: tuple[str, str] | None = None  # (error type, message): left out of the output shard

    def extensions(self) -> list[str]:
        return [key_and_extension(m.name)[1] for m in self.members]


@dataclass
class TarContents:
    """A tar's items in order: ``TarSample`` or a ``Member`` of no sample (passed through)."""

    items: list[TarSample | Member]
    damage: str | None = None  # why reading stopped early (the items before are whole)

    @property
    def samples(self) -> list[TarSample]:
        return [item for item in self.items if isinstance(item, TarSample)]


def read_tar(data: bytes) -> TarContents:
    """The samples of a tar's bytes (plain tar, or gzip-compressed)."""
    items: list[TarSample | Member] = []
    by_key: dict[str, TarSample] = {}
    current: TarSample | None = None
    try:
        archive = tarfile.open(fileobj=io.BytesIO(data), mode="r:*")
    except (tarfile.TarError, EOFError, OSError) as e:
        return TarContents([], damage=f"not a readable tar ({len(data)} bytes): {e}")
    damage = None
    with archive:
        while True:
            try:
                info = archive.next()
            except (tarfile.TarError, EOFError, OSError) as e:
                damage = f"unreadable member header after {sum(1 for _ in _members(items))} members: {e}"
                break
            if info is None:
                # tarfile ends quietly at a header cut short after the first member: whatever
                # follows the last whole member must be the end-of-archive zeros.
                rest = data[archive.offset :] if not data.startswith(b"\x1f\x8b") else b""
                if rest.strip(b"\x00"):
                    damage = f"{len(rest)} bytes after the last whole member are not a member (a cut or damaged tar)"
                break
            if not info.isfile():
                continue  # directories and links are no sample's data (webdataset skips them too)
            try:
                member = Member(info, archive.extractfile(info).read())
            except (tarfile.TarError, EOFError, OSError) as e:
                damage = f"member {info.name!r} is cut short: {e}"
                key = key_and_extension(info.name)[0]
                cut = ("truncated", f"the tar ends inside this sample's member {info.name!r}")
                if current is not None and key == current.key:
                    current.error = cut
                elif key is not None and key not in by_key:
                    items.append(TarSample(key, [], error=cut))
                break
            key, ext = key_and_extension(info.name)
            if key is None:
                items.append(member)
                current = None
                continue
            if current is not None and key == current.key:
                if ext in current.extensions():
                    current.error = ("duplicate_member", f"the sample holds {ext!r} twice ({info.name!r})")
                current.members.append(member)
                continue
            if key in by_key:
                # The sample's members are not contiguous: an error of the sample, never a merge.
                current = by_key[key]
                current.error = (
                    "split_key",
                    f"members of key {key!r} are not contiguous in the tar ({info.name!r} comes after "
                    "other samples); WebDataset readers would see two samples",
                )
                current.members.append(member)
                continue
            current = TarSample(key, [member])
            by_key[key] = current
            items.append(current)
    return TarContents(items, damage)


def _members(items):
    for item in items:
        yield from (item.members if isinstance(item, TarSample) else [item])


def image_member(sample: TarSample, image_ext: str | None = None) -> Member:
    """The member a sample's completion replaces; raises ``ValueError`` with the reason.

    By the last part of the extension (``jpg``, ``jpeg``, ``png``, ``webp``, any case), never a
    ``mask.*`` member; ``image_ext`` names the extension exactly instead."""
    if image_ext is not None:
        found = [m for m in sample.members if key_and_extension(m.name)[1] == image_ext]
    else:
        found = [
            m
            for m in sample.members
            if (ext := key_and_extension(m.name)[1].lower()).rsplit(".", 1)[-1] in IMAGE_EXTENSIONS
            and not ext.startswith("mask.")
        ]
    if len(found) == 1:
        return found[0]
    names = [m.name for m in sample.members]
    wanted = f"extension {image_ext!r}" if image_ext else f"an image member ({', '.join(IMAGE_EXTENSIONS)})"
    if not found:
        raise ValueError(f"no member with {wanted} among {names}")
    raise ValueError(
        f"{len(found)} members with {wanted} ({[m.name for m in found]}); choose with --image-ext"
    )


def mask_member(sample: TarSample) -> Member | None:
    found = [m for m in sample.members if key_and_extension(m.name)[1].lower() == MASK_EXTENSION]
    return found[0] if found else None


def renamed(info: tarfile.TarInfo, name: str, size: int) -> tarfile.TarInfo:
    """``info``'s header for a member of another name and size (mode, time and owner kept)."""
    new = tarfile.TarInfo(name)
    new.size, new.mtime, new.mode = size, info.mtime, info.mode
    new.uid, new.gid, new.uname, new.gname = info.uid, info.gid, info.uname, info.gname
    return new


class TarShardWriter:
    """Members appended to a tar file on local disk (the spill file that is then uploaded)."""

    def __init__(self, path: str):
        self._tar = tarfile.open(path, mode="w", format=tarfile.PAX_FORMAT)

    def add(self, info: tarfile.TarInfo, data: bytes) -> None:
        info = renamed(info, info.name, len(data)) if info.size != len(data) else info
        self._tar.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        self._tar.close()
