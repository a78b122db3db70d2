"""Triton kernels of yolozu_ttt (shipped as ``yolozu_ttt.kernels``)."""
