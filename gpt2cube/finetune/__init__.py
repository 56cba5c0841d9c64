"""Recovery: fine-tuning with the compression in the loop.

`fakequant` holds the exact values the converter stores, `qat` swaps them into a model for the
forward and backward passes (straight-through estimator), `tasks` makes the batches (language
modelling, supervised spam as language modelling), `loop` is the one training loop that serves
QAT, distillation and task fine-tuning.
"""
