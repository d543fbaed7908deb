"""Track Neural Collapse from any training loop: ``Tracker`` (see tracker.py)."""

from ncserve.track.tracker import Tracker, TrackerError, find_classifier

__all__ = ["Tracker", "TrackerError", "find_classifier"]
