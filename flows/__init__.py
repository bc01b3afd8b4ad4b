"""Prefect flows of the Kaleido platform (deployments in prefect.yaml)."""
