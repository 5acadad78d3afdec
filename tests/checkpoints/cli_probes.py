"""A callback for CLI subprocess tests: logs every training batch's labels, and can kill its process (SIGKILL)."""

import os
import signal

import lightning.pytorch as pl


class BatchLog(pl.Callback):
    """Append each training batch's labels to ``path``; at ``kill_at_step`` kill the process before training it."""

    def __init__(self, path: str, kill_at_step: int | None = None) -> None:
        self.path = path
        self.kill_at_step = kill_at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)  # as a crash or a pre-empted machine: no hook runs
        with open(self.path, "a") as file:
            file.write(" ".join(str(int(label)) for label in batch[1]) + "\n")
