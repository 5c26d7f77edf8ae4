"""What a run records: metrics.jsonl always, TensorBoard event files when asked for."""

import json
import os
import warnings

from .. import files

METRICS_FILE = os.path.join("logs", "metrics.jsonl")


def peak_bytes(memory_stats):
    """The largest "peak_bytes_in_use" among devices' `memory_stats()` dicts, or None when none
    reports it (CPU devices return None)."""
    peaks = [int(stats["peak_bytes_in_use"]) for stats in memory_stats if stats and "peak_bytes_in_use" in stats]
    return max(peaks) if peaks else None


def device_memory_stats(device):
    """`device.memory_stats()`, or None where the backend has no such query (CPU)."""
    try:
        return device.memory_stats()
    except (NotImplementedError, RuntimeError):  # a backend without the query (XlaRuntimeError)
        return None


def peak_device_bytes(devices):
    """Peak device memory in use on any of `devices` since the process started, or None."""
    return peak_bytes([device_memory_stats(device) for device in devices])


def startup_text(timings):
    """One line of what a run's start cost, e.g. "loaded model in 3.1 s; compiled step in 12.4 s;
    peak device memory 7.25 GiB"; the memory only where it is known.

    Args:
      timings: {"load_model_s", "compile_step_s": seconds, "peak_device_bytes": int or None,
        optionally "estimated_device_bytes": the compiled step's memory per device (footprint.py),
        None or absent where unknown}; "compile_step_s" is None when a run that compiles on its
        first step took none.
    """
    text = f"loaded model in {timings['load_model_s']:.1f} s"
    if timings.get("compile_step_s") is not None:
        text += f"; compiled step in {timings['compile_step_s']:.1f} s"
    peak, estimate = timings.get("peak_device_bytes"), timings.get("estimated_device_bytes")
    if peak is not None:
        text += f"; peak device memory {peak / 2**30:.2f} GiB"
        if estimate is not None:
            text += f" (step estimated {estimate / 2**30:.2f} GiB)"
    elif estimate is not None:
        text += f"; step estimated {estimate / 2**30:.2f} GiB of device memory"
    return text


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

    def log(self, step, scalars, prefix="train/"):
        """One line {"step": step, **scalars} in metrics.jsonl; each scalar (a list: each item) to
        TensorBoard as `prefix + name`."""
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
                    self.writer.add_scalar(f"{prefix}{name}", value, step)
                elif isinstance(value, list):
                    for i, v in enumerate(value):
                        self.writer.add_scalar(f"{prefix}{name}/{i}", v, step)

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
