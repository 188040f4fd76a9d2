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
#include <cstdlib>
#include <cstring>

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

// Exact a / b for 0 <= a < 2^17 with a precomputed 1/b: the +0.5 keeps the float product at least 0.5/b
// away from an integer, well beyond its rounding error. Integer division by a run-time value costs ~20
// instructions per element in the load loops, which dominated small feature maps.
__device__ __forceinline__ int fdiv(int a, float inv_b) { return __float2int_rz((a + 0.5f) * inv_b); }

// Weight tap (i, j) of channel c in slide orientation (i < p.kh along the long axis), read from the caller's
// (C, 1, kh, kw) tensor as given: transposed back to global orientation, rotated by 180 degrees for the input
// gradient (p.wflip) and converted from p.wdtype. Only the per-block weight staging calls it.
__device__ __forceinline__ float load_weight(const void* __restrict__ w, const Plan& p, int c, int i, int j) {
  const int kh_g = p.transposed ? p.kw : p.kh, kw_g = p.transposed ? p.kh : p.kw;
  int a = p.transposed ? j : i, b = p.transposed ? i : j;
  if (p.wflip) {
    a = kh_g - 1 - a;
    b = kw_g - 1 - b;
  }
  const int64_t idx = (static_cast<int64_t>(c) * kh_g + a) * kw_g + b;
  switch (p.wdtype) {
    case kFloat16: return __half2float(static_cast<const __half*>(w)[idx]);
    case kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(w)[idx]);
    default: return static_cast<const float*>(w)[idx];
  }
}

// Copy `nplanes` planes' tiles (slide-orientation rows [ys0, ys0+rows), cols [xs0, xs0+cols)) into shared
// memory as fp32: plane k at dst + k * plane_sz, row r at r * pitch. Tile positions outside the image must
// already be zero (see zero_fill). Only in-image elements are read, in global row-major order so that
// neighbouring threads read neighbouring addresses in either orientation, four independent loads in
// flight per thread (one load at a time left small maps latency-bound).
template <typename T>
__device__ __forceinline__ void load_tiles(const T* __restrict__ src, int64_t plane_stride, int nplanes,
                                           const Plan& p, int ys0, int xs0, int rows, int cols, int pitch,
                                           int plane_sz, float* __restrict__ dst) {
  const int r0 = max(0, -ys0), r1 = min(rows, p.Hs - ys0);
  const int q0 = max(0, -xs0), q1 = min(cols, p.Ws - xs0);
  if (r1 <= r0 || q1 <= q0 || nplanes <= 0) return;
  const int nr = r1 - r0, nq = q1 - q0;
  const int fast = p.transposed ? nr : nq;
  const int per = nr * nq;
  const int total = nplanes * per;
  const float inv_fast = 1.f / fast, inv_per = 1.f / per;
  const int step = blockDim.x;
  for (int base = threadIdx.x; base < total; base += 4 * step) {
    float v[4];
    int off[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int e = base + u * step;
      off[u] = -1;
      v[u] = 0.f;
      if (e < total) {
        const int pl = fdiv(e, inv_per);
        const int rem = e - pl * per;
        const int sl = fdiv(rem, inv_fast);
        const int f = rem - sl * fast;
        const int r = r0 + (p.transposed ? f : sl), q = q0 + (p.transposed ? sl : f);
        const int ys = ys0 + r, xs = xs0 + q;
        const int gy = p.transposed ? xs : ys, gx = p.transposed ? ys : xs;
        v[u] = to_float(src[pl * plane_stride + (int64_t)gy * p.W + gx]);
        off[u] = pl * plane_sz + r * pitch + q;
      }
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      if (off[u] >= 0) dst[off[u]] = v[u];
    }
  }
}

// Zero `n` floats from a 16-byte aligned shared address (n rounded up to 4: allocations carry the slack).
__device__ __forceinline__ void zero_fill(float* dst, int n) {
  float4* d4 = reinterpret_cast<float4*>(dst);
  const int n4 = (n + 3) / 4;
  for (int t = threadIdx.x; t < n4; t += blockDim.x) d4[t] = make_float4(0.f, 0.f, 0.f, 0.f);
}

// Forward. Each thread owns R outputs along the slide axis at one column. Its input window holds rows
// (k + step) for k < R in a circular buffer whose slot for row k at step q is (q + k) % R: the indices stay
// compile-time constants, so the window lives in registers and the loop unrolled by R needs no moves.
template <typename T, int R>
__global__ void __launch_bounds__(256)
    forward_kernel(const T* __restrict__ x, const void* __restrict__ w, const float* __restrict__ bias,
                   T* __restrict__ y, const Plan p) {
  extern __shared__ __align__(16) float smem[];
  const int ksz = p.kh * p.kw;
  const int in_sz = p.in_rows * p.pitch;
  float* s_w = smem;
  float* s_in = smem + ((p.P * ksz + 3) & ~3);

  int64_t blk = blockIdx.x;
  const int tile_x = static_cast<int>(blk % p.tiles_x);
  blk /= p.tiles_x;
  const int tile_y = static_cast<int>(blk % p.tiles_y);
  blk /= p.tiles_y;
  const int64_t plane0 = blk * p.P;
  const int ty0 = tile_y * p.TH, tx0 = tile_x * p.TW;
  const int64_t HW = static_cast<int64_t>(p.H) * p.W;

  const int nplanes = static_cast<int>(min(static_cast<int64_t>(p.P), p.planes - plane0));
  for (int t = threadIdx.x; t < p.P * ksz; t += blockDim.x) {
    const int pl = t / ksz;
    const int64_t plane = plane0 + pl;
    const int e = t - pl * ksz;
    s_w[t] = plane < p.planes ? load_weight(w, p, static_cast<int>(plane % p.channels), e / p.kw, e % p.kw) : 0.f;
  }
  zero_fill(s_in, p.P * in_sz);
  __syncthreads();
  load_tiles(x + plane0 * HW, HW, nplanes, p, ty0 - p.ph, tx0 - p.pw, p.in_rows, p.in_cols, p.pitch, in_sz, s_in);
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

  {
    const int nr = min(p.TH, p.Hs - ty0), nq = min(p.TW, p.Ws - tx0);
    const int fast = p.transposed ? nr : nq;
    const int per = nr * nq;
    const float inv_fast = 1.f / fast, inv_per = 1.f / per;
    const int total = nplanes * per;
    for (int e = threadIdx.x; e < total; e += blockDim.x) {
      const int pl2 = fdiv(e, inv_per);
      const int rem = e - pl2 * per;
      const int sl = fdiv(rem, inv_fast), f = rem - sl * fast;
      const int r = p.transposed ? f : sl;
      const int q = p.transposed ? sl : f;
      const int64_t plane = plane0 + pl2;
      const float b = bias != nullptr ? bias[plane % p.channels] : 0.f;
      const int ys = ty0 + r, xs = tx0 + q;
      const int gy = p.transposed ? xs : ys, gx = p.transposed ? ys : xs;
      y[plane * HW + (int64_t)gy * p.W + gx] = from_float<T>(s_in[pl2 * in_sz + r * opitch + q] + b);
    }
  }
}

template <typename T, int R>
__global__ void __launch_bounds__(256)
    wgrad_kernel(const T* __restrict__ x, const T* __restrict__ dy, float* __restrict__ ws, const Plan p) {
  extern __shared__ __align__(16) float smem[];
  const int groups = (p.kh + R - 1) / R;
  const int U = groups * p.kw;
  const int dpitch = p.TW | 1;
  float* s_acc = smem;
  float* s_x = s_acc + ((U * R + 3) & ~3);
  float* s_dy = s_x + ((p.in_rows * p.pitch + 3) & ~3);

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
        zero_fill(s_x, p.in_rows * p.pitch);
        zero_fill(s_dy, p.TH * dpitch);
        __syncthreads();
        load_tiles(x + plane * HW, HW, 1, p, ty0 - p.ph, tx0 - p.pw, p.in_rows, p.in_cols, p.pitch, 0, s_x);
        load_tiles(dy + plane * HW, HW, 1, p, ty0, tx0, p.TH, p.TW, dpitch, 0, s_dy);
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

// Weight gradient for small maps (H*W <= 256: SLaK's 14x14 and 7x7 stages). The general kernel spends its
// time there on per-plane barriers, loads and warp reductions. Here each lane owns one plane of a batch of
// 32 and walks all of it, so partial sums stay in registers for the block's whole batch chunk and are
// reduced once at the end. Shared memory holds, per lane, the in-image rows of x plus R-1 zero rows on
// each side (all the sliding window can reach once taps are clipped) and dy; the odd slot stride keeps the
// 32 lanes on 32 banks.
constexpr int kSmallUnits = 4;  // tap units per warp held in registers

template <typename T, int R>
__global__ void __launch_bounds__(256)
    wgrad_small_kernel(const T* __restrict__ x, const T* __restrict__ dy, float* __restrict__ ws, const Plan p) {
  extern __shared__ __align__(16) float smem[];
  const int xrows = p.Hs + 2 * (R - 1);
  const int xsz = xrows * p.Ws;
  const int hw = p.Hs * p.Ws;
  const int slot = (xsz + hw) | 1;
  const int groups = (p.kh + R - 1) / R;
  const int U = groups * p.kw;

  const int c = static_cast<int>(blockIdx.x % p.channels);
  const int chunk = static_cast<int>(blockIdx.x / p.channels);
  const int64_t N = p.planes / p.channels;
  const int64_t n0 = static_cast<int64_t>(chunk) * p.chunk;
  const int64_t n1 = min(N, n0 + p.chunk);
  const int64_t HW = static_cast<int64_t>(p.H) * p.W;
  const int64_t cstride = static_cast<int64_t>(p.channels) * HW;  // from plane (n, c) to (n + 1, c)

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
  zero_fill(smem, 32 * slot);  // zero rows stay zero: batches only overwrite in-image rows

  float acc[kSmallUnits][R];
#pragma unroll
  for (int m = 0; m < kSmallUnits; ++m)
#pragma unroll
    for (int k = 0; k < R; ++k) acc[m][k] = 0.f;

  const float inv_w = 1.f / p.W, inv_hw = 1.f / hw;
  for (int64_t nb = n0; nb < n1; nb += 32) {
    const int nbatch = static_cast<int>(min(static_cast<int64_t>(32), n1 - nb));
    __syncthreads();
    // Load x (into rows R-1 .. R-1+Hs of each slot) and dy (after x) for nbatch planes, 4 loads in flight.
    const int total = 2 * nbatch * hw;
    const int64_t base_plane = (nb * p.channels + c) * HW;
    for (int base = threadIdx.x; base < total; base += 4 * blockDim.x) {
      float v[4];
      int off[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int e = base + u * blockDim.x;
        off[u] = -1;
        v[u] = 0.f;
        if (e < total) {
          const int which = e >= nbatch * hw;  // 0: x, 1: dy
          const int e2 = e - which * nbatch * hw;
          const int b = fdiv(e2, inv_hw);
          const int g = e2 - b * hw;
          const int gy = fdiv(g, inv_w), gx = g - gy * p.W;
          const T* src = which ? dy : x;
          v[u] = to_float(src[base_plane + b * cstride + g]);
          const int ys = p.transposed ? gx : gy, xs = p.transposed ? gy : gx;
          off[u] = b * slot + (which ? xsz + ys * p.Ws : (ys + R - 1) * p.Ws) + xs;
        }
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        if (off[u] >= 0) smem[off[u]] = v[u];
      }
    }
    __syncthreads();
    if (lane < nbatch) {
      const float* sx = smem + lane * slot;
      const float* sd = sx + xsz;
#pragma unroll
      for (int m = 0; m < kSmallUnits; ++m) {
        const int u = warp + m * nw;
        if (u >= U) break;
        const int gi = u / p.kw, j = u - gi * p.kw;
        const int i0 = gi * R;
        const int ya = max(0, p.ph - i0 - R + 1), yb = min(p.Hs, p.Hs + p.ph - i0);
        if (ya >= yb) continue;
        const int xa = max(0, p.pw - j), xb = min(p.Ws, p.Ws + p.pw - j);
        for (int xs = xa; xs < xb; ++xs) {
          // window row k at output row y reads x row y + i0 + k - ph, stored at row (that + R - 1).
          const float* col = sx + (ya + i0 - p.ph + R - 1) * p.Ws + xs + j - p.pw;
          float win[R];
#pragma unroll
          for (int k = 0; k < R - 1; ++k) win[k] = col[k * p.Ws];
          const float* src = col + (R - 1) * p.Ws;
          const float* dp = sd + ya * p.Ws + xs;
          int yl = ya;
          for (; yl + R <= yb; yl += R) {
#pragma unroll
            for (int q = 0; q < R; ++q) {
              win[(q + R - 1) % R] = src[q * p.Ws];
              const float d = dp[q * p.Ws];
#pragma unroll
              for (int k = 0; k < R; ++k) acc[m][k] = fmaf(win[(q + k) % R], d, acc[m][k]);
            }
            src += R * p.Ws;
            dp += R * p.Ws;
          }
#pragma unroll
          for (int q = 0; q < R - 1; ++q) {
            if (yl + q < yb) {
              win[(q + R - 1) % R] = src[q * p.Ws];
              const float d = dp[q * p.Ws];
#pragma unroll
              for (int k = 0; k < R; ++k) acc[m][k] = fmaf(win[(q + k) % R], d, acc[m][k]);
            }
          }
        }
      }
    }
  }
  const int ksz = p.kh * p.kw;
  float* out = ws + (static_cast<int64_t>(chunk) * p.channels + c) * ksz;
#pragma unroll
  for (int m = 0; m < kSmallUnits; ++m) {
    const int u = warp + m * nw;
#pragma unroll
    for (int k = 0; k < R; ++k) {
      float v = acc[m][k];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
      acc[m][k] = v;
    }
    if (u < U && lane == 0) {
      const int gi = u / p.kw, j = u - gi * p.kw;
#pragma unroll
      for (int k = 0; k < R; ++k) {
        const int i = gi * R + k;
        if (i < p.kh) out[i * p.kw + j] = acc[m][k];
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Whole-plane kernels (v5). A block takes P planes of ONE channel (different images), each whole with its
// zero halo in shared memory, so the weights are loaded once per block and global memory is read and
// written as 8- or 16-byte vectors (every plane is contiguous). Each thread owns a 2-D register block:
// forward R output rows x 4 output columns; per kernel row it reads one input row segment (4 + kw - 1
// values, float4 LDS) and one weight row (float4 LDS, broadcast) and does R * 4 * kw FMAs, so shared
// memory is no longer the wall (v4 did one LDS per R FMAs). The weight gradient is the same loop with dy
// in place of the weights: a thread owns R taps x kw and slides over output rows.

template <int BYTES>
struct VecOf;
template <>
struct VecOf<16> { using type = uint4; };
template <>
struct VecOf<8> { using type = uint2; };
template <>
struct VecOf<4> { using type = unsigned int; };
template <>
struct VecOf<2> { using type = unsigned short; };

template <typename T, int N>
__device__ __forceinline__ void load_vec(const T* __restrict__ src, float (&out)[N]) {
  using V = typename VecOf<N * sizeof(T)>::type;
  const V v = *reinterpret_cast<const V*>(src);
  const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
  for (int q = 0; q < N; ++q) out[q] = to_float(e[q]);
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* __restrict__ dst, const float (&in)[N]) {
  using V = typename VecOf<N * sizeof(T)>::type;
  V v;
  T* e = reinterpret_cast<T*>(&v);
#pragma unroll
  for (int q = 0; q < N; ++q) e[q] = from_float<T>(in[q]);
  *reinterpret_cast<V*>(dst) = v;
}

// NV float4 loads from a 16-byte aligned shared address.
template <int NV>
__device__ __forceinline__ void lds_row(const float* __restrict__ src, float (&out)[4 * NV]) {
#pragma unroll
  for (int n = 0; n < NV; ++n) {
    const float4 f = *reinterpret_cast<const float4*>(src + 4 * n);
    out[4 * n] = f.x;
    out[4 * n + 1] = f.y;
    out[4 * n + 2] = f.z;
    out[4 * n + 3] = f.w;
  }
}

// Load `nplanes` whole planes (plane k at src + k * pstride, H x W row-major) into shared memory as fp32:
// element (gy, gx) goes to dst + k * dplane + (r + roff) * dpitch + c + coff with (r, c) = (gy, gx), or
// (gx, gy) when transposed. N elements per global load: N divides H * W and pstride, src is aligned.
template <typename T, int N>
__device__ __forceinline__ void load_planes_n(const T* __restrict__ src, int64_t pstride, int nplanes, int H,
                                              int W, bool tr, float* __restrict__ dst, int dplane, int dpitch,
                                              int roff, int coff) {
  const int nvp = H * W / N;
  const int total = nplanes * nvp;
  const float inv_nvp = 1.f / nvp, inv_w = 1.f / W;
  constexpr int U = N >= 8 ? 2 : 4;
  for (int base = threadIdx.x; base < total; base += U * blockDim.x) {
    float v[U][N];
    int pl[U], e0[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int id = base + u * blockDim.x;
      pl[u] = -1;
      e0[u] = 0;
      if (id < total) {
        const int k = fdiv(id, inv_nvp);
        pl[u] = k;
        e0[u] = (id - k * nvp) * N;
        load_vec<T, N>(src + k * pstride + e0[u], v[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (pl[u] >= 0) {
        int gy = fdiv(e0[u], inv_w), gx = e0[u] - gy * W;
        float* d = dst + pl[u] * dplane;
#pragma unroll
        for (int q = 0; q < N; ++q) {
          const int r = tr ? gx : gy, c = tr ? gy : gx;
          d[(r + roff) * dpitch + c + coff] = v[u][q];
          if (++gx == W) {
            gx = 0;
            ++gy;
          }
        }
      }
    }
  }
}

template <typename T>
__device__ __forceinline__ void load_planes(const T* __restrict__ src, int64_t pstride, int nplanes, int H, int W,
                                            bool tr, float* __restrict__ dst, int dplane, int dpitch, int roff,
                                            int coff) {
  constexpr int N16 = 16 / sizeof(T), N8 = 8 / sizeof(T);
  const int HW = H * W;
  const uintptr_t a = reinterpret_cast<uintptr_t>(src);
  if (HW % N16 == 0 && pstride % N16 == 0 && a % 16 == 0) {
    load_planes_n<T, N16>(src, pstride, nplanes, H, W, tr, dst, dplane, dpitch, roff, coff);
  } else if (HW % N8 == 0 && pstride % N8 == 0 && a % 8 == 0) {
    load_planes_n<T, N8>(src, pstride, nplanes, H, W, tr, dst, dplane, dpitch, roff, coff);
  } else {
    load_planes_n<T, 1>(src, pstride, nplanes, H, W, tr, dst, dplane, dpitch, roff, coff);
  }
}

// Asynchronous staging of one batch of whole planes, for software pipelining (v8): issue() starts cp.async
// copies of the next batch's planes, raw (B = 8-byte pieces), into a staging buffer in shared memory
// (plane k at raw + k * HW) while the block computes on the current batch; commit() waits for the thread's own
// copies, converts them to fp32 and scatters them into the tile, exactly as load_planes_n does. A thread
// commits the pieces it issued, so only the barriers around the compute are needed.
__device__ __forceinline__ void cp_async8(void* smem_dst, const void* gsrc) {
  const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(d), "l"(gsrc) : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

template <typename T, int B>
struct PlaneStager {
  static_assert(B == 8, "cp_async8 copies 8-byte pieces");
  static constexpr int N = B / sizeof(T);  // elements per piece
  using V = typename VecOf<B>::type;

  __device__ __forceinline__ static bool fits(int HW, int64_t pstride, const void* a, const void* b) {
    return N >= 1 && HW % N == 0 && pstride % N == 0 && reinterpret_cast<uintptr_t>(a) % B == 0 &&
           reinterpret_cast<uintptr_t>(b) % B == 0;
  }

  __device__ __forceinline__ static void issue(T* raw, const T* __restrict__ src, int64_t pstride, int nplanes,
                                               int HW) {
    const int nvp = HW / N, total = nplanes * nvp;
    const float inv_nvp = 1.f / nvp;
    for (int id = threadIdx.x; id < total; id += blockDim.x) {
      const int k = fdiv(id, inv_nvp);
      const int e0 = (id - k * nvp) * N;
      cp_async8(raw + k * HW + e0, src + k * pstride + e0);
    }
  }

  __device__ __forceinline__ static void commit(const T* raw, int nplanes, int H, int W, bool tr,
                                                float* __restrict__ dst, int dplane, int dpitch, int roff, int coff) {
    const int HW = H * W, nvp = HW / N, total = nplanes * nvp;
    const float inv_nvp = 1.f / nvp, inv_w = 1.f / W;
    for (int id = threadIdx.x; id < total; id += blockDim.x) {
      const int k = fdiv(id, inv_nvp);
      const int e0 = (id - k * nvp) * N;
      int gy = fdiv(e0, inv_w), gx = e0 - gy * W;
      const V val = *reinterpret_cast<const V*>(raw + k * HW + e0);
      const T* e = reinterpret_cast<const T*>(&val);
      float* d = dst + k * dplane;
#pragma unroll
      for (int q = 0; q < N; ++q) {
        const int r = tr ? gx : gy, c = tr ? gy : gx;
        d[(r + roff) * dpitch + c + coff] = to_float(e[q]);
        if (++gx == W) {
          gx = 0;
          ++gy;
        }
      }
    }
  }
};

// Store `nplanes` planes staged contiguously in shared memory (plane k at s + k * HW) to dst + k * pstride,
// adding b.
template <typename T, int N>
__device__ __forceinline__ void store_planes_n(T* __restrict__ dst, int64_t pstride, int nplanes, int HW,
                                               const float* __restrict__ s, float b) {
  const int nvp = HW / N;
  const int total = nplanes * nvp;
  const float inv_nvp = 1.f / nvp;
  for (int id = threadIdx.x; id < total; id += blockDim.x) {
    const int k = fdiv(id, inv_nvp);
    const int e = (id - k * nvp) * N;
    float o[N];
#pragma unroll
    for (int q = 0; q < N; ++q) o[q] = s[k * HW + e + q] + b;
    store_vec<T, N>(dst + k * pstride + e, o);
  }
}

template <typename T>
__device__ __forceinline__ void store_planes(T* __restrict__ dst, int64_t pstride, int nplanes, int HW,
                                             const float* __restrict__ s, float b) {
  constexpr int N16 = 16 / sizeof(T), N8 = 8 / sizeof(T);
  const uintptr_t a = reinterpret_cast<uintptr_t>(dst);
  if (HW % N16 == 0 && pstride % N16 == 0 && a % 16 == 0) {
    store_planes_n<T, N16>(dst, pstride, nplanes, HW, s, b);
  } else if (HW % N8 == 0 && pstride % N8 == 0 && a % 8 == 0) {
    store_planes_n<T, N8>(dst, pstride, nplanes, HW, s, b);
  } else {
    store_planes_n<T, 1>(dst, pstride, nplanes, HW, s, b);
  }
}

// Forward on whole planes. Block = (channel c, batch chunk of P images). Thread = (plane, row group g,
// column group t): outputs rows [g*R, g*R+R) x cols [4t, 4t+4) in slide orientation. The input window is a
// circular buffer of R rows (slot of row m is m % R) indexed by compile-time constants, as in v1.
template <typename T, int KW, int R>
__global__ void __launch_bounds__(256)
    forward_plane_kernel(const T* __restrict__ x, const void* __restrict__ w, const float* __restrict__ bias,
                         T* __restrict__ y, const Plan p) {
  constexpr int NV = (KW + 6) / 4;  // float4 loads per input row segment: 4 + KW - 1 values
  constexpr int KWP = (KW + 3) & ~3;
  extern __shared__ __align__(16) float smem[];
  const int HW = p.H * p.W;
  const int wsz = p.khe * KWP;
  float* s_w = smem;
  float* s_in = smem + wsz;  // wsz is a multiple of 4
  const int c = static_cast<int>(blockIdx.x % p.channels);
  const int64_t N = p.planes / p.channels;
  const int64_t nb = static_cast<int64_t>(blockIdx.x / p.channels) * p.P;
  const int nplanes = static_cast<int>(min(static_cast<int64_t>(p.P), N - nb));
  const int64_t cstride = static_cast<int64_t>(p.channels) * HW;
  const int64_t base = (nb * p.channels + c) * HW;

  zero_fill(smem, wsz + p.P * p.plane_sz);
  __syncthreads();
  {
    for (int t = threadIdx.x; t < p.khe * KW; t += blockDim.x) {
      const int i = t / KW;
      s_w[i * KWP + t - i * KW] = load_weight(w, p, c, p.kh_lo + i, t - i * KW);
    }
  }
  load_planes(x + base, cstride, nplanes, p.H, p.W, p.transposed != 0, s_in, p.plane_sz, p.pitch, p.phe, p.pw);
  __syncthreads();

  const int per = p.G * p.CT;
  const int pl = threadIdx.x / per;
  const int rem = threadIdx.x - pl * per;
  const int g = rem / p.CT, t = rem - g * p.CT;
  const int y0 = g * R, x0 = 4 * t;
  const bool active = pl < nplanes;

  float acc[R][4];
#pragma unroll
  for (int k = 0; k < R; ++k)
#pragma unroll
    for (int v = 0; v < 4; ++v) acc[k][v] = 0.f;

  if (active) {
    const int y_last = min(y0 + R - 1, p.Hs - 1);
    const int i_lo = max(0, p.phe - y_last), i_hi = min(p.khe, p.Hs + p.phe - y0);
    if (i_lo < i_hi) {
      // Output row y with (effective) tap i reads shared row y + i.
      const float* src = s_in + pl * p.plane_sz + (y0 + i_lo) * p.pitch + x0;
      const float* wp = s_w + i_lo * KWP;
      float win[R][4 * NV];
#pragma unroll
      for (int k = 0; k < R - 1; ++k) lds_row<NV>(src + k * p.pitch, win[k]);
      src += (R - 1) * p.pitch;
      int i = i_lo;
      for (; i + R <= i_hi; i += R) {
#pragma unroll
        for (int q = 0; q < R; ++q) {
          lds_row<NV>(src + q * p.pitch, win[(q + R - 1) % R]);
          float wv[KWP];
          lds_row<KWP / 4>(wp + q * KWP, wv);
#pragma unroll
          for (int k = 0; k < R; ++k)
#pragma unroll
            for (int j = 0; j < KW; ++j)
#pragma unroll
              for (int v = 0; v < 4; ++v) acc[k][v] = fmaf(win[(q + k) % R][v + j], wv[j], acc[k][v]);
        }
        src += R * p.pitch;
        wp += R * KWP;
      }
#pragma unroll
      for (int q = 0; q < R - 1; ++q) {
        if (i + q < i_hi) {
          lds_row<NV>(src + q * p.pitch, win[(q + R - 1) % R]);
          float wv[KWP];
          lds_row<KWP / 4>(wp + q * KWP, wv);
#pragma unroll
          for (int k = 0; k < R; ++k)
#pragma unroll
            for (int j = 0; j < KW; ++j)
#pragma unroll
              for (int v = 0; v < 4; ++v) acc[k][v] = fmaf(win[(q + k) % R][v + j], wv[j], acc[k][v]);
        }
      }
    }
  }
  __syncthreads();  // the input tiles are dead: stage the outputs there in global (NCHW) order
  if (active) {
    float* so = s_in + pl * HW;
#pragma unroll
    for (int k = 0; k < R; ++k) {
      const int yy = y0 + k;
#pragma unroll
      for (int v = 0; v < 4; ++v) {
        const int xx = x0 + v;
        if (yy < p.Hs && xx < p.Ws) so[p.transposed ? xx * p.W + yy : yy * p.W + xx] = acc[k][v];
      }
    }
  }
  __syncthreads();
  store_planes(y + base, cstride, nplanes, HW, s_in, bias != nullptr ? bias[c] : 0.f);
}

// Weight gradient on whole planes. Block = (channel c, batch chunk); it walks the chunk P images at a time.
// Thread = (tap group g, plane, row segment s, column group t) with t fastest: it owns taps
// [g*R, g*R+R) x [0, KW) (effective rows) and, per output row y of its segment, reads one dy row segment
// (4 values) and one input row segment (4 + KW - 1 values) for R * KW * 4 FMAs. Lanes sharing g are an
// aligned power-of-two group of a warp (or whole warps): shuffle-reduced, then added into shared memory.
template <int R, int KW>
__device__ __forceinline__ void reduce_taps(float (&acc)[R][KW], int lw, bool ok, float* __restrict__ dst) {
#pragma unroll
  for (int k = 0; k < R; ++k)
#pragma unroll
    for (int j = 0; j < KW; ++j) {
      float v = acc[k][j];
      for (int off = lw >> 1; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
      acc[k][j] = v;
    }
  if (ok && (threadIdx.x & (lw - 1)) == 0) {
#pragma unroll
    for (int k = 0; k < R; ++k)
#pragma unroll
      for (int j = 0; j < KW; ++j) atomicAdd(dst + k * KW + j, acc[k][j]);
  }
}

// PIPE (v8): the next batch of planes is staged with cp.async while the current one is computed; a separate
// instance, used only where it pays (plan.pipe). Kernels of <= 5 columns are held to 2 blocks of 256 per SM
// (<= 128 registers, as v7's compiler chose; without the bound the v8 code grew to 155-164); 7 columns would
// spill there, so they keep the compiler's choice.
template <typename T, int KW, int R, bool PIPE>
__global__ void __launch_bounds__(256, KW < 7 ? 2 : 1)
    wgrad_plane_kernel(const T* __restrict__ x, const T* __restrict__ dy, float* __restrict__ ws, const Plan p) {
  constexpr int NV = (KW + 6) / 4;
  extern __shared__ __align__(16) float smem[];
  float* s_acc = smem;
  float* s_x = smem + p.acc_sz;
  float* s_dy = s_x + p.P * p.plane_sz;

  const int c = static_cast<int>(blockIdx.x % p.channels);
  const int chunk = static_cast<int>(blockIdx.x / p.channels);
  const int64_t N = p.planes / p.channels;
  const int64_t n0 = static_cast<int64_t>(chunk) * p.chunk;
  const int64_t n1 = min(N, n0 + p.chunk);
  const int HW = p.H * p.W;
  const int64_t cstride = static_cast<int64_t>(p.channels) * HW;

  const int L = p.CTp * p.YS * p.P;  // lanes per tap group (power of two)
  const int g = threadIdx.x / L;
  int rem = threadIdx.x - g * L;
  const int pl = rem / (p.CTp * p.YS);
  rem -= pl * (p.CTp * p.YS);
  const int s = rem / p.CTp, t = rem - s * p.CTp;
  const int seg = (p.Hs + p.YS - 1) / p.YS;
  const int ylo = s * seg, yhi = min(p.Hs, ylo + seg);
  const bool lane_ok = t < p.CT && g < p.Gb;
  const bool multi = p.Gt > p.Gb;
  const int lw = min(L, 32);
  const int x0 = 4 * t;

  zero_fill(smem, p.acc_sz + p.P * (p.plane_sz + p.dplane_sz));  // halos stay zero: loads write the image only

  float acc[R][KW];
#pragma unroll
  for (int k = 0; k < R; ++k)
#pragma unroll
    for (int j = 0; j < KW; ++j) acc[k][j] = 0.f;

  // Pipelining (v8): when a batch of planes fits in a few registers per thread, the next batch's global
  // loads are issued before the current batch is computed, so DRAM latency hides behind the FMAs (v7's
  // small maps stalled on those loads: ~25 % of warp samples).
  // Pipelining (v8): the next batch's planes are copied with cp.async into raw staging buffers while the
  // current batch is computed (v7's small maps stalled on these loads: ~25 % of warp samples).
  using Stage8 = PlaneStager<T, 8>;
  const bool tr = p.transposed != 0;
  T* raw_x = reinterpret_cast<T*>(s_dy + p.P * p.dplane_sz);
  T* raw_dy = reinterpret_cast<T*>(s_dy + p.P * p.dplane_sz + p.raw_sz);
  const bool pipe = PIPE && Stage8::fits(HW, cstride, x, dy);  // the launch checked it; never wrong if not
  auto issue = [&](int64_t nb) {
    const int cnt = static_cast<int>(min(static_cast<int64_t>(p.P), n1 - nb));
    const int64_t base = (nb * p.channels + c) * HW;
    Stage8::issue(raw_x, x + base, cstride, cnt, HW);
    Stage8::issue(raw_dy, dy + base, cstride, cnt, HW);
  };
  if (pipe && n0 < n1) issue(n0);

  for (int64_t nb = n0; nb < n1; nb += p.P) {
    const int nbatch = static_cast<int>(min(static_cast<int64_t>(p.P), n1 - nb));
    __syncthreads();
    if (pipe) {
      cp_async_wait_all();
      Stage8::commit(raw_x, nbatch, p.H, p.W, tr, s_x, p.plane_sz, p.pitch, p.phe, p.pw);
      Stage8::commit(raw_dy, nbatch, p.H, p.W, tr, s_dy, p.dplane_sz, p.pitch_d, 0, 0);
      if (nb + p.P < n1) issue(nb + p.P);
    } else {
      const int64_t base = (nb * p.channels + c) * HW;
      load_planes(x + base, cstride, nbatch, p.H, p.W, tr, s_x, p.plane_sz, p.pitch, p.phe, p.pw);
      load_planes(dy + base, cstride, nbatch, p.H, p.W, tr, s_dy, p.dplane_sz, p.pitch_d, 0, 0);
    }
    __syncthreads();
    for (int gb = 0; gb < p.Gt; gb += p.Gb) {
      const int gg = gb + g;
      if (lane_ok && gg < p.Gt && pl < nbatch) {
        const int i0 = gg * R;
        const int ya = max(ylo, p.phe - i0 - R + 1), yb = min(yhi, p.Hs + p.phe - i0);
        if (ya < yb) {
          // Output row y with (effective) tap i0 + k reads shared x row y + i0 + k.
          const float* src = s_x + pl * p.plane_sz + (ya + i0) * p.pitch + x0;
          const float* dp = s_dy + pl * p.dplane_sz + ya * p.pitch_d + x0;
          float win[R][4 * NV];
#pragma unroll
          for (int k = 0; k < R - 1; ++k) lds_row<NV>(src + k * p.pitch, win[k]);
          src += (R - 1) * p.pitch;
          int yy = ya;
          for (; yy + R <= yb; yy += R) {
#pragma unroll
            for (int q = 0; q < R; ++q) {
              lds_row<NV>(src + q * p.pitch, win[(q + R - 1) % R]);
              float d[4];
              lds_row<1>(dp + q * p.pitch_d, d);
#pragma unroll
              for (int k = 0; k < R; ++k)
#pragma unroll
                for (int j = 0; j < KW; ++j)
#pragma unroll
                  for (int v = 0; v < 4; ++v) acc[k][j] = fmaf(win[(q + k) % R][v + j], d[v], acc[k][j]);
            }
            src += R * p.pitch;
            dp += R * p.pitch_d;
          }
#pragma unroll
          for (int q = 0; q < R - 1; ++q) {
            if (yy + q < yb) {
              lds_row<NV>(src + q * p.pitch, win[(q + R - 1) % R]);
              float d[4];
              lds_row<1>(dp + q * p.pitch_d, d);
#pragma unroll
              for (int k = 0; k < R; ++k)
#pragma unroll
                for (int j = 0; j < KW; ++j)
#pragma unroll
                  for (int v = 0; v < 4; ++v) acc[k][j] = fmaf(win[(q + k) % R][v + j], d[v], acc[k][j]);
            }
          }
        }
      }
      if (multi) {
        reduce_taps<R, KW>(acc, lw, lane_ok && gg < p.Gt, s_acc + gg * R * KW);
#pragma unroll
        for (int k = 0; k < R; ++k)
#pragma unroll
          for (int j = 0; j < KW; ++j) acc[k][j] = 0.f;
      }
    }
  }
  if (!multi) reduce_taps<R, KW>(acc, lw, lane_ok, s_acc + g * R * KW);
  __syncthreads();
  const int ksz = p.kh * KW;
  float* out = ws + (static_cast<int64_t>(chunk) * p.channels + c) * ksz;
  for (int e = threadIdx.x; e < ksz; e += blockDim.x) {
    const int ie = e / KW - p.kh_lo;
    out[e] = (ie >= 0 && ie < p.khe) ? s_acc[ie * KW + e % KW] : 0.f;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Tensor-core forward for fp16/bf16 (v7). Along the long axis a 1-D correlation is a product with a banded
// Toeplitz matrix of one kernel column: for a 16-row output strip starting at y0 and a 16-row input chunk
// starting at r0, Out[y0 + m, x] += sum_k W[m, k] * In[r0 + k, x + j - pw] with W[m, k] = w[r0 - y0 + phe + k - m, j]
// (zero outside the kernel). That is one mma.m16n8k16 (A = W, 16 x 16; B = the input chunk, 16 rows x 8
// columns; fp32 accumulators) per (strip, chunk, kernel column j, 8 output columns). Only chunks of real input
// rows are visited, so padding costs nothing and a kernel taller than the map costs no more than the map.
// * Shared memory holds each plane transposed, s[x + pw][y] (the contracted axis y contiguous, zero halo
//   columns, rows rounded up to 16 with zeros), so a B fragment is one ldmatrix.x2 whose 8 row addresses are
//   8 consecutive x (the column shift j just moves the row address); pitch = 8 (mod 16) halves keeps it
//   conflict-free.
// * A fragments come from a table of weight pairs pw2[j][t] = (w[t, j], w[t + 1, j]) (zero outside the
//   kernel): thread (g = lane / 4, q = lane % 4) needs a0 = pw2[d + 2q - g], a1 = pw2[d + 2q - g - 8],
//   a2 = pw2[d + 2q - g + 8], a3 = a0 (d = r0 - y0 + phe), 3 LDS reused across the warp's 8-column tiles.
// * Warp = (plane, 16-row strip, group of <= 8 column tiles); outputs go through shared memory in NCHW order
//   (+ bias, rounded once) and out as vectors.

template <typename T>
__device__ __forceinline__ uint32_t pack_pair(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack_pair<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack_pair<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                                         uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                  uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void ldsm_x2(uint32_t addr, uint32_t& b0, uint32_t& b1) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(b0), "=r"(b1) : "r"(addr));
}

constexpr int kMmaNT = 8;     // 8-column tiles per warp at most (32 fp32 accumulators)
constexpr int kMmaTOff = 32;  // pw2[j][t] lives at index t + kMmaTOff (t in [-30, khe + 30] is read)

// Load `nplanes` planes (H x W, row-major, plane k at src + k * pstride) into s[k * plane_sz + (x + pw) * pitch + y]
// (slide orientation) as raw 16-bit values; N elements per global load (N divides W, src aligned to N).
template <int N>
__device__ __forceinline__ void mma_load_planes_n(const unsigned short* __restrict__ src, int64_t pstride,
                                                  int nplanes, int H, int W, bool tr, unsigned short* __restrict__ s,
                                                  int plane_sz, int pitch, int pw) {
  using V = typename VecOf<N * 2>::type;
  const int nv = W / N;
  if (tr) {
    // Slide x = global row, slide y = global column: rows copy straight across.
    const int per = H * nv, total = nplanes * per;
    const float inv_per = 1.f / per, inv_nv = 1.f / nv;
    for (int id = threadIdx.x; id < total; id += blockDim.x) {
      const int k = fdiv(id, inv_per);
      const int r = id - k * per;
      const int gy = fdiv(r, inv_nv), v = r - gy * nv;
      const V val = *reinterpret_cast<const V*>(src + k * pstride + gy * W + v * N);
      *reinterpret_cast<V*>(s + k * plane_sz + (gy + pw) * pitch + v * N) = val;
    }
  } else {
    // Slide = global: transpose. A task is two rows (2yp, 2yp + 1) x N columns: N 32-bit shared stores.
    const int hp = (H + 1) / 2;
    const int per = hp * nv, total = nplanes * per;
    const float inv_per = 1.f / per, inv_hp = 1.f / hp;
    for (int id = threadIdx.x; id < total; id += blockDim.x) {
      const int k = fdiv(id, inv_per);
      const int r = id - k * per;
      const int v = fdiv(r, inv_hp), yp = r - v * hp;
      const unsigned short* g = src + k * pstride + (2 * yp) * W + v * N;
      const bool two = 2 * yp + 1 < H;
      uint32_t* d = reinterpret_cast<uint32_t*>(s + k * plane_sz + (v * N + pw) * pitch + 2 * yp);
      const int dstep = pitch / 2;
      if constexpr (N == 1) {
        const uint32_t e0 = g[0], e1 = two ? g[W] : 0u;
        d[0] = e0 | (e1 << 16);
      } else {
        // N / 2 words per row; element q of a row is half (q & 1) of word q / 2.
        uint32_t w0[N / 2], w1[N / 2];
        const V r0 = *reinterpret_cast<const V*>(g);
        V r1{};
        if (two) r1 = *reinterpret_cast<const V*>(g + W);
        memcpy(w0, &r0, sizeof(V));
        memcpy(w1, &r1, sizeof(V));
#pragma unroll
        for (int h = 0; h < N / 2; ++h) {
          d[(2 * h) * dstep] = __byte_perm(w0[h], w1[h], 0x5410);
          d[(2 * h + 1) * dstep] = __byte_perm(w0[h], w1[h], 0x7632);
        }
      }
    }
  }
}

// Copy `nplanes` planes of HW 16-bit values from shared (plane k at s + k * plane_sz) to dst + k * pstride.
template <int N>
__device__ __forceinline__ void mma_store_planes_n(unsigned short* __restrict__ dst, int64_t pstride, int nplanes,
                                                   int HW, const unsigned short* __restrict__ s, int plane_sz) {
  using V = typename VecOf<N * 2>::type;
  const int nv = HW / N, total = nplanes * nv;
  const float inv_nv = 1.f / nv;
  for (int id = threadIdx.x; id < total; id += blockDim.x) {
    const int k = fdiv(id, inv_nv);
    const int e = (id - k * nv) * N;
    *reinterpret_cast<V*>(dst + k * pstride + e) = *reinterpret_cast<const V*>(s + k * plane_sz + e);
  }
}

// One warp: output rows [y0, y0 + 16) x column tiles [nt0, nt0 + ntw) of the plane tile at s_x (see above).
template <typename T, int KW, int NT>
__device__ __forceinline__ void mma_strip(const Plan& p, const uint32_t* __restrict__ s_pw,
                                          const unsigned short* s_x, int y0, int nt0, int ntw, int lane,
                                          float (&acc)[NT][4]) {
  const int gq = lane >> 2, tq = lane & 3;
  const int WP = p.wpitch;
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int v = 0; v < 4; ++v) acc[n][v] = 0.f;
  // Chunks r0 = 16 kc with some tap in range: d = r0 - y0 + phe in [-15, khe + 14].
  const int lo = y0 - p.phe - 15;
  const int kc_lo = lo <= 0 ? 0 : (lo + 15) / 16;
  const int kc_hi = min(p.HP / 16 - 1, (y0 - p.phe + p.khe + 14) / 16);
  const uint32_t xbase = static_cast<uint32_t>(__cvta_generic_to_shared(s_x)) +
                         2u * static_cast<uint32_t>((8 * nt0 + (lane & 7)) * p.pitch + ((lane >> 3) & 1) * 8);
#pragma unroll
  for (int j = 0; j < KW; ++j) {
    const uint32_t* pj = s_pw + j * WP + kMmaTOff + 2 * tq - gq;
    const uint32_t xj = xbase + 2u * static_cast<uint32_t>(j * p.pitch);
    for (int kc = kc_lo; kc <= kc_hi; ++kc) {
      const int d = 16 * kc - y0 + p.phe;
      const uint32_t a0 = pj[d], a1 = pj[d - 8], a2 = pj[d + 8];
      const uint32_t xk = xj + 32u * kc;
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        if (n < ntw) {
          uint32_t b0, b1;
          ldsm_x2(xk + 2u * static_cast<uint32_t>(8 * n * p.pitch), b0, b1);
          mma_16816<T>(acc[n], a0, a1, a2, a0, b0, b1);
        }
      }
    }
  }
}

// Write a warp's accumulators (+ bias, rounded once) into `so` in global (NCHW) order of the plane.
template <typename T, int NT>
__device__ __forceinline__ void mma_stage(const Plan& p, T* so, int y0, int nt0, int ntw, int lane,
                                          const float (&acc)[NT][4], float b) {
  const int gq = lane >> 2, tq = lane & 3;
#pragma unroll
  for (int n = 0; n < NT; ++n) {
    if (n < ntw) {
#pragma unroll
      for (int v = 0; v < 4; ++v) {
        const int yy = y0 + gq + (v >> 1) * 8;
        const int xx = 8 * (nt0 + n) + 2 * tq + (v & 1);
        if (yy < p.Hs && xx < p.Ws) so[p.transposed ? xx * p.W + yy : yy * p.W + xx] = from_float<T>(acc[n][v] + b);
      }
    }
  }
}

// NT: column tiles per warp at compile time (2, 4 or 8 >= the plan's NTW). v7 unrolled all 8 under a run-time
// `n < ntw` guard: on 14x14 maps (2 tiles) that issued ~950 instructions per plane for 10 MMAs.
template <typename T, int KW, int NT>
__global__ void __launch_bounds__(256, 2)
    forward_mma_kernel(const T* __restrict__ x, const void* __restrict__ w, const float* __restrict__ bias,
                       T* __restrict__ y, const Plan p) {
  extern __shared__ __align__(16) float smem[];
  const int HW = p.H * p.W;
  const int WP = p.wpitch;  // words per kernel column in the pair table
  uint32_t* s_pw = reinterpret_cast<uint32_t*>(smem);
  unsigned short* s_x = reinterpret_cast<unsigned short*>(smem + ((KW * WP + 3) & ~3));
  const int c = static_cast<int>(blockIdx.x % p.channels);
  const int64_t N = p.planes / p.channels;
  const int64_t nb = static_cast<int64_t>(blockIdx.x / p.channels) * p.P;
  const int nplanes = static_cast<int>(min(static_cast<int64_t>(p.P), N - nb));
  const int64_t cstride = static_cast<int64_t>(p.channels) * HW;
  const int64_t base = (nb * p.channels + c) * HW;

  zero_fill(reinterpret_cast<float*>(s_x), p.P * p.plane_sz / 2);
  {
    for (int id = threadIdx.x; id < KW * WP; id += blockDim.x) {
      const int j = id / WP;
      const int t = id - j * WP - kMmaTOff;
      const float lo = (t >= 0 && t < p.khe) ? load_weight(w, p, c, p.kh_lo + t, j) : 0.f;
      const float hi = (t + 1 >= 0 && t + 1 < p.khe) ? load_weight(w, p, c, p.kh_lo + t + 1, j) : 0.f;
      s_pw[id] = pack_pair<T>(lo, hi);
    }
  }
  __syncthreads();
  {
    const unsigned short* src = reinterpret_cast<const unsigned short*>(x) + base;
    const bool tr = p.transposed != 0;
    switch (p.vin) {
      case 8: mma_load_planes_n<8>(src, cstride, nplanes, p.H, p.W, tr, s_x, p.plane_sz, p.pitch, p.pw); break;
      case 4: mma_load_planes_n<4>(src, cstride, nplanes, p.H, p.W, tr, s_x, p.plane_sz, p.pitch, p.pw); break;
      case 2: mma_load_planes_n<2>(src, cstride, nplanes, p.H, p.W, tr, s_x, p.plane_sz, p.pitch, p.pw); break;
      default: mma_load_planes_n<1>(src, cstride, nplanes, p.H, p.W, tr, s_x, p.plane_sz, p.pitch, p.pw); break;
    }
  }
  __syncthreads();

  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  const int units = p.MT * p.CG;
  const float b = bias != nullptr ? bias[c] : 0.f;
  // units == 1 (small maps): a warp owns whole planes (pl = wid, wid + warps, ...), so it stages each plane's
  // outputs over that plane's own tile as soon as it is done, and a block holds several planes per warp.
  // Otherwise warp = one (plane, strip, column group) and the block stages after a barrier. One call site
  // of mma_strip keeps the register count of one strip.
  const int nw = static_cast<int>(blockDim.x >> 5);
  const int steps = units == 1 ? max(1, (nplanes - wid + nw - 1) / nw) : 1;
  float acc[NT][4];
  int pl = wid, y0 = 0, nt0 = 0, ntw = p.NT8;
  if (units != 1) {
    pl = wid / units;
    const int u = wid - pl * units;
    const int mt = u / p.CG, cg = u - mt * p.CG;
    y0 = 16 * mt;
    nt0 = cg * p.NTW;
    ntw = min(p.NTW, p.NT8 - nt0);
  }
  for (int it = 0; it < steps; ++it) {
    const int q = pl + it * nw;  // units != 1: steps = 1, q = pl
    const bool active = q < nplanes;
    unsigned short* sp = s_x + q * p.plane_sz;
    if (active) mma_strip<T, KW, NT>(p, s_pw, sp, y0, nt0, ntw, lane, acc);
    if (units == 1 && active) {
      __syncwarp();
      mma_stage<T, NT>(p, reinterpret_cast<T*>(sp), y0, nt0, ntw, lane, acc, b);
    }
  }
  if (units != 1) {
    __syncthreads();  // the input tiles are dead: stage the outputs there in global (NCHW) order
    if (pl < nplanes) mma_stage<T, NT>(p, reinterpret_cast<T*>(s_x + pl * p.plane_sz), y0, nt0, ntw, lane, acc, b);
  }
  __syncthreads();
  {
    unsigned short* dst = reinterpret_cast<unsigned short*>(y) + base;
    switch (p.vout) {
      case 8: mma_store_planes_n<8>(dst, cstride, nplanes, HW, s_x, p.plane_sz); break;
      case 4: mma_store_planes_n<4>(dst, cstride, nplanes, HW, s_x, p.plane_sz); break;
      case 2: mma_store_planes_n<2>(dst, cstride, nplanes, HW, s_x, p.plane_sz); break;
      default: mma_store_planes_n<1>(dst, cstride, nplanes, HW, s_x, p.plane_sz); break;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Tensor-core weight gradient for fp16/bf16 (v9, "row GEMM"). In slide orientation (long kernel axis along
// rows), for one output row y,
//   dW[i, j] += sum_c X[y + i - phe, c] * dY[y, c - j + pw]      (c = the input column x + j - pw),
// a matrix product with M = taps i (16 per block), K = input columns c (16 per chunk, only the map's own
// columns: the shift by j lives in B), N = kernel columns j (8, of which kw <= 7 are kept):
// * A[i, c] = X[y + i - phe, c] is a plain 16 x 16 block of the row-major input tile: one ldmatrix.x4;
// * B[c, j] = dY[y, c - j + pw] is a Toeplitz band of one dY row: a thread needs the element pairs starting at
//   e = c0 + 2q - g + pw and e + 8 (g = lane / 4, q = lane % 4). Their parity is fixed per thread, so each dY
//   row is kept twice, as loaded (E) and shifted by one element (O), and a pair is one aligned word of one
//   of them.
// * A for (row y, tap block ib) starts at input row y + 16 ib - phe, so it is the same block for (y + 16, ib - 1):
//   a warp takes the rows y0 + 16 m (m < MY, y0 < 16) together and loads each distinct A block once (MY + NB - 1
//   instead of MY * NB), then runs all MY * NB products. Blocks of rows wholly off the map are zero (not read),
//   rows past the map read zeros for B and taps past khe are discarded, so no product needs a branch.
// Both tiles are row-major in slide orientation (a 51x5 kernel copies rows straight, a 5x51 one transposes on
// the way in), zero outside the map: X at rows + kRgRO, dY at columns + kRgDO. fp32 accumulators live across
// the block's planes, then go through shared memory to one workspace row per batch chunk, as the FFMA kernel's.
// The index mapping was checked by a NumPy emulation of the fragments (12 shapes, exact) before the first run.
constexpr int kRgMaxMY = 4;  // rows per warp unit (y0 + 16 m): maps of <= 64 rows along the long axis
constexpr int kRgMaxNB = 4;  // 16-tap blocks: <= 64 effective taps
constexpr int kRgRO = 16;    // zero rows above the input tile (and 16 below): A blocks start at row >= -15
constexpr int kRgDO = 8;     // zero halves before each dY row: B reads elements from c0 + pw - 7 on

__device__ __forceinline__ void ldsm_x4(uint32_t addr, uint32_t (&a)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3])
               : "r"(addr));
}

template <int N>
__device__ __forceinline__ void rg_load(const unsigned short* __restrict__ x, const unsigned short* __restrict__ dy,
                                        int64_t cstride, int nbatch, const Plan& p, bool straight,
                                        unsigned short* __restrict__ s_x, unsigned short* __restrict__ s_d) {
  mma_load_planes_n<N>(x, cstride, nbatch, p.H, p.W, straight, s_x, p.plane_sz, p.pitch, kRgRO);
  mma_load_planes_n<N>(dy, cstride, nbatch, p.H, p.W, straight, s_d + kRgDO, p.dplane_sz, p.pitch_d, 0);
}

template <typename T, int MY, int NB>
__global__ void __launch_bounds__(256, 3)
    wgrad_mma_kernel(const T* __restrict__ x, const T* __restrict__ dy, float* __restrict__ ws, const Plan p) {
  constexpr int NK = MY + NB - 1;
  extern __shared__ __align__(16) float smem[];
  float* s_acc = smem;                                                       // NB * 16 taps x 8 columns, fp32
  unsigned short* s_x = reinterpret_cast<unsigned short*>(smem + p.acc_sz);  // P x (Hs + 2 kRgRO) x pitch
  unsigned short* s_d = s_x + p.P * p.plane_sz;                              // E: P x Hs x pitch_d
  uint32_t* s_o = reinterpret_cast<uint32_t*>(s_d + p.P * p.dplane_sz);      // O: the same, shifted by one
  const int c = static_cast<int>(blockIdx.x % p.channels);
  const int chunk = static_cast<int>(blockIdx.x / p.channels);
  const int64_t N = p.planes / p.channels;
  const int64_t n0 = static_cast<int64_t>(chunk) * p.chunk;
  const int64_t n1 = min(N, n0 + p.chunk);
  const int HW = p.H * p.W;
  const int64_t cstride = static_cast<int64_t>(p.channels) * HW;
  const bool straight = p.transposed == 0;  // slide rows are global rows: copied straight, else transposed
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  const int gq = lane >> 2, tq = lane & 3;
  const int units = min(16, p.Hs);  // row classes y0 per plane
  const int nc = (p.Ws + 15) >> 4;  // 16-column chunks
  const int wrow = p.pitch_d >> 1;  // words per dY row
  const int dwords = p.dplane_sz >> 1;
  // B: the thread's pair starts at element e = kRgDO + pw - g + 2q (+ 16 per chunk, + 8 for b1) of a dY row: word
  // e / 2 of E when e is even, of O when it is odd.
  const int eb = kRgDO + p.pw - gq + 2 * tq;
  const uint32_t* s_b = ((eb & 1) ? s_o : reinterpret_cast<const uint32_t*>(s_d)) + (eb >> 1);
  // A: ldmatrix.x4 row address of this lane: matrix lane / 8 = (rows + 8 (lane / 8 & 1), columns + 8 (lane / 16)).
  const int arow = (lane & 7) + ((lane >> 3) & 1) * 8, acol = (lane >> 4) * 8;
  const uint32_t astep = 32u * static_cast<uint32_t>(p.pitch);  // bytes per 16 tile rows
  const uint32_t sx_base = static_cast<uint32_t>(__cvta_generic_to_shared(s_x)) +
                           2u * static_cast<uint32_t>((kRgRO - p.phe + arow) * p.pitch + acol);
  // Zeros to read for B in place of a row past the map: the first plane's top tile row (words 8 cc and
  // 8 cc + 4 < pitch / 2; the top kRgRO rows are never written).
  const uint32_t* zero_b = reinterpret_cast<const uint32_t*>(s_x);

  for (int e = threadIdx.x; e < p.acc_sz; e += blockDim.x) s_acc[e] = 0.f;
  zero_fill(reinterpret_cast<float*>(s_x), p.P * (p.plane_sz + 2 * p.dplane_sz) / 2);  // margins stay zero

  float acc[NB][4];
#pragma unroll
  for (int b = 0; b < NB; ++b)
#pragma unroll
    for (int v = 0; v < 4; ++v) acc[b][v] = 0.f;

  for (int64_t nbase = n0; nbase < n1; nbase += p.P) {
    const int nbatch = static_cast<int>(min(static_cast<int64_t>(p.P), n1 - nbase));
    const int64_t base = (nbase * p.channels + c) * HW;
    __syncthreads();
    {
      const unsigned short* sx = reinterpret_cast<const unsigned short*>(x) + base;
      const unsigned short* sd = reinterpret_cast<const unsigned short*>(dy) + base;
      switch (p.vin) {
        case 8: rg_load<8>(sx, sd, cstride, nbatch, p, straight, s_x, s_d); break;
        case 4: rg_load<4>(sx, sd, cstride, nbatch, p, straight, s_x, s_d); break;
        case 2: rg_load<2>(sx, sd, cstride, nbatch, p, straight, s_x, s_d); break;
        default: rg_load<1>(sx, sd, cstride, nbatch, p, straight, s_x, s_d); break;
      }
    }
    __syncthreads();
    {
      // O[w] = (E[2w + 1], E[2w + 2]); the word that would straddle into the next row is never read.
      const uint32_t* s_e = reinterpret_cast<const uint32_t*>(s_d);
      const int total = nbatch * dwords - 1;
      for (int w = threadIdx.x; w < total; w += blockDim.x) s_o[w] = __byte_perm(s_e[w], s_e[w + 1], 0x5432);
    }
    __syncthreads();
    int pl = 0, y0 = wid;
    while (y0 >= units) {
      y0 -= units;
      ++pl;
    }
    for (; pl < nbatch;) {
      const int my = (p.Hs - y0 + 15) >> 4;  // rows y0 + 16 m < Hs
      // A block k covers input rows [y0 + 16 k - phe, + 16); one wholly off the map is not read (zero: v9 read
      // zero rows there, which was 30-40 % of the ldmatrix traffic on 56-row maps), and a row past the map reads
      // zero words for B (the first plane's top tile row).
      const int r0 = y0 - p.phe;
      uint32_t a_at[NK];
      unsigned live = 0;
#pragma unroll
      for (int k = 0; k < NK; ++k) {
        const bool on = r0 + 16 * k > -16 && r0 + 16 * k < p.Hs;
        a_at[k] = sx_base + 2u * static_cast<uint32_t>(pl * p.plane_sz + y0 * p.pitch) + k * astep;
        live |= on ? 1u << k : 0u;
      }
      const uint32_t* b_at[MY];
#pragma unroll
      for (int m = 0; m < MY; ++m) b_at[m] = m < my ? s_b + pl * dwords + (y0 + 16 * m) * wrow : zero_b;
#pragma unroll 2
      for (int cc = 0; cc < nc; ++cc) {
        uint32_t b[MY][2];
#pragma unroll
        for (int m = 0; m < MY; ++m) {
          b[m][0] = b_at[m][8 * cc];
          b[m][1] = b_at[m][8 * cc + 4];
        }
        uint32_t a[NK][4];
#pragma unroll
        for (int k = 0; k < NK; ++k) {
          a[k][0] = a[k][1] = a[k][2] = a[k][3] = 0u;
          if (live & (1u << k)) ldsm_x4(a_at[k] + 32u * cc, a[k]);
        }
#pragma unroll
        for (int m = 0; m < MY; ++m)
#pragma unroll
          for (int ib = 0; ib < NB; ++ib)
            mma_16816<T>(acc[ib], a[m + ib][0], a[m + ib][1], a[m + ib][2], a[m + ib][3], b[m][0], b[m][1]);
      }
      y0 += nw;
      while (y0 >= units) {
        y0 -= units;
        ++pl;
      }
    }
  }
  // Block-level sum: taps 16 ib + g (+ 8), kernel columns 2 q (+ 1).
#pragma unroll
  for (int ib = 0; ib < NB; ++ib) {
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      const int i = 16 * ib + gq + (v >> 1) * 8, j = 2 * tq + (v & 1);
      if (i < p.khe && j < p.kw) atomicAdd(s_acc + i * 8 + j, acc[ib][v]);
    }
  }
  __syncthreads();
  const int ksz = p.kh * p.kw;
  float* out = ws + (static_cast<int64_t>(chunk) * p.channels + c) * ksz;
  for (int e = threadIdx.x; e < ksz; e += blockDim.x) {
    const int ie = e / p.kw - p.kh_lo;
    out[e] = (ie >= 0 && ie < p.khe) ? s_acc[ie * 8 + e % p.kw] : 0.f;
  }
}

// dw[c][a][b] (global orientation, output dtype) = sum over chunks of workspace[chunk][c][i][j] (slide
// orientation): replaces a reduction, a transpose and a cast (three launches) with one.
template <typename TO>
__global__ void finish_wgrad_kernel(const float* __restrict__ ws, TO* __restrict__ dw, const Plan p) {
  const int ksz = p.kh * p.kw;
  const int64_t total = static_cast<int64_t>(p.channels) * ksz;
  const int64_t cstride = total;
  const int kw_g = p.transposed ? p.kh : p.kw;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = e / ksz;
    const int r = static_cast<int>(e - c * ksz);
    const int a = r / kw_g, b = r - a * kw_g;
    const int i = p.transposed ? b : a, j = p.transposed ? a : b;
    const float* src = ws + c * ksz + i * p.kw + j;
    float acc = 0.f;
    for (int k = 0; k < p.n_chunks; ++k) acc += src[k * cstride];
    dw[e] = from_float<TO>(acc);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Host side: plans and launches.

// Launch-geometry knobs for tuning sweeps only (kernels/NOTES.md): an unset or non-positive value keeps the
// default. They change speed, never results.
int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || v[0] == '\0') return fallback;
  const int x = std::atoi(v);
  return x > 0 ? x : fallback;
}

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

// Forward: per column and kernel column, a row group of R outputs walks min(kh, Hs + R - 1) taps (taps
// off the map are clipped) after preloading R - 1 inputs; each step is one input LDS, one weight LDS and
// R FMAs, so it costs max(R/4, 2) shared-memory-or-FMA cycles plus loop overhead (the +2, fitted to
// the first H100 runs: R = 14 beat R = 8 on 56x56 with 51 taps). Pick the R with the fewest cycles.
int pick_forward_r(int hs, int kh) {
  int best = kForwardR[0];
  int64_t best_cost = -1;
  for (int r : kForwardR) {
    const int64_t steps = std::min(kh, hs + r - 1);
    const int64_t cost = static_cast<int64_t>((hs + r - 1) / r) * (steps * (std::max(r, 8) + 2) + 4 * (r - 1));
    if (best_cost < 0 || cost <= best_cost) {
      best_cost = cost;
      best = r;
    }
  }
  return best;
}

// Weight gradient: a tap unit of R taps costs R FMAs per step plus ~6 of per-unit work amortised per step
// (window preload, dy load, reduction); v3 measured R = 8 LDS-bound on 51-tap kernels, hence the 6.
template <size_t M>
int pick_r(const int (&options)[M], int extent) {
  int best = options[0];
  int64_t best_cost = -1;
  for (int r : options) {
    const int64_t cost = static_cast<int64_t>((extent + r - 1) / r) * (r + 6);
    if (best_cost < 0 || cost < best_cost) {
      best_cost = cost;
      best = r;
    }
  }
  return best;
}

int64_t forward_smem(const Plan& p) {
  return 4LL * (((static_cast<int64_t>(p.P) * p.kh * p.kw + 3) & ~3LL) +
                static_cast<int64_t>(p.P) * p.in_rows * p.pitch + 4);
}

int64_t wgrad_smem(const Plan& p) {
  const int groups = (p.kh + p.R - 1) / p.R;
  return 4LL * (((static_cast<int64_t>(groups) * p.kw * p.R + 3) & ~3LL) +
                ((static_cast<int64_t>(p.in_rows) * p.pitch + 3) & ~3LL) + static_cast<int64_t>(p.TH) * (p.TW | 1) +
                4);
}


// Whole-plane path: the short kernel axis must be one of the compiled widths and a plane (with halo) must
// fit in shared memory with at most 256 threads per plane. SLAK_DWCONV_TILED=1 turns it off (A/B timing).
bool plane_path_allowed(const Plan& p) {
  const char* env = std::getenv("SLAK_DWCONV_TILED");
  if (env != nullptr && env[0] == '1') return false;
  if (p.kw != 1 && p.kw != 3 && p.kw != 5 && p.kw != 7) return false;
  return p.Ws <= 128 && static_cast<int64_t>(p.H) * p.W < 65536;
}

void crop_rows(Plan* p) {
  // Kernel rows farther than Hs - 1 from the centre only ever multiply padding.
  p->kh_lo = std::max(0, p->ph - (p->Hs - 1));
  p->khe = p->kh - 2 * p->kh_lo;
  p->phe = p->ph - p->kh_lo;
}

int plane_nv(int kw) { return (kw + 6) / 4; }

bool make_forward_plane_plan(Plan* plan) {
  Plan& p = *plan;
  if (!plane_path_allowed(p)) return false;
  crop_rows(&p);
  // R = 7 tiles 7- and 14-row maps exactly; otherwise R = 4 (fewer registers, more threads).
  p.R = (p.Hs % 7 == 0 && p.Hs <= 14) ? 7 : 4;
  p.G = (p.Hs + p.R - 1) / p.R;
  p.CT = (p.Ws + 3) / 4;
  const int per = p.G * p.CT;
  if (per > 256) return false;
  p.pitch = 4 * (p.CT - 1 + plane_nv(p.kw));
  p.in_rows = p.G * p.R + p.khe - 1;
  p.plane_sz = p.in_rows * p.pitch;
  const int64_t N = p.planes / p.channels;
  const int64_t wsz = static_cast<int64_t>(p.khe) * ((p.kw + 3) & ~3);
  auto smem = [&](int P) { return 4LL * (wsz + static_cast<int64_t>(P) * p.plane_sz); };
  const int hard = smem_optin_limit();
  if (smem(1) > hard) return false;
  const int cap = std::max(per, std::min(256, env_int("SLAK_DWCONV_PLANE_THREADS", 256)));
  p.P = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(cap / per, N)));
  while (p.P > 1 && smem(p.P) > 64 * 1024) p.P = (p.P + 1) / 2;
  p.smem_bytes = smem(p.P);
  p.threads = ((p.P * per + 31) / 32) * 32;
  p.n_chunks = static_cast<int>((N + p.P - 1) / p.P);
  p.chunk = p.P;
  p.TH = p.G * p.R;
  p.TW = 4 * p.CT;
  p.tiles_y = p.tiles_x = 1;
  p.path = 1;
  return true;
}

bool make_wgrad_plane_plan(int sm_count, Plan* plan) {
  Plan& p = *plan;
  if (!plane_path_allowed(p)) return false;
  crop_rows(&p);
  // R in {4, 5}: the fewest padded taps (5x5 -> one group of 5, 51 -> 13 groups of 4, 49 -> 10 of 5).
  const int pad4 = (p.khe + 3) / 4 * 4, pad5 = (p.khe + 4) / 5 * 5;
  p.R = pad5 < pad4 ? 5 : 4;
  p.Gt = (p.khe + p.R - 1) / p.R;
  p.CT = (p.Ws + 3) / 4;
  p.CTp = 1;
  while (p.CTp < p.CT) p.CTp <<= 1;
  p.Gb = std::min(p.Gt, std::max(1, 256 / p.CTp));
  p.pitch = 4 * (p.CT - 1 + plane_nv(p.kw));
  p.in_rows = p.Hs + p.Gt * p.R - 1;
  p.plane_sz = p.in_rows * p.pitch;
  p.pitch_d = 4 * p.CT;
  p.dplane_sz = p.Hs * p.pitch_d;
  p.acc_sz = (p.Gt * p.R * p.kw + 3) & ~3;
  const int64_t N = p.planes / p.channels;
  // cp.async staging (two raw buffers of P planes, sized for fp32) on maps up to 32 x 32 with several tap
  // groups, where the loads' latency was exposed (v8: s3 47x5 bf16 93 -> 70 us). 56 x 56 maps gain nothing
  // (s1 K x 5 wgrad, both dtypes: 1577 vs 1575 us) and keep the shared memory; single-group (5x5) passes
  // are too short to hide a load (measured slower), and H * W % 4 != 0 cannot use 8-byte pieces.
  const char* no_pipe = std::getenv("SLAK_DWCONV_NO_PIPE");  // 1: v7's unpipelined loads (A/B timing only)
  const int pipe_max_hw = env_int("SLAK_DWCONV_PIPE_MAX_HW", 1024);
  p.pipe = (no_pipe != nullptr && no_pipe[0] == '1') || p.H * p.W > pipe_max_hw || p.Gt == 1 || (p.H * p.W) % 4 != 0
               ? 0
               : 1;
  auto raw = [&](int P) -> int64_t { return p.pipe ? (static_cast<int64_t>(P) * p.H * p.W + 3) & ~3LL : 0; };
  auto smem = [&](int P) {
    return 4LL * (p.acc_sz + static_cast<int64_t>(P) * (p.plane_sz + p.dplane_sz) + 2 * raw(P));
  };
  const int hard = smem_optin_limit();
  if (smem(1) > hard) return false;
  p.P = 1;
  p.YS = 1;
  // Grow planes per pass, then row segments, in powers of two, up to 256 threads and 64 KB.
  // Threads per block and blocks per SM (batch chunks), measured on an H200 over SLaK-T's shapes (NOTES.md,
  // v8): 7x7 maps want small blocks (64 threads: 68 -> 50 us for 13x5 at B64); 14x14 maps with several tap
  // groups 128 threads and fewer, longer chunks (106 -> 93 us for 47x5); a single tap group (5x5) on
  // 14x14 / 28x28 maps fewer chunks (59 -> 53 us), on 56x56 maps 128 threads and more chunks (159 -> 130 us).
  int cap_default = 256, bps_default = 4;
  if (p.Hs <= 8) {
    cap_default = 64;
  } else if (p.Hs <= 16 && p.Gt > 1) {
    cap_default = 128;
    bps_default = 2;
  } else if (p.Hs <= 32 && p.Gt == 1) {
    bps_default = 2;
  } else if (p.Gt == 1) {
    cap_default = 128;
    bps_default = 8;
  }
  const int cap = std::min(256, env_int("SLAK_DWCONV_WG_THREADS", cap_default));
  for (;;) {
    if (p.Gb * p.CTp * p.YS * p.P * 2 > cap) break;
    if (p.P * 2 <= N && smem(p.P * 2) <= 64 * 1024) {
      p.P *= 2;
    } else if ((p.Hs + 2 * p.YS - 1) / (2 * p.YS) >= p.R) {
      p.YS *= 2;
    } else {
      break;
    }
  }
  p.smem_bytes = smem(p.P);
  p.threads = ((p.Gb * p.CTp * p.YS * p.P + 31) / 32) * 32;
  p.raw_sz = static_cast<int>(raw(p.P));
  const int64_t target = static_cast<int64_t>(env_int("SLAK_DWCONV_WG_BPS", bps_default)) * std::max(1, sm_count);
  const int64_t n_chunks = std::max<int64_t>(1, std::min<int64_t>((N + p.P - 1) / p.P, (target + p.channels - 1) / p.channels));
  p.chunk = static_cast<int>(((N + n_chunks - 1) / n_chunks + p.P - 1) / p.P * p.P);
  p.n_chunks = static_cast<int>((N + p.chunk - 1) / p.chunk);
  p.TH = p.Hs;
  p.TW = 4 * p.CT;
  p.tiles_y = p.tiles_x = 1;
  p.path = 1;
  return true;
}

// Tensor-core forward plan (fp16/bf16, whole-plane shapes with a long axis of >= 13 taps). Block = P planes of
// one channel, MT * CG warps per plane (16-row strips x groups of <= 8 column tiles), at most 8 warps.
// SLAK_DWCONV_NO_MMA=1 keeps fp16/bf16 on the FFMA kernels (A/B timing only).
bool make_forward_mma_plan(const Plan& b, const void* x, const void* y, Plan* out) {
  // Planes of at most 8 rows along the long axis (SLaK-T stage 4: 7x7 maps) give a block too few MMAs to
  // repay building the weight table: v7 measured s4 13x5 bf16 0.050 -> 0.090 ms there (v8, with the
  // column-tile count compiled in: 0.042 -> 0.049), so they stay on FFMA.
  // v8 (H200, bf16, B64): on 9..16-row planes a 5-tap axis gains too (s3 5x5 fwd 44 -> 34 us: one chunk,
  // 10 MMAs per plane); on larger planes 5x5 stays on FFMA (s1 116 vs 126 us, s2 64 vs 66 us).
  const int min_k = env_int("SLAK_DWCONV_MMA_MIN_K", b.Hs <= 16 ? 5 : 13);
  if (b.path != 1 || b.kh < min_k || b.Hs < env_int("SLAK_DWCONV_MMA_MIN_HS", 9)) return false;
  const char* env = std::getenv("SLAK_DWCONV_NO_MMA");
  if (env != nullptr && env[0] == '1') return false;
  Plan p = b;
  p.MT = (p.Hs + 15) / 16;
  p.HP = 16 * p.MT;
  p.NT8 = (p.Ws + 7) / 8;
  p.CG = (p.NT8 + kMmaNT - 1) / kMmaNT;
  p.NTW = (p.NT8 + p.CG - 1) / p.CG;
  const int units = p.MT * p.CG;
  if (units > 8) return false;
  const int rows = 8 * p.NT8 + p.kw - 1;
  p.pitch = p.HP + 8;  // halves; pitch / 2 = 4 (mod 8) words: conflict-free ldmatrix rows
  const int HW = p.H * p.W;
  p.plane_sz = std::max(rows * p.pitch, (HW + 7) & ~7);
  p.wpitch = p.khe + 2 * kMmaTOff;
  const int64_t N = p.planes / p.channels;
  const int64_t wbytes = 4LL * ((p.kw * p.wpitch + 3) & ~3);
  auto smem = [&](int P) { return wbytes + 2LL * P * p.plane_sz; };
  if (smem(1) > smem_optin_limit()) return false;
  if (units == 1) {
    // A warp per plane, up to 4 planes per warp: per-block costs (weight table, barriers) spread over
    // 32 planes, as the FFMA kernels do on small maps.
    p.P = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(env_int("SLAK_DWCONV_MMA_P", 32), N)));
    while (p.P > 1 && smem(p.P) > 48 * 1024) p.P = (p.P + 1) / 2;
    p.threads = std::min(p.P, std::min(8, env_int("SLAK_DWCONV_MMA_WARPS", 8))) * 32;
  } else {
    const int warps = std::max(units, std::min(8, env_int("SLAK_DWCONV_MMA_BLOCK_WARPS", 8)));
    p.P = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(warps / units, N)));
    while (p.P > 1 && smem(p.P) > 64 * 1024) p.P = (p.P + 1) / 2;
    p.threads = p.P * units * 32;
  }
  p.smem_bytes = smem(p.P);
  p.n_chunks = static_cast<int>((N + p.P - 1) / p.P);
  p.chunk = p.P;
  const uintptr_t xa = reinterpret_cast<uintptr_t>(x), ya = reinterpret_cast<uintptr_t>(y);
  p.vin = p.vout = 1;
  for (int n : {2, 4, 8}) {
    if (p.W % n == 0 && xa % (2 * n) == 0) p.vin = n;
    if (HW % n == 0 && ya % (2 * n) == 0) p.vout = n;
  }
  p.mma = 1;
  *out = p;
  return true;
}

// Tensor-core weight-gradient plan (fp16/bf16, v9), built at launch from the FFMA plan `b`, whose batch
// chunking (and so the workspace) it keeps. Applies to whole-plane shapes with <= 64 rows along the long axis
// and <= 64 effective taps. By default it is used for long kernels (>= 13 effective taps) on maps of >= 17 rows
// along the long axis: there it beat the FFMA kernel on the H200 (bf16, B64: s1 51x5 405 -> 176 us, 5x51
// 405 -> 172, s2 49x5 173 -> 142, 5x49 173 -> 130), while on 14- and 7-row maps and for 5x5 kernels the
// FFMA kernel stayed faster (s3 47x5 70 vs 98 us, s4 13x5 50 vs 88, s1 5x5 129 vs 145).
// SLAK_DWCONV_MMA_WGRAD=0 keeps every shape on FFMA, =1 takes the tensor cores wherever they apply;
// SLAK_DWCONV_MMA_WGRAD_MIN_K / _MIN_HS move the default.
bool make_wgrad_mma_plan(const Plan& b, const void* x, const void* dy, Plan* out) {
  if (b.path != 1 || b.Hs > kRgMaxMY * 16 || b.khe > kRgMaxNB * 16 || b.kw > 8) return false;
  const char* env = std::getenv("SLAK_DWCONV_MMA_WGRAD");
  if (env != nullptr && env[0] == '0') return false;
  const bool forced = env != nullptr && env[0] == '1';
  const int min_k = env_int("SLAK_DWCONV_MMA_WGRAD_MIN_K", 13), min_hs = env_int("SLAK_DWCONV_MMA_WGRAD_MIN_HS", 17);
  if (!forced && (b.khe < min_k || b.Hs < min_hs)) return false;
  Plan p = b;
  const int nc = (p.Ws + 15) / 16;
  p.pitch = 16 * nc + 8;                                  // halves; = 8 (mod 16): conflict-free ldmatrix rows
  p.plane_sz = (p.Hs + 2 * kRgRO) * p.pitch;
  p.pitch_d = (kRgDO + 16 * nc + p.pw + 10 + 7) & ~7;     // B reads elements < kRgDO + pw + 16 nc (+ slack)
  p.dplane_sz = p.Hs * p.pitch_d;
  p.acc_sz = kRgMaxNB * 16 * 8;
  const int64_t per_plane = 2LL * (p.plane_sz + 2 * p.dplane_sz);  // X tile, dY rows E and O
  auto smem = [&](int P) { return 4LL * p.acc_sz + P * per_plane; };
  if (smem(1) > smem_optin_limit()) return false;
  // Planes per batch: enough row classes for the block's 8 warps to have >= 4 units each, within 64 KB
  // (3 blocks per SM).
  const int units = std::min(16, p.Hs);
  int P = std::max(1, (32 + units - 1) / units);
  P = static_cast<int>(std::min<int64_t>(P, std::max(1, p.chunk)));
  while (P > 1 && smem(P) > 64 * 1024) --P;
  p.P = P;
  p.smem_bytes = smem(p.P);
  p.threads = 256;
  const uintptr_t xa = reinterpret_cast<uintptr_t>(x), da = reinterpret_cast<uintptr_t>(dy);
  p.vin = 1;
  for (int n : {2, 4, 8}) {
    if (p.W % n == 0 && xa % (2 * n) == 0 && da % (2 * n) == 0) p.vin = n;
  }
  p.mma = 1;
  *out = p;
  return true;
}

}  // namespace

int make_forward_plan(int64_t N, int C, int H, int W, int kh, int kw, Plan* plan) {
  Plan& p = *plan;
  orient(N, C, H, W, kh, kw, &p);
  if (make_forward_plane_plan(&p)) return 0;
  orient(N, C, H, W, kh, kw, &p);
  p.R = pick_forward_r(p.Hs, p.kh);
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
  if (make_wgrad_plane_plan(sm_count, &p)) return 0;
  orient(N, C, H, W, kh, kw, &p);
  const int hard = smem_optin_limit();
  const int64_t target = 4LL * std::max(1, sm_count);
  if (p.Hs * p.Ws <= 256) {
    // Small-map kernel: R = 8 windows (the map is short, so a long window mostly preloads), whole plane
    // per lane; eligible while every warp's tap units fit in registers.
    p.R = 8;
    const int units = ((p.kh + p.R - 1) / p.R) * p.kw;
    const int slot = ((p.Hs + 2 * (p.R - 1)) * p.Ws + p.Hs * p.Ws) | 1;
    p.smem_bytes = 4LL * (((32LL * slot) + 3) & ~3LL) + 16;
    if (units <= 8 * kSmallUnits && p.smem_bytes <= std::min(hard, 96 * 1024)) {
      p.small = 1;
      p.threads = 32 * std::min(8, units);  // >= ceil(units / kSmallUnits) warps since units <= 32
      p.TH = p.Hs;
      p.TW = p.Ws;
      p.tiles_y = p.tiles_x = 1;
      // Chunks of whole 32-plane batches; enough blocks to fill the GPU.
      int64_t n_chunks = std::max<int64_t>(1, std::min<int64_t>((N + 31) / 32, (target + C - 1) / C));
      p.chunk = static_cast<int>((N + n_chunks - 1) / n_chunks);
      p.n_chunks = static_cast<int>((N + p.chunk - 1) / p.chunk);
      return 0;
    }
  }
  p.R = pick_r(kWgradR, p.kh);
  const int groups = (p.kh + p.R - 1) / p.R;
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
  int64_t n_chunks = std::max<int64_t>(1, std::min<int64_t>(N, (target + C - 1) / C));
  p.chunk = static_cast<int>((N + n_chunks - 1) / n_chunks);
  p.n_chunks = static_cast<int>((N + p.chunk - 1) / p.chunk);
  return 0;
}

namespace {

// Launch `kernel` on `blocks` blocks of p.threads threads with p.smem_bytes of dynamic shared memory, opting in
// above the default 48 KB; returns the launch's cudaError_t value.
template <typename... KArgs, typename... Args>
int launch_kernel(void (*kernel)(KArgs...), int64_t blocks, const Plan& p, cudaStream_t stream, Args... args) {
  if (p.smem_bytes > 48 * 1024) {
    cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(p.smem_bytes));
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  kernel<<<static_cast<unsigned>(blocks), p.threads, p.smem_bytes, stream>>>(args...);
  return static_cast<int>(cudaGetLastError());
}

template <typename T, int R>
int launch_forward_r(const void* x, const void* w, const float* bias, void* y, const Plan& p,
                     cudaStream_t stream) {
  auto kernel = forward_kernel<T, R>;
  return launch_kernel(kernel, ((p.planes + p.P - 1) / p.P) * p.tiles_y * p.tiles_x, p, stream,
                       static_cast<const T*>(x), w, bias, static_cast<T*>(y), p);
}

template <typename T, int KW, int R>
int launch_forward_plane_r(const void* x, const void* w, const float* bias, void* y, const Plan& p,
                           cudaStream_t stream) {
  auto kernel = forward_plane_kernel<T, KW, R>;
  return launch_kernel(kernel, static_cast<int64_t>(p.n_chunks) * p.channels, p, stream,
                       static_cast<const T*>(x), w, bias, static_cast<T*>(y), p);
}

template <typename T, int KW>
int launch_forward_plane_kw(const void* x, const void* w, const float* bias, void* y, const Plan& p,
                            cudaStream_t s) {
  return p.R == 7 ? launch_forward_plane_r<T, KW, 7>(x, w, bias, y, p, s)
                  : launch_forward_plane_r<T, KW, 4>(x, w, bias, y, p, s);
}

template <typename T>
int launch_forward(const void* x, const void* w, const float* bias, void* y, const Plan& p, cudaStream_t s) {
  if (p.path == 1) {
    switch (p.kw) {
      case 1: return launch_forward_plane_kw<T, 1>(x, w, bias, y, p, s);
      case 3: return launch_forward_plane_kw<T, 3>(x, w, bias, y, p, s);
      case 5: return launch_forward_plane_kw<T, 5>(x, w, bias, y, p, s);
      case 7: return launch_forward_plane_kw<T, 7>(x, w, bias, y, p, s);
      default: return static_cast<int>(cudaErrorInvalidValue);
    }
  }
  switch (p.R) {
    case 4: return launch_forward_r<T, 4>(x, w, bias, y, p, s);
    case 7: return launch_forward_r<T, 7>(x, w, bias, y, p, s);
    case 8: return launch_forward_r<T, 8>(x, w, bias, y, p, s);
    case 14: return launch_forward_r<T, 14>(x, w, bias, y, p, s);
    case 16: return launch_forward_r<T, 16>(x, w, bias, y, p, s);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

template <typename T, int KW>
int launch_forward_mma_kw(const void* x, const void* w, const float* bias, void* y, const Plan& p,
                          cudaStream_t stream) {
  auto kernel = p.NTW <= 2 ? forward_mma_kernel<T, KW, 2>
                : p.NTW <= 4 ? forward_mma_kernel<T, KW, 4> : forward_mma_kernel<T, KW, kMmaNT>;
  return launch_kernel(kernel, static_cast<int64_t>(p.n_chunks) * p.channels, p, stream,
                       static_cast<const T*>(x), w, bias, static_cast<T*>(y), p);
}

// fp16/bf16: the tensor-core forward where its plan applies, else the FFMA kernels.
template <typename T>
int launch_forward_half(const void* x, const void* w, const float* bias, void* y, const Plan& plan,
                        cudaStream_t s) {
  Plan q;
  if (make_forward_mma_plan(plan, x, y, &q)) {
    switch (q.kw) {
      case 1: return launch_forward_mma_kw<T, 1>(x, w, bias, y, q, s);
      case 3: return launch_forward_mma_kw<T, 3>(x, w, bias, y, q, s);
      case 5: return launch_forward_mma_kw<T, 5>(x, w, bias, y, q, s);
      case 7: return launch_forward_mma_kw<T, 7>(x, w, bias, y, q, s);
      default: break;
    }
  }
  return launch_forward<T>(x, w, bias, y, plan, s);
}

template <typename T, int R>
int launch_wgrad_r(const void* x, const void* dy, float* ws, const Plan& p, cudaStream_t stream) {
  auto kernel = p.small ? wgrad_small_kernel<T, 8> : wgrad_kernel<T, R>;
  return launch_kernel(kernel, static_cast<int64_t>(p.n_chunks) * p.channels, p, stream,
                       static_cast<const T*>(x), static_cast<const T*>(dy), ws, p);
}

template <typename T, int KW, int R>
int launch_wgrad_plane_r(const void* x, const void* dy, float* ws, const Plan& p, cudaStream_t stream) {
  const int64_t HW = static_cast<int64_t>(p.H) * p.W;
  constexpr int N8 = 8 / sizeof(T);
  const bool pipe = p.pipe != 0 && HW % N8 == 0 && reinterpret_cast<uintptr_t>(x) % 8 == 0 &&
                    reinterpret_cast<uintptr_t>(dy) % 8 == 0;
  auto kernel = pipe ? wgrad_plane_kernel<T, KW, R, true> : wgrad_plane_kernel<T, KW, R, false>;
  return launch_kernel(kernel, static_cast<int64_t>(p.n_chunks) * p.channels, p, stream,
                       static_cast<const T*>(x), static_cast<const T*>(dy), ws, p);
}

template <typename T, int KW>
int launch_wgrad_plane_kw(const void* x, const void* dy, float* ws, const Plan& p, cudaStream_t s) {
  return p.R == 5 ? launch_wgrad_plane_r<T, KW, 5>(x, dy, ws, p, s) : launch_wgrad_plane_r<T, KW, 4>(x, dy, ws, p, s);
}

template <typename T>
int launch_wgrad(const void* x, const void* dy, float* ws, const Plan& p, cudaStream_t s) {
  if (p.path == 1) {
    switch (p.kw) {
      case 1: return launch_wgrad_plane_kw<T, 1>(x, dy, ws, p, s);
      case 3: return launch_wgrad_plane_kw<T, 3>(x, dy, ws, p, s);
      case 5: return launch_wgrad_plane_kw<T, 5>(x, dy, ws, p, s);
      case 7: return launch_wgrad_plane_kw<T, 7>(x, dy, ws, p, s);
      default: return static_cast<int>(cudaErrorInvalidValue);
    }
  }
  switch (p.R) {
    case 4: return launch_wgrad_r<T, 4>(x, dy, ws, p, s);
    case 5: return launch_wgrad_r<T, 5>(x, dy, ws, p, s);
    case 8: return launch_wgrad_r<T, 8>(x, dy, ws, p, s);
    case 16: return launch_wgrad_r<T, 16>(x, dy, ws, p, s);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

// The tensor-core weight gradient compiled for MY row groups per warp unit and NB tap blocks (1..4 each).
template <typename T, int MY>
auto wgrad_mma_instance_my(int nb) {
  return nb <= 1 ? wgrad_mma_kernel<T, MY, 1>
         : nb == 2 ? wgrad_mma_kernel<T, MY, 2> : nb == 3 ? wgrad_mma_kernel<T, MY, 3> : wgrad_mma_kernel<T, MY, 4>;
}
template <typename T>
auto wgrad_mma_instance(int my, int nb) {
  return my <= 1 ? wgrad_mma_instance_my<T, 1>(nb)
         : my == 2 ? wgrad_mma_instance_my<T, 2>(nb) : my == 3 ? wgrad_mma_instance_my<T, 3>(nb)
                                                     : wgrad_mma_instance_my<T, 4>(nb);
}

template <typename T>
int launch_wgrad_half(const void* x, const void* dy, float* ws, const Plan& plan, cudaStream_t s) {
  Plan q;
  if (make_wgrad_mma_plan(plan, x, dy, &q)) {
    return launch_kernel(wgrad_mma_instance<T>((q.Hs + 15) / 16, (q.khe + 15) / 16),
                         static_cast<int64_t>(q.n_chunks) * q.channels, q, s, static_cast<const T*>(x),
                         static_cast<const T*>(dy), ws, q);
  }
  return launch_wgrad<T>(x, dy, ws, plan, s);
}

}  // namespace

int forward(DType dtype, const void* x, const void* w, const float* bias, void* y, const Plan& plan,
            void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kFloat32: return launch_forward<float>(x, w, bias, y, plan, s);
    case kFloat16: return launch_forward_half<__half>(x, w, bias, y, plan, s);
    case kBFloat16: return launch_forward_half<__nv_bfloat16>(x, w, bias, y, plan, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int finish_wgrad(DType out_dtype, const float* workspace, void* dw, const Plan& plan, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int64_t total = static_cast<int64_t>(plan.channels) * plan.kh * plan.kw;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((total + 255) / 256, 4096));
  switch (out_dtype) {
    case kFloat32: finish_wgrad_kernel<float><<<blocks, 256, 0, s>>>(workspace, static_cast<float*>(dw), plan); break;
    case kFloat16: finish_wgrad_kernel<__half><<<blocks, 256, 0, s>>>(workspace, static_cast<__half*>(dw), plan); break;
    case kBFloat16:
      finish_wgrad_kernel<__nv_bfloat16><<<blocks, 256, 0, s>>>(workspace, static_cast<__nv_bfloat16*>(dw), plan);
      break;
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
  return static_cast<int>(cudaGetLastError());
}

int wgrad(DType dtype, const void* x, const void* dy, float* workspace, const Plan& plan, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kFloat32: return launch_wgrad<float>(x, dy, workspace, plan, s);
    case kFloat16: return launch_wgrad_half<__half>(x, dy, workspace, plan, s);
    case kBFloat16: return launch_wgrad_half<__nv_bfloat16>(x, dy, workspace, plan, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace slak_dw
