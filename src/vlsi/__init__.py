"""vlsi: VLsI (Verbalized Layers-to-Interactions, arXiv 2412.01822).

Layer-wise distillation from a large vision-language model (teacher) into a small one
(student) in three steps: verbalization, interaction with adaptive layer matching, SFT.
docs/method.md describes every choice the paper leaves open and the module that makes it.
"""

__version__ = "0.1.0"

from vlsi.errors import VlsiError

__all__ = ["VlsiError", "__version__"]
