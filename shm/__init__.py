"""Shared-memory segments: a lock-free session table and per-worker counters.

Every record is written by exactly one process and read by anyone without locks, using a
sequence counter that is odd while the record is being written (a seqlock).
"""
from shm.segment import Segment, SegmentError, attach, create, list_segments
from shm.table import SlotTable

__all__ = ["Segment", "SegmentError", "SlotTable", "attach", "create", "list_segments"]
