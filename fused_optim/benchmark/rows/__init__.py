"""The benchmark's rows, one module per op family (regularization, clip_grad, pre_step, averaging,
ensemble, dropout, structured_dropout, flat, step): each holds the family's ``*_rows(bench, case)``
function, which times the fused ops beside their references and returns the table's rows, and the
baselines (seed_*, foreach_*, ...) it times them against."""
