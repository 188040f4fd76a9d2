// Depthwise "same" convolution on CUDA cores: forward (also used for the input gradient with a flipped
// kernel) and weight gradient. Plain CUDA C++ with no ATen so that CI can compile it alone.
//
// Why this shape of kernel (the numbers behind it are in kernels/NOTES.md):
// * A depthwise conv does 2*kh*kw FLOPs per output and reuses every input kh*kw times, so a plane tile
//   (with its halo) lives in shared memory and global memory is touched once per element.
// * Shared memory, not the FMA pipe, is the first wall: one 32-bit LDS per FMA would cap us at a quarter of
//   the FFMA rate. Each thread therefore owns R outputs along the kernel's long axis and slides a register
//   window over the inputs: one LDS of input and one (broadcast) LDS of weight feed R FMAs.
// * The long axis is made the row axis of the shared tile (the plane is transposed on the way in when the
//   kernel is wider than tall), so 5x51 costs what 51x5 costs.
// * Taps that only ever see zero padding are skipped: each thread clips its tap loops to the window that
//   overlaps the image, so a 47x5 kernel on a 14x14 map costs about 14x5 taps, not 47x5.
// * Accumulation is fp32 for every dtype; the weight gradient is a two-level reduction (per block in
//   registers + warp shuffles + shared memory, then over batch chunks in an fp32 workspace), no atomics.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "../dwconv.h"

namespace slak_dw {
namespace {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Copy one plane's tile (slide orientation rows [ty0-ph, ty0-ph+rows), cols [tx0-pw, tx0-pw+cols)) into
// shared memory as fp32, zero outside the image. The loop walks the tile in global row-major order so that
// neighbouring threads read neighbouring addresses whichever orientation the tile has; the odd pitch keeps
// the transposed shared-memory writes free of bank conflicts.
template <typename T>
__device__ __forceinline__ void load_tile(const T* __restrict__ src, const Plan& p, int ty0, int tx0, int rows,
                                          int cols, int pitch, float* __restrict__ dst) {
  const int total = rows * cols;
  const int fast = p.transposed ? rows : cols;  // extent along the global column axis
  int slow = threadIdx.x / fast;
  int f = threadIdx.x - slow * fast;
  const int inc_slow = blockDim.x / fast, inc_f = blockDim.x - inc_slow * fast;
  for (int e = threadIdx.x; e < total; e += blockDim.x) {
    const int r = p.transposed ? f : slow;
    const int q = p.transposed ? slow : f;
    const int ys = ty0 + r, xs = tx0 + q;
    float v = 0.f;
    if (ys >= 0 && ys < p.Hs && xs >= 0 && xs < p.Ws) {
      const int gy = p.transposed ? xs : ys, gx = p.transposed ? ys : xs;
      v = to_float(src[(int64_t)gy * p.W + gx]);
    }
    dst[r * pitch + q] = v;
    f += inc_f;
    slow += inc_slow;
    if (f >= fast) {
      f -= fast;
      ++slow;
    }
  }
}

// Forward. Each thread owns R outputs along the slide axis at one column. Its input window holds rows
// (k + step) for k < R in a circular buffer whose slot for row k at step q is (q + k) % R: the indices stay
// compile-time constants, so the window lives in registers and the loop unrolled by R needs no moves.
template <typename T, int R>
__global__ void __launch_bounds__(256)
    forward_kernel(const T* __restrict__ x, const float* __restrict__ w, const float* __restrict__ bias,
                   T* __restrict__ y, const Plan p) {
  extern __shared__ float smem[];
  const int ksz = p.kh * p.kw;
  const int in_sz = p.in_rows * p.pitch;
  float* s_w = smem;
  float* s_in = smem + p.P * ksz;

  int64_t blk = blockIdx.x;
  const int tile_x = static_cast<int>(blk % p.tiles_x);
  blk /= p.tiles_x;
  const int tile_y = static_cast<int>(blk % p.tiles_y);
  blk /= p.tiles_y;
  const int64_t plane0 = blk * p.P;
  const int ty0 = tile_y * p.TH, tx0 = tile_x * p.TW;
  const int64_t HW = static_cast<int64_t>(p.H) * p.W;

  for (int t = threadIdx.x; t < p.P * ksz; t += blockDim.x) {
    const int pl = t / ksz;
    const int64_t plane = plane0 + pl;
    s_w[t] = plane < p.planes ? w[(plane % p.channels) * ksz + (t - pl * ksz)] : 0.f;
  }
  for (int pl = 0; pl < p.P; ++pl) {
    const int64_t plane = plane0 + pl;
    if (plane >= p.planes) break;
    load_tile(x + plane * HW, p, ty0 - p.ph, tx0 - p.pw, p.in_rows, p.in_cols, p.pitch, s_in + pl * in_sz);
  }
  __syncthreads();

  const int per_plane = p.G * p.TW;
  const int pl = threadIdx.x / per_plane;
  const int rem = threadIdx.x - pl * per_plane;
  const int g = rem / p.TW, c = rem - g * p.TW;
  const int y0 = ty0 + g * R, xo = tx0 + c;
  const bool active = pl < p.P && plane0 + pl < p.planes && y0 < p.Hs && xo < p.Ws;

  float acc[R];
#pragma unroll
  for (int k = 0; k < R; ++k) acc[k] = 0.f;

  if (active) {
    const int y_last = min(y0 + R - 1, p.Hs - 1);
    const int i_lo = max(0, p.ph - y_last), i_hi = min(p.kh, p.Hs + p.ph - y0);
    const int j_lo = max(0, p.pw - xo), j_hi = min(p.kw, p.Ws + p.pw - xo);
    const float* sp = s_in + pl * in_sz;
    const float* wp = s_w + pl * ksz;
    for (int j = j_lo; j < j_hi; ++j) {
      const float* col = sp + (g * R + i_lo) * p.pitch + c + j;
      float win[R];
#pragma unroll
      for (int k = 0; k < R - 1; ++k) win[k] = col[k * p.pitch];
      const float* src = col + (R - 1) * p.pitch;
      const float* wj = wp + j;
      int i = i_lo;
      for (; i + R <= i_hi; i += R) {
#pragma unroll
        for (int q = 0; q < R; ++q) {
          win[(q + R - 1) % R] = src[q * p.pitch];
          const float wv = wj[(i + q) * p.kw];
#pragma unroll
          for (int k = 0; k < R; ++k) acc[k] = fmaf(win[(q + k) % R], wv, acc[k]);
        }
        src += R * p.pitch;
      }
#pragma unroll
      for (int q = 0; q < R - 1; ++q) {
        if (i + q < i_hi) {
          win[(q + R - 1) % R] = src[q * p.pitch];
          const float wv = wj[(i + q) * p.kw];
#pragma unroll
          for (int k = 0; k < R; ++k) acc[k] = fmaf(win[(q + k) % R], wv, acc[k]);
        }
      }
    }
  }
  __syncthreads();  // the input tile is dead; reuse it to stage outputs for coalesced stores

  const int opitch = p.TW | 1;
  if (active) {
    float* so = s_in + pl * in_sz;
#pragma unroll
    for (int k = 0; k < R; ++k) so[(g * R + k) * opitch + c] = acc[k];
  }
  __syncthreads();

  for (int pl2 = 0; pl2 < p.P; ++pl2) {
    const int64_t plane = plane0 + pl2;
    if (plane >= p.planes) break;
    const float b = bias != nullptr ? bias[plane % p.channels] : 0.f;
    const float* so = s_in + pl2 * in_sz;
    T* dst = y + plane * HW;
    const int total = p.TH * p.TW;
    const int fast = p.transposed ? p.TH : p.TW;
    for (int e = threadIdx.x; e < total; e += blockDim.x) {
      const int slow = e / fast, f = e - slow * fast;
      const int r = p.transposed ? f : slow;
      const int q = p.transposed ? slow : f;
      const int ys = ty0 + r, xs = tx0 + q;
      if (ys < p.Hs && xs < p.Ws) {
        const int gy = p.transposed ? xs : ys, gx = p.transposed ? ys : xs;
        dst[(int64_t)gy * p.W + gx] = from_float<T>(so[r * opitch + q] + b);
      }
    }
  }
}

template <typename T, int R>
__global__ void __launch_bounds__(256)
    wgrad_kernel(const T* __restrict__ x, const T* __restrict__ dy, float* __restrict__ ws, const Plan p) {
  extern __shared__ float smem[];
  const int groups = (p.kh + R - 1) / R;
  const int U = groups * p.kw;
  const int dpitch = p.TW | 1;
  float* s_acc = smem;
  float* s_x = s_acc + U * R;
  float* s_dy = s_x + p.in_rows * p.pitch;

  const int c = static_cast<int>(blockIdx.x % p.channels);
  const int chunk = static_cast<int>(blockIdx.x / p.channels);
  const int64_t N = p.planes / p.channels;
  const int64_t n0 = static_cast<int64_t>(chunk) * p.chunk;
  const int64_t n1 = min(N, n0 + p.chunk);
  const int64_t HW = static_cast<int64_t>(p.H) * p.W;

  for (int t = threadIdx.x; t < U * R; t += blockDim.x) s_acc[t] = 0.f;

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
  int lx_n = 1;
  while (lx_n < p.TW && lx_n < 32) lx_n <<= 1;
  const int ly_n = 32 / lx_n;
  const int rows_per = (p.TH + ly_n - 1) / ly_n;
  const int ly = lane / lx_n, lx = lane - ly * lx_n;

  for (int64_t n = n0; n < n1; ++n) {
    const int64_t plane = n * p.channels + c;
    for (int tyi = 0; tyi < p.tiles_y; ++tyi) {
      for (int txi = 0; txi < p.tiles_x; ++txi) {
        const int ty0 = tyi * p.TH, tx0 = txi * p.TW;
        __syncthreads();
        load_tile(x + plane * HW, p, ty0 - p.ph, tx0 - p.pw, p.in_rows, p.in_cols, p.pitch, s_x);
        load_tile(dy + plane * HW, p, ty0, tx0, p.TH, p.TW, dpitch, s_dy);
        __syncthreads();
        for (int u = warp; u < U; u += nw) {
          const int gi = u / p.kw, j = u - gi * p.kw;
          const int i0 = gi * R;
          float acc[R];
#pragma unroll
          for (int k = 0; k < R; ++k) acc[k] = 0.f;
          // Rows whose window meets the image for some tap of this group, and this lane's share of them.
          const int ya = max(ly * rows_per, p.ph - i0 - R + 1 - ty0);
          const int yb = min(min((ly + 1) * rows_per, p.TH), min(p.Hs, p.Hs + p.ph - i0) - ty0);
          if (ya < yb) {
            for (int xl = lx; xl < p.TW; xl += lx_n) {
              const int xg = tx0 + xl;
              if (xg >= p.Ws) break;
              const int xin = xg + j - p.pw;
              if (xin < 0 || xin >= p.Ws) continue;
              const float* col = s_x + (ya + i0) * p.pitch + xl + j;
              float win[R];
#pragma unroll
              for (int k = 0; k < R - 1; ++k) win[k] = col[k * p.pitch];
              const float* src = col + (R - 1) * p.pitch;
              const float* dp = s_dy + ya * dpitch + xl;
              int yl = ya;
              for (; yl + R <= yb; yl += R) {
#pragma unroll
                for (int q = 0; q < R; ++q) {
                  win[(q + R - 1) % R] = src[q * p.pitch];
                  const float d = dp[q * dpitch];
#pragma unroll
                  for (int k = 0; k < R; ++k) acc[k] = fmaf(win[(q + k) % R], d, acc[k]);
                }
                src += R * p.pitch;
                dp += R * dpitch;
              }
#pragma unroll
              for (int q = 0; q < R - 1; ++q) {
                if (yl + q < yb) {
                  win[(q + R - 1) % R] = src[q * p.pitch];
                  const float d = dp[q * dpitch];
#pragma unroll
                  for (int k = 0; k < R; ++k) acc[k] = fmaf(win[(q + k) % R], d, acc[k]);
                }
              }
            }
          }
#pragma unroll
          for (int k = 0; k < R; ++k) {
            float v = acc[k];
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
            acc[k] = v;
          }
          if (lane == 0) {
#pragma unroll
            for (int k = 0; k < R; ++k) s_acc[u * R + k] += acc[k];
          }
        }
      }
    }
  }
  __syncthreads();
  const int ksz = p.kh * p.kw;
  float* out = ws + (static_cast<int64_t>(chunk) * p.channels + c) * ksz;
  for (int t = threadIdx.x; t < ksz; t += blockDim.x) {
    const int i = t / p.kw, j = t - i * p.kw;
    out[t] = s_acc[((i / R) * p.kw + j) * R + (i % R)];
  }
}

// ---------------------------------------------------------------------------------------------------------
// Host side: plans and launches.

int smem_optin_limit() {
  int dev = 0, bytes = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 48 * 1024;
  if (cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) {
    return 48 * 1024;
  }
  return bytes;
}

void orient(int64_t N, int C, int H, int W, int kh, int kw, Plan* p) {
  *p = Plan{};
  p->planes = N * C;
  p->channels = C;
  p->H = H;
  p->W = W;
  p->transposed = kw > kh ? 1 : 0;
  p->Hs = p->transposed ? W : H;
  p->Ws = p->transposed ? H : W;
  p->kh = p->transposed ? kw : kh;
  p->kw = p->transposed ? kh : kw;
  p->ph = p->kh / 2;
  p->pw = p->kw / 2;
}

constexpr int kForwardR[] = {4, 7, 8, 14, 16};
constexpr int kWgradR[] = {4, 5, 8, 16};

template <size_t M>
int pick_r(const int (&options)[M], int extent) {
  int best = options[0];
  int64_t best_cost = -1;
  for (int r : options) {
    const int64_t cost = static_cast<int64_t>((extent + r - 1) / r) * (r + 2);
    if (best_cost < 0 || cost < best_cost) {
      best_cost = cost;
      best = r;
    }
  }
  return best;
}

int64_t forward_smem(const Plan& p) {
  return 4LL * (static_cast<int64_t>(p.P) * p.kh * p.kw + static_cast<int64_t>(p.P) * p.in_rows * p.pitch);
}

int64_t wgrad_smem(const Plan& p) {
  const int groups = (p.kh + p.R - 1) / p.R;
  return 4LL * (static_cast<int64_t>(groups) * p.kw * p.R + static_cast<int64_t>(p.in_rows) * p.pitch +
                static_cast<int64_t>(p.TH) * (p.TW | 1));
}

}  // namespace

int make_forward_plan(int64_t N, int C, int H, int W, int kh, int kw, Plan* plan) {
  Plan& p = *plan;
  orient(N, C, H, W, kh, kw, &p);
  p.R = pick_r(kForwardR, p.Hs);
  const int groups_total = (p.Hs + p.R - 1) / p.R;
  const int hard = smem_optin_limit();
  for (int limit : {64 * 1024, hard}) {
    p.TW = std::min(p.Ws, 64);
    p.G = std::min(groups_total, std::max(1, 256 / p.TW));
    p.P = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(p.planes, 256 / (p.G * p.TW))));
    for (;;) {
      p.TH = p.G * p.R;
      p.in_rows = p.TH + p.kh - 1;
      p.in_cols = p.TW + p.kw - 1;
      p.pitch = p.in_cols | 1;
      p.smem_bytes = forward_smem(p);
      if (p.smem_bytes <= limit) break;
      if (p.P > 1) {
        p.P = std::max(1, p.P / 2);
      } else if (p.G > 1) {
        --p.G;
      } else if (p.TW > 8) {
        p.TW = std::max(8, p.TW / 2);
      } else {
        break;
      }
    }
    if (p.smem_bytes <= limit) break;
  }
  if (p.smem_bytes > hard) return -1;
  p.tiles_y = (p.Hs + p.TH - 1) / p.TH;
  p.tiles_x = (p.Ws + p.TW - 1) / p.TW;
  p.threads = ((p.P * p.G * p.TW + 31) / 32) * 32;
  return 0;
}

int make_wgrad_plan(int64_t N, int C, int H, int W, int kh, int kw, int sm_count, Plan* plan) {
  Plan& p = *plan;
  orient(N, C, H, W, kh, kw, &p);
  p.R = pick_r(kWgradR, p.kh);
  const int groups = (p.kh + p.R - 1) / p.R;
  const int hard = smem_optin_limit();
  for (int limit : {64 * 1024, hard}) {
    p.TH = std::min(p.Hs, 64);
    p.TW = std::min(p.Ws, 64);
    for (;;) {
      // Rows past kh - 1 + TH are read by the padded taps of the last group: keep them in the tile (zero).
      p.in_rows = p.TH + groups * p.R - 1;
      p.in_cols = p.TW + p.kw - 1;
      p.pitch = p.in_cols | 1;
      p.smem_bytes = wgrad_smem(p);
      if (p.smem_bytes <= limit) break;
      if (p.TH > 8 && p.TH >= p.TW) {
        p.TH = std::max(8, p.TH / 2);
      } else if (p.TW > 8) {
        p.TW = std::max(8, p.TW / 2);
      } else {
        break;
      }
    }
    if (p.smem_bytes <= limit) break;
  }
  if (p.smem_bytes > hard) return -1;
  p.tiles_y = (p.Hs + p.TH - 1) / p.TH;
  p.tiles_x = (p.Ws + p.TW - 1) / p.TW;
  p.threads = 32 * std::min(8, groups * p.kw);
  const int64_t target = 4LL * std::max(1, sm_count);
  int64_t n_chunks = std::max<int64_t>(1, std::min<int64_t>(N, (target + C - 1) / C));
  p.chunk = static_cast<int>((N + n_chunks - 1) / n_chunks);
  p.n_chunks = static_cast<int>((N + p.chunk - 1) / p.chunk);
  return 0;
}

namespace {

template <typename T, int R>
int launch_forward_r(const void* x, const float* w, const float* bias, void* y, const Plan& p,
                     cudaStream_t stream) {
  auto kernel = forward_kernel<T, R>;
  if (p.smem_bytes > 48 * 1024) {
    cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(p.smem_bytes));
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  const int64_t blocks = ((p.planes + p.P - 1) / p.P) * p.tiles_y * p.tiles_x;
  kernel<<<static_cast<unsigned>(blocks), p.threads, p.smem_bytes, stream>>>(
      static_cast<const T*>(x), w, bias, static_cast<T*>(y), p);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_forward(const void* x, const float* w, const float* bias, void* y, const Plan& p, cudaStream_t s) {
  switch (p.R) {
    case 4: return launch_forward_r<T, 4>(x, w, bias, y, p, s);
    case 7: return launch_forward_r<T, 7>(x, w, bias, y, p, s);
    case 8: return launch_forward_r<T, 8>(x, w, bias, y, p, s);
    case 14: return launch_forward_r<T, 14>(x, w, bias, y, p, s);
    case 16: return launch_forward_r<T, 16>(x, w, bias, y, p, s);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

template <typename T, int R>
int launch_wgrad_r(const void* x, const void* dy, float* ws, const Plan& p, cudaStream_t stream) {
  auto kernel = wgrad_kernel<T, R>;
  if (p.smem_bytes > 48 * 1024) {
    cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(p.smem_bytes));
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  const int64_t blocks = static_cast<int64_t>(p.n_chunks) * p.channels;
  kernel<<<static_cast<unsigned>(blocks), p.threads, p.smem_bytes, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(dy), ws, p);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_wgrad(const void* x, const void* dy, float* ws, const Plan& p, cudaStream_t s) {
  switch (p.R) {
    case 4: return launch_wgrad_r<T, 4>(x, dy, ws, p, s);
    case 5: return launch_wgrad_r<T, 5>(x, dy, ws, p, s);
    case 8: return launch_wgrad_r<T, 8>(x, dy, ws, p, s);
    case 16: return launch_wgrad_r<T, 16>(x, dy, ws, p, s);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

}  // namespace

int forward(DType dtype, const void* x, const float* w, const float* bias, void* y, const Plan& plan,
            void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kFloat32: return launch_forward<float>(x, w, bias, y, plan, s);
    case kFloat16: return launch_forward<__half>(x, w, bias, y, plan, s);
    case kBFloat16: return launch_forward<__nv_bfloat16>(x, w, bias, y, plan, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int wgrad(DType dtype, const void* x, const void* dy, float* workspace, const Plan& plan, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kFloat32: return launch_wgrad<float>(x, dy, workspace, plan, s);
    case kFloat16: return launch_wgrad<__half>(x, dy, workspace, plan, s);
    case kBFloat16: return launch_wgrad<__nv_bfloat16>(x, dy, workspace, plan, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace slak_dw
