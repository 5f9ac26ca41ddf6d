"""Parallelism on real torch.distributed collectives (lesson 08): gloo on a laptop, NCCL on GPUs."""
from .launcher import RankError, RankTimeout, choose_backend, device, launch

__all__ = ["launch", "RankError", "RankTimeout", "choose_backend", "device"]
