"""Thin modules for TopK and Expander sparse autoencoders, built on :mod:`topk_kernels`."""
