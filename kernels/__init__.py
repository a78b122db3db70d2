"""Triton kernels of yolozu_ttt (shipped as ``yolozu_ttt.kernels``).

``entropy`` and ``mim``: the kernels and launchers behind ``yolozu_ttt.ops`` (which owns their
semantics and autograd); ``update``: the fused update engine, the GPU twin of ``yolozu_ttt._C``.
Of the package they import ``yolozu_ttt.common`` only, never ``yolozu_ttt.ops``.
"""
