"""The methods apt trains with, each a plain-torch function over networks, a batch and an update protocol.

    flow_matching.teacher_loss      stage 0: the demo's teacher (rectified-flow matching)
    consistency.consistency_loss    stage 1: consistency distillation of the CFG teacher (APT §3.2)
    apt.apt_step                    stage 2: adversarial post-training, D step + G step + EMA (APT §3.3-3.5)

Nothing here imports Lightning or DeepSpeed: the runners (``apt.lit`` for Lightning's Trainer,
``apt.distributed.deepspeed_runner`` for ZeRO, ``eval/benchmark_train_step.py``, the tests) hold the
networks and optimisers and call these functions. A new method adds a file here.
"""
