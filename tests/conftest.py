import os

# Before torch or triton is imported anywhere: Triton kernels run in the interpreter on the CPU,
# and OpenMP must not spin on the 2 vCPUs of the test machines.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
