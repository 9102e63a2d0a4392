"""The teacher as an exponential moving average of the student, shard-local and in fp32.

Under ZeRO-3, student and teacher have identical shapes, so every rank owns the same slice of
each pair. The update reads the optimizer's fp32 master slice of each student parameter
(`safe_get_local_fp32_param`), updates an fp32 shadow of the same slice, and writes its cast into
the teacher's local partition (`ds_tensor`). Nothing is gathered and nothing is written through a
gather (writes inside `GatheredParameters` without `modifier_rank` are silently dropped).

The shadow matters: at momentum 0.9995 an update moves a weight by 0.0005 of its distance to the
student, far below bf16's resolution (2^-8 relative), so a bf16-only EMA rounds most updates away.

The student's master slices are read as views of the optimizer's own flat fp32 partitions, found
once: no copy and no host synchronisation per parameter (`safe_get_local_fp32_param` synchronises
DeepSpeed's reduce stream and copies the slice to the GPU on every call). So the shadow lives where
the masters do: on the GPU, or in CPU memory under `offload_optimizer` (as the memory planner counts
it), and each update writes only the bf16 cast of the teacher's slice to the GPU. Under NVMe
offload, whose partitions are swapped in and out, the reads go through DeepSpeed's accessor.

The pairs are the parameters the two have in common, by name. The teacher may lack some of the
student's (iBOT's --shared_head_teacher: a student with its own patch prototypes, a teacher
without); it may not have any the student lacks, and a common pair must have the same shape.

Without stage 3 (ZeRO-0/1/2, or no DeepSpeed) every rank holds whole parameters: the shadow is a
whole fp32 copy, started from the student's fp32 master weights and then updated from the
student's working weights, which every rank holds identically (under bf16 that adds one bf16
rounding of the student per update, scaled by 1 - m, never accumulated beyond one rounding).
"""

from __future__ import annotations

import torch
import torch.nn as nn


def _is_zero3(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_tensor")


def _shape(p: torch.Tensor) -> torch.Size:
    return p.ds_shape if _is_zero3(p) else p.shape


def _master_view(p: torch.Tensor) -> torch.Tensor | None:
    """This rank's fp32 master slice of a ZeRO-3 parameter as a view into the optimizer's flat fp32
    partition (where DeepSpeed keeps it: GPU or CPU), or None where that partition is swapped (NVMe)."""
    opt = getattr(p, "_z3_optimizer", None)
    if opt is None or not p.requires_grad:
        return None
    group, offset, numel = opt.grad_position[opt.get_param_id(p)]
    if opt._swappable_optimizer_subgroup(group):
        return None
    return opt.fp32_partitioned_groups_flat[group].narrow(0, offset, numel)


class TeacherEMA:
    """fp32 shadow of the teacher, updated from the student without gathering anything."""

    def __init__(self, student: nn.Module, teacher: nn.Module):
        s_named, t_named = dict(student.named_parameters()), dict(teacher.named_parameters())
        orphans = sorted(set(t_named) - set(s_named))
        if orphans:
            raise ValueError(f"teacher parameters without a student twin: {orphans[:5]}")
        self.names = [n for n in s_named if n in t_named]
        self.student_only = [n for n in s_named if n not in t_named]
        for name in self.names:
            a, b = _shape(s_named[name]), _shape(t_named[name])
            if a != b:
                raise ValueError(f"EMA pair {name}: student {tuple(a)} vs teacher {tuple(b)}")
        self.students = [s_named[n] for n in self.names]
        self.teachers = [t_named[n] for n in self.names]
        for name, s, t in zip(self.names, self.students, self.teachers):
            a, b = self._student_local(s), self._teacher_local(t)
            # DeepSpeed #2056: a pair partitioned differently would mix unrelated slices silently.
            if a.numel() != b.numel():
                raise RuntimeError(f"EMA pair {name}: student slice has {a.numel()} elements, teacher "
                                   f"slice {b.numel()}; student and teacher must be partitioned alike")
        self.shadow = [self._student_start(s) for s in self.students]
        # DeepSpeed's all-gather stream where there is one (trainer.engine.gather_stream), or
        # "synchronize" where it could not be found on a GPU
        self.gather_stream = None

    def _student_local(self, p: torch.Tensor) -> torch.Tensor:
        if _is_zero3(p):
            view = _master_view(p)
            if view is not None:
                return view
            from deepspeed.utils import safe_get_local_fp32_param  # only reached under ZeRO-3

            return safe_get_local_fp32_param(p)
        return p.data

    def _student_start(self, p: torch.Tensor) -> torch.Tensor:
        """fp32 start value of the shadow: the master weights where the optimizer keeps them."""
        if not _is_zero3(p) and hasattr(p, "_hp_mapping"):  # ZeRO-1/2: fragments on each rank, once
            from deepspeed.utils import safe_get_full_fp32_param

            return safe_get_full_fp32_param(p).detach().float().clone()
        return self._student_local(p).detach().float().clone()

    def _teacher_local(self, p: torch.Tensor) -> torch.Tensor:
        return p.ds_tensor.data if _is_zero3(p) else p.data

    @torch.no_grad()
    def copy_student_to_teacher(self) -> None:
        """Teacher := student (start of training), through the same local slices."""
        for sh, s, t in zip(self.shadow, self.students, self.teachers):
            sh.copy_(self._student_start(s).view_as(sh))
            self._teacher_local(t).copy_(sh.view_as(self._teacher_local(t)))

    @torch.no_grad()
    def update(self, momentum: float) -> None:
        """shadow = m * shadow + (1 - m) * student; teacher = cast(shadow). On a GPU the teacher's
        partitions are written on the current stream, and the stream DeepSpeed all-gathers them on is
        made to wait for it (`gather_stream`), so the next forward cannot gather a half-written slice."""
        students = [self._student_local(s).float().view_as(sh) for s, sh in zip(self.students, self.shadow)]
        torch._foreach_mul_(self.shadow, momentum)
        torch._foreach_add_(self.shadow, students, alpha=1.0 - momentum)
        for sh, t in zip(self.shadow, self.teachers):
            local = self._teacher_local(t)
            local.copy_(sh.to(local.dtype).view_as(local))  # cast where the shadow is: half the bytes to move
        if self.gather_stream == "synchronize":
            torch.cuda.current_stream().synchronize()
        elif self.gather_stream is not None:
            self.gather_stream.wait_stream(torch.cuda.current_stream())

    def state_dict(self) -> dict:
        """This rank's slices (each rank saves its own; the layout must match on load)."""
        return {"names": self.names, "shadow": [s.clone() for s in self.shadow]}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        if state["names"] != self.names:
            raise ValueError("EMA state belongs to another model (parameter names differ)")
        for sh, saved in zip(self.shadow, state["shadow"]):
            if saved.shape != sh.shape:
                raise ValueError(f"EMA shadow slice has shape {tuple(saved.shape)}, expected {tuple(sh.shape)}: "
                                 "saved by another number of ranks? trainer/resharding.py re-slices it")
            sh.copy_(saved)
        for sh, t in zip(self.shadow, self.teachers):
            local = self._teacher_local(t)
            local.copy_(sh.view_as(local))
