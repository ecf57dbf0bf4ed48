"""What a process killed mid-write leaves behind, and how the next writer treats it."""

import json
import os
import socket
import subprocess
import sys

from car_maker_pipeline.storage import atomic_directory, remove_stale_temporaries, temporary_prefix, write_json_atomic


def _dead_pid() -> int:
    process = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    return int(process.stdout)


def test_the_next_atomic_write_removes_dead_writers_temporaries_only(tmp_path):
    host = socket.gethostname()
    dead = tmp_path / f".predictions.tmp-{_dead_pid()}@{host}@abc"  # killed before its rename
    dead.mkdir()
    live = tmp_path / f".other.tmp-{os.getppid()}@{host}@def"  # a writer that is still running
    live.mkdir()
    elsewhere = tmp_path / f".other.tmp-{_dead_pid()}@another-pod@ghi"  # pids of other hosts mean nothing here
    elsewhere.mkdir()

    write_json_atomic(tmp_path / "current.json", {"ok": True})
    assert not dead.exists() and live.exists() and elsewhere.exists()
    assert json.loads((tmp_path / "current.json").read_text()) == {"ok": True}
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name and p not in (live, elsewhere)]


def test_atomic_directory_names_its_temporary_after_its_writer(tmp_path):
    with atomic_directory(tmp_path / "built") as tmp:
        assert tmp.name.startswith(temporary_prefix("built"))
        assert remove_stale_temporaries(tmp_path) == []  # our own, alive
    assert (tmp_path / "built").is_dir() and not tmp.exists()


def test_buffered_loss_points_survive_a_line_cut_by_a_kill(tmp_path):
    from car_maker_pipeline.training.mlflow_callback import MlflowLossCallback

    pending = tmp_path / "mlflow_pending.jsonl"
    pending.write_text('["train_loss", 2.5, 1000, 10]\n["val_loss", 2.1, 1001, 10]\n["train_lo')
    callback = MlflowLossCallback("run", "sqlite:///unused.db", pending_path=pending)
    assert callback.pending_points() == [("train_loss", 2.5, 1000, 10), ("val_loss", 2.1, 1001, 10)]
