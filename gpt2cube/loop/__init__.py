"""The training loop every trainer here shares (`train`, every `finetune` mode, `baseline neural`),
single-process or data-parallel under torchrun (DDP, or FSDP2 with `--fsdp`)."""
