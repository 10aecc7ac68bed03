"""Compression phases' components: distillation losses, student construction (pruning to come)."""

from dist_dpc.compress.distill import every_other_layer, kd_loss, student_from_teacher

__all__ = ["every_other_layer", "kd_loss", "student_from_teacher"]
