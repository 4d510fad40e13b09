"""train.py, killed by SIGKILL (no cleanup, as a power cut) at one moment: the resume tests' power cut.

``FINOLA_CRASH_AT=STAGE@STEP`` names the moment; the points are patched in here, train.py knows nothing of them:
  step                the optimizer step STEP of this process, after its backward pass, before the update
  checkpoint-written  the checkpoint of step STEP written (state.tmp) but not yet marked complete (trainer.json)
  checkpoint-old      that checkpoint complete, the previous ``state`` moved away, before state.tmp becomes ``state``
  checkpoint-new      just after state.tmp became ``state``

    FINOLA_CRASH_AT=step@3 python tests/crash.py TRAIN.PY-FLAGS   (also as ``accelerate launch``'s script)
"""
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import accelerate  # noqa: E402

import errors  # noqa: E402
import runs  # noqa: E402
import train  # noqa: E402

STAGE, STEP = os.environ["FINOLA_CRASH_AT"].split("@")
STEP = int(STEP)
checkpoint = {"step": None}  # the step whose checkpoint is being written


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def make_optimizer(*args, **kwargs):
    optimizer, steps = MAKE_OPTIMIZER(*args, **kwargs), [0]

    def before_step(*_):
        steps[0] += 1
        if STAGE == "step" and steps[0] == STEP:
            die()
    optimizer.register_step_pre_hook(before_step)
    return optimizer


def save_checkpoint(accelerator, out, step, *args, **kwargs):
    checkpoint["step"] = step
    return SAVE_CHECKPOINT(accelerator, out, step, *args, **kwargs)


def save_state(self, *args, **kwargs):
    result = SAVE_STATE(self, *args, **kwargs)
    if STAGE == "checkpoint-written" and checkpoint["step"] == STEP:
        self.wait_for_everyone()
        die()
    return result


def rename(self, target):
    into_place = self.name == "state.tmp" and Path(target).name == "state" and checkpoint["step"] == STEP
    if into_place and STAGE == "checkpoint-old":
        die()
    result = RENAME(self, target)
    if into_place and STAGE == "checkpoint-new":
        die()
    return result


MAKE_OPTIMIZER, SAVE_CHECKPOINT = train.make_optimizer, runs.save_checkpoint
SAVE_STATE, RENAME = accelerate.Accelerator.save_state, Path.rename
train.make_optimizer, runs.save_checkpoint = make_optimizer, save_checkpoint
accelerate.Accelerator.save_state, Path.rename = save_state, rename

if __name__ == "__main__":
    errors.run(train.main)
