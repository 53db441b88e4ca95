"""What a run leaves behind and others read: checkpoints, embedding exports (diffusers, A1111, extended), their PyTorch loaders."""
