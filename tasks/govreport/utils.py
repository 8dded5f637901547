"""lm-eval hooks of the govreport_pi task; the logic lives in pieval.govreport."""

from pieval.govreport import GovReportTask, doc_to_text, process_results

__all__ = ["GovReportTask", "doc_to_text", "process_results"]
