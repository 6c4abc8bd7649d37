"""The devices codecllm runs on, checked where a user names one."""

from __future__ import annotations

import torch

from codecllm.errors import ConfigError

DEVICES = "cpu, cuda or cuda:N"


def device_of(device: str | torch.device) -> torch.device:
    """`device` as a torch.device, or a ConfigError that names it when this machine cannot run
    on it (a typo, another backend, CUDA asked for where there is none, a GPU index too high)."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {str(device)!r} is not a device; use {DEVICES}") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {str(device)!r} was asked for but CUDA is not available here")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ConfigError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif resolved.type != "cpu":
        raise ConfigError(f"device {str(device)!r} is not supported; use {DEVICES}")
    return resolved
