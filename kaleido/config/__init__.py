"""The typed schema of params.yaml: the one source of truth for every knob.

DVC stages, the `kaleido` CLI and the Prefect flows all read the same file through `load_params`.
Unknown keys are errors (a typo must not silently fall back to a default).
"""

from kaleido.config.schema import (
    DataConfig,
    EvalConfig,
    FlowMatchingConfig,
    GateConfig,
    GenerateConfig,
    ModelConfig,
    Params,
    ParamsError,
    PlatformConfig,
    TrainConfig,
    find_params_file,
    load_params,
    params_hash,
)

__all__ = [
    "DataConfig",
    "EvalConfig",
    "FlowMatchingConfig",
    "GateConfig",
    "GenerateConfig",
    "ModelConfig",
    "Params",
    "ParamsError",
    "PlatformConfig",
    "TrainConfig",
    "find_params_file",
    "load_params",
    "params_hash",
]
