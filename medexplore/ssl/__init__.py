"""Self-supervised pretraining: VICReg loss, expander and two-view augmentation."""
from .vicreg import Expander, VICRegLoss, gather_with_grad
from .views import TwoViews, ViewAugment, gaussian_blur

__all__ = ["Expander", "VICRegLoss", "TwoViews", "ViewAugment", "gather_with_grad", "gaussian_blur"]
