"""run.compile: torch.compile applied to the plain student from outside, before DeepSpeed wraps it.

'blocks': each of the student backbone's blocks; its `forward` is compiled, not its `__call__`, so the
hooks on the block stay outside the graph. Under ZeRO-3 the block then gathers its parameters whole and
the hooks inside it are removed (`gather_blocks_whole`): one graph per block shape, no break.
Activation checkpointing wraps the compiled forward unchanged.

'model': the student's networks whole (the backbone's `forward_features` and `forward`, the head), one
graph per crop shape. Only below ZeRO stage 3 (trainer/ds_config.py refuses it there): DeepSpeed 0.19's
`engine.compile()` is `nn.Module.compile` unless its DeepCompile (CUDA only) is on, and it traces the
ZeRO-3 hooks (a break at every submodule) and the methods' reads of partitioned parameters outside
them (cls_token, pos_embed), which dynamo cannot follow.

The Triton attention is a torch.library custom op (models/kernels/attention_triton.py): one opaque call
in the graph, not a break. The softmax-CE losses run outside the compiled student."""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


def backbone_blocks(backbone: nn.Module) -> list[nn.Module]:
    blocks = getattr(backbone, "blocks", None)
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or not len(blocks):
        raise ValueError(f"run.compile blocks: the student's {type(backbone).__name__} has no `blocks` to compile; "
                         "use run.compile model (below ZeRO stage 3) or off")
    return list(blocks)


def compile_student(method: nn.Module, mode: str, zero_stage: int) -> None:
    """Compile the student's blocks or networks in place (before `deepspeed.initialize`)."""
    if mode == "off":
        return
    backbone = method.student["backbone"]
    if mode == "blocks":
        blocks = backbone_blocks(backbone)
        for block in blocks:
            block.forward = torch.compile(block.forward)
        log.info("run.compile blocks: %d blocks of the student compiled (torch.compile, inductor)%s", len(blocks),
                 "; each gathered whole by ZeRO-3" if zero_stage == 3 else "")
        return
    for net in method.student.values():
        for attr in ("forward_features", "forward"):
            if hasattr(net, attr):
                setattr(net, attr, torch.compile(getattr(net, attr)))
    log.info("run.compile model: the student's %s compiled (torch.compile, inductor)", ", ".join(method.student))


def gather_blocks_whole(engine, blocks: list[nn.Module]) -> None:
    """ZeRO-3 with compiled blocks: each block's parameters gathered and released by the block's own hooks,
    none inside it. DeepSpeed hooks every submodule; a hook inside a compiled forward breaks its graph
    (they are `torch.compiler.disable`d, and each Linear's integer ds_id recompiles the graph). So, after
    `deepspeed.initialize`: a block is flagged a ZeRO-3 leaf (its hooks then fetch, re-fetch for backward
    and release all its parameters, recursively) and the hooks DeepSpeed put on its submodules are
    removed. Not `set_z3_leaf_modules` before initialize: that also moves the gradient reduction to the
    block's backward hook, which can run before the compiled graph's parameter gradients are accumulated
    (seen here: iBOT's block weights reduced without their gradients); the per-parameter gradient hooks,
    set up by then, stay."""
    from deepspeed.utils import set_z3_leaf_module

    offload = getattr(engine.optimizer, "parameter_offload", None)
    if offload is None or not hasattr(offload, "forward_hooks") or not hasattr(offload, "backward_hooks"):
        raise RuntimeError("run.compile blocks under ZeRO-3: this DeepSpeed keeps its module hooks elsewhere than "
                           "parameter_offload.forward_hooks/backward_hooks (tested with 0.19); use run.compile off")
    inner = set()
    for block in blocks:
        set_z3_leaf_module(block, True)
        for m in block.modules():
            if m is not block:
                inner |= {id(m._forward_pre_hooks), id(m._forward_hooks)}
    removed = 0
    for hooks in (offload.forward_hooks, offload.backward_hooks):
        for handle in list(hooks):
            table = handle.hooks_dict_ref()
            if table is not None and id(table) in inner:
                handle.remove()
                hooks.remove(handle)
                removed += 1
    log.info("run.compile blocks: %d ZeRO-3 hooks inside the blocks removed; each block gathers its parameters whole",
             removed)


def graph_counts() -> dict[str, int]:
    """What dynamo compiled in this process so far: unique graphs and graph breaks."""
    from torch._dynamo.utils import counters

    return {"compile_graphs": int(counters["stats"]["unique_graphs"]),
            "compile_graph_breaks": int(sum(counters["graph_break"].values()))}


class CompileReport:
    """Logs, once, what compiling cost: the first step (which compiles) against the second, and the graph
    and break counts after it, so a user sees the compile time and whether the graph broke."""

    def __init__(self, mode: str):
        self.mode, self.first, self.done = mode, None, mode == "off"

    def step(self, seconds: float) -> dict[str, int]:
        """Called after each step with its time; -> the counts, once (after the second step), else {}."""
        if self.done:
            return {}
        if self.first is None:
            self.first = seconds
            return {}
        self.done = True
        counts = graph_counts()
        log.info("run.compile %s: the first step took %.1f s, the second %.2f s (about %.1f s compiling); %d graphs, "
                 "%d graph breaks", self.mode, self.first, seconds, max(0.0, self.first - seconds),
                 counts["compile_graphs"], counts["compile_graph_breaks"])
        return counts
