"""Which incoming files are read at all: the incoming folder and `classify`, tried with what a careless
or hostile user leaves there. Classified by the real (untuned) tiny model.

Incoming folder (`classify_folder`, then `predict_folder`'s parquet and the sensor's fingerprint):

| entry                                              | row                                              |
|----------------------------------------------------|--------------------------------------------------|
| a JPEG, a PNG                                      | classified                                       |
| a named pipe; one that replaced a file after the listing | refused, "a named pipe (FIFO)", never blocks |
| a UNIX socket                                      | refused, "a socket"                              |
| a character device (mknod as root, else a link to /dev/zero) | refused, "a character device" / "outside this folder" |
| a sparse file one byte over the limit              | refused from its size, unread                    |
| a link to an image outside the folder; to a text file outside; to /etc/hostname by absolute path | refused, "outside this folder", nothing of it described |
| a link to an image in the folder; a link to that link; an absolute link into the folder | classified like the image itself |
| a link to nothing; to a subfolder's image; to the subfolder; to a hidden file | refused with the reason |
| an image named `caf\\xe9.png` (not UTF-8)           | refused, listed as `caf\\xe9.png` (escaped): rename it |
| an image named with a newline; a 255-byte name; a 254-byte name of two-byte characters | classified |
| a subfolder; a hidden file                         | not listed                                       |
| names given with `/` or `..`; a folder gone since the listing | rows with the reason, nothing outside read |

`classify` on a FIFO, a socket, a device, a folder, a 2 GB sparse `car.mp4`: exit 2 with the reason,
within seconds, without reading it (peak RSS far below the file). `--from-test -3`, `0`, `x`: a usage
error, no traceback.

Memory (slow): 4 files of 12 MB, then 16, read 4 at a time: the peak grows by less than two files.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from car_maker_pipeline.serving.batch import classify_folder, predict_folder, snapshot
from car_maker_pipeline.serving.images import MAX_IMAGE_BYTES
from car_maker_pipeline_tests.support.hostile_images import encoded
from car_maker_pipeline_tests.support.serving import memory_measuring_env

MAKERS = ["AM General", "Aston Martin", "BMW", "Land Rover", "Mercedes-Benz", "Rolls-Royce"]
REPO = Path(__file__).resolve().parents[1]
NOT_UTF8 = os.fsdecode(b"caf\xe9.png")
NEWLINE = "two\nlines.jpg"
LONG_ASCII = "a" * 251 + ".jpg"  # 255 bytes, the longest name ext4 allows
LONG_UTF8 = "é" * 125 + ".jpg"  # 254 bytes in 129 characters


@pytest.fixture(scope="module")
def predictor(tiny_model):
    from car_maker_pipeline.evaluation.scoring.classifier import MakerClassifier
    from car_maker_pipeline.serving.predictor import MakerPredictor

    return MakerPredictor(MakerClassifier(tiny_model.model, tiny_model.processor, MAKERS, batch_size=4))


def hostile_folder(root: Path) -> tuple[Path, dict[str, str | None], list[socket.socket]]:
    """The folder in the docstring's table; returns it, {name: expected reason or None}, and open sockets."""
    folder, outside = root / "incoming", root / "outside"
    folder.mkdir()
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(encoded((40, 40), color=(1, 2, 3)))
    (outside / "notes.txt").write_text("private notes, never to be described")
    (folder / "subfolder").mkdir()
    (folder / "subfolder" / "deep.jpg").write_bytes(encoded())
    (folder / ".partial.jpg").write_bytes(encoded())
    expected: dict[str, str | None] = {}
    for name, data in {
        "a-photo.jpg": encoded((96, 64), color=(10, 200, 10)),
        "b-photo.png": encoded((80, 60), fmt="PNG", color=(10, 10, 200)),
        NEWLINE: encoded((70, 50)),
        LONG_ASCII: encoded((60, 40)),
        LONG_UTF8: encoded((50, 40)),
    }.items():
        (folder / name).write_bytes(data)
        expected[name] = None
    (folder / NOT_UTF8).write_bytes(encoded())
    expected[NOT_UTF8] = "not valid UTF-8"
    os.mkfifo(folder / "pipe.jpg")
    expected["pipe.jpg"] = "a named pipe (FIFO), not a regular file"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(folder / "upload.sock"))
    expected["upload.sock"] = "a socket, not a regular file"
    if os.geteuid() == 0:
        os.mknod(folder / "zero.jpg", 0o600 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero's numbers
        expected["zero.jpg"] = "a character device, not a regular file"
    else:
        (folder / "zero.jpg").symlink_to("/dev/zero")
        expected["zero.jpg"] = "outside this folder"
    with open(folder / "huge.jpg", "wb") as handle:  # sparse: no disk used
        handle.truncate(MAX_IMAGE_BYTES + 1)
    expected["huge.jpg"] = f"over the {MAX_IMAGE_BYTES:,}-byte limit"
    links = {
        "link-out.jpg": ("../outside/secret.jpg", "outside this folder"),
        "link-notes.jpg": (str(outside / "notes.txt"), "outside this folder"),
        "link-etc.jpg": ("/etc/hostname", "outside this folder"),
        "link-in.jpg": ("a-photo.jpg", None),
        "link-chain.jpg": ("link-in.jpg", None),
        "link-absolute.jpg": (str(folder / "b-photo.png"), None),
        "link-dangling.jpg": ("missing.jpg", "no such file"),
        "link-deep.jpg": ("subfolder/deep.jpg", "not a file directly in this folder"),
        "link-dir": ("subfolder", "a folder, not a regular file"),
        "link-hidden.jpg": (".partial.jpg", "the hidden file"),
    }
    for name, (target, reason) in links.items():
        (folder / name).symlink_to(target)
        expected[name] = reason
    return folder, expected, [server]


def test_every_entry_gets_a_row_and_nothing_outside_the_folder_is_read(predictor, tmp_path):
    folder, expected, sockets = hostile_folder(tmp_path)
    seen = snapshot(folder)
    assert sorted(seen.files) == sorted(expected)  # subfolders and hidden files are not incoming images
    table = classify_folder(predictor.predict_bytes, folder, seen.files, model_name="m", model_version="1")
    rows = table.set_index("file_name")
    assert list(table["file_name"]) == [os.fsencode(name).decode("utf-8", "backslashreplace") for name in seen.files]
    assert "caf\\xe9.png" in rows.index and NEWLINE in rows.index and LONG_UTF8 in rows.index
    for name, reason in expected.items():
        row = rows.loc[os.fsencode(name).decode("utf-8", "backslashreplace")]
        if reason is None:
            assert pd.isna(row.error) and row.maker in MAKERS, (name, row.error)
        else:
            assert pd.isna(row.maker) and reason in row.error, (name, row.error)
    for name in ("link-out.jpg", "link-notes.jpg", "link-etc.jpg"):  # nothing of the target is described
        assert "bytes" not in rows.loc[name].error and "Pillow" not in rows.loc[name].error
    assert rows.loc["link-in.jpg"].probability == pytest.approx(rows.loc["a-photo.jpg"].probability, abs=1e-4)
    assert rows.loc["link-absolute.jpg"].maker == rows.loc["b-photo.png"].maker
    for server in sockets:
        server.close()


def test_the_parquet_and_the_sensor_take_undecodable_names(predictor, tmp_path):
    from car_maker_pipeline.orchestration.assets.serving import IncomingImages
    from car_maker_pipeline.orchestration.incoming import incoming_images_sensor
    from car_maker_pipeline.orchestration.resources import StoreResource
    from car_maker_pipeline.store import CHECKPOINT_ACCURACY, PipelineStore

    folder = tmp_path / "incoming"
    folder.mkdir()
    for name in (NOT_UTF8, NEWLINE, "plain.jpg"):
        (folder / name).write_bytes(encoded())
        os.utime(folder / name, (0, 1_000_000))  # long settled
    batch = predict_folder(lambda: predictor.predict_bytes, folder, tmp_path / "out", model_name="m", model_version="1")
    written = pd.read_parquet(batch.path).set_index("file_name")
    assert written.loc["plain.jpg"].maker in MAKERS and written.loc[NEWLINE].maker in MAKERS
    assert "not valid UTF-8" in written.loc["caf\\xe9.png"].error and batch.unreadable == 1

    store = PipelineStore(tmp_path / "home")
    store.write_manifest(CHECKPOINT_ACCURACY, {"registered_version": "1"}, partition="tiny-s")
    resources = {"store": StoreResource(home=str(store.root)), "incoming_images": IncomingImages(path=str(folder))}
    with dg.build_sensor_context(resources=resources) as context:
        tick = incoming_images_sensor(context)
    assert [r.partition_key for r in tick.run_requests] == ["tiny-s|maker"] and tick.cursor == batch.fingerprint


def test_names_that_leave_the_folder_and_a_folder_gone_are_rows_not_failures(predictor, tmp_path):
    folder, outside = tmp_path / "incoming", tmp_path / "outside"
    folder.mkdir()
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(encoded())
    (folder / "car.jpg").write_bytes(encoded())
    names = ["car.jpg", "../outside/secret.jpg", "..", str(outside / "secret.jpg")]
    rows = classify_folder(predictor.predict_bytes, folder, names, model_name="m", model_version="1")
    assert rows["maker"][0] in MAKERS
    assert all("is not the name of a file in this folder" in error for error in rows["error"][1:])
    gone = classify_folder(predictor.predict_bytes, tmp_path / "gone", ["car.jpg"], model_name="m", model_version="1")
    assert "the folder cannot be opened (FileNotFoundError" in gone["error"][0]


def _within(seconds: float, work):
    """`work()`'s result, or a failure if it takes longer (a blocked read would otherwise hang the suite)."""
    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", work()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s: blocked on a file"
    return result["value"]


@pytest.mark.timeout(120)
def test_a_file_replaced_by_a_pipe_after_the_listing_never_blocks(predictor, tmp_path):
    folder = tmp_path / "incoming"
    folder.mkdir()
    for name in ("first.jpg", "swapped.jpg", "last.jpg"):
        (folder / name).write_bytes(encoded())
    seen = snapshot(folder)
    (folder / "swapped.jpg").unlink()
    os.mkfifo(folder / "swapped.jpg")  # nobody ever writes to it
    table = _within(
        60, lambda: classify_folder(predictor.predict_bytes, folder, seen.files, model_name="m", model_version="1")
    )
    rows = table.set_index("file_name")
    assert "a named pipe (FIFO)" in rows.loc["swapped.jpg"].error
    assert rows.loc["first.jpg"].maker in MAKERS and rows.loc["last.jpg"].maker in MAKERS


CLASSIFY_WITH_PEAK = (
    "import sys\n"
    "from car_maker_pipeline.classify import main\n"
    "code = main(sys.argv[1:])\n"
    "peak = [line for line in open('/proc/self/status') if line.startswith('VmHWM')][0].split()[1]\n"
    "print('PEAK_KB', peak)\n"
    "sys.exit(code)\n"
)


def classify(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", CLASSIFY_WITH_PEAK, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.timeout(300)
def test_classify_refuses_special_and_huge_files_before_reading_them(tmp_path, capsys):
    from car_maker_pipeline.classify import main

    os.mkfifo(tmp_path / "pipe.jpg")
    (tmp_path / "folder.jpg").mkdir()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(tmp_path / "upload.sock"))
    with open(tmp_path / "car.mp4", "wb") as handle:  # 2 GB, sparse
        handle.truncate(2 * 1024**3)
    cases = {
        str(tmp_path / "pipe.jpg"): "a named pipe (FIFO), not a regular file",
        "/dev/zero": "a character device, not a regular file",
        str(tmp_path / "upload.sock"): "a socket, not a regular file",
        str(tmp_path / "folder.jpg"): "a folder, not a regular file",
        str(tmp_path / "absent.jpg"): "no such file",
    }
    for path, reason in cases.items():
        assert _within(60, lambda path=path: main([path])) == 2
        stderr = capsys.readouterr().err
        assert reason in stderr and path in stderr, (path, stderr)
    server.close()
    huge = classify(str(tmp_path / "car.mp4"))  # in a process of its own, to read its peak memory
    assert (
        huge.returncode == 2
        and f"file of {2 * 1024**3:,} bytes is over the {MAX_IMAGE_BYTES:,}-byte limit" in huge.stderr
    )
    assert "Traceback" not in huge.stderr
    peak_mb = int(huge.stdout.split("PEAK_KB")[-1]) / 1024
    assert peak_mb < 600, f"{peak_mb:.0f} MB peak: the file was read"  # read whole, it was 2.25 GB


@pytest.mark.parametrize("count", ["-3", "0", "x"])
def test_classify_from_test_wants_a_positive_count(count, capsys):
    from car_maker_pipeline.classify import main

    with pytest.raises(SystemExit) as usage:
        main(["--from-test", count])
    assert usage.value.code == 2 and "is not a number of images" in capsys.readouterr().err


FOLDER_PEAKS = (
    "import json, sys\n"
    "from car_maker_pipeline.evaluation.scoring.classifier import MakerClassifier\n"
    "from car_maker_pipeline.models.loading import load_model_and_processor\n"
    "from car_maker_pipeline.serving.batch import classify_folder, snapshot\n"
    "from car_maker_pipeline.serving.predictor import MakerPredictor\n"
    "loaded = load_model_and_processor(sys.argv[1])\n"
    "predictor = MakerPredictor(MakerClassifier(loaded.model, loaded.processor, ['BMW', 'Audi'], batch_size=4))\n"
    "peaks = []\n"
    "for folder in sys.argv[2:]:\n"
    "    table = classify_folder(predictor.predict_bytes, folder, snapshot(folder).files, model_name='m',\n"
    "                            model_version='1', batch_size=4)\n"
    "    assert table['error'].isna().all(), table['error'].tolist()\n"
    "    peaks.append([int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')][0] / 1024)\n"
    "print(json.dumps(peaks))\n"
)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_peak_memory_is_one_batch_of_files_whatever_their_number(tiny_model_dir, tmp_path):
    """4 files, the same 4 again, then 16 files of 12 MB (random pixels: the file is as large as its pixels),
    read 4 at a time: the peak grows by less than two files, the allocator's noise (every file held at once
    was 12 x 12 MB more)."""
    import json

    from car_maker_pipeline_tests.support.hostile_images import noise_png

    photo = noise_png((2000, 2000), seed=1)
    folders = {count: tmp_path / f"{count}-files" for count in (4, 16)}
    for count, folder in folders.items():
        folder.mkdir()
        for index in range(count):
            (folder / f"photo-{index:02d}.png").write_bytes(photo)
    result = subprocess.run(
        [sys.executable, "-c", FOLDER_PEAKS, str(tiny_model_dir), str(folders[4]), str(folders[4]), str(folders[16])],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=540,
        env=memory_measuring_env(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    _, four, sixteen = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"peak RSS after 4 files {four:.0f} MB, after 16 files {sixteen:.0f} MB")
    assert sixteen - four < 2 * len(photo) / 1024**2, (four, sixteen)
