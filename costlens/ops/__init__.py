"""The per-op cost rules (format: ops/registry.py). Importing the package registers them all."""
from costlens.ops import attention, elementwise, linear, moe, norms  # noqa: F401  (they register their rules)
