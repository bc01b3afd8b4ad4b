"""The local platform around the library: sample data, local services (Prefect, MLflow) and the end-to-end run.

The Prefect flow itself lives in `flows/kaleido_flow.py`; it only calls the `kaleido` CLI, DVC and the registry.
"""
