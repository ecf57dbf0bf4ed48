"""The Dagster instance at DAGSTER_HOME, created once before any command runs in it.

`python -m car_maker_pipeline.orchestration.instance` (what `make init` runs, and `make demo` and
`make ui` through it). Dagster creates its sqlite databases (runs, event log index, schedules) the
first time any process opens the instance; two commands started together on a fresh DAGSTER_HOME
both find no tables, both create them, and one fails with "table ... already exists", or both
stamp a schema version and no command can open the instance again. Created here
once, under a lock (so that two set-ups at once are safe too), the databases exist before anything
else starts, and commands run in parallel afterwards only read the schema.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from car_maker_pipeline.locking import file_lock
from car_maker_pipeline.storage import temporary_prefix

# The project's instance settings (gpu pool, run monitoring, run retries), copied into a new DAGSTER_HOME.
PROJECT_INSTANCE_YAML = Path("dagster.yaml")


class InstanceSetupError(RuntimeError):
    """DAGSTER_HOME cannot be opened; the message says why and what to do."""


def dagster_home() -> Path:
    """DAGSTER_HOME (set to `./.dagster_home` when unset, as `make` does), created if missing."""
    home = Path(os.environ.get("DAGSTER_HOME") or Path.cwd() / ".dagster_home").resolve()
    home.mkdir(parents=True, exist_ok=True)
    os.environ["DAGSTER_HOME"] = str(home)  # Dagster accepts an absolute path only
    return home


def prepare_instance(settings: Path = PROJECT_INSTANCE_YAML):
    """The instance at DAGSTER_HOME with its settings file and databases in place; safe to call at any time.

    `settings` is copied in only when DAGSTER_HOME has no `dagster.yaml` yet (an operator's own is kept).
    """
    import dagster as dg

    home = dagster_home()
    with file_lock(home / ".init.lock"):
        target = home / "dagster.yaml"
        if not target.exists() and settings.exists():
            tmp = home / (temporary_prefix(target.name) + "copy")
            shutil.copyfile(settings, tmp)
            os.replace(tmp, target)  # a reader sees no file or the whole file
        try:
            return dg.DagsterInstance.get()  # opening a new instance creates its databases
        except Exception as error:
            if "more than one head" not in str(error):
                raise
            raise InstanceSetupError(
                f"The Dagster databases in {home} record two schema versions: two commands created them at "
                "the same time before the instance was initialised, and Dagster cannot open them any more. "
                f"If the run history there is not needed, delete {home} and run `make init` again."
            ) from error


def main() -> int:
    try:
        instance = prepare_instance()
    except InstanceSetupError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"Dagster instance ready in {os.environ['DAGSTER_HOME']} ({type(instance.run_storage).__name__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
