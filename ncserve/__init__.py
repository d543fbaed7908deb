"""ncserve: measure Neural Collapse (NC0-NC4) exactly in distributed training runs."""

__version__ = "0.1.0"
