"""Errors of the metric engine."""


class MetricInputError(ValueError):
    """Statistics or features that cannot be measured; the message names the field and value."""
