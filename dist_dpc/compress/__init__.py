"""Compression phases' components: DPKD loss and student construction, DPIMP masks and layer removal."""

from dist_dpc.compress.config import DistillConfig, PruneConfig
from dist_dpc.compress.distill import DistillationLoss, every_other_layer, kd_loss, student_from_teacher

__all__ = ["DistillConfig", "DistillationLoss", "PruneConfig", "every_other_layer", "kd_loss", "student_from_teacher"]
