"""The training layer: the parts of the one training loop (:class:`distill.trainer.Trainer`), one job each.

* :mod:`~distill.training.devices`: accelerate for a run (devices, processes, mixed precision, trackers);
* :mod:`~distill.training.speed`: the speed options (a half-precision teacher, gradient checkpointing,
  ``torch.compile``) and whether the CPU computes half precision natively;
* :mod:`~distill.training.fsdp`: sharding a method's networks across the processes (``trainer.fsdp``);
* :mod:`~distill.training.optim`: one AdamW per role, its learning-rate schedule, EMA updates;
* :mod:`~distill.training.guard`: the non-finite guard (a NaN/inf update is skipped and counted; a streak stops
  the run);
* :mod:`~distill.training.state`: checkpoint state and resume (weights, optimizers, random streams, data position).

The loop itself, which calls these in order, is :meth:`distill.trainer.Trainer.fit`: there is one. Below this
layer sit the mechanics these parts use: :mod:`distill.checkpoint` (the files), :mod:`distill.sharding` (FSDP2)
and :mod:`distill.precision` (short attention in fp32 on CPUs).
"""
