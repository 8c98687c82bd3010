"""The ShiftAdd family (issue 9), CPU-verifiable foundations: power-of-two weight quantization and
its packed format (quant.py), Q16.16 fixed point and the integer shift-linear reference (fixed.py),
the add primitive's binary codes, Hamming scores and masked accumulation (add.py), the
latency-aware router loss (router.py), and TIR for the shift-linear and Hamming kernels
(tvm_shift.py, tvm_hamming.py; built for llvm by pigeon/runtime/tvm_llvm.py); the layers built on
them, ShiftLinear, AddAttention and the mixture MoEMLP (layers.py), and the ShiftAdd ViT block
(block.py, a torch module: not yet compiled through the DSL).  No GPU kernel of the family runs yet."""
