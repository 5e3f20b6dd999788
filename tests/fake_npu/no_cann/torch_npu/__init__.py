"""A stand-in for torch_npu installed without Ascend CANN (tests only): importing it fails the way the real
package does when libhccl.so is not on the library path."""
raise ImportError("libhccl.so: cannot open shared object file: No such file or directory")
