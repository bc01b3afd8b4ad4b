"""Training: the DeepSpeed worker and its launchers (local torchrun, Kubernetes)."""
