"""The compute kernels, one module each; importing this package imports none of them.

- ``_jit``: every numba flag, and the process set-up (``setup``, ``ready``,
  ``set_threads``), done by explicit calls, nothing at import.
- ``moments``: count, mean, m2 (m3, m4), min, max, NaN count per unit
  (``moments4``, ``moments4_higher``), with ``_keys`` for their vectorizing
  min/max loops.
- ``normalize``: y = (x - mean) * scale + shift per unit (``normalize4``).
- ``numpy_engine``: the same moments with numpy, for small inputs.

Every kernel takes the C-contiguous (P, A, U, B) view of ``layout.Plan.kernel_view``.
"""
