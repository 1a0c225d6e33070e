"""Triton reads TRITON_INTERPRET when it is first imported: set it before any test imports it.

The repository's top-level folders are installed as `esp.*`; on `sys.path` (`python -m pytest`
puts the working directory there) its `kernels/` folder would shadow the Hugging Face `kernels`
package, which transformers (the tests' oracle) imports when it is installed."""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]
