"""Host-side integer helpers shared by the launchers.

Plain Python on purpose: in recent Triton ``triton.cdiv`` and ``triton.next_power_of_2`` are ``@triton.jit``
functions, and each call from Python costs microseconds, which add up in the per-call cost of small ops.
"""


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for integers, ``b > 0``."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ``>= n`` (1 for ``n <= 1``)."""
    return 1 << max(0, n - 1).bit_length()
