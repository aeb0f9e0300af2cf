"""One module per op: schema, fake kernel, reference and public function (Triton kernels live in
fedspa_kernels.triton_kernels, C++/CUDA kernels in csrc/)."""
