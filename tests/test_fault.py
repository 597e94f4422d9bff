"""Issue #7: faults, bad input and concurrent runs lose nothing.

Every test here injects one fault into a real inpainting job (a local Ray with 2 CPUs, a real S3
server on 127.0.0.1) and then hands the result to ``check_runs``, the one place that states what
"lost nothing" means: every input has exactly one row in each run, across runs exactly one ``ok``
row, every ``ok`` output is present, whole and decodable under ``--output``, and nothing else
(temporaries, partial or orphaned objects) is left there. The counts each test observed are
printed (``pytest -s``) and copied into RELIABILITY.md.

Faults already covered elsewhere are not repeated here (see RELIABILITY.md): an inference actor
killed mid-batch and the driver killed mid-run (tests/test_inpaint.py), a training worker killed
mid-checkpoint (tests/test_train_job.py), decoder fuzzing at the unit level (tests/test_decode.py).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from embedded.servers import LocalS3Server
from jobs.config import InpaintConfig, parse_config
from jobs.inpaint import run
from pipeline import storage
from pipeline.decode import decode_image
from pipeline.manifest import SUCCESS_FILE, read_manifest, run_summaries
from tests.helpers import write_objects

REPO = Path(__file__).resolve().parent.parent
TEMP_PREFIX = ".glcic-tmp-"


# ---------------------------------------------------------------------------------------------
# The checker every fault test ends with.


def _fresh_fs(uri: str, endpoint_url: str | None):
    """A filesystem that lists what is there now (s3fs caches listings per instance)."""
    fs, root = storage.filesystem(uri, endpoint_url)
    fs.invalidate_cache()
    return fs, root


def check_runs(
    output: str,
    inputs: dict[str, set[str]],
    *,
    manifest: str | None = None,
    endpoint_url: str | None = None,
    complete: bool = True,
) -> dict:
    """Check what a set of runs left behind; return the counts observed.

    ``inputs``: run id -> the input keys that run was given. Checked:

    - each run has at most one row per input key (none duplicated, none foreign), and every input
      it has no row for was completed by another run (the listing skips those: none missing);
    - across runs, at most one ``ok`` row per key; with ``complete``, exactly one per input;
    - every ``ok`` row names an output under ``output`` that exists and decodes to its size, and no
      two ``ok`` rows name the same output (inputs map to outputs one to one);
    - every row is ``ok`` or ``error``; every ``error`` row has a type and a reason and names no
      output;
    - a run with ``_SUCCESS.json`` counted exactly the rows its manifest holds, and as ``skipped``
      exactly its inputs without a row;
    - no temporary file is left under ``output``, and with ``complete`` every object there is
      an ``ok`` row's output or belongs to the manifest (nothing partial or orphaned).
    """
    manifest = manifest or f"{output.rstrip('/')}/_manifest"
    out_fs, out_root = _fresh_fs(output, endpoint_url)
    man_fs, man_root = _fresh_fs(manifest, endpoint_url)
    every_run = read_manifest(manifest, endpoint_url=endpoint_url).to_pylist()
    assert {r["run_id"] for r in every_run} <= set(inputs), "rows from a run nobody started"

    counts = Counter()
    ok_by_key: dict[str, dict] = {}
    without_row: dict[str, set[str]] = {}
    for run_id, keys in inputs.items():
        rows = [r for r in every_run if r["run_id"] == run_id]
        per_key = Counter(r["input_key"] for r in rows)
        counts["inputs"] += len(keys)
        counts["rows"] += len(rows)
        counts["duplicated"] += sum(n - 1 for n in per_key.values())
        assert set(per_key) <= keys, (run_id, sorted(set(per_key) - keys))
        assert max(per_key.values(), default=1) == 1, (run_id, [k for k, n in per_key.items() if n > 1])
        without_row[run_id] = keys - set(per_key)
        by_status = Counter(r["status"] for r in rows)
        counts.update(by_status)
        success = storage.join_key(man_root, f"run_id={run_id}/{SUCCESS_FILE}")
        if man_fs.exists(success):
            summary = json.loads(man_fs.cat_file(success))
            skipped = summary["counts"]["skipped"]
            assert summary["images"] == len(rows) + skipped, (run_id, summary["counts"], dict(by_status))
            assert skipped == len(without_row[run_id]), (run_id, skipped, sorted(without_row[run_id]))
            assert summary["skipped_counted"] is True, run_id
            counts["skipped"] += skipped
            assert {k: v for k, v in summary["counts"].items() if v and k != "skipped"} == dict(by_status)
        for r in rows:
            assert r["status"] in ("ok", "error"), r
            if r["status"] == "ok":
                assert r["input_key"] not in ok_by_key, f"two ok rows for {r['input_key']!r}"
                ok_by_key[r["input_key"]] = r
            else:
                assert r["error_type"] and r["error_message"], r
                assert r["output_key"] is None, r

    all_inputs = set().union(*inputs.values())
    # An input a run has no row for is one that another run completed: nothing went missing.
    for run_id, keys in without_row.items():
        missing = {k for k in keys if k not in ok_by_key}
        counts["missing"] += len(missing)
        assert not missing, (run_id, sorted(missing))
    if complete:
        assert set(ok_by_key) == all_inputs, sorted(all_inputs - set(ok_by_key))

    outputs = Counter(r["output_key"] for r in ok_by_key.values())
    assert max(outputs.values(), default=1) == 1, [k for k, n in outputs.items() if n > 1]
    for r in ok_by_key.values():
        path = storage.join_key(out_root, r["output_key"])  # refuses keys that leave --output
        assert r["output_uri"] == storage.full_uri(out_fs, path), r
        image = decode_image(out_fs.cat_file(path))
        assert image.shape == (r["height"], r["width"], 3), r["input_key"]

    leftovers = sorted(p for p in out_fs.find(out_root) if os.path.basename(p).startswith(TEMP_PREFIX))
    assert not leftovers, leftovers
    if complete:
        expected = {storage.join_key(out_root, k) for k in outputs}
        expected_masks = {storage.join_key(out_root, r["mask_output_key"]) for r in ok_by_key.values() if r["mask_output_key"]}  # fmt: skip
        manifest_path = _fresh_fs(manifest, endpoint_url)[1]
        found = {p for p in out_fs.find(out_root) if not p.startswith(manifest_path.rstrip("/") + "/")}
        assert found - expected_masks == expected, (sorted(found - expected), sorted(expected - found))
    observed = {"inputs": counts["inputs"], "rows": counts["rows"], "ok": counts["ok"],
                "error": counts["error"], "skipped": counts["skipped"], "missing": counts["missing"],
                "duplicated": counts["duplicated"], "ok_images": len(ok_by_key), "images": len(all_inputs)}  # fmt: skip
    return observed


def report(name: str, counts: dict, **extra) -> None:
    print(f"\nRELIABILITY {name}: {json.dumps({**counts, **extra}, sort_keys=True, ensure_ascii=False)}")


# ---------------------------------------------------------------------------------------------
# Inputs and fixtures.


def encode(image: np.ndarray | Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    img = image if isinstance(image, Image.Image) else Image.fromarray(image)
    sink = io.BytesIO()
    img.save(sink, format=fmt, **kwargs)
    return sink.getvalue()


def tile(photos, i: int, size: int = 32) -> np.ndarray:
    photo = photos[i % len(photos)]
    y, x = 40 + 7 * i, 60 + 11 * i
    return np.ascontiguousarray(photo[y : y + size, x : x + size])


@pytest.fixture(scope="session")
def checkpoint(tiny_checkpoint) -> str:
    return tiny_checkpoint


def small_job(**kwargs) -> InpaintConfig:
    """A job shaped for 2 CPUs: half a CPU per actor leaves room for the read and write tasks.

    Task batches as small as the inference batches, so a fault injected mid-run finds work still
    in flight (with the default 64, a few dozen inputs travel as one block)."""
    defaults = dict(postprocess=False, batch_size=4, task_batch_size=4, manifest_rows_per_part=4,
                    num_actors=1, num_cpus_per_actor=0.5, log_every_s=1e9)  # fmt: skip
    return InpaintConfig(**{**defaults, **kwargs})


def _subprocess_env(extra: dict[str, str]) -> dict[str, str]:
    # RAY_ADDRESS=local: the job's own ray.init() starts a private Ray instead of joining a
    # `ray start` head another test left on this machine.
    return {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": "local", **extra}


# ---------------------------------------------------------------------------------------------
# Faults.


@pytest.mark.timeout(300)
def test_concurrent_runs_share_an_output_prefix(ray_local, s3_prefix, photos, checkpoint):
    """Two runs at once into one --output: separate run ids and manifests, nothing mixed up."""
    keys = [f"c/{i:02d}.png" for i in range(16)]
    files = {f"in/{k}": encode(tile(photos, i)) for i, k in enumerate(keys)}
    halves = {"first": keys[0::2], "second": keys[1::2]}
    for name, half in halves.items():
        files[f"in/{name}.txt"] = ("\n".join(half) + "\n").encode()
    files["in/all.txt"] = ("\n".join(keys) + "\n").encode()
    write_objects(s3_prefix, files)
    output = f"{s3_prefix}/out"

    results: dict[str, dict] = {}
    errors: list[BaseException] = []

    def start(name: str) -> None:
        try:
            config = small_job(images=f"{s3_prefix}/in/{name}.txt", output=output, checkpoint=checkpoint)
            results[name] = run(config)
        except BaseException as e:  # surfaced by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=start, args=(name,)) for name in halves]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not errors, errors
    assert len({r["run_id"] for r in results.values()}) == 2
    # They did run at the same time: each started before the other finished.
    assert max(r["started_at"] for r in results.values()) < min(r["finished_at"] for r in results.values())
    inputs = {results[name]["run_id"]: set(half) for name, half in halves.items()}
    counts = check_runs(output, inputs)
    assert counts["ok"] == len(keys) and counts["error"] == 0
    report("concurrent runs", counts)

    # A third run over every key reads both runs' manifests and redoes nothing.
    again = run(small_job(images=f"{s3_prefix}/in/all.txt", output=output, checkpoint=checkpoint))
    assert again["counts"] == {"ok": 0, "error": 0, "skipped": len(keys)}
    inputs[again["run_id"]] = set(keys)
    counts = check_runs(output, inputs)
    assert counts["ok"] == counts["skipped"] == len(keys)
    report("concurrent runs, then a rerun", counts)


@pytest.mark.timeout(300)
def test_unusual_keys_stay_under_output_one_to_one(ray_local, s3_prefix, photos, checkpoint):
    """Spaces, unicode, URL-special characters, dotted names and very deep prefixes keep their
    names under --output; keys that would escape it (``..``, absolute, empty segments) are error
    rows, and nothing is written anywhere else in the bucket."""
    deep = "/".join(f"level{i:02d}" for i in range(40))
    names = [
        "with space/a photo .jpg",
        "ünïcødé/雲 ✓ é.png",
        "emoji/🙂.png",
        "url/100% a+b=c&d?x#y.jpg",
        "dots/a..b.jpg",
        "dots/...png",
        "dots/.. .png",
        f"{deep}/leaf.jpg",
        "same/cat.jpg",
        "same/cat.png",
        "same/cat.jpg.png",  # what "cat.jpg" would be written as
        "tab/a\tb.png",
    ]
    files = {}
    for i, key in enumerate(names):
        fmt = "JPEG" if key.endswith(".jpg") else "PNG"
        files[f"in/{key}"] = encode(tile(photos, i), fmt)
    unsafe = ["../escape.jpg", "a/../../up.jpg", "./here.jpg", "a//b.jpg", "a/./b.jpg", "back\\slash.jpg"]
    files["in/list.txt"] = ("\n".join([*names, *unsafe]) + "\n").encode()
    write_objects(s3_prefix, files)
    fs, bucket_root = _fresh_fs(f"{s3_prefix}", None)
    before = set(fs.find("test"))

    output = f"{s3_prefix}/out"
    summary = run(small_job(images=f"{s3_prefix}/in/list.txt", output=output, checkpoint=checkpoint))
    rows = {r["input_key"]: r for r in read_manifest(f"{output}/_manifest", summary["run_id"]).to_pylist()}
    assert {k: rows[k]["error_type"] for k in unsafe} == dict.fromkeys(unsafe, "unsafe_key")
    # "cat.jpg" would be written as "cat.jpg.png", the name of another input that keeps it.
    collided = "same/cat.jpg"
    assert rows[collided]["error_type"] == "output_collision", rows[collided]
    for key in set(names) - {collided}:
        assert rows[key]["status"] == "ok", rows[key]
        assert rows[key]["output_key"] in (key, key + ".png")  # the name kept, at most a suffix added
    counts = check_runs(output, {summary["run_id"]: {*names, *unsafe}}, complete=False)
    assert counts["ok"] == len(names) - 1 and counts["error"] == len(unsafe) + 1

    # Listing the prefix itself finds the same collision among one folder's objects.
    folder_output = f"{s3_prefix}/out-same"
    again = run(small_job(images=f"{s3_prefix}/in/same", output=folder_output, checkpoint=checkpoint))
    same = {"cat.jpg", "cat.png", "cat.jpg.png"}
    folder_rows = read_manifest(f"{folder_output}/_manifest", again["run_id"]).to_pylist()
    assert {r["input_key"]: r["error_type"] for r in folder_rows if r["status"] == "error"} == {
        "cat.jpg": "output_collision"
    }
    folder_counts = check_runs(folder_output, {again["run_id"]: same}, complete=False)
    assert folder_counts["ok"] == 2

    fs.invalidate_cache()
    written = set(fs.find("test")) - before
    roots = tuple(storage.filesystem(o)[1] + "/" for o in (output, folder_output))
    assert written and all(p.startswith(roots) for p in written), sorted(written)
    report("unusual keys (list file)", counts)
    report("output name collision (prefix)", folder_counts)


def _own_s3_server(tmp_path) -> LocalS3Server:
    """A private S3 server: this test stops it, so it must not be the session's."""
    (tmp_path / "s3").mkdir()
    return LocalS3Server(data_dir=str(tmp_path / "s3"), buckets=("fault",)).start()


def _wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the job ended (rc {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _outputs(fs, root: str) -> list[str]:
    fs.invalidate_cache()
    try:
        return [p for p in fs.find(root) if "/_manifest/" not in p]
    except FileNotFoundError:
        return []


def _restart_on_same_ports(server: LocalS3Server, down_s: float) -> LocalS3Server:
    """Stop ``server`` (connections are refused), wait, and start a new one on its ports and data."""
    server.stop()
    time.sleep(down_s)
    again = LocalS3Server(data_dir=server.data_dir, buckets=server.buckets)
    again.ports, again.endpoint_url = server.ports, server.endpoint_url
    return again.start()


@pytest.mark.timeout(420)
@pytest.mark.parametrize("outage", ["frozen", "restarted"])
def test_s3_outage_mid_run_is_retried_and_a_rerun_completes(ray_local, tmp_path, photos, checkpoint, outage):
    """The S3 server goes away mid-run for a few seconds, either frozen (SIGSTOP: connections
    hang, as in a network partition) or stopped and restarted on the same ports and data
    (connections refused, then a cold server). Requests time out or fail and are retried with
    backoff, the job finishes, anything that still failed is an error row with its reason, and
    rerunning the same command completes it."""
    n, outage_s = 24, 6.0
    server = _own_s3_server(tmp_path)
    try:
        endpoint = server.endpoint_url
        keys = [f"o/{i:02d}.jpg" for i in range(n)]
        write_objects(
            "s3://fault/in", {k: encode(tile(photos, i, 48), "JPEG") for i, k in enumerate(keys)}, endpoint
        )
        output = "s3://fault/out"
        argv = [sys.executable, "-m", "jobs.inpaint", "--images", "s3://fault/in", "--output", output,
                "--checkpoint", checkpoint, "--no-postprocess", "--batch-size", "2", "--task-batch-size", "2",
                "--manifest-rows-per-part", "2", "--num-actors", "1", "--num-cpus-per-actor", "0.5"]  # fmt: skip
        # Short client timeouts so that the outage outlasts many attempts: the one retry layer
        # (storage.with_retries; botocore and s3fs make one attempt each) must carry requests through.
        env = _subprocess_env({
            "GLCIC_S3_ENDPOINT_URL": endpoint, "GLCIC_S3_CONNECT_TIMEOUT_S": "1", "GLCIC_S3_READ_TIMEOUT_S": "2",
        })  # fmt: skip
        fs, out_root = storage.filesystem(output, endpoint)
        log_path = tmp_path / "first.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
            try:
                _wait_for(lambda: len(_outputs(fs, out_root)) >= 4, 180, "the first outputs", proc)
                written_before = len(_outputs(fs, out_root))
                if outage == "frozen":
                    server.pause()
                    time.sleep(outage_s)
                    server.resume()
                else:
                    server = _restart_on_same_ports(server, outage_s)
                rc = proc.wait(timeout=240)
            finally:
                server.resume()
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        assert rc == 0, log_path.read_text()[-4000:]
        assert written_before < n, "the job finished before the outage"

        _fresh_fs(output, endpoint)
        rows = read_manifest(f"{output}/_manifest", endpoint_url=endpoint).to_pylist()
        (first_run,) = {r["run_id"] for r in rows}
        first = check_runs(output, {first_run: set(keys)}, endpoint_url=endpoint, complete=False)
        errors = Counter(r["error_type"] for r in rows if r["status"] == "error")
        assert set(errors) <= {"read_failed", "write_failed"}, errors
        report(f"S3 {outage} {outage_s:.0f}s, first run", first, outputs_before_outage=written_before,
               error_types=dict(errors))  # fmt: skip

        # The same command again, here on the session's Ray (a second private one costs half a minute).
        rerun = run(parse_config(InpaintConfig, [*argv[3:], "--endpoint-url", endpoint]))
        assert rerun["counts"]["ok"] == first["error"], rerun["counts"]
        _fresh_fs(output, endpoint)
        # The rerun has rows only for what the first run left undone (maybe none), and a _SUCCESS.json.
        runs = {first_run, rerun["run_id"]}
        assert [r for r, _ in run_summaries(f"{output}/_manifest", endpoint)] == sorted(runs)
        assert {
            r["run_id"] for r in read_manifest(f"{output}/_manifest", endpoint_url=endpoint).to_pylist()
        } <= runs
        counts = check_runs(output, dict.fromkeys(runs, set(keys)), endpoint_url=endpoint)
        assert counts["ok"] == n and counts["skipped"] == n - first["error"], counts
        report(f"S3 {outage} {outage_s:.0f}s, after the rerun", counts)
    finally:
        server.stop()


DECODE_ERRORS = {"empty", "not_an_image", "truncated", "too_large", "corrupt"}
MASK_ERRORS = {f"mask_{kind}" for kind in DECODE_ERRORS} | {
    "mask_missing",
    "mask_size_mismatch",
    "mask_all_hole",
}


def _mangle(rng: np.random.Generator, data: bytes) -> bytes:
    """A few random bytes overwritten, then possibly cut short."""
    blob = bytearray(data)
    for _ in range(int(rng.integers(1, 9))):
        blob[int(rng.integers(0, len(blob)))] = int(rng.integers(0, 256))
    return bytes(blob[: int(rng.integers(len(blob) // 2, len(blob) + 1))])


def fuzz_corpus(photos, n: int, seed: int) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """``n`` inputs and their masks: valid, corrupted and random, in every format we decode."""
    rng = np.random.default_rng(seed)
    formats = ["PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF"]
    images, masks = {}, {}
    for i in range(n):
        pixels = tile(photos, i)
        fmt = formats[i % len(formats)]
        key = f"z/{i:02d}.{fmt.lower()}"
        valid = encode(pixels if fmt != "GIF" else Image.fromarray(pixels).convert("P"), fmt)
        kind = rng.choice(["valid", "mangled", "random"], p=[0.4, 0.4, 0.2])
        images[key] = {
            "valid": valid,
            "mangled": _mangle(rng, valid),
            "random": rng.bytes(int(rng.integers(0, 400))),
        }[kind]
        hole = np.zeros((32, 32), np.uint8)
        hole[8:20, 10:24] = 255
        mask_png = encode(hole)
        mask_kind = rng.choice(["valid", "mangled", "random", "missing", "small", "white"])
        if mask_kind != "missing":
            masks[key] = {
                "valid": mask_png,
                "mangled": _mangle(rng, mask_png),
                "random": rng.bytes(int(rng.integers(0, 200))),
                "small": encode(hole[:20]),
                "white": encode(np.full_like(hole, 255)),
            }[mask_kind]
    return images, masks


@pytest.mark.timeout(300)
def test_fuzzed_images_and_masks_each_end_as_one_row(ray_local, tmp_path, photos, checkpoint):
    """Random and corrupted images and masks through the whole job: no crash, no hang (the
    timeout), and every input ends as exactly one row, ok with a whole output or a typed error."""
    seed = 7
    images, masks = fuzz_corpus(photos, 36, seed)
    write_objects(str(tmp_path / "in"), images)
    write_objects(str(tmp_path / "masks"), masks)
    output = str(tmp_path / "out")
    summary = run(
        small_job(
            images=str(tmp_path / "in"), masks=str(tmp_path / "masks"), output=output, checkpoint=checkpoint
        )
    )
    counts = check_runs(output, {summary["run_id"]: set(images)}, complete=False)
    rows = read_manifest(f"{output}/_manifest", summary["run_id"]).to_pylist()
    error_types = Counter(r["error_type"] for r in rows if r["status"] == "error")
    assert set(error_types) <= DECODE_ERRORS | MASK_ERRORS, error_types
    assert counts["ok"] and counts["error"], "the corpus no longer has both outcomes"
    for r in rows:  # what decodes as an image and as a mask is completed, and nothing else
        if r["status"] == "ok":
            assert r["mask_key"] == r["input_key"] and 0 < r["hole_fraction"] < 1, r
    report("fuzzed images and masks", counts, seed=seed, error_types=dict(sorted(error_types.items())))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("outage", ["frozen", "restarted"])
def test_a_request_survives_the_server_going_away(s3_server, tmp_path, monkeypatch, outage):
    """One GET issued while the server is frozen or down, with client timeouts far shorter than the
    outage (and one botocore attempt, as always): storage.with_retries carries it until the server is
    back. A refused connection (botocore's EndpointConnectionError) is no OSError, so this
    failed at once before ``storage.transient_errors``."""
    down_s = 3.0
    server = _own_s3_server(tmp_path)
    try:
        server.filesystem().pipe_file("fault/key", b"payload")
        monkeypatch.setenv(storage.S3_CONNECT_TIMEOUT_ENV, "1")
        monkeypatch.setenv(storage.S3_READ_TIMEOUT_ENV, "1")
        fs, path = storage.filesystem("s3://fault/key", server.endpoint_url)
        back: list[LocalS3Server] = []
        if outage == "frozen":
            server.pause()
            bring_back = threading.Timer(down_s, server.resume)
        else:
            server.stop()
            bring_back = threading.Timer(0, lambda: back.append(_restart_on_same_ports(server, down_s)))
        started = time.monotonic()
        bring_back.start()
        try:
            data = storage.with_retries(lambda: storage.read_bytes(fs, path), attempts=8, max_delay=4)
        finally:
            bring_back.join()
            server.resume()
            for restarted in back:
                server = restarted
        waited = time.monotonic() - started
        assert data == b"payload"
        assert waited >= down_s * 0.9, waited  # it did wait out the outage
        report(f"one request, server {outage} {down_s:.0f}s", {"ok": 1}, waited_s=round(waited, 1))
    finally:
        server.stop()


@pytest.mark.timeout(120)
def test_a_manifest_write_outlasts_a_longer_restart(s3_server, tmp_path, monkeypatch):
    """The driver's manifest write retries longer than an image's read or write (a write that
    gives up ends the run): a part written while the server is down for 10 s lands whole."""
    from pipeline.manifest import rows_to_table, write_part

    down_s = 10.0
    server = _own_s3_server(tmp_path)
    back: list[LocalS3Server] = []
    try:
        monkeypatch.setenv(storage.S3_CONNECT_TIMEOUT_ENV, "1")
        keys = ["a.jpg", "b.jpg"]
        table = rows_to_table(
            {
                name: [""] * 2
                for name in (
                    "input_uri",
                    "mask_key",
                    "mask_generator",
                    "output_key",
                    "output_uri",
                    "mask_output_key",
                    "error_type",
                    "error_message",
                    "checkpoint_id",
                    "node_id",
                    "inference_worker",
                    "gpu_id",
                )
            }  # fmt: skip
            | {
                "input_key": keys,
                "status": ["error"] * 2,
                "mask_seed": [0, 0],
                "width": [0, 0],
                "height": [0, 0],
                "known_pixels_exact": [False, False],
            }
            | {name: [0.0, 0.0] for name in ("hole_fraction", "read_s", "decode_s", "inference_s", "write_s")}
        )
        server.stop()
        bring_back = threading.Timer(0, lambda: back.append(_restart_on_same_ports(server, down_s)))
        started = time.monotonic()
        bring_back.start()
        try:
            write_part("s3://fault/manifest", "r1", table, server.endpoint_url)
        finally:
            bring_back.join()
        waited = time.monotonic() - started
        rows = read_manifest("s3://fault/manifest", "r1", server.endpoint_url).to_pylist()
        assert [r["input_key"] for r in rows] == keys
        assert waited >= down_s, waited
        report(
            f"manifest part, server restarted {down_s:.0f}s", {"rows": len(rows)}, waited_s=round(waited, 1)
        )
    finally:
        for restarted in back:
            restarted.stop()
        server.stop()


def test_the_retry_layer_knows_the_errors_of_every_client_under_it():
    """botocore and s3fs make one attempt each, so every transient error they can raise must be
    one with_retries retries (an import that moved once made it retry none of botocore's)."""
    import http.client

    import aiohttp
    from botocore.exceptions import ConnectTimeoutError, EndpointConnectionError, ReadTimeoutError
    from botocore.parsers import ResponseParserError

    transient = storage.transient_errors()
    for error in (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ResponseParserError,
                  http.client.IncompleteRead, aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError,
                  ConnectionRefusedError, TimeoutError):  # fmt: skip
        assert issubclass(error, transient), error
    fs, _ = storage.filesystem("s3://bucket/key", "http://127.0.0.1:1")
    assert fs.retries == 1 and fs.config_kwargs["retries"]["total_max_attempts"] == 1
