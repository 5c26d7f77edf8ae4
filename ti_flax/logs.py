"""What a run records: metrics.jsonl always, TensorBoard event files when asked for."""

import json
import os

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
        path = os.path.join(output_dir, METRICS_FILE)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.file = open(path, "a", encoding="utf-8")
        if report_to == "tensorboard":
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(os.path.join(output_dir, logging_dir))

    def log(self, step, scalars):
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **scalars}) + "\n")
        self.file.flush()
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

    def close(self):
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()
