"""Triton kernels of yolozu_ttt (shipped as ``yolozu_ttt.kernels``).

``entropy`` and ``mim``: the kernels and launchers behind ``yolozu_ttt.ops`` (which owns their
semantics and autograd); ``update_kernels``: the fused update's kernels, and ``update``: its
stateful arena group and launch API, the GPU twin of ``yolozu_ttt._C``. What they share is in
``_shared`` (rounding, the ticket, partial sums, the restore mixer, the tile warps) and
``constants`` (the named constants, also the C++ engine's; no Triton, so the CPU engine imports
it anywhere). Of the package they import ``yolozu_ttt.common`` only, never ``yolozu_ttt.ops``.
"""
