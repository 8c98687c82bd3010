"""torch dtypes of the dtype names kernels and IR use (the IR itself never imports torch)."""
import torch

TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
                "float16": torch.float16, "float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2,
                "int8": torch.int8, "uint8": torch.uint8, "int32": torch.int32, "int64": torch.int64,
                "bool": torch.bool}
