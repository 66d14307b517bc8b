"""gptcore: a GPT-2-architecture model in PyTorch and in NVIDIA cuTile kernels, trained, verified,
benchmarked and sampled through a DVC pipeline that logs to MLflow."""

__version__ = "0.1.0"
