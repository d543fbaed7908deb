"""Track Neural Collapse from any training loop: ``Tracker`` (see tracker.py)."""

from ncserve.track.capture import TrackerError, find_classifier
from ncserve.track.tracker import Tracker

__all__ = ["Tracker", "TrackerError", "find_classifier"]
