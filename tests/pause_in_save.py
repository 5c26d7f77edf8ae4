"""`python tests/pause_in_save.py STEP ARGS...`: ti_flax.train's command line, with the checkpoint
save of step STEP stopped half-way (its state file written, the folder not yet renamed): it
prints a line and sleeps, so a test can kill the process inside the save. The fault is injected
by patching from outside; ti_flax itself has no test hook."""

import sys
import time

from ti_flax import formats
from ti_flax.commands import train as training


def main(step, args):
    real_save = formats.save_diffusers

    def save_then_pause(path, *rest, **kwargs):
        out = real_save(path, *rest, **kwargs)
        if f".checkpoint-{step}." in path:  # inside the temporary folder of that checkpoint
            print(f"paused inside the save of step {step}", flush=True)
            time.sleep(600)
        return out

    formats.save_diffusers = save_then_pause
    return training.main(args)


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), sys.argv[2:]))
