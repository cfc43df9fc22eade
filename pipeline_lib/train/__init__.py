"""Trainers: SFT, Bradley-Terry reward models, the preference methods and PPO (accelerate).

Nothing here assumes a GPU: ``accelerate`` places the model on whatever device is there and
handles mixed precision where configured. Every loop returns per-step log rows for the
``train_log`` table.

Under ``accelerate launch`` (several processes) the batch size stays global: each rank takes a
contiguous slice of every batch (:func:`pipeline_lib.train.distributed.rank_slice`) and scales its
loss so that the averaged gradient is that of the global batch (token mean for SFT, pair mean
for reward models), as in one process; logged values are reduced over ranks; validation runs
on every rank over the whole held-out set. In one process nothing changes.
"""
