// T5's attention core, forward and backward, fused for XLA:CPU (an XLA FFI custom call;
// built and loaded by cpu_attention.py).
//
//   S = Q K^T + bias (masked keys: -FLT_MAX),  P = softmax_rows(S),  O = P V
//   backward: dV = P^T dO,  dP = dO V^T,  dS = P (dP - rowsum(dO O)),  dQ = dS K,
//             dK = dS^T Q,  dbias = sum over the batch of dS.
//
// Why a kernel: XLA:CPU runs these as separate products over whole [B, H, Q, K] arrays,
// which do not fit in cache (memory-bound), and it cannot skip the pairs the mask hides.
// Here each (row, head) works on blocks of 4 query rows whose scores stay in L1, and each
// block only touches the keys between the first and the last one its mask lets it see.
// On packed rows (several examples per row, attention only within an example) that is
// each example's own keys: the work scales with the sum of the squared example lengths,
// not with the squared row length. Skipping a key whose weight is exactly 0 (exp of a
// masked score underflows to 0 by construction) changes no sum, so the result does not
// depend on how much is skipped.
//
// Deterministic: every output element is computed by one thread in a fixed order (the
// bias gradient, which sums over the batch, is split by head).

#if defined(__linux__)
#include <sched.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <thread>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// One vector register of floats (GCC/Clang vector extension, so the same source builds
// for x86-64 and AArch64; aligned(4): unaligned loads and stores are allowed through it).
// With AVX-512: 16 floats, and a register block of 4 query rows x 4 vectors (16 of the 32
// registers). Without it (AVX2: 16 registers of 8 floats; NEON: 32 of 4), a 16-float
// vector is two or four registers and the same block spilled to the stack: on an
// AVX2-only AMD EPYC the kernel ran at 0.34-0.60x XLA's attention's speed
// (scripts/bench_attention.py, docs/benchmarks.md). There: 8 floats and blocks of
// 4 rows x 2 vectors, 8 accumulators.
#if defined(__AVX512F__)
typedef float Vec __attribute__((vector_size(64), aligned(4)));
constexpr int kLanes = 16;
constexpr int kChunk = 4;                 // key vectors per register block (64 keys)
#else
typedef float Vec __attribute__((vector_size(32), aligned(4)));
constexpr int kLanes = 8;
constexpr int kChunk = 2;                 // key vectors per register block (16 keys)
#endif
constexpr int kRows = 4;                  // query rows per block
constexpr float kMasked = -std::numeric_limits<float>::max();  // layers._MASKED_LOGIT

inline Vec Load(const float* p) { return *reinterpret_cast<const Vec*>(p); }
inline void Store(float* p, Vec v) { *reinterpret_cast<Vec*>(p) = v; }
inline int64_t RoundUp(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

struct Dims {
  int64_t B, Q, K, H, D;  // D: the head size of the arrays
  int64_t Qp, Kp;         // Q and K rounded up to kRows and kLanes
};

// s[r][j] = sum_d a[r][d] bt[d][j] for j in [j0, j0 + C * kLanes).
template <int D, int C>
inline void ScoresChunk(const float* __restrict a, const float* __restrict bt, int64_t Kp, int64_t j0,
                        float* __restrict s) {
  Vec acc[kRows][C] = {};
  for (int d = 0; d < D; ++d) {
    Vec bv[C];
    for (int c = 0; c < C; ++c) bv[c] = Load(bt + d * Kp + j0 + c * kLanes);
    for (int r = 0; r < kRows; ++r) {
      const float av = a[r * D + d];
      for (int c = 0; c < C; ++c) acc[r][c] += av * bv[c];
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < C; ++c) Store(s + r * Kp + j0 + c * kLanes, acc[r][c]);
}

// s[r][j] = sum_d a[r][d] bt[d][j] for the block's rows a [kRows][D] and keys j in
// [lo, hi) (multiples of kLanes); bt is [D][Kp], s is [kRows][Kp].
template <int D>
inline void Scores(const float* a, const float* bt, int64_t Kp, int64_t lo, int64_t hi, float* s) {
  int64_t j0 = lo;
  for (; j0 + kChunk * kLanes <= hi; j0 += kChunk * kLanes) ScoresChunk<D, kChunk>(a, bt, Kp, j0, s);
  for (; j0 < hi; j0 += kLanes) ScoresChunk<D, 1>(a, bt, Kp, j0, s);
}

// o[r][:] = sum_{j in [lo, hi)} p[r][j] b[j][:]; p is [kRows][Kp], b is [Kp][D], o is [kRows][D].
template <int D>
inline void WeightedSum(const float* __restrict p, const float* __restrict b, int64_t Kp, int64_t lo, int64_t hi,
                        float* __restrict o) {
  constexpr int C = D / kLanes;
  Vec acc[kRows][C] = {};
  for (int64_t j = lo; j < hi; ++j) {
    Vec bv[C];
    for (int c = 0; c < C; ++c) bv[c] = Load(b + j * D + c * kLanes);
    for (int r = 0; r < kRows; ++r) {
      const float pv = p[r * Kp + j];
      for (int c = 0; c < C; ++c) acc[r][c] += pv * bv[c];
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < C; ++c) Store(o + r * D + c * kLanes, acc[r][c]);
}

// acc[j][:] += sum_r p[r][j] a[r][:] for j in [lo, hi); p [kRows][Kp], a [kRows][D], acc [Kp][D].
template <int D>
inline void AccumulateTransposed(const float* __restrict p, const float* __restrict a, int64_t Kp, int64_t lo,
                                 int64_t hi, float* __restrict acc) {
  constexpr int C = D / kLanes;
  Vec av[kRows][C];
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < C; ++c) av[r][c] = Load(a + r * D + c * kLanes);
  for (int64_t j = lo; j < hi; ++j) {
    Vec o[C];
    for (int c = 0; c < C; ++c) o[c] = Load(acc + j * D + c * kLanes);
    for (int r = 0; r < kRows; ++r) {
      const float pv = p[r * Kp + j];
      for (int c = 0; c < C; ++c) o[c] += pv * av[r][c];
    }
    for (int c = 0; c < C; ++c) Store(acc + j * D + c * kLanes, o[c]);
  }
}

// exp(x) for float: Cephes' expf (range reduction by ln 2, degree-5 polynomial, relative
// error ~1e-7), written so that the compiler vectorises it and every platform rounds the
// same way. Returns exactly 0 below -87.3 (masked scores), never a denormal.
inline float ExpF(float x) {
  const bool underflow = x < -87.3f;
  x = std::min(std::max(x, -87.3f), 88.3f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &p, 4);
  bits += static_cast<int32_t>(n) << 23;
  std::memcpy(&p, &bits, 4);
  return underflow ? 0.f : p;
}

// Copies x[b, :, h, :] of x [B, L, H, D] into dst [Lp][Dp], zero padded (a zero-padded
// head changes no product: the padded lanes add 0 to every score and output 0).
template <int Dp>
inline void Gather(const float* x, const Dims& d, int64_t L, int64_t Lp, int64_t b, int64_t h, float* dst) {
  std::memset(dst, 0, Lp * Dp * 4);
  for (int64_t i = 0; i < L; ++i) std::memcpy(dst + i * Dp, x + ((b * L + i) * d.H + h) * d.D, d.D * 4);
}
// Copies x[b, :, h, :] transposed into dst [Dp][Lp], zero padded. Through a tile of
// kLanes rows, so that every store to dst is a whole vector (storing single floats
// kLanes-strided apart was a quarter of the backward pass's time).
template <int Dp>
inline void GatherTransposed(const float* x, const Dims& d, int64_t L, int64_t Lp, int64_t b, int64_t h,
                             float* dst) {
  std::memset(dst, 0, Dp * Lp * 4);
  float tile[kLanes][Dp];
  for (int64_t i0 = 0; i0 < L; i0 += kLanes) {
    const int64_t rows = std::min<int64_t>(kLanes, L - i0);
    std::memset(tile, 0, sizeof(tile));
    for (int64_t r = 0; r < rows; ++r) std::memcpy(tile[r], x + ((b * L + i0 + r) * d.H + h) * d.D, d.D * 4);
    for (int64_t e = 0; e < d.D; ++e) {
      float column[kLanes];
      for (int r = 0; r < kLanes; ++r) column[r] = tile[r][e];
      std::memcpy(dst + e * Lp + i0, column, sizeof(column));
    }
  }
}

// Writes src [L][Dp] (its first D lanes) to x[b, :, h, :].
template <int Dp>
inline void Scatter(const float* src, const Dims& d, int64_t L, int64_t b, int64_t h, float* x) {
  for (int64_t i = 0; i < L; ++i) std::memcpy(x + ((b * L + i) * d.H + h) * d.D, src + i * Dp, d.D * 4);
}

// The index of the first (last) nonzero byte of row[0, n), or n (-1) if there is none;
// eight bytes at a time.
inline int64_t FirstNonzero(const uint8_t* row, int64_t n) {
  int64_t i = 0;
  for (uint64_t word; i + 8 <= n; i += 8) {
    std::memcpy(&word, row + i, 8);
    if (word) break;
  }
  while (i < n && !row[i]) ++i;
  return i;
}
inline int64_t LastNonzero(const uint8_t* row, int64_t n) {
  int64_t i = n;
  for (uint64_t word; i >= 8; i -= 8) {
    std::memcpy(&word, row + i - 8, 8);
    if (word) break;
  }
  while (i > 0 && !row[i - 1]) --i;
  return i - 1;
}

// For every block of kRows query rows of every batch row: the keys [lo, hi) that the
// block may see (rounded out to kLanes, hi <= Kp), as ranges[2 * (b * blocks + block)].
// A row that sees no key at all gets uniform weights over every key, as softmax gives
// for a row of equal scores, so its block needs the whole range. The same for every
// head, so computed once per call.
std::vector<int64_t> KeyRanges(const Dims& d, const uint8_t* mask) {
  const int64_t blocks = d.Qp / kRows;
  std::vector<int64_t> ranges(2 * d.B * blocks);
  for (int64_t b = 0; b < d.B; ++b) {
    for (int64_t blk = 0; blk < blocks; ++blk) {
      int64_t* range = ranges.data() + 2 * (b * blocks + blk);
      range[0] = 0;
      range[1] = d.Kp;
      if (mask == nullptr) continue;
      int64_t first = d.K, last = -1;
      for (int r = 0; r < kRows; ++r) {
        const uint8_t* row = mask + (b * d.Q + std::min(blk * kRows + r, d.Q - 1)) * d.K;
        const int64_t f = FirstNonzero(row, d.K);
        if (f == d.K) {  // a row that sees nothing
          first = 0;
          last = d.K - 1;
          break;
        }
        first = std::min(first, f);
        last = std::max(last, LastNonzero(row, d.K));
      }
      range[0] = first / kLanes * kLanes;
      range[1] = std::min(RoundUp(last + 1, kLanes), d.Kp);
    }
  }
  return ranges;
}

// s[r][j] += bias, then -FLT_MAX where masked, for j in [lo, hi); returns nothing.
inline void AddBiasAndMask(const Dims& d, int64_t b, int64_t h, int64_t i0, const float* bias, const uint8_t* mask,
                           int64_t lo, int64_t hi, float* s) {
  for (int r = 0; r < kRows; ++r) {
    const int64_t i = std::min(i0 + r, d.Q - 1);
    float* row = s + r * d.Kp;
    const float* br = bias ? bias + (h * d.Q + i) * d.K : nullptr;
    const uint8_t* mr = mask ? mask + (b * d.Q + i) * d.K : nullptr;
    for (int64_t j = lo; j < hi; ++j) {
      float x = row[j] + (br ? br[j] : 0.f);
      row[j] = (mr && !mr[j]) ? kMasked : x;
    }
  }
}

template <int D>
void ForwardHead(const Dims& d, int64_t b, int64_t h, const float* q, const float* k, const float* v,
                 const float* bias, const uint8_t* mask, const int64_t* ranges, float* out, float* stats,
                 std::vector<float>& work) {
  const int64_t Qp = d.Qp, Kp = d.Kp;
  work.resize(Qp * D + D * Kp + Kp * D + kRows * Kp + kRows * D);
  float* qh = work.data();
  float* kt = qh + Qp * D;
  float* vh = kt + D * Kp;
  float* s = vh + Kp * D;
  float* o = s + kRows * Kp;
  Gather<D>(q, d, d.Q, Qp, b, h, qh);
  GatherTransposed<D>(k, d, d.K, Kp, b, h, kt);
  Gather<D>(v, d, d.K, Kp, b, h, vh);
  for (int64_t i0 = 0; i0 < d.Q; i0 += kRows) {
    const int64_t* range = ranges + 2 * (b * (d.Qp / kRows) + i0 / kRows);
    const int64_t lo = range[0], hi = range[1];
    const int64_t end = std::min(hi, d.K);  // the real keys of the range
    Scores<D>(qh + i0 * D, kt, Kp, lo, hi, s);
    AddBiasAndMask(d, b, h, i0, bias, mask, lo, end, s);
    float inv[kRows];
    for (int r = 0; r < kRows; ++r) {
      float* row = s + r * Kp;
      float m = kMasked;
      for (int64_t j = lo; j < end; ++j) m = std::max(m, row[j]);
      float l = 0.f;
      for (int64_t j = lo; j < end; ++j) {
        row[j] = ExpF(row[j] - m);
        l += row[j];
      }
      inv[r] = 1.f / l;
      if (i0 + r < d.Q) {
        // The row's max and 1/sum (not log-sum-exp: for a row with every key masked,
        // m = -FLT_MAX and m + log(sum) rounds back to m).
        float* st = stats + ((b * d.H + h) * d.Q + i0 + r) * 2;
        st[0] = m;
        st[1] = inv[r];
      }
    }
    WeightedSum<D>(s, vh, Kp, lo, end, o);
    for (int r = 0; r < kRows && i0 + r < d.Q; ++r) {
      float* dst = out + ((b * d.Q + i0 + r) * d.H + h) * d.D;
      for (int64_t e = 0; e < d.D; ++e) dst[e] = o[r * D + e] * inv[r];
    }
  }
}

template <int D>
void BackwardHead(const Dims& d, int64_t b, int64_t h, const float* q, const float* k, const float* v,
                  const float* bias, const uint8_t* mask, const int64_t* ranges, const float* out,
                  const float* stats, const float* dout, float* dq, float* dk, float* dv, float* dbias,
                  std::vector<float>& work) {
  const int64_t Qp = d.Qp, Kp = d.Kp;
  work.resize(Qp * D * 2 + D * Kp * 2 + Kp * D * 3 + kRows * Kp * 2 + kRows * D + Qp);
  float* qh = work.data();
  float* doh = qh + Qp * D;
  float* kt = doh + Qp * D;
  float* vt = kt + D * Kp;
  float* kh = vt + D * Kp;
  float* dkh = kh + Kp * D;
  float* dvh = dkh + Kp * D;
  float* p = dvh + Kp * D;
  float* ds = p + kRows * Kp;
  float* dqb = ds + kRows * Kp;
  float* rowdot = dqb + kRows * D;
  Gather<D>(q, d, d.Q, Qp, b, h, qh);
  Gather<D>(dout, d, d.Q, Qp, b, h, doh);
  GatherTransposed<D>(k, d, d.K, Kp, b, h, kt);
  GatherTransposed<D>(v, d, d.K, Kp, b, h, vt);
  Gather<D>(k, d, d.K, Kp, b, h, kh);
  std::memset(dkh, 0, 2 * Kp * D * 4);  // dkh and dvh
  for (int64_t i = 0; i < d.Q; ++i) {
    const float* o = out + ((b * d.Q + i) * d.H + h) * d.D;
    float acc = 0.f;
    for (int64_t e = 0; e < d.D; ++e) acc += doh[i * D + e] * o[e];
    rowdot[i] = acc;
  }
  for (int64_t i0 = 0; i0 < d.Q; i0 += kRows) {
    const int64_t* range = ranges + 2 * (b * (d.Qp / kRows) + i0 / kRows);
    const int64_t lo = range[0], hi = range[1];
    const int64_t end = std::min(hi, d.K);
    Scores<D>(qh + i0 * D, kt, Kp, lo, hi, p);
    AddBiasAndMask(d, b, h, i0, bias, mask, lo, end, p);
    Scores<D>(doh + i0 * D, vt, Kp, lo, hi, ds);
    for (int r = 0; r < kRows; ++r) {
      float* pr = p + r * Kp;
      float* dr = ds + r * Kp;
      if (i0 + r >= d.Q) {  // padding rows of the last block contribute nothing
        std::fill(pr + lo, pr + end, 0.f);
        std::fill(dr + lo, dr + end, 0.f);
        continue;
      }
      const float* st = stats + ((b * d.H + h) * d.Q + i0 + r) * 2;
      const float m = st[0], inv = st[1], rd = rowdot[i0 + r];
      const uint8_t* mr = mask ? mask + (b * d.Q + i0 + r) * d.K : nullptr;
      for (int64_t j = lo; j < end; ++j) {
        const float pj = ExpF(pr[j] - m) * inv;
        pr[j] = pj;
        const float g = pj * (dr[j] - rd);
        dr[j] = (mr && !mr[j]) ? 0.f : g;
      }
      if (dbias) {
        float* db = dbias + (h * d.Q + i0 + r) * d.K;
        for (int64_t j = lo; j < end; ++j) db[j] += dr[j];
      }
    }
    AccumulateTransposed<D>(p, doh + i0 * D, Kp, lo, end, dvh);
    AccumulateTransposed<D>(ds, qh + i0 * D, Kp, lo, end, dkh);
    WeightedSum<D>(ds, kh, Kp, lo, end, dqb);
    for (int r = 0; r < kRows && i0 + r < d.Q; ++r)
      std::memcpy(dq + ((b * d.Q + i0 + r) * d.H + h) * d.D, dqb + r * D, d.D * 4);
  }
  Scatter<D>(dkh, d, d.K, b, h, dk);
  Scatter<D>(dvh, d, d.K, b, h, dv);
}

// The CPUs this process may run on (its affinity mask), at least 1.
int AvailableCpus() {
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
#endif
  return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}

// Runs f(task, work) for task in [0, tasks): task t on worker t % n, each worker with
// its own scratch buffer. The split is static, so the results do not depend on timing.
template <typename F>
void ParallelFor(const Dims& d, int64_t tasks, F&& f) {
  // Small calls (decoding steps, tiny models) run on the calling thread: starting
  // threads would cost more than the work.
  const bool small = d.B * d.H * d.Q * d.K * d.D < (int64_t{1} << 22);
  const int n = small ? 1 : static_cast<int>(std::min<int64_t>(AvailableCpus(), tasks));
  if (n <= 1) {
    std::vector<float> work;
    for (int64_t t = 0; t < tasks; ++t) f(t, work);
    return;
  }
  std::vector<std::thread> threads;
  threads.reserve(n);
  for (int w = 0; w < n; ++w) {
    threads.emplace_back([&f, w, n, tasks] {
      std::vector<float> work;
      for (int64_t t = w; t < tasks; t += n) f(t, work);
    });
  }
  for (auto& t : threads) t.join();
}

template <int D>
void ForwardAll(const Dims& d, const float* q, const float* k, const float* v, const float* bias,
                const uint8_t* mask, float* out, float* stats) {
  const std::vector<int64_t> ranges = KeyRanges(d, mask);
  ParallelFor(d, d.B * d.H, [&](int64_t t, std::vector<float>& work) {
    ForwardHead<D>(d, t / d.H, t % d.H, q, k, v, bias, mask, ranges.data(), out, stats, work);
  });
}

template <int D>
void BackwardAll(const Dims& d, const float* q, const float* k, const float* v, const float* bias,
                 const uint8_t* mask, const float* out, const float* stats, const float* dout, float* dq, float* dk,
                 float* dv, float* dbias) {
  const std::vector<int64_t> ranges = KeyRanges(d, mask);
  if (dbias) std::memset(dbias, 0, d.H * d.Q * d.K * 4);
  if (dbias) {
    // One task per head: the bias gradient sums over the batch in a fixed order.
    ParallelFor(d, d.H, [&](int64_t h, std::vector<float>& work) {
      for (int64_t b = 0; b < d.B; ++b)
        BackwardHead<D>(d, b, h, q, k, v, bias, mask, ranges.data(), out, stats, dout, dq, dk, dv, dbias, work);
    });
  } else {
    ParallelFor(d, d.B * d.H, [&](int64_t t, std::vector<float>& work) {
      BackwardHead<D>(d, t / d.H, t % d.H, q, k, v, bias, mask, ranges.data(), out, stats, dout, dq, dk, dv,
                      nullptr, work);
    });
  }
}

// Calls f with the padded head size (16, 32, 64 or 128) as a std::integral_constant.
template <typename F>
void Dispatch(int64_t D, F&& f) {
  if (D <= 16)
    f(std::integral_constant<int, 16>());
  else if (D <= 32)
    f(std::integral_constant<int, 32>());
  else if (D <= 64)
    f(std::integral_constant<int, 64>());
  else
    f(std::integral_constant<int, 128>());
}

Dims MakeDims(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& k) {
  const auto qd = q.dimensions();
  const auto kd = k.dimensions();
  Dims d;
  d.B = qd[0];
  d.Q = qd[1];
  d.H = qd[2];
  d.D = qd[3];
  d.K = kd[1];
  d.Qp = RoundUp(d.Q, kRows);
  d.Kp = RoundUp(d.K, kLanes);
  return d;
}

ffi::Error CheckShapes(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& k,
                       const ffi::Buffer<ffi::F32>& v) {
  const auto qd = q.dimensions();
  const auto kd = k.dimensions();
  const auto vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4)
    return ffi::Error::InvalidArgument("query, key and value must be [B, L, H, D]");
  if (kd[0] != qd[0] || kd[2] != qd[2] || kd[3] != qd[3] || vd[0] != kd[0] || vd[1] != kd[1] || vd[2] != kd[2] ||
      vd[3] != kd[3])
    return ffi::Error::InvalidArgument("query, key and value shapes do not agree");
  if (qd[3] < 1 || qd[3] > 128) return ffi::Error::InvalidArgument("head size must be 1 to 128");
  if (qd[1] == 0 || kd[1] == 0) return ffi::Error::InvalidArgument("empty query or key axis");
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                       ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::U8> mask, ffi::ResultBuffer<ffi::F32> out,
                       ffi::ResultBuffer<ffi::F32> stats, int64_t has_bias, int64_t has_mask) {
  if (ffi::Error e = CheckShapes(q, k, v); e.failure()) return e;
  const Dims d = MakeDims(q, k);
  const float* bp = has_bias ? bias.typed_data() : nullptr;
  const uint8_t* mp = has_mask ? mask.typed_data() : nullptr;
  Dispatch(d.D, [&](auto dp) {
    ForwardAll<decltype(dp)::value>(d, q.typed_data(), k.typed_data(), v.typed_data(), bp, mp, out->typed_data(),
                                    stats->typed_data());
  });
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                        ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::U8> mask, ffi::Buffer<ffi::F32> out,
                        ffi::Buffer<ffi::F32> stats, ffi::Buffer<ffi::F32> dout, ffi::ResultBuffer<ffi::F32> dq,
                        ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv,
                        ffi::ResultBuffer<ffi::F32> dbias, int64_t has_bias, int64_t has_mask,
                        int64_t bias_grad) {
  if (ffi::Error e = CheckShapes(q, k, v); e.failure()) return e;
  const Dims d = MakeDims(q, k);
  const float* bp = has_bias ? bias.typed_data() : nullptr;
  const uint8_t* mp = has_mask ? mask.typed_data() : nullptr;
  float* dbp = has_bias && bias_grad ? dbias->typed_data() : nullptr;
  Dispatch(d.D, [&](auto dp) {
    BackwardAll<decltype(dp)::value>(d, q.typed_data(), k.typed_data(), v.typed_data(), bp, mp, out.typed_data(),
                                     stats.typed_data(), dout.typed_data(), dq->typed_data(), dk->typed_data(),
                                     dv->typed_data(), dbp);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FedjaxAttentionForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // query [B, Q, H, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // key [B, K, H, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // value [B, K, H, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias [H, Q, K] (or a placeholder)
                                  .Arg<ffi::Buffer<ffi::U8>>()   // mask [B, Q, K] (or a placeholder)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // output [B, Q, H, D]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // row max and 1/sum [B, H, Q, 2]
                                  .Attr<int64_t>("has_bias")
                                  .Attr<int64_t>("has_mask"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FedjaxAttentionBackward, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // query
                                  .Arg<ffi::Buffer<ffi::F32>>()  // key
                                  .Arg<ffi::Buffer<ffi::F32>>()  // value
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Arg<ffi::Buffer<ffi::U8>>()   // mask
                                  .Arg<ffi::Buffer<ffi::F32>>()  // output
                                  .Arg<ffi::Buffer<ffi::F32>>()  // row stats
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d output
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d query
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d key
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d value
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d bias [H, Q, K] (or a placeholder)
                                  .Attr<int64_t>("has_bias")
                                  .Attr<int64_t>("has_mask")
                                  .Attr<int64_t>("bias_grad"));  // 0: the bias needs no gradient
