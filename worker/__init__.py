"""antenna-worker: a self-tuning Antenna image-inference worker with a memory watchdog."""

__version__ = "0.1.0"
