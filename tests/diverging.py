"""A test strategy whose loss turns NaN at a known place: task index 1, the 3rd training step.

Run it as ``--strategy diverging:Diverging`` with ``tests/`` on PYTHONPATH."""
from __future__ import annotations

from clframe.strategies.base import Batch, ForwardOutput
from clframe.strategies.linear import Linear

BAD_TASK, BAD_STEP = 1, 2  # 0-based: the 3rd step of the 2nd task


class Diverging(Linear):
    """The linear probe, except that one training batch gets NaN logits."""

    capturable_step = False  # its step counter is Python state: a replayed graph would not advance it

    def forward(self, batch: Batch) -> ForwardOutput:
        out = super().forward(batch)
        if batch.training and self.task_id == BAD_TASK:
            self.steps_in_task = getattr(self, "steps_in_task", 0) + 1
            if self.steps_in_task == BAD_STEP + 1:
                out.logits = out.logits * float("nan")
        return out
