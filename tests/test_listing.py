"""The input listing at scale: pages straight from S3 (nothing cached), skipped subtrees, and the
output-name collision check that holds a few keys instead of a set of all of them."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest

from pipeline import storage
from pipeline.listing import _with_collisions, iter_entries
from pipeline.naming import output_key_for


def put_empty(root: str, keys: list[str]) -> None:
    fs, base = storage.filesystem(root)
    paths = [f"{base}/{k}" for k in keys]
    if storage.protocol_of(root) == "file":
        for p in paths:
            fs.makedirs(p.rsplit("/", 1)[0], exist_ok=True)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda p: fs.pipe_file(p, b"x"), paths))


# 2,200 visible keys over three pages, with a hidden folder and an excluded output folder each
# larger than a page, so pages end inside them and the listing must resume after them.
VISIBLE = [f"a/{i:04d}.jpg" for i in range(1500)] + [f"b/{i:04d}.png" for i in range(700)]
HIDDEN = [f"a/.glcic-tmp/{i:04d}" for i in range(1100)] + ["a/.hidden.jpg", "b/x/.y/z.png"]
EXCLUDED = [f"a/out/{i:04d}.png" for i in range(1200)]


@pytest.mark.parametrize("where", ["s3", "local"])
def test_pages_hold_every_visible_key_once_in_order_and_cache_nothing(where, s3_prefix, tmp_path):
    root = s3_prefix if where == "s3" else str(tmp_path / "in")
    put_empty(root, VISIBLE + HIDDEN + EXCLUDED)
    fs, base = storage.filesystem(root)
    fs.invalidate_cache()

    pages = list(storage.iter_object_pages(fs, base, exclude=(f"{base}/a/out",)))

    listed = [storage.relative_key(base, p) for page in pages for p in page]
    assert listed == sorted(VISIBLE)  # nothing hidden or excluded, nothing twice, in key order
    assert max(len(page) for page in pages) <= storage.LIST_PAGE_KEYS
    if where == "s3":
        assert not fs.dircache, "the listing filled s3fs's directory cache"


def brute_force_collisions(keys: list[str], output_format: str) -> dict[str, str]:
    inputs = set(keys)
    found = {}
    for key in keys:
        out = output_key_for(key, output_format)[0]
        found[key] = out if out != key and out in inputs else ""
    return found


@pytest.mark.parametrize("output_format", ["png", "jpeg", "same"])
def test_collision_check_in_a_sorted_stream_matches_a_set_of_every_key(output_format):
    rng = random.Random(7)
    stems = ["cat", "cat.jpg", "dog", "a/b", "a/b.c", "x.png", "x"]
    suffixes = ["", ".jpg", ".png", ".jpg.png", ".png.jpg", ".jpeg", "/y.png", ".jpg.png.png", "0"]
    keys = sorted({rng.choice(stems) + rng.choice(suffixes) for _ in range(400)})
    got = {k: c for k, _, c in _with_collisions(((k, f"uri:{k}") for k in keys), output_format)}
    assert got == brute_force_collisions(keys, output_format)
    assert sum(bool(c) for c in got.values()) > 0 or output_format == "same"


def test_list_file_finds_duplicates_and_collisions_anywhere_in_the_file(tmp_path):
    listed = ["z/cat.jpg", "b.png", "z/cat.jpg.png", "b.png", "q.webp", "z/cat.jpg", "q.webp.png"]
    (tmp_path / "inputs.txt").write_text("# a comment\n" + "\n".join(listed) + "\n\n")

    entries = list(iter_entries(str(tmp_path / "inputs.txt"), output_format="png"))

    assert [k for k, _, _ in entries] == listed
    assert [bool(u) for _, u, _ in entries] == [True, True, True, False, True, False, True]
    assert [c for _, _, c in entries] == ["z/cat.jpg.png", "", "", "", "q.webp.png", "z/cat.jpg.png", ""]
