"""`make demo`'s terminal: one line per job and the final tables; everything else goes to its log file.

| written inside a job, by                      | terminal | log file |
|-----------------------------------------------|----------|----------|
| print() (Dagster's event lines, summaries)     | no       | yes      |
| the logging module (library INFO and warnings) | no       | yes      |
| warnings.warn                                  | no       | yes      |
| a library writing to file descriptor 2 itself  | no       | yes      |
| the demo's own line after the job              | yes      | no       |

The demo's run config: the maker task's training_job gets `DEMO_TRAINING` (valid against the job's schema,
shorter than the default, every other field at its default); the class task's and the other jobs get none.
"""

import subprocess
import sys
import textwrap


def test_job_output_goes_to_the_log_and_only_the_demo_lines_reach_the_terminal(tmp_path):
    log = tmp_path / "home" / "demo.log"
    script = textwrap.dedent(
        f"""
        import logging, os, sys, warnings
        from pathlib import Path
        from car_maker_pipeline.demo import output_to

        logging.basicConfig(level=logging.INFO)
        with output_to(Path({str(log)!r})):
            print("event line")
            logging.getLogger("mlflow").info("library info")
            warnings.warn("library warning")
            os.write(2, b"progress bar\\n")
        print("data_job: ok in 3s")
        """
    )
    shown = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert shown.stdout == "data_job: ok in 3s\n" and shown.stderr == ""
    logged = log.read_text()
    for line in ("event line", "library info", "library warning", "progress bar"):
        assert line in logged, line
    assert "data_job" not in logged


def test_the_demo_trains_the_maker_task_shorter_and_configures_nothing_else():
    import dagster as dg

    from car_maker_pipeline.definitions import defs
    from car_maker_pipeline.demo import DEMO_TRAINING, PER_MODEL_JOBS, run_config
    from car_maker_pipeline.training.config import LoraHyperparameters

    for job, partition in [("data_job", None)] + [(job, "tiny-m|maker") for job in PER_MODEL_JOBS]:
        dg.validate_run_config(defs.resolve_job_def(job), run_config(job, partition))  # an unknown field fails
    resolved = dg.validate_run_config(defs.resolve_job_def("training_job"), run_config("training_job", "tiny-m|maker"))
    training = resolved["ops"]["lora_checkpoints"]["config"]
    assert training["max_steps"] == DEMO_TRAINING["max_steps"] < LoraHyperparameters().max_steps
    assert training["learning_rate"] == LoraHyperparameters().learning_rate  # every other field keeps its default
    assert run_config("training_job", "tiny-s|class") == {}  # the class task trains the default length
    assert run_config("baseline_job", "tiny-s|maker") == run_config("serving_job", "tiny-s|maker") == {}
