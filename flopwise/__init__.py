"""flopwise: spend compute wisely.

Sub-packages: ``flopwise.kernels`` (Triton kernels with PyTorch references),
``flopwise.models`` (layers and models), ``flopwise.coding`` (compressed text),
``flopwise.scaling`` (scaling-law fits).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
