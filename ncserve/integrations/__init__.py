"""Framework callbacks over ``ncserve.track.Tracker``.

``ncserve.integrations.lightning.NCTrackerCallback`` (extra ``ncserve[lightning]``) and
``ncserve.integrations.hf.NCTrackerCallback`` (extra ``ncserve[hf]``). Import the module of
the framework you use; this package imports neither framework by itself.
"""
