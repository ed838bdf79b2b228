"""Built-in tasks that run anywhere (pure torch, vectorised, CPU or CUDA)."""
