#!/usr/bin/env bash
# An MLflow tracking server with a PostgreSQL backend store and a served artifact root.
# Listens on loopback unless MLFLOW_HOST says otherwise; point the pipeline at it with
#   export MLFLOW_TRACKING_URI=http://127.0.0.1:${MLFLOW_PORT:-5000}
# Credentials come from the environment:
#   MLFLOW_PG_HOST (127.0.0.1) MLFLOW_PG_PORT (5432) MLFLOW_PG_USER MLFLOW_PG_PASSWORD MLFLOW_PG_DB (mlflow)
#   MLFLOW_ARTIFACTS (file://$PWD/mlflow-artifacts; s3://... or gs://... in production)
set -euo pipefail
: "${MLFLOW_PG_USER:?set MLFLOW_PG_USER}" "${MLFLOW_PG_PASSWORD:?set MLFLOW_PG_PASSWORD}"
# The store URI holds the password: it reaches mlflow (which reads --backend-store-uri from this
# variable) through the environment, not the command line that any local user can read (ps).
# MLflow's job runner (eight more Python processes, for its GenAI evaluation jobs) serves nothing the pipeline
# records; set MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true to have it anyway.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
export MLFLOW_BACKEND_STORE_URI="postgresql://${MLFLOW_PG_USER}:${MLFLOW_PG_PASSWORD}@${MLFLOW_PG_HOST:-127.0.0.1}:${MLFLOW_PG_PORT:-5432}/${MLFLOW_PG_DB:-mlflow}"
exec mlflow server \
  --artifacts-destination "${MLFLOW_ARTIFACTS:-file://$PWD/mlflow-artifacts}" \
  --serve-artifacts \
  --host "${MLFLOW_HOST:-127.0.0.1}" \
  --port "${MLFLOW_PORT:-5000}" \
  --workers "${MLFLOW_WORKERS:-2}"
