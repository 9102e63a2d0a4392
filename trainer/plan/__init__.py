"""Sizing a run before it starts: parameter counts, activation memory, FLOPs per step and the
per-GPU memory plan under a DeepSpeed config, all from the config's own networks built on the
meta device (shapes only: a 1.8B-parameter model costs no memory and builds in a second).

    workload.py  the method's networks on the meta device, and what one micro-batch runs through them
    memory.py    the per-GPU memory table for a ZeRO stage / offload / world size, fit and largest micro-batch
    flops.py     model FLOPs per step, and the bf16 peaks of known devices (model FLOP utilisation)
"""
