"""The pipeline's store: where every asset keeps its data, and the manifests that say which is current.

A plain object (no Dagster): assets, the CLI, the demo runner and the benchmarks all reach
materialized data through it. Each asset writes its data to a versioned folder under
`<root>/<asset key>/` and then, atomically and last, a small `current.json` manifest naming that
folder, so a crash leaves either the old manifest or the new one, never a half-written folder that
a reader would trust.

A build that was rejected (its blocking checks failed) never gets a manifest: the previous one stays
current, and a `rejected.json` beside it says what was refused and why, so a reader that finds no
current version can tell "never built" from "built, but refused".
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from car_maker_pipeline.locking import file_lock
from car_maker_pipeline.settings import pipeline_home
from car_maker_pipeline.storage import read_json, write_json_atomic

# One constant per asset key, named after it: the folder, the manifest and the Dagster asset share it.
RAW_STANFORD_CARS = "raw_stanford_cars"
CAR_MAKER_DATASET = "car_maker_dataset"
BASELINE_EVALUATION = "baseline_evaluation"
LORA_CHECKPOINTS = "lora_checkpoints"
LORA_SWEEP = "lora_sweep"
CHECKPOINT_ACCURACY = "checkpoint_accuracy"
MERGED_MODEL = "merged_model"
MAKER_PREDICTIONS = "maker_predictions"
LABELED_ADDITIONS = "labeled_additions"
REVIEW_QUEUE = "review_queue"

MANIFEST = "current.json"
REJECTED = "rejected.json"
LOCK = ".lock"


class MissingUpstreamError(RuntimeError):
    """An asset's input has not been materialized yet."""


@dataclass(frozen=True)
class PipelineStore:
    root: Path

    @classmethod
    def from_env(cls) -> PipelineStore:
        """The store at CAR_MAKER_HOME (default `.car_maker_home` under the working directory)."""
        return cls(pipeline_home())

    def asset_dir(self, asset: str, partition: str | None = None) -> Path:
        return self.root / asset if partition is None else self.root / asset / partition

    def manifest_path(self, asset: str, partition: str | None = None) -> Path:
        return self.asset_dir(asset, partition) / MANIFEST

    def write_manifest(self, asset: str, payload: dict, partition: str | None = None) -> None:
        """Make `payload` the current version (and clear any record of an earlier rejected build)."""
        write_json_atomic(self.manifest_path(asset, partition), payload)
        self.asset_dir(asset, partition).joinpath(REJECTED).unlink(missing_ok=True)

    def record_rejection(self, asset: str, reason: str, partition: str | None = None, **details) -> None:
        """Note that a build was refused (the manifest is left alone): `reason` says why and what to do."""
        write_json_atomic(self.asset_dir(asset, partition) / REJECTED, {"reason": reason, **details})

    def read_rejection(self, asset: str, partition: str | None = None) -> dict | None:
        """The last refused build since the current version was made current, if any."""
        path = self.asset_dir(asset, partition) / REJECTED
        return read_json(path) if path.exists() else None

    @contextmanager
    def lock(self, asset: str) -> Iterator[None]:
        """Exclusive across processes on this machine: concurrent runs building `asset` take turns, so a
        second one finds the first's finished folder instead of writing the same folder over it."""
        with file_lock(self.asset_dir(asset) / LOCK):
            yield

    def read_manifest(self, asset: str, partition: str | None = None) -> dict:
        path = self.manifest_path(asset, partition)
        if not path.exists():
            selection = asset if partition is None else f"{asset} --partition {partition}"
            rejected = self.read_rejection(asset, partition)
            if rejected is not None:
                raise MissingUpstreamError(
                    f"No version of `{asset}` is current: no build of it has passed its checks yet. The latest "
                    f"attempt: {rejected['reason']} Fix its input, then materialize `{asset}` again "
                    f"(`dagster asset materialize -m car_maker_pipeline --select {selection}`)."
                )
            raise MissingUpstreamError(
                f"{path} does not exist: materialize `{asset}` first "
                f"(for example `dagster asset materialize -m car_maker_pipeline --select {selection}`)."
            )
        return read_json(path)
