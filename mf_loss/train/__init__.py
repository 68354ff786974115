"""`mf-loss train`: a small Llama-style language model trained on dp x mp ranks with the vocab-parallel loss.

Modules: `tokenizer` (byte-level BPE over the shipped corpus, built once and cached), `data` (deterministic
global batches, split over data-parallel ranks and micro-batches), `model` (the model; its output layer is
split over model-parallel ranks), `checks` (what training needs of a config), `trainer` (the loop of
one rank: MindSpore's optimizer and schedule, the fused or unfused head, outputs), `step` (the training step
both trainers use: micro-batches, one data-parallel all-reduce, the exact global token mean, clipping),
`checkpoints` (per-rank checkpoints, latest.json, resume, full weights), `curve` (loss.csv), `progress` (the
progress events and their tqdm view), `plot` (matplotlib charts), `worker` (the per-rank entry msrun
starts), `run` (the parent: checks, data, launch on one or several nodes, progress), `compare` (two runs'
curves and weights), `demo` (`mf-loss demo`).
"""
