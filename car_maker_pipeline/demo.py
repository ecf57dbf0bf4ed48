"""`python -m car_maker_pipeline.demo`: materialize every asset of the active profile, then summarize.

This is the main job behind `make demo`. It runs the same jobs a person launches from the Dagster
UI or `dagster asset materialize`, in dependency order and one model partition at a time, recording
every run in the Dagster instance at DAGSTER_HOME, so `dagster dev` shows the history afterwards.
Every model runs the maker task; the first (smallest) also runs the class task (make, model and year),
whose 196 answers make its scoring several times the maker task's. The maker task trains
`DEMO_TRAINING`'s shorter run, so the tour stays near 15 minutes on 2 cores.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from car_maker_pipeline.store import BASELINE_EVALUATION, CAR_MAKER_DATASET, CHECKPOINT_ACCURACY

# The demo's maker-task LoRA runs, shorter than the default (LoraHyperparameters.max_steps), checkpoints at the
# default spacing: training is most of the demo's time. The class task keeps the default length: with 196
# classes of about ten pictures each, half of it leaves the model below its own baseline. Runs launched any
# other way (`dagster asset materialize`, the UI, schedules) train the default length.
DEMO_TRAINING = {"max_steps": 200}
LOG_FILE = "demo.log"  # under DAGSTER_HOME: everything the jobs print besides the demo's own lines
FAILURE_TAIL_LINES = 60


def main(argv: list[str] | None = None) -> int:
    from car_maker_pipeline.data.tasks import CLASS
    from car_maker_pipeline.definitions import defs
    from car_maker_pipeline.orchestration.instance import prepare_instance
    from car_maker_pipeline.orchestration.partitions import partition_key
    from car_maker_pipeline.settings import get_profile
    from car_maker_pipeline.store import PipelineStore

    profile = get_profile()
    instance = prepare_instance()
    store = PipelineStore.from_env()
    log_path = Path(os.environ["DAGSTER_HOME"]) / LOG_FILE
    print(f"profile {profile.name}; data under {store.root}; Dagster runs in {os.environ['DAGSTER_HOME']}", flush=True)
    print(f"step logs, library warnings and progress bars go to {log_path}", flush=True)
    keys = [partition_key(model) for model in profile.model_keys] + [partition_key(profile.model_keys[0], CLASS)]
    stages = [("data_job", None)] + [(job, key) for key in keys for job in PER_MODEL_JOBS]
    for job_name, partition in stages:
        started = time.perf_counter()
        label = job_name + (f" [{partition}]" if partition else "")
        with output_to(log_path):
            result = defs.resolve_job_def(job_name).execute_in_process(
                run_config=run_config(job_name, partition),
                instance=instance,
                partition_key=partition,
                raise_on_error=False,
            )
        status = "ok" if result.success else "FAILED"
        print(f"{label}: {status} in {time.perf_counter() - started:.0f}s (run {result.run_id})", flush=True)
        if not result.success:
            tail = log_path.read_text(errors="replace").splitlines()[-FAILURE_TAIL_LINES:]
            print("\n".join(tail), file=sys.stderr)
            print(
                f"   the end of {log_path} is above; `dagster dev -w workspace.yaml` shows run {result.run_id}",
                file=sys.stderr,
            )
            return 1
        if job_name == "data_job":  # a few test images for maker_predictions to classify
            seed_incoming_images(store)
    print_summary(store, profile.model_keys)
    print_class_task(store, profile.model_keys)
    return 0


@contextmanager
def output_to(path: Path) -> Iterator[None]:
    """Everything written to stdout and stderr inside the block, by Python or by libraries below it
    (Dagster's event lines, warnings, progress bars), appended to `path` instead of the terminal."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


PER_MODEL_JOBS = ["baseline_job", "training_job", "serving_job"]


def run_config(job_name: str, partition: str | None) -> dict:
    """What `make demo` configures in `job_name` for `partition`: the shorter LoRA run in the maker task's
    training_job, nothing else."""
    from car_maker_pipeline.data.tasks import MAKER
    from car_maker_pipeline.orchestration.partitions import model_and_task

    if job_name != "training_job" or model_and_task(partition)[1] != MAKER:
        return {}
    return {"ops": {"lora_checkpoints": {"config": DEMO_TRAINING}}}


def seed_incoming_images(store) -> None:
    from car_maker_pipeline.data.maker_dataset import MakerDataset
    from car_maker_pipeline.serving.batch import INCOMING_FOLDER, write_demo_images

    written = write_demo_images(store.root / INCOMING_FOLDER, MakerDataset.current(store))
    if written:
        print(f"wrote {len(written)} files to {store.root / INCOMING_FOLDER} for maker_predictions", flush=True)


def print_summary(store, model_keys: list[str]) -> None:
    makers = store.read_manifest(CAR_MAKER_DATASET)
    print(f"\ncar_maker_dataset: {len(makers['makers'])} makers, rows {makers['rows_per_split']}")
    print(f"{'model':<14}{'baseline accuracy (95% CI)':<34}{'images/s':>10}")
    for key in model_keys:
        try:
            report = store.read_manifest(BASELINE_EVALUATION, key)
        except Exception:
            continue
        summary = report["summary"]
        print(
            f"{key:<14}{summary['accuracy']:.1%} [{summary['ci_low']:.1%}, {summary['ci_high']:.1%}]{'':<8}{report['images_per_second']:>10.1f}"
        )
    for key in model_keys:
        try:
            scored = store.read_manifest(CHECKPOINT_ACCURACY, key)
        except Exception:
            continue
        import pandas as pd

        table = pd.read_parquet(scored["table"])
        print(
            f"\n{key}: best checkpoint step {scored['best_step']} (chosen on validation), registered version {scored['registered_version']}"
        )
        print(
            table[
                [
                    "step",
                    "val_accuracy",
                    "accuracy",
                    "ci_low",
                    "ci_high",
                    "change_vs_baseline",
                    "val_coverage_at_target",
                    "coverage_at_target",
                ]
            ].to_string(index=False, float_format=lambda v: f"{v:.3f}")
        )
    print_calibration(store, model_keys)


def print_calibration(store, model_keys: list[str]) -> None:
    """Per model, baseline and best checkpoint: top-1/top-3, ECE before/after temperature, the precision certified
    on validation (Learn then Test), and on test the coverage and the accuracy of the answered images."""
    rows = []
    for key in model_keys:
        for label, calibration in _calibrations(store, key):
            rows.append((key, label, calibration))
    if not rows:
        return
    first = rows[0][2]
    print(
        f"\nOn test, with the temperature fitted on {first['temperature_images']} validation images and the threshold "
        f"for {first['target_precision']:.0%} precision certified at {1 - first['delta']:.0%} confidence on the other "
        f"{first['threshold_images']}:"
    )
    print(
        f"{'model':<10}{'evaluated':<29}{'top-1':>7}{'top-3':>7}{'ECE':>7}{'ECE (T)':>9}{'T':>7}"
        f"{'certified':>11}{'coverage':>10}{'accuracy answered (95% CI)':>30}"
    )
    for key, label, c in rows:
        answered = f"{c['selective_accuracy']:.1%} [{c['selective_ci_low']:.1%}, {c['selective_ci_high']:.1%}]"
        certified = f">= {c['certified_precision']:.0%}" if c["certified"] else "none"
        print(
            f"{key:<10}{label:<29}{c['top1_accuracy']:>7.1%}{c['top3_accuracy']:>7.1%}{c['ece']:>7.3f}"
            f"{c['ece_calibrated']:>9.3f}{c['temperature']:>7.2f}{certified:>11}{c['coverage']:>10.1%}"
            f"{answered if c['answered'] else 'nothing answered':>30}"
        )
    print()
    for key, label, c in rows:
        refused = (
            f" Temperature fit refused (T = 1 kept): {c['temperature_refused']}." if c["temperature_refused"] else ""
        )
        print(f"{key} {label}: {c['statement']}{refused}")


def print_class_task(store, model_keys: list[str]) -> None:
    """The class task's baseline and best checkpoint: class top-1/top-5, the maker accuracy its answers imply, and
    on test the share answered at class level, at maker level and unsure, with the precision of what it answered."""
    from car_maker_pipeline.data.tasks import CLASS

    rows = [(key, label, c) for key in model_keys for label, c in _calibrations(store, CLASS.partition(key))]
    if not rows:
        return
    print("\nThe class task (make, model and year), answered at class level, else maker level, else unsure:")
    print(
        f"{'model':<10}{'evaluated':<29}{'top-1':>7}{'top-5':>7}{'maker':>7}{'class':>8}{'maker':>8}{'unsure':>8}"
        f"{'precision answered (95% CI)':>30}"
    )
    for key, label, c in rows:
        answered = f"{c['answered_precision']:.1%} [{c['answered_ci_low']:.1%}, {c['answered_ci_high']:.1%}]"
        print(
            f"{key:<10}{label:<29}{c['top1_accuracy']:>7.1%}{c['top5_accuracy']:>7.1%}"
            f"{c['implied_maker_accuracy']:>7.1%}{c['class_share']:>8.1%}{c['maker_share']:>8.1%}"
            f"{c['unsure_share']:>8.1%}{answered if c['unsure_share'] < 1 else 'nothing answered':>30}"
        )
    for key, label, c in rows:
        print(f"{key} class task {label}: {c['statement']}")


def _calibrations(store, key: str) -> list[tuple[str, dict]]:
    found = []
    for asset, label in ((BASELINE_EVALUATION, "baseline"), (CHECKPOINT_ACCURACY, "best checkpoint")):
        try:
            manifest = store.read_manifest(asset, key)
        except Exception:
            continue
        if manifest.get("calibration"):
            step = f" (step {manifest['best_step']})" if "best_step" in manifest else ""
            found.append((label + step, manifest["calibration"]))
    return found


if __name__ == "__main__":
    raise SystemExit(main())
