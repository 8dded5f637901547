"""lm-eval hooks of the passkey task; the logic lives in pieval.passkey."""

from pieval.passkey import PasskeyTask, build_dataset, process_results

__all__ = ["PasskeyTask", "build_dataset", "process_results"]
