"""ONNX export of fpdm models with the solver unrolled (see DESIGN.md)."""
