"""`mf-loss train`: a small causal language model trained on dp x mp ranks with the vocab-parallel loss.

Modules: `tokenizer` (character tokenizer over the shipped corpus), `data` (deterministic global
batches, split over data-parallel ranks and micro-batches), `model` (the model; its output layer is
split over model-parallel ranks), `trainer` (the step, the optimizer, checkpoints, outputs), `worker`
(the per-rank entry msrun starts), `run` (the parent: checks, launch, progress), `plot` (PNG chart),
`demo` (`mf-loss demo`).
"""
