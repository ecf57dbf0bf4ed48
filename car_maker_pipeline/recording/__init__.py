"""Recording: what the pipeline keeps in MLflow, above the evaluation and serving code it records.

- baseline.py: `baseline_evaluation`'s MLflow run and manifest; the shared run helpers.
- checkpoint_accuracy.py: every checkpoint scored, the best registered, the table, chart and manifest.
- registry.py: the registered classifier: pyfunc logging, versions bound to their files' hashes.
- aliases.py: champion/challenger, moved once the registering run has finished, one registration at a time.
- lineage.py: `mlflow.log_input` of the dataset splits a run saw.
"""
