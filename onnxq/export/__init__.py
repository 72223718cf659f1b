"""Export: weight and activation Q/DQ, MatMulNBits, atomic writing and output checks."""
