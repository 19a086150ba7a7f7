"""Model definitions. Importing this package registers every variant with timm."""
from hymamba.models.mambavision import VARIANTS, MambaVision

__all__ = ["MambaVision", "VARIANTS"]
