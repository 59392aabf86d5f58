"""Training: optimisers (ScaledAdam, AdamW), LR schedulers, DDP/DeepSpeed set-up, the training loop
and the recipe behind ``src/train.py`` / ``src/train_mose.py``.

- :mod:`llmasr.training.optim`      ScaledAdam, AdamW, parameter groups
- :mod:`llmasr.training.schedulers` FixedLRScheduler, WarmupCosine, Eden
- :mod:`llmasr.training.dist`       process launch (``--world-size``/torchrun), NCCL/gloo set-up
- :mod:`llmasr.training.logs`       per-rank log files, metrics, the metrics file (read_metrics), progress/ETA, tensorboard
- :mod:`llmasr.training.loop`       step_on_batch, train_step, train_one_epoch, compute_validation_loss, fault handling
- :mod:`llmasr.training.warmup`     the projector-only warm-up (aux CTC) on the same training step
- :mod:`llmasr.training.deepspeed`  DeepSpeed engine, ZeRO checkpoints -> epoch-N.pt
- :mod:`llmasr.recipes.train`     argument parser, checkpointing/resume, ``run``/``main``
"""
