"""The training methods, one module each, and the registry that finds them (see registry.py)."""
from .registry import all_methods, get_method, method_names

__all__ = ["all_methods", "get_method", "method_names"]
