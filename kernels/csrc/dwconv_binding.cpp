// PyTorch binding of the depthwise conv kernels: argument checks, weight orientation, workspace, streams.
// The op schema, fake (meta) kernels and autograd live in kernels/cuda_ext.py (torch.library.custom_op),
// so this file only exposes plain functions.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "dwconv.h"

#define SLAK_CHECK(cond, ...) TORCH_CHECK(cond, "slak dwconv2d: ", __VA_ARGS__)

namespace {

slak_dw::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return slak_dw::kFloat32;
    case at::kHalf: return slak_dw::kFloat16;
    case at::kBFloat16: return slak_dw::kBFloat16;
    default: SLAK_CHECK(false, "dtype ", t.scalar_type(), " is not supported; use float32, float16 or bfloat16");
  }
  return slak_dw::kFloat32;
}

void check_input(const at::Tensor& t, const char* name) {
  SLAK_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got device ", t.device());
  SLAK_CHECK(t.dim() == 4, name, " must be 4-D (N, C, H, W), got ", t.dim(), "-D");
  SLAK_CHECK(t.is_contiguous(), name, " must be NCHW-contiguous (the Python wrapper makes it so)");
}

void check_status(int status, const char* what) {
  SLAK_CHECK(status == 0, what, " failed: ", cudaGetErrorString(static_cast<cudaError_t>(status)));
}

}  // namespace

// flip = true computes the input gradient: the forward with the kernel rotated by 180 degrees. The kernels read
// the weight as given (any kernel dtype, global orientation), so no conversion or flip op runs per call.
at::Tensor dwconv_forward(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                          bool flip) {
  check_input(x, "x");
  SLAK_CHECK(weight.is_cuda() && weight.device() == x.device(), "weight must be on ", x.device());
  SLAK_CHECK(weight.dim() == 4 && weight.size(1) == 1 && weight.size(0) == x.size(1),
             "weight must be (C, 1, kh, kw) with C = ", x.size(1), ", got ", weight.sizes());
  const int kh = static_cast<int>(weight.size(2)), kw = static_cast<int>(weight.size(3));
  SLAK_CHECK(kh % 2 == 1 && kw % 2 == 1, "kernel must be odd in both dims, got ", kh, "x", kw);
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return y;
  slak_dw::Plan plan;
  SLAK_CHECK(slak_dw::make_forward_plan(x.size(0), static_cast<int>(x.size(1)), static_cast<int>(x.size(2)),
                                        static_cast<int>(x.size(3)), kh, kw, &plan) == 0,
             "kernel ", kh, "x", kw, " needs more shared memory than this GPU offers");
  const at::Tensor w = weight.contiguous();
  plan.wdtype = dtype_of(w);
  plan.wflip = flip ? 1 : 0;
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    SLAK_CHECK(bias->numel() == x.size(1), "bias must have C = ", x.size(1), " elements");
    b = bias->to(x.device(), at::kFloat).contiguous();
  }
  const int status = slak_dw::forward(dtype_of(x), x.data_ptr(), w.data_ptr(),
                                      b.defined() ? b.data_ptr<float>() : nullptr, y.data_ptr(), plan,
                                      at::cuda::getCurrentCUDAStream().stream());
  check_status(status, "forward kernel launch");
  return y;
}

// Gradient w.r.t. the weight, in x's dtype: sum over N, H, W of dy * shifted x, accumulated in fp32 (per block,
// then over batch chunks in an fp32 workspace) and rounded once.
at::Tensor dwconv_wgrad(const at::Tensor& x, const at::Tensor& dy, int64_t kh, int64_t kw) {
  check_input(x, "x");
  check_input(dy, "grad_output");
  SLAK_CHECK(dy.sizes() == x.sizes(), "grad_output shape ", dy.sizes(), " must equal x shape ", x.sizes());
  SLAK_CHECK(dy.scalar_type() == x.scalar_type(), "grad_output dtype must equal x dtype");
  SLAK_CHECK(kh % 2 == 1 && kw % 2 == 1, "kernel must be odd in both dims, got ", kh, "x", kw);
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t C = x.size(1);
  if (x.numel() == 0) return at::zeros({C, 1, kh, kw}, x.options());
  const int sm_count = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  slak_dw::Plan plan;
  SLAK_CHECK(slak_dw::make_wgrad_plan(x.size(0), static_cast<int>(C), static_cast<int>(x.size(2)),
                                      static_cast<int>(x.size(3)), static_cast<int>(kh), static_cast<int>(kw),
                                      sm_count, &plan) == 0,
             "kernel ", kh, "x", kw, " needs more shared memory than this GPU offers");
  at::Tensor ws = at::empty({plan.n_chunks, C, plan.kh, plan.kw}, x.options().dtype(at::kFloat));
  const int status = slak_dw::wgrad(dtype_of(x), x.data_ptr(), dy.data_ptr(), ws.data_ptr<float>(), plan,
                                    at::cuda::getCurrentCUDAStream().stream());
  check_status(status, "weight-gradient kernel launch");
  at::Tensor dw = at::empty({C, 1, kh, kw}, x.options());
  check_status(slak_dw::finish_wgrad(dtype_of(x), ws.data_ptr<float>(), dw.data_ptr(), plan,
                                     at::cuda::getCurrentCUDAStream().stream()),
               "weight-gradient reduction launch");
  return dw;
}

// The launch geometry, for tests and the notes (no launch).
std::vector<int64_t> dwconv_plan(int64_t N, int64_t C, int64_t H, int64_t W, int64_t kh, int64_t kw, bool wgrad) {
  slak_dw::Plan p;
  int status;
  if (wgrad) {
    int dev = 0;
    cudaGetDevice(&dev);
    status = slak_dw::make_wgrad_plan(N, static_cast<int>(C), static_cast<int>(H), static_cast<int>(W),
                                      static_cast<int>(kh), static_cast<int>(kw),
                                      at::cuda::getDeviceProperties(dev)->multiProcessorCount, &p);
  } else {
    status = slak_dw::make_forward_plan(N, static_cast<int>(C), static_cast<int>(H), static_cast<int>(W),
                                        static_cast<int>(kh), static_cast<int>(kw), &p);
  }
  return {status, p.transposed, p.R, p.TH, p.TW, p.P, p.threads, p.smem_bytes, p.tiles_y, p.tiles_x, p.n_chunks};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &dwconv_forward, "depthwise same conv forward (NCHW); flip=True gives the input gradient",
        py::arg("x"), py::arg("weight"), py::arg("bias") = py::none(), py::arg("flip") = false);
  m.def("wgrad", &dwconv_wgrad, "depthwise same conv weight gradient (in x's dtype)", py::arg("x"), py::arg("grad_output"),
        py::arg("kh"), py::arg("kw"));
  m.def("plan", &dwconv_plan, "launch geometry: status, transposed, R, TH, TW, P, threads, smem, tiles_y, tiles_x, n_chunks");
}
