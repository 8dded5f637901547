"""lm-eval hooks of the passkey task; the logic lives in pieval.passkey."""

from pieval.passkey import PasskeyTask, process_results

__all__ = ["PasskeyTask", "process_results"]
