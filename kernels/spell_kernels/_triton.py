"""Triton, or stand-ins where it is not installed (macOS, Windows, CPU-only setups).

The kernel modules import `triton`, `tl` and `HAS_TRITON` from here. Without Triton they still
import and their PyTorch paths run: `triton.jit` keeps the function and gives an object that
refuses to launch, `tl.constexpr` serves the kernels' annotations, and the launch-size helpers
(`cdiv`, `next_power_of_2`) are plain Python. `_dispatch.use_triton` refuses a Triton path first,
with the same advice.
"""
try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

MISSING_TRITON = ("the `triton` package is not installed: install it (pip install triton; Linux with a GPU) "
                  "to run the Triton kernels, or use CPU tensors or SPELL_KERNELS=torch for the PyTorch path")


class _KernelWithoutTriton:
    """What @triton.jit gives without Triton: the function, kept, and a clear error on launch."""

    def __init__(self, fn):
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", "kernel")
        self.__doc__ = getattr(fn, "__doc__", None)

    def __getitem__(self, grid):
        raise RuntimeError(f"spell_kernels: cannot launch the Triton kernel {self.__name__}: {MISSING_TRITON}")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"spell_kernels: cannot call the Triton function {self.__name__}: {MISSING_TRITON}")


class _TritonStandIn:
    @staticmethod
    def jit(fn=None, **_options):
        if fn is None:  # @triton.jit(...) with options
            return _KernelWithoutTriton
        return _KernelWithoutTriton(fn)

    @staticmethod
    def cdiv(a: int, b: int) -> int:
        return -(-a // b)

    @staticmethod
    def next_power_of_2(n: int) -> int:
        return 1 << (int(n) - 1).bit_length() if n > 0 else 0


class _LanguageStandIn:
    class constexpr:  # noqa: N801 (triton.language's name): only read in the kernels' annotations
        pass


if not HAS_TRITON:
    triton = _TritonStandIn()
    tl = _LanguageStandIn()
