"""LightningModules for the three stages (teacher pretraining, distillation, APT) and their callbacks."""
