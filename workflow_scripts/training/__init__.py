"""The training stage's parts, one concern per module; `workflow_scripts.train` runs them.

params: the stage's parameters. text: caption draws and token masking. data: the memory-mapped side table
and its batches. optim: optimizer, schedule and the contrastive backward pass. state: what one run carries
from step to step, and the resume file.
"""
