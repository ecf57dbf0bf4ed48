"""`make demo`'s terminal: one line per job and the final tables; everything else goes to its log file.

| written inside a job, by                      | terminal | log file |
|-----------------------------------------------|----------|----------|
| print() (Dagster's event lines, summaries)     | no       | yes      |
| the logging module (library INFO and warnings) | no       | yes      |
| warnings.warn                                  | no       | yes      |
| a library writing to file descriptor 2 itself  | no       | yes      |
| the demo's own line after the job              | yes      | no       |
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
