// Depthwise "same" convolution kernels (stride 1, odd kernels): the plain-C interface between the CUDA
// kernels (csrc/cuda/dwconv_kernels.cu, no ATen, so nvcc can compile them alone as a CI check) and the
// PyTorch binding (csrc/dwconv_binding.cpp).
//
// Every kernel works on (n, c) planes in an "slide orientation": the long kernel axis runs along the plane's
// rows, so a thread can keep a strip of outputs in registers and slide a window of inputs along that axis.
// When the kernel is wider than tall (5x51), the plane is transposed on its way into shared memory.
#pragma once

#include <cstdint>

namespace slak_dw {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Geometry of one launch, in slide orientation unless named global.
struct Plan {
  int64_t planes;  // N * C
  int channels;    // C (a plane's channel is plane % C)
  int H, W;        // global plane size
  int Hs, Ws;      // plane size in slide orientation
  int kh, kw;      // kernel in slide orientation (kh >= kw)
  int ph, pw;      // kh / 2, kw / 2
  int transposed;  // 1 when slide orientation = global transposed (kernel wider than tall)
  int R;           // outputs (fwd) or taps (wgrad) per thread along the slide axis
  int TH, TW;      // output tile (slide orientation)
  int G;           // row groups per tile (fwd): TH = G * R
  int P;           // planes per block (fwd)
  int tiles_y, tiles_x;
  int in_rows, in_cols, pitch;  // shared input tile: TH + kh - 1 rows, TW + kw - 1 cols, odd pitch
  int threads;
  int64_t smem_bytes;
  int n_chunks;    // wgrad: batch split (second-level reduction over chunks in fp32)
  int chunk;       // wgrad: planes of one channel per block
  int small;       // wgrad: 1 = small-map kernel (one plane per lane, whole chunk in registers)
  // Whole-plane path (path = 1): a block holds P whole planes of one channel (plus halo) in shared memory,
  // each thread a 2-D register block (R rows x 4 columns of outputs, or R taps x kw for the weight
  // gradient) with the short kernel axis kw (1, 3, 5 or 7) a compile-time constant.
  int path;        // 0 = tiled kernels, 1 = whole-plane kernels
  int kh_lo, khe;  // kernel rows [kh_lo, kh_lo + khe) can meet the map (the rest only ever see padding)
  int phe;         // ph - kh_lo
  int CT, CTp;     // column threads per row group (ceil(Ws / 4)); wgrad: rounded up to a power of two
  int YS;          // wgrad: row segments per plane
  int Gt, Gb;      // wgrad: tap groups (Gt * R >= khe) and groups per pass
  int plane_sz;    // floats per plane tile (input with halo)
  int pitch_d, dplane_sz;  // wgrad: dy tile pitch and size (floats; 16-bit values in the tensor-core wgrad)
  int acc_sz;      // wgrad: floats of the block's tap accumulators
  // Tensor-core forward (fp16/bf16, mma = 1; chosen at launch from a path-1 plan): pitch and plane_sz count
  // 16-bit elements of the transposed tile s[x + pw][y].
  int mma;
  int MT, HP;      // 16-row output strips per plane, rows rounded up to 16
  int NT8, CG, NTW;  // 8-column tiles per plane, column groups, tiles per column group
  int wpitch;      // 32-bit weight pairs per kernel column (khe + 64)
  int vin, vout;   // 16-bit elements per global load / store vector
  // Weights are read as given, (C, 1, kh, kw) in global orientation and any kernel dtype: the kernels orient,
  // flip (input gradient) and convert them while staging, so no extra PyTorch ops run per call.
  int wdtype;      // DType of the weight tensor
  int wflip;       // 1: use the kernel rotated by 180 degrees (input gradient = forward with flipped kernel)
  int pipe;        // whole-plane weight gradient: 1 = stage the next batch of planes with cp.async
  int raw_sz;      // floats per cp.async staging buffer (P planes, sized for fp32)
};

// Build the launch plan; returns 0 or a negative code when no tiling fits the device's shared memory.
int make_forward_plan(int64_t N, int C, int H, int W, int kh, int kw, Plan* plan);
int make_wgrad_plan(int64_t N, int C, int H, int W, int kh, int kw, int sm_count, Plan* plan);

// y = dwconv(x, w) (+ bias).  w: (C, 1, kh, kw) contiguous in global orientation, dtype plan.wdtype (flipped
// when plan.wflip). bias: fp32 or null. Returns a cudaError_t value (0 = success).
int forward(DType dtype, const void* x, const void* w, const float* bias, void* y, const Plan& plan,
            void* stream);

// workspace[chunk][c][i][j] = sum over the chunk's planes of dy * shifted x (slide orientation, fp32).
int wgrad(DType dtype, const void* x, const void* dy, float* workspace, const Plan& plan, void* stream);

// dw (C, 1, kh, kw) in global orientation and dtype out_dtype = the sum over the plan's n_chunks workspace
// rows: one small kernel instead of a reduction, a transpose and a cast.
int finish_wgrad(DType out_dtype, const float* workspace, void* dw, const Plan& plan, void* stream);

}  // namespace slak_dw
