"""Data views (one file per view): how a model family reads a dataset. See ``views.base``."""

from __future__ import annotations

from mirror.data.views.admissions import AdmissionsView
from mirror.data.views.base import Batch, DataView, SplitReport
from mirror.data.views.code_vector import CodeVectorView
from mirror.data.views.sequence import SequenceView
from mirror.data.views.visits import VisitsView
from mirror.data.views.windows import WindowsView

VIEWS: dict[str, type[DataView]] = {
    view.name: view for view in (SequenceView, CodeVectorView, WindowsView, VisitsView, AdmissionsView)
}

__all__ = ["VIEWS", "AdmissionsView", "Batch", "CodeVectorView", "DataView", "SplitReport", "SequenceView",
           "VisitsView", "WindowsView"]
