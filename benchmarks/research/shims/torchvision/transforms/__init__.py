from torchvision._stub import module_getattr

__getattr__ = module_getattr("torchvision.transforms")
from . import functional, transforms  # noqa: E402,F401
