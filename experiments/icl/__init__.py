"""In-context linear regression study (He, Pan, Chen, Yang, ICML 2025, arXiv 2503.12734).

Modules: `data` (prompts), `model` (one-layer multi-head softmax / linear attention, pure
functions over a params dict), `predictors` (GD, debiased GD, reduced multi-head, single
head, ridge), `training` (joint multi-model, multi-seed trainer with orbax resume),
`analysis` (structure readouts, error vs length, non-isotropic and multi-task),
`plots`, and `study` (the binary's library: `study.run(config, workdir)`).
"""
