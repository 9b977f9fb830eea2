"""The Triton Python-backend model file (copied into the model repository)."""
