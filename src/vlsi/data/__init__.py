"""Datasets: visual-instruction data in the LLaVA JSON format.

Reading (LLaVA-style ``conversations`` or messages-style records, JSON or JSONL):
:mod:`vlsi.data.records`; chat template, labels and vision-token counts: :mod:`vlsi.data.encode`;
the validated torch dataset: :mod:`vlsi.data.dataset`; batching with placeholder expansion:
:mod:`vlsi.data.collator`; ``vlsi data check``: :mod:`vlsi.data.check`.
"""

from vlsi.data.check import check_data, format_report
from vlsi.data.collator import VisionLanguageCollator
from vlsi.data.dataset import DataSummary, VisualInstructionDataset
from vlsi.data.encode import IGNORE_INDEX, EncodedSample, SampleEncoder
from vlsi.data.records import Sample, Skip, read_records

__all__ = [
    "IGNORE_INDEX",
    "DataSummary",
    "EncodedSample",
    "Sample",
    "SampleEncoder",
    "Skip",
    "VisionLanguageCollator",
    "VisualInstructionDataset",
    "check_data",
    "format_report",
    "read_records",
]
