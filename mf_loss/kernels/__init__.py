"""The C++ kernel source and its build (pure filesystem: compiler, flags, cache, lock; no MindSpore).

`mf_loss.ops.fused` registers the built library's functions as MindSpore operators.
"""
