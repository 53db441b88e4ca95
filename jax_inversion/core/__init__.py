"""Plumbing every layer may use: errors, paths (local or gs://), the platform and its attention kernels, the device mesh, XLA flags, ahead-of-time compilation."""
