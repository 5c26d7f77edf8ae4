"""What a run records: metrics.jsonl always, TensorBoard event files when asked for."""

import json
import os
import warnings

from . import files

METRICS_FILE = os.path.join("logs", "metrics.jsonl")


def tensorboard_available():
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        return False
    return True


class MetricsLogger:
    """Appends one JSON line per logged step to `output_dir/logs/metrics.jsonl` and, with
    report_to="tensorboard", writes the same scalars to event files under `logging_dir`
    (relative to output_dir, as in diffusers' scripts)."""

    def __init__(self, output_dir, logging_dir="logs", report_to="none", enabled=True):
        self.enabled = enabled
        self.writer = None
        self.file = None
        if not enabled:
            return
        self.path = os.path.join(output_dir, METRICS_FILE)
        with files.writing(self.path):  # read-only or full before training: one line, exit 2
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self.file = open(self.path, "a", encoding="utf-8")
        if report_to == "tensorboard":
            from tensorboardX import SummaryWriter

            with files.writing(os.path.join(output_dir, logging_dir)):
                self.writer = SummaryWriter(os.path.join(output_dir, logging_dir))

    def log(self, step, scalars):
        if not self.enabled:
            return
        if self.file is not None:
            try:
                self.file.write(json.dumps({"step": step, **scalars}) + "\n")
                self.file.flush()
            except OSError as err:  # a full disk loses log lines, never the run: warn once, stop logging
                warnings.warn(f"{files.WriteFailed(self.path, err)}; metrics are no longer logged there, training continues",
                              stacklevel=2)
                self._close_file()
        if self.writer is not None:
            for name, value in scalars.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(f"train/{name}", value, step)
                elif isinstance(value, list):
                    for i, v in enumerate(value):
                        self.writer.add_scalar(f"train/{name}/{i}", v, step)

    def log_image(self, step, name, image):
        """An HWC uint8 image to TensorBoard (metrics.jsonl holds only scalars)."""
        if self.enabled and self.writer is not None:
            self.writer.add_image(name, image, step, dataformats="HWC")

    def _close_file(self):
        file, self.file = self.file, None
        try:
            file.close()
        except OSError:
            pass  # the buffered lines could not be written either; warned already

    def close(self):
        if self.file is not None:
            self._close_file()
        if self.writer is not None:
            self.writer.close()
