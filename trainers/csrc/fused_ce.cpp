// Fused CPU forward and backward of the contrastive cross-entropy's two common cases, with their own autograd nodes.
// trainers/streamed_ce.py has the maths and the general path; trainers/fused_ce.py builds this file on first use
// and falls back to that path where it cannot be built.
//
// Why: at small sizes (SimCLR at N = 256, MoCo at K = 4096) the matrix products take well under a millisecond, and
// the general path's ~35 small eager ops, each a Python call through the dispatcher, plus a Python autograd
// Function, cost as much again. Here each thread takes one run of rows (sized by the threads' measured speeds, see
// "rows balanced between threads") and does all of their work: it makes their logits tile by tile with a
// single-threaded product, exponentiates and sums each tile while it is in that core's cache, then scales and
// multiplies its rows of E for the gradient, in the forward, all in one parallel region (see "gradients made in the
// forward" below). The only ATen calls left are the products.
//
//   simclr_loss(z1, z2, beta, tile_rows): one process's SimCLR. Rows are [z1; z2], row r's positive is the other
//     view of its image, column (r + n) mod 2n, and an anchor is not its own negative. With unit rows a, the
//     exponentiated logits E = exp(beta a a^T) (diagonal zeroed) are symmetric, so the gradient's row side
//     W E a and column side E W a (W = diag(1 / row sums)) are one product (W E + E W) @ a.
//   keyed_loss(queries, keys, candidates, beta, tile_rows, block_columns): MoCo. Each query's positive is its own
//     key (an extra logit); the candidates (the queue) are unit vectors already and get no gradient.
//
// Both assume unshifted logits: beta small enough that exp(+-beta) times the number of columns is a normal float,
// so exp needs no max subtracted (the Python side checks, see streamed_ce._SAFE_UNSHIFTED). Inputs are CPU matrices
// of any floating dtype; the loss is computed in the first input's dtype promoted to at least float32.

#include <torch/extension.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>

#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/util/ParallelGuard.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

using tensor_list = std::vector<at::Tensor>;

// The kernels' own tensor calls (allocations, tiles as views, products into them) run below autograd's dispatch
// keys: they make no graph, and the autograd and view-tracking layers cost a microsecond or more per call (at
// n = 8 rows, 0.87x the time of a forward+backward with them). Set per thread, like every dispatch key guard.
using BelowAutograd = at::AutoDispatchBelowADInplaceOrView;

constexpr double kNormEps = 1e-12;  // as F.normalize
constexpr int64_t kGrain = 16;      // rows per parallel chunk: a row is a few hundred flops

// ------------------------------------------------------------------------------- optional phase timers
//
// For benchmarks/bench_loss_phases.py, which builds this file a second time with -DCONTRASTIVE_STUDY_PHASE_TIMERS:
// each thread then adds the wall time of its steps to its own row of phase_microseconds, and phase_times() hands
// the means per call out. In the build the losses use, PHASE_SPAN is nothing.
inline double microseconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count();
}

enum PhaseSlot : int {
  kNormalise,         // the inputs to unit rows (and the positives' logits)
  kLogitsProducts,    // the products that make the logits
  kExpPass,           // exp of every logit and each row's sum
  kScaling,           // SimCLR: E scaled by (w_r + w_c)
  kGradientProducts,  // the products that make the gradient rows
  kGradientRows,      // the gradient rows' weighting and normalisation backward
  kRegion,            // the thread's time in the parallel region, waiting at its barriers included
  kCall,              // the caller: the whole kernel call (inputs, allocations, region, loss and node)
  kSlots
};
#ifdef CONTRASTIVE_STUDY_PHASE_TIMERS
constexpr int kTimedThreads = 8;
double phase_microseconds[kTimedThreads][kSlots] = {};
int64_t timed_calls = 0;

class PhaseSpan {
 public:
  explicit PhaseSpan(PhaseSlot slot) : slot_(slot), start_(std::chrono::steady_clock::now()) {}
  PhaseSpan(const PhaseSpan&) = delete;
  PhaseSpan& operator=(const PhaseSpan&) = delete;
  ~PhaseSpan() {
    const int thread = at::get_thread_num();
    if (thread < kTimedThreads) phase_microseconds[thread][slot_] += microseconds_since(start_);
    if (slot_ == kCall) ++timed_calls;
  }

 private:
  PhaseSlot slot_;
  std::chrono::steady_clock::time_point start_;
};
#define PHASE_SPAN(slot) const PhaseSpan phase_span_##slot(slot)
#else
#define PHASE_SPAN(slot)
#endif

// ------------------------------------------------------------------------------------------- row kernels
//
// Beyond the matrix products, the work is per row: normalising the inputs, one pass over the logits (exp of every
// logit and each row's sum; for SimCLR's gradient also one scaling pass) and the gradient through the normalisation.
// With ATen's exp_ (MKL's or SLEEF's vector exp) and sum_out that pass was two, each its own parallel region; at SimCLR
// N = 256 they took 0.19x the time of the products (benchmarks/bench_loss.py). These loops are written once, as
// inline templates, and for float32 compiled three times (AVX-512, AVX2 + FMA, the baseline x86-64 or other target)
// through GCC's target attribute; the best the CPU supports is picked at the first call, so the build never assumes
// more than the baseline. One exception: the AVX-512 build's exp pass is written with intrinsics (exp_avx512), for
// a table lookup in a register and scalef, which GCC does not generate from the portable loop. float64 (rare) uses
// the baseline build of the same templates, with std::exp.
#define ROW_INLINE __attribute__((always_inline)) inline

constexpr int64_t kLanes = 16;  // partial sums per reduction: one AVX-512 register, two AVX2 ones

// sum_c term(c) in kLanes partial sums, so that the adds vectorise (a plain loop, without -ffast-math, is one serial
// chain of dependent adds).
template <typename T, typename Term>
ROW_INLINE T lane_sum(int64_t count, const Term& term) {
  T lanes[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= count; c += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) lanes[j] += term(c + j);
  }
  T sum = 0;
  for (; c < count; ++c) sum += term(c);
  for (int64_t j = 0; j < kLanes; ++j) sum += lanes[j];
  return sum;
}

template <typename T>
ROW_INLINE T dot_loop(const T* x, const T* y, int64_t count) {
  return lane_sum<T>(count, [=](int64_t c) __attribute__((always_inline)) { return x[c] * y[c]; });
}

template <typename T>
ROW_INLINE T inverse_norm(const T* x, int64_t dim) {
  return T(1) / std::max<T>(std::sqrt(dot_loop(x, x, dim)), T(kNormEps));
}

// Two input rows x, y to unit rows a, b; writes their inverse norms and returns x . y (the positive's cosine is
// x . y * inv_x * inv_y).
template <typename T>
ROW_INLINE T unit_pair_loop(const T* x, const T* y, T* a, T* b, T* inv_x, T* inv_y, int64_t dim) {
  const T ix = inverse_norm(x, dim), iy = inverse_norm(y, dim);
  for (int64_t d = 0; d < dim; ++d) {
    a[d] = x[d] * ix;
    b[d] = y[d] * iy;
  }
  *inv_x = ix;
  *inv_y = iy;
  return dot_loop(x, y, dim);
}

// g <- g * g_weight + other * other_weight, then the gradient through u = x / max(|x|, eps) for that row:
// g <- (g - u (u . g)) * inv_norm (no projection where the clamp was active, as autograd through F.normalize gives).
template <typename T>
ROW_INLINE void combine_unit_backward_loop(T* g, T g_weight, const T* other, T other_weight, const T* u, T inv_norm,
                                           int64_t dim) {
  for (int64_t d = 0; d < dim; ++d) g[d] = g[d] * g_weight + other[d] * other_weight;
  const T along = inv_norm < T(1 / kNormEps) ? dot_loop(u, g, dim) : T(0);
  for (int64_t d = 0; d < dim; ++d) g[d] = (g[d] - u[d] * along) * inv_norm;
}

// In place e[c] *= (f_r + f[c]): one row of E W + W E.
template <typename T>
ROW_INLINE void scale_symmetric_loop(T* e, const T* f, T f_r, int64_t columns) {
  for (int64_t c = 0; c < columns; ++c) e[c] *= f_r + f[c];
}

// log2(e) and ln2 in two parts (Cody and Waite: n * kLn2High is exact for the n that occur, in exp_avx512 for the
// sixteenths too), and Cephes' coefficients of exp(r) = 1 + r + r^2 (c0 r^5 + c1 r^4 + ... + c5) for fast_exp.
constexpr float kLog2e = 1.44269504088896341f, kLn2High = 0.693359375f, kLn2Low = -2.12194440e-4f;
constexpr float kExpPolynomial[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                                     4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

// exp(x), x clamped to [-87, 88] (the result stays a normal float; logits here are within +-beta): x = n ln2 + r,
// |r| <= ln2 / 2 (ln2 in two parts, Cody and Waite), exp(r) by Cephes' degree-7 polynomial, 2^n through the
// exponent bits. Within 1.5 ulp (relative error 8.3e-8 over [-87, 88]; tests/test_fused_ce.py measures it). Branch
// free, so each variant's loop vectorises (the file is compiled with -fno-trapping-math, which lets GCC turn the
// clamp into min/max). NaN stays NaN.
ROW_INLINE float fast_exp(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer
  const float n = (x * kLog2e + kRound) - kRound;
  const float r = (x - n * kLn2High) - n * kLn2Low;
  float p = kExpPolynomial[0];
  for (int i = 1; i < 6; ++i) p = p * r + kExpPolynomial[i];
  p = p * r * r + r + 1.0f;
  const int32_t exponent_bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_to_n;
  std::memcpy(&two_to_n, &exponent_bits, sizeof two_to_n);
  return p * two_to_n;
}

// In place e[c] <- exp(beta * e[c]); returns their sum (one pass: 10% faster than exp, then sum).
ROW_INLINE float exp_sum_loop(float* e, int64_t count, float beta) {
  return lane_sum<float>(count, [=](int64_t c) __attribute__((always_inline)) { return e[c] = fast_exp(beta * e[c]); });
}

#if defined(__x86_64__) && defined(__GNUC__)
#define AVX512_TARGET __attribute__((target("avx512f,avx2,fma")))

// exp for 16 floats, the AVX-512 build's exp pass. Tang's table method instead of fast_exp's reduction: x = k ln2 + r
// with k rounded to the nearest sixteenth, k = q + i / 16, so |r| <= ln2 / 32 and exp(x) = 2^q 2^(i / 16) exp(r).
// 2^(i / 16) comes from a table of 16 floats held in one register (permutexvar picks by the lowest four bits, where
// the rounding leaves i), exp(r) - 1 from a degree-3 Taylor polynomial (truncation error below 1e-8 on that range),
// and scalef makes the power of two directly: 10 vector operations per 16 floats, against 13 for the version it
// replaced (fast_exp's reduction and degree-7 polynomial on |r| <= ln2 / 2, with roundscale and scalef). Within 1.07
// ulp (relative error 1.15e-7) over [-87, 88] (4 million points), against 1.25 ulp for that version, in 0.77-0.86x
// its time (256 x 512 logits in cache, AMD EPYC). Outside [-87, 88] (never reached: the logits stay within
// +-beta <= 40) it gives subnormals, 0 or inf where fast_exp clamps. NaN stays NaN.
AVX512_TARGET ROW_INLINE __m512 exp_avx512(__m512 x) {
  const __m512 two_to_sixteenths = _mm512_setr_ps(  // 2^(i / 16), i = 0..15
      1.0f, 1.04427378242741384f, 1.09050773266525766f, 1.13878863475669165f, 1.18920711500272107f,
      1.24185781207348405f, 1.29683955465100967f, 1.35425554693689273f, 1.41421356237309505f,
      1.47682614593949931f, 1.54221082540794082f, 1.61049033194925431f, 1.68179283050742909f,
      1.75625216037329948f, 1.83400808640934246f, 1.91520656139714729f);
  // 1.5 * 2^19, whose float neighbours are 1/16 apart: adding it rounds x / ln2 to the nearest sixteenth, and leaves
  // 16 k mod 16 in the lowest four bits.
  constexpr float kRound = 786432.0f;
  const __m512 rounded = _mm512_fmadd_ps(x, _mm512_set1_ps(kLog2e), _mm512_set1_ps(kRound));
  const __m512 k = _mm512_sub_ps(rounded, _mm512_set1_ps(kRound));
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(kLn2High), x);
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(kLn2Low), r);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(1.0f / 6), r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_mul_ps(p, r);  // exp(r) - 1, so that 2^(i / 16) exp(r) is one fused multiply-add (one rounding)
  const __m512 two_to_fraction = _mm512_permutexvar_ps(_mm512_castps_si512(rounded), two_to_sixteenths);
  return _mm512_scalef_ps(_mm512_fmadd_ps(two_to_fraction, p, two_to_fraction), k);
}

// exp_sum_loop with exp_avx512: 16 columns at a time, the last few under a mask.
AVX512_TARGET ROW_INLINE float exp_sum_avx512_loop(float* e, int64_t count, float beta) {
  const __m512 b = _mm512_set1_ps(beta);
  __m512 sums = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 16 <= count; c += 16) {
    const __m512 v = exp_avx512(_mm512_mul_ps(b, _mm512_loadu_ps(e + c)));
    _mm512_storeu_ps(e + c, v);
    sums = _mm512_add_ps(sums, v);
  }
  if (c < count) {
    const __mmask16 rest = static_cast<__mmask16>((1u << (count - c)) - 1);
    const __m512 v = exp_avx512(_mm512_mul_ps(b, _mm512_maskz_loadu_ps(rest, e + c)));
    _mm512_mask_storeu_ps(e + c, rest, v);
    sums = _mm512_add_ps(sums, _mm512_maskz_mov_ps(rest, v));
  }
  return _mm512_reduce_add_ps(sums);
}
#endif

struct RowKernels {
  float (*exp_sum)(float*, int64_t, float);
  void (*scale_symmetric)(float*, const float*, float, int64_t);
  float (*unit_pair)(const float*, const float*, float*, float*, float*, float*, int64_t);
  void (*combine_unit_backward)(float*, float, const float*, float, const float*, float, int64_t);
  const char* isa;
};

#define ROW_KERNELS(name, target, exp_sum_impl)                                                                   \
  target float exp_sum_##name(float* e, int64_t count, float beta) { return exp_sum_impl(e, count, beta); }        \
  target void scale_symmetric_##name(float* e, const float* f, float f_r, int64_t columns) {                     \
    scale_symmetric_loop(e, f, f_r, columns);                                                                    \
  }                                                                                                              \
  target float unit_pair_##name(const float* x, const float* y, float* a, float* b, float* ix, float* iy,         \
                                int64_t dim) {                                                                   \
    return unit_pair_loop(x, y, a, b, ix, iy, dim);                                                              \
  }                                                                                                              \
  target void combine_unit_backward_##name(float* g, float gw, const float* o, float ow, const float* u, float iv, \
                                           int64_t dim) {                                                        \
    combine_unit_backward_loop(g, gw, o, ow, u, iv, dim);                                                        \
  }                                                                                                              \
  constexpr RowKernels kRowKernels_##name{exp_sum_##name, scale_symmetric_##name, unit_pair_##name,               \
                                          combine_unit_backward_##name, #name};

ROW_KERNELS(baseline, , exp_sum_loop)
#if defined(__x86_64__) && defined(__GNUC__)
ROW_KERNELS(avx2, __attribute__((target("avx2,fma"))), exp_sum_loop)
ROW_KERNELS(avx512, AVX512_TARGET, exp_sum_avx512_loop)
#endif
#undef ROW_KERNELS

// The kernels this CPU can run, best first.
const std::vector<RowKernels>& supported_row_kernels() {
  static const std::vector<RowKernels> supported = [] {
    std::vector<RowKernels> found;
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (avx2 && __builtin_cpu_supports("avx512f")) found.push_back(kRowKernels_avx512);
    if (avx2) found.push_back(kRowKernels_avx2);
#endif
    found.push_back(kRowKernels_baseline);
    return found;
  }();
  return supported;
}

// The kernels in use: the best supported, unless a test chose others (use_row_kernels).
std::atomic<const RowKernels*> chosen_row_kernels{nullptr};

const RowKernels& row_kernels() {
  const RowKernels* kernels = chosen_row_kernels.load(std::memory_order_acquire);
  return kernels != nullptr ? *kernels : supported_row_kernels().front();
}

// What the losses call: float32 through the best kernels, float64 through the baseline templates.
inline float exp_sum(float* e, int64_t count, float beta) { return row_kernels().exp_sum(e, count, beta); }
inline double exp_sum(double* e, int64_t count, double beta) {
  double sum = 0;
  for (int64_t c = 0; c < count; ++c) sum += (e[c] = std::exp(beta * e[c]));
  return sum;
}
inline void scale_symmetric_row(float* e, const float* f, float f_r, int64_t columns) {
  row_kernels().scale_symmetric(e, f, f_r, columns);
}
inline void scale_symmetric_row(double* e, const double* f, double f_r, int64_t columns) {
  scale_symmetric_loop(e, f, f_r, columns);
}
inline float unit_pair(const float* x, const float* y, float* a, float* b, float* ix, float* iy, int64_t dim) {
  return row_kernels().unit_pair(x, y, a, b, ix, iy, dim);
}
inline double unit_pair(const double* x, const double* y, double* a, double* b, double* ix, double* iy,
                        int64_t dim) {
  return unit_pair_loop(x, y, a, b, ix, iy, dim);
}
inline void combine_unit_backward(float* g, float gw, const float* o, float ow, const float* u, float iv,
                                  int64_t dim) {
  row_kernels().combine_unit_backward(g, gw, o, ow, u, iv, dim);
}
inline void combine_unit_backward(double* g, double gw, const double* o, double ow, const double* u, double iv,
                                  int64_t dim) {
  combine_unit_backward_loop(g, gw, o, ow, u, iv, dim);
}

// E[r, c] = exp(beta * rows[r] . columns[c]) for the rows [begin, end), with E[r, r] = 0 if zero_diagonal (the
// anchor is not its own negative); sums[r] = sum_c E[r, c]. Each thread of a parallel region calls this for its
// own rows: the products run on that thread (ATen's and MKL's products do not fork inside a parallel region), tile
// by tile, and each tile is exponentiated while it is in that core's cache. The exp pass then never reads what
// another core's thread of a shared product wrote, and a pass costs no fork and join of its own.
// Tiles are tile_rows x block_columns: MoCo's few queries against a long queue are cut into column blocks, because
// a tile of whole rows would have too few rows for the product to run at full speed (at K = 65536 on an AMD EPYC,
// tiles of 64 rows x 65536 columns took 1.7x the time of 256 x 4096 blocks). SimCLR's tiles are whole rows (one
// block): 4096-column blocks were 4% slower there at N = 4096.
template <typename scalar_t>
void exp_logits_rows(const at::Tensor& rows, const at::Tensor& columns, scalar_t beta, bool zero_diagonal,
                     int64_t tile_rows, int64_t block_columns, int64_t begin, int64_t end, at::Tensor& exp_logits,
                     scalar_t* sums) {
  const int64_t num_columns = columns.size(0);
  scalar_t* e = exp_logits.data_ptr<scalar_t>();
  for (int64_t c0 = 0; c0 < num_columns; c0 += block_columns) {
    const int64_t c1 = std::min(c0 + block_columns, num_columns);
    const at::Tensor block_t = columns.narrow(0, c0, c1 - c0).t();
    for (int64_t r0 = begin; r0 < end; r0 += tile_rows) {
      const int64_t r1 = std::min(r0 + tile_rows, end);
      at::Tensor tile = exp_logits.narrow(0, r0, r1 - r0).narrow(1, c0, c1 - c0);  // rows of stride num_columns
      {
        PHASE_SPAN(kLogitsProducts);
        at::mm_out(tile, rows.narrow(0, r0, r1 - r0), block_t);  // the cosines; beta goes on in exp_sum
      }
      PHASE_SPAN(kExpPass);
      for (int64_t r = r0; r < r1; ++r) {
        scalar_t* row = e + r * num_columns;
        scalar_t sum;
        if (zero_diagonal && c0 <= r && r < c1) {  // both sides of the diagonal, which is set to exp(-inf)
          sum = exp_sum(row + c0, r - c0, beta) + exp_sum(row + r + 1, c1 - r - 1, beta);
          row[r] = 0;
        } else {
          sum = exp_sum(row + c0, c1 - c0, beta);
        }
        sums[r] = c0 == 0 ? sum : sums[r] + sum;  // the first block writes, later ones add
      }
    }
  }
}

// The inputs as contiguous matrices of the dtype the loss is computed in: the first input's, promoted to at least
// float32 (bf16/fp16 embeddings are computed in float32, as on the eager path).
std::vector<at::Tensor> prepare_inputs(const std::vector<at::Tensor>& tensors) {
  const at::ScalarType dtype = at::promote_types(tensors[0].scalar_type(), at::kFloat);
  std::vector<at::Tensor> prepared;
  for (const at::Tensor& t : tensors) {
    TORCH_CHECK(t.device().is_cpu() && t.dim() == 2 && t.size(1) == tensors[0].size(1),
                "fused contrastive loss: expected CPU matrices with ", tensors[0].size(1), " columns");
    // Each call through the dispatcher costs about a microsecond, even where it returns t itself.
    const at::Tensor converted = t.scalar_type() == dtype ? t : t.to(dtype);
    prepared.push_back(converted.is_contiguous() ? converted : converted.contiguous());
  }
  return prepared;
}

// The most threads run_phases(work, ...) runs its phases on: 1 where it runs on the calling thread alone.
int64_t phase_threads(int64_t work) {
  at::internal::lazy_init_num_threads();
#ifdef _OPENMP
  if (work > kGrain && !at::in_parallel_region()) {
    return std::min<int64_t>(at::get_num_threads(), (work + kGrain - 1) / kGrain);
  }
#endif
  return 1;  // a build without OpenMP (the flags ask for it): at::parallel_for is serial there too
}

// One parallel region whose threads run the phases in order, a barrier between phases: phase(thread, threads) for
// thread in [0, threads), threads at most one per kGrain items of `work`. Like at::parallel_for, it runs on the
// calling thread alone where the work is small, torch has one thread, or the caller is in a parallel region
// already; and products called inside it run on the calling thread (neither ATen nor MKL forks in a region). The
// caller runs below autograd (BelowAutograd, set in both losses' compute), and so does every thread of the region.
// An exception in a phase is rethrown after the region; every thread still reaches every barrier.
template <typename... Phases>
void run_phases(int64_t work, const Phases&... phases) {
  const int64_t most = phase_threads(work);  // read before the region: inside it, it would say 1
  if (most < 2) {
    at::internal::ThreadIdGuard thread_guard(0);
    c10::ParallelGuard parallel_guard(true);
    PHASE_SPAN(kRegion);
    (phases(0, 1), ...);
    return;
  }
#ifdef _OPENMP
  std::atomic_flag failed = ATOMIC_FLAG_INIT;
  std::exception_ptr error;
#pragma omp parallel  // no num_threads clause, as at::parallel_for (GOMP's thread pool, pytorch#32008)
  {
    const int64_t threads = std::min<int64_t>(omp_get_num_threads(), most);
    const int64_t thread = omp_get_thread_num();
    at::internal::ThreadIdGuard thread_guard(static_cast<int>(thread));
    c10::ParallelGuard parallel_guard(true);
    const BelowAutograd below_autograd;  // the caller's guard is thread-local: the team's others need their own
    PHASE_SPAN(kRegion);
    bool first = true;
    const auto run = [&](const auto& phase) {
      if (!first) {
#pragma omp barrier
      }
      first = false;
      if (thread < threads) {
        try {
          phase(thread, threads);
        } catch (...) {
          if (!failed.test_and_set()) error = std::current_exception();
        }
      }
    };
    (run(phases), ...);
  }
  if (error) std::rethrow_exception(error);
#endif
}

// Thread `thread`'s share [begin, end) of `count` items: one contiguous run each, as at::parallel_for splits.
inline std::pair<int64_t, int64_t> thread_share(int64_t count, int64_t thread, int64_t threads) {
  const int64_t chunk = (count + threads - 1) / threads;
  return {std::min(count, thread * chunk), std::min(count, (thread + 1) * chunk)};
}

// ----------------------------------------------------------------------------- rows balanced between threads
//
// On a shared host one core can run well below the other's speed for seconds at a time (benchmarks/
// bench_loss_phases.py showed rounds with one thread's products taking 1.4-1.5x the other's); with an even split the
// faster thread then waits at every barrier and at the end. So the phases that make E and the gradient split their
// rows in proportion to the threads' speeds on the phase before (SimCLR's gradient phase: this call's exp phase;
// the first: the last call's last phase), where the speeds differ by more than kDeadband. A row's values do not
// depend on which thread makes it: its products are the same single-threaded BLAS calls on tiles of at least kGrain
// rows (MKL's rows agreed bitwise for every split tried from 5 rows up; 1 and 3 differ; tests/test_fused_ce.py
// checks forced splits), and its exp, sums and gradient are its own. In an A/B of 100 alternating blocks (SimCLR
// N = 256, AMD EPYC): 0.949x the time in the 24 blocks where the even split's threads differed by over 10%, 0.998x
// in the 68 within 5%.
constexpr int64_t kMaxBalanced = 8;  // threads whose speeds are measured; beyond that the split is even
constexpr double kDeadband = 0.05;   // relative speeds within 1 +- kDeadband split evenly

using Rates = std::array<float, kMaxBalanced>;  // rows per microsecond of each thread in one phase; 0: not measured
std::array<std::atomic<float>, kMaxBalanced> last_rates;  // the last call's last phase (zero-initialised: static)

Rates kept_rates() {
  Rates rates;
  for (int64_t t = 0; t < kMaxBalanced; ++t) rates[t] = last_rates[t].load(std::memory_order_relaxed);
  return rates;
}

void keep_rates(const Rates& rates) {
  for (int64_t t = 0; t < kMaxBalanced; ++t) last_rates[t].store(rates[t], std::memory_order_relaxed);
}

// Thread `thread`'s rows [begin, end) of `count`, in proportion to the threads' `rates` (each share within half and
// one and a half times the even one, at least kGrain rows), or thread_share's even split where they are not all
// measured or all within the deadband.
std::pair<int64_t, int64_t> balanced_share(int64_t count, int64_t thread, int64_t threads, const Rates& rates) {
  if (threads < 2 || threads > kMaxBalanced || count < threads * kGrain) return thread_share(count, thread, threads);
  double total = 0;
  for (int64_t t = 0; t < threads; ++t) {
    if (!(rates[t] > 0)) return thread_share(count, thread, threads);
    total += rates[t];
  }
  std::array<double, kMaxBalanced> speed;
  bool even = true;
  for (int64_t t = 0; t < threads; ++t) {
    speed[t] = std::clamp(rates[t] * static_cast<double>(threads) / total, 0.5, 1.5);
    even = even && std::abs(speed[t] - 1) < kDeadband;
  }
  if (even) return thread_share(count, thread, threads);
  double sum = 0, before = 0;  // all threads' speeds, and those of the threads before this one
  for (int64_t t = 0; t < threads; ++t) {
    sum += speed[t];
    if (t < thread) before += speed[t];
  }
  const auto boundary = [&](int64_t t, double cumulative) -> int64_t {  // the first row of thread t
    if (t == 0) return 0;
    if (t == threads) return count;
    return std::clamp<int64_t>(std::llround(static_cast<double>(count) * cumulative / sum), t * kGrain,
                               count - (threads - t) * kGrain);
  };
  return {boundary(thread, before), boundary(thread + 1, before + speed[thread])};
}

// work(begin, end) on the thread's balanced share of `count` rows (by `rates`); its rate goes into measured[thread].
template <typename Work>
void balanced_rows(int64_t count, int64_t thread, int64_t threads, const Rates& rates, Rates& measured,
                   const Work& work) {
  const auto [begin, end] = balanced_share(count, thread, threads, rates);
  const auto start = std::chrono::steady_clock::now();
  work(begin, end);
  if (thread < kMaxBalanced) {
    measured[thread] = static_cast<float>((end - begin) / std::max(microseconds_since(start), 1e-3));
  }
}

// --------------------------------------------------------------------------- gradients made in the forward
//
// A loss is a scalar, so its gradient for an upstream gradient of 1 is known in the forward, where its inputs (E,
// a thread's rows of it) are in that core's cache. Both losses make it there and keep it in their backward node
// instead of E: E is freed before the forward returns (the loss holds only gradients the size of its inputs while
// the rest of a model runs its backward), and the backward is at most one multiplication. That is how fused
// cross-entropy kernels such as Liger's do it. The backward takes the gradients out of the node (a retained graph
// then does not keep them alive); a second backward of a retained graph finds none and recomputes them from the
// saved inputs, with the same code, so it gets the same values.

// The backward is written by hand on raw memory: it makes no graph, so a second derivative would be silently wrong.
// (Grad mode is on inside a backward only under create_graph=True.)
void refuse_double_backward() {
  TORCH_CHECK(!at::GradMode::is_enabled(), "the fused contrastive loss has no second derivative (create_graph=True); "
              "set CONTRASTIVE_STUDY_FUSED_LOSS=0 to use the eager path, which refuses it only when it is used");
}

// A loss and the gradients of its tensor inputs, in their order (undefined where an input needs none).
using LossAndGradients = std::pair<double, std::vector<at::Tensor>>;

// The backward node of both losses: it hands out the gradients the forward made (upstream gradient 1), scaled by
// the upstream gradient and cast to each input's dtype; a second backward of a retained graph recomputes them from
// the prepared inputs it keeps. It also keeps their versions and refuses an input changed in place since the forward
// (say a queue updated before the backward), as autograd refuses a saved tensor changed in place: the gradients kept
// are those of the forward's values.
// A plain autograd Node rather than a torch::autograd::Function: a Function's node also packs and unpacks
// SavedVariables and a map of IValues, and goes through more of autograd's code, around a backward that only hands
// gradients out. A SimCLR forward+backward with this node took 0.78x the time at n = 8 rows and 0.97-1.00x at N = 256
// (medians of 40 interleaved pairs; five runs at N = 256: 0.972-1.000, AMD EPYC).
class FusedLossBackward : public torch::autograd::Node {
 public:
  // inputs: the prepared inputs (all of them, for the version check and a recompute); originals: those that can
  // take a gradient, in the order of the node's outputs (their dtypes are the gradients').
  FusedLossBackward(std::vector<at::Tensor> inputs, std::vector<at::Tensor> gradients,
                    const std::vector<at::Tensor>& originals)
      : inputs_(std::move(inputs)), gradients_(std::move(gradients)) {
    for (const at::Tensor& t : inputs_) versions_.push_back(version(t));
    for (const at::Tensor& t : originals) dtypes_.push_back(t.scalar_type());
  }

  torch::autograd::variable_list apply(torch::autograd::variable_list&& upstream) override {
    refuse_double_backward();
    std::lock_guard<std::mutex> lock(mutex_);  // as a Function's node: backwards through one graph may overlap
    TORCH_CHECK(!released_, "Trying to backward through the graph of the fused contrastive loss a second time; "
                "specify retain_graph=True to backward through it again");
    for (size_t i = 0; i < inputs_.size(); ++i) {
      TORCH_CHECK(version(inputs_[i]) == versions_[i], "one of the variables needed for gradient computation has "
                  "been modified by an inplace operation: input ", i, " of the fused contrastive loss is at version ",
                  version(inputs_[i]), "; expected version ", versions_[i], " instead");
    }
    const size_t outputs = dtypes_.size();
    torch::autograd::variable_list result(outputs);
    if (!upstream[0].defined()) return result;  // nothing flows back through the loss
    std::vector<at::Tensor> gradients = gradients_.empty() ? recompute(inputs_) : std::move(gradients_);
    gradients_.clear();
    const double scale = scalar_value(upstream[0]);
    for (size_t i = 0; i < outputs; ++i) {
      at::Tensor g = gradients[i];
      if (!g.defined() || !should_compute_output(i)) continue;
      if (scale != 1) g.mul_(scale);  // in place: nothing else holds it
      result[i] = g.scalar_type() == dtypes_[i] ? g : g.to(dtypes_[i]);
    }
    return result;
  }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    inputs_.clear();
    gradients_.clear();
    released_ = true;
  }

 protected:
  // The gradients (upstream gradient 1) of the prepared inputs, made again by the forward's code.
  virtual std::vector<at::Tensor> recompute(const std::vector<at::Tensor>& inputs) = 0;

 private:
  static uint32_t version(const at::Tensor& t) { return t.unsafeGetTensorImpl()->version_counter().current_version(); }

  // The upstream gradient's value, read directly where it is a CPU float (item() is a dispatcher call).
  static double scalar_value(const at::Tensor& t) {
    if (t.is_cpu() && t.numel() == 1 && t.scalar_type() == at::kFloat) return *t.const_data_ptr<float>();
    if (t.is_cpu() && t.numel() == 1 && t.scalar_type() == at::kDouble) return *t.const_data_ptr<double>();
    return t.item<double>();
  }

  std::vector<at::Tensor> inputs_, gradients_;
  std::vector<uint32_t> versions_;
  std::vector<at::ScalarType> dtypes_;
  std::mutex mutex_;
  bool released_ = false;
};

// The loss as a 0-dim tensor (options: the prepared inputs') and, where grad mode is on and `first` or `second` (the
// inputs that can take a gradient) needs one, make_node() (called only then) as its grad_fn, with an edge to each.
template <typename MakeNode>
at::Tensor loss_tensor(double loss, const at::TensorOptions& options, const at::Tensor& first,
                       const at::Tensor& second, const MakeNode& make_node) {
  at::Tensor out;
  {
    const BelowAutograd below_autograd;
    out = at::scalar_tensor(loss, options);
  }
  if (at::GradMode::is_enabled() && (first.requires_grad() || second.requires_grad())) {
    c10::intrusive_ptr<FusedLossBackward> node = make_node();
    node->set_next_edges(torch::autograd::collect_next_edges(first, second));
    torch::autograd::set_history(out, node);
  }
  return out;
}

// mean_r (log Z_r - positive_r), the logs in the loss's dtype, summed in double.
template <typename T>
double mean_loss(const T* partition, const T* positive, int64_t rows) {
  double total = 0;
  for (int64_t r = 0; r < rows; ++r) {
    total += static_cast<double>(std::log(partition[r])) - static_cast<double>(positive[r]);
  }
  return total / static_cast<double>(rows);
}

// -------------------------------------------------------------------------------------------------- SimCLR

// Threads up to which each thread of the SimCLR kernel makes its own copy of all unit rows (beyond: one copy, each
// thread normalising its share). Every thread's products read every unit row, and a row that another core wrote has
// to come over from that core's cache. On this project's 2-vCPU VM the cores' cache-line round trip
// (benchmarks/round_trip.py) moves between about 60 and 700 ns from one second to the next, as the host places the
// vCPUs on near or distant cores; with one shared copy the kernel (forward + backward, N = 256) took 1.29x and 1.42x
// the bare products' time in the distant stretches of two A/B runs, against 1.16-1.20x in the near ones, while the
// products themselves (no data between the cores) did not slow. Each thread then normalises twice the rows (at
// N = 256, 22-23 us per call in a slow stretch against 15-23 us for its half before; 1-2% of its products) and the
// rows take a copy more memory per thread; with many threads both grow with the count, hence the bound. A/B at
// N = 256 on 2 threads, blocks classified by the round trip around them (/tmp script): 0.88x the time in the distant
// stretches, 0.98-1.00x in the near ones; N = 1024: 1.01x.
constexpr int64_t kOwnCopiesThreads = 4;

// The loss and its gradient (upstream gradient 1) of views z1, z2, in one parallel region of three phases:
//   1. the unit rows a = [z1; z2] / norms and the positives' logits, all of them in each thread's own copy (up to
//      kOwnCopiesThreads threads; beyond, each thread its share of one copy);
//   2. each thread's rows of E = exp(beta a a^T) (diagonal zeroed) and their sums Z (every thread's products need
//      every unit row, hence the barrier before where the copy is shared);
//   3. the gradient. With P = W E the softmax (W = diag(w), w = 1/Z) and logits beta a a^T, the partition terms'
//      gradient is beta (P + P^T) a = beta (W E + E W) a: each thread scales its rows of E by (w_r + w_c) (every
//      row's w, hence the barrier before), multiplies them by a and takes the result through the normalisation.
//      That is half the flops of E @ [a | w a] (the two sides as one product of 2D columns).
template <typename scalar_t>
LossAndGradients simclr_loss_and_gradients(const at::Tensor& z1, const at::Tensor& z2, scalar_t beta,
                                           int64_t tile_rows) {
  const int64_t n = z1.size(0), rows = 2 * n, dim = z1.size(1);
  const int64_t threads_at_most = phase_threads(rows);
  const bool own_copies = threads_at_most <= kOwnCopiesThreads;
  const int64_t copies = own_copies ? threads_at_most : 1;
  at::Tensor units = at::empty({copies, rows, dim}, z1.options());
  at::Tensor copy_values = at::empty({copies, 2, rows}, z1.options());  // each copy's inverse norms and positives
  at::Tensor exp_logits = at::empty({rows, rows}, z1.options());
  at::Tensor row_values = at::empty({2, rows}, z1.options());
  at::Tensor grad = at::empty({rows, dim}, z1.options());
  const scalar_t* x1 = z1.const_data_ptr<scalar_t>();
  const scalar_t* x2 = z2.const_data_ptr<scalar_t>();
  scalar_t *e = exp_logits.data_ptr<scalar_t>(), *g = grad.data_ptr<scalar_t>();
  scalar_t *z = row_values.data_ptr<scalar_t>(), *w = z + rows;  // Z, w with the mean's 1/R and beta
  const tensor_list unit_copies = units.unbind(0);
  scalar_t* copy_rows = copy_values.data_ptr<scalar_t>();
  const auto copy_of = [&](int64_t thread) {  // the thread's unit rows, and its inverse norms then positives' logits
    const int64_t copy = own_copies ? thread : 0;
    TORCH_CHECK(copy < copies, "simclr_loss: more threads than phase_threads counted");
    return std::pair<const at::Tensor&, scalar_t*>{unit_copies[copy], copy_rows + copy * 2 * rows};
  };
  const double scale = 1.0 / static_cast<double>(rows);
  // Minus one at the positive, once for row r (a[p(r)]) and once for column r, which is the positive of row p(r)
  // (p(p(r)) = r), so a[p(r)] again: -2 * scale * beta * a[p(r)].
  const scalar_t minus = static_cast<scalar_t>(-2 * scale * beta);
  const Rates previous_rates = kept_rates();
  Rates exp_rates{}, gradient_rates{};
  run_phases(
      rows,
      [&](int64_t thread, int64_t threads) {  // image i's two views, rows i and n + i, in one pass over the pair
        PHASE_SPAN(kNormalise);
        const auto [unit, inv] = copy_of(thread);
        scalar_t *u = unit.template data_ptr<scalar_t>(), *pos = inv + rows;
        const auto [begin, end] = own_copies ? std::pair<int64_t, int64_t>{0, n} : thread_share(n, thread, threads);
        for (int64_t i = begin; i < end; ++i) {
          const scalar_t dot12 = unit_pair(x1 + i * dim, x2 + i * dim, u + i * dim, u + (n + i) * dim, inv + i,
                                           inv + n + i, dim);
          pos[i] = pos[n + i] = beta * dot12 * inv[i] * inv[n + i];
        }
      },
      [&](int64_t thread, int64_t threads) {
        const at::Tensor& unit = copy_of(thread).first;
        balanced_rows(rows, thread, threads, previous_rates, exp_rates, [&](int64_t begin, int64_t end) {
          exp_logits_rows(unit, unit, beta, /*zero_diagonal=*/true, tile_rows, rows, begin, end, exp_logits, z);
          for (int64_t r = begin; r < end; ++r) w[r] = static_cast<scalar_t>(scale * beta / static_cast<double>(z[r]));
        });
      },
      [&](int64_t thread, int64_t threads) {
        const auto copy = copy_of(thread);  // not a structured binding: the lambda below captures it
        const at::Tensor& unit = copy.first;
        const scalar_t *u = unit.const_data_ptr<scalar_t>(), *inv = copy.second;
        balanced_rows(rows, thread, threads, exp_rates, gradient_rates, [&](int64_t begin, int64_t end) {
          for (int64_t r0 = begin; r0 < end; r0 += tile_rows) {  // a tile's scaling just before its product
            const int64_t r1 = std::min(r0 + tile_rows, end);
            {
              PHASE_SPAN(kScaling);
              for (int64_t r = r0; r < r1; ++r) scale_symmetric_row(e + r * rows, w, w[r], rows);
            }
            {
              PHASE_SPAN(kGradientProducts);
              at::Tensor grad_tile = grad.narrow(0, r0, r1 - r0);
              at::mm_out(grad_tile, exp_logits.narrow(0, r0, r1 - r0), unit);
            }
            PHASE_SPAN(kGradientRows);
            for (int64_t r = r0; r < r1; ++r) {
              const scalar_t* a_positive = u + ((r + n) % rows) * dim;
              combine_unit_backward(g + r * dim, scalar_t(1), a_positive, minus, u + r * dim, inv[r], dim);
            }
          }
        });
      });
  keep_rates(gradient_rates);
  const scalar_t* pos = copy_rows + rows;  // copy 0's: every row's, whichever the copies
  return {mean_loss(z, pos, rows), {grad.narrow(0, 0, n), grad.narrow(0, n, n)}};  // both views in one matrix
}

LossAndGradients simclr_compute(const tensor_list& inputs, double beta, int64_t tile_rows) {
  const BelowAutograd below_autograd;
  LossAndGradients result;
  AT_DISPATCH_FLOATING_TYPES(inputs[0].scalar_type(), "simclr_loss", [&] {
    result = simclr_loss_and_gradients<scalar_t>(inputs[0], inputs[1], static_cast<scalar_t>(beta), tile_rows);
  });
  return result;
}

class SimclrLossBackward : public FusedLossBackward {
 public:
  SimclrLossBackward(tensor_list inputs, tensor_list gradients, const tensor_list& originals, double beta,
                     int64_t tile_rows)
      : FusedLossBackward(std::move(inputs), std::move(gradients), originals), beta_(beta), tile_rows_(tile_rows) {}
  std::string name() const override { return "SimclrLossBackward"; }

 protected:
  tensor_list recompute(const tensor_list& inputs) override { return simclr_compute(inputs, beta_, tile_rows_).second; }

 private:
  double beta_;
  int64_t tile_rows_;
};

at::Tensor simclr_loss(const at::Tensor& z1, const at::Tensor& z2, double beta, int64_t tile_rows) {
  PHASE_SPAN(kCall);
  tensor_list inputs;
  {
    const at::NoGradGuard no_grad;  // a dtype conversion here is data for the kernel, not a step of the graph
    inputs = prepare_inputs({z1, z2});
  }
  TORCH_CHECK(inputs[0].size(0) == inputs[1].size(0), "simclr_loss: z1 and z2 differ in rows");
  auto [loss, gradients] = simclr_compute(inputs, beta, tile_rows);
  return loss_tensor(loss, inputs[0].options(), z1, z2, [&] {
    return c10::make_intrusive<SimclrLossBackward>(inputs, std::move(gradients), tensor_list{z1, z2}, beta,
                                                   tile_rows);
  });
}

// ---------------------------------------------------------------------------------------------------- MoCo

// The loss and the gradients of the queries and (if need_keys) the keys, upstream gradient 1, in one parallel
// region: the candidates are given, so a thread's rows need only its own queries and keys, and a row's gradient only
// its own Z. Each thread normalises its queries and keys, makes E for its rows against the candidates (tiles of
// column blocks) with their sums Z, then multiplies its rows of E by the candidates and weights the result.
template <typename scalar_t>
LossAndGradients keyed_loss_and_gradients(const at::Tensor& queries, const at::Tensor& keys,
                                          const at::Tensor& candidates, scalar_t beta, int64_t tile_rows,
                                          int64_t block_columns, bool need_keys) {
  const int64_t rows = queries.size(0), dim = queries.size(1);
  at::Tensor a = at::empty({rows, dim}, queries.options()), k = at::empty({rows, dim}, queries.options());
  at::Tensor exp_logits = at::empty({rows, candidates.size(0)}, queries.options());
  at::Tensor row_values = at::empty({4, rows}, queries.options());
  at::Tensor grad = at::empty({rows, dim}, queries.options());
  at::Tensor grad_keys = need_keys ? at::empty({rows, dim}, queries.options()) : at::Tensor();
  const scalar_t *xq = queries.const_data_ptr<scalar_t>(), *xk = keys.const_data_ptr<scalar_t>();
  scalar_t *ap = a.data_ptr<scalar_t>(), *kp = k.data_ptr<scalar_t>(), *g = grad.data_ptr<scalar_t>();
  scalar_t* gk = need_keys ? grad_keys.data_ptr<scalar_t>() : nullptr;
  scalar_t* inv = row_values.data_ptr<scalar_t>();  // the queries' inverse norms
  scalar_t *kinv = inv + rows, *pos = kinv + rows, *z = pos + rows;  // the keys', the positives' logits, Z
  const double scale = 1.0 / static_cast<double>(rows);
  const Rates previous_rates = kept_rates();
  Rates rates{};
  run_phases(rows, [&](int64_t thread, int64_t threads) {
    balanced_rows(rows, thread, threads, previous_rates, rates, [&](int64_t begin, int64_t end) {
      {
        PHASE_SPAN(kNormalise);
        for (int64_t r = begin; r < end; ++r) {
          const scalar_t dot_qk =
              unit_pair(xq + r * dim, xk + r * dim, ap + r * dim, kp + r * dim, inv + r, kinv + r, dim);
          pos[r] = beta * dot_qk * inv[r] * kinv[r];
        }
      }
      exp_logits_rows(a, candidates, beta, /*zero_diagonal=*/false, tile_rows, block_columns, begin, end, exp_logits,
                      z);
      for (int64_t r = begin; r < end; ++r) z[r] += std::exp(pos[r]);  // the positive key's term of the sum
      {
        PHASE_SPAN(kGradientProducts);
        for (int64_t r0 = begin; r0 < end; r0 += tile_rows) {
          const int64_t r1 = std::min(r0 + tile_rows, end);
          at::Tensor grad_tile = grad.narrow(0, r0, r1 - r0);
          at::mm_out(grad_tile, exp_logits.narrow(0, r0, r1 - r0), candidates);  // E @ B, rows weighted below
        }
      }
      PHASE_SPAN(kGradientRows);
      for (int64_t r = begin; r < end; ++r) {
        // the softmax weights E / Z; the positive key's weight minus one; both with beta and the mean's 1/R
        const double z_r = z[r];
        const scalar_t weight = static_cast<scalar_t>(scale * beta / z_r);
        const double positive_weight = std::exp(static_cast<double>(pos[r])) / z_r;
        const scalar_t key_factor = static_cast<scalar_t>((positive_weight - 1) * scale * beta);
        const scalar_t *ar = ap + r * dim, *kr = kp + r * dim;
        combine_unit_backward(g + r * dim, weight, kr, key_factor, ar, inv[r], dim);
        if (gk != nullptr) {  // the key's gradient: a * key_factor through the key's normalisation
          scalar_t* gkr = gk + r * dim;
          std::copy(ar, ar + dim, gkr);
          combine_unit_backward(gkr, key_factor, ar, scalar_t(0), kr, kinv[r], dim);
        }
      }
    });
  });
  keep_rates(rates);
  return {mean_loss(z, pos, rows), {grad, grad_keys}};
}

LossAndGradients keyed_compute(const tensor_list& inputs, double beta, int64_t tile_rows, int64_t block_columns,
                               bool need_keys) {
  const BelowAutograd below_autograd;
  LossAndGradients result;
  AT_DISPATCH_FLOATING_TYPES(inputs[0].scalar_type(), "keyed_loss", [&] {
    result = keyed_loss_and_gradients<scalar_t>(inputs[0], inputs[1], inputs[2], static_cast<scalar_t>(beta),
                                                tile_rows, block_columns, need_keys);
  });
  return result;
}

class KeyedLossBackward : public FusedLossBackward {
 public:
  KeyedLossBackward(tensor_list inputs, tensor_list gradients, const tensor_list& originals, double beta,
                    int64_t tile_rows, int64_t block_columns)
      : FusedLossBackward(std::move(inputs), std::move(gradients), originals),
        beta_(beta),
        tile_rows_(tile_rows),
        block_columns_(block_columns) {}
  std::string name() const override { return "KeyedLossBackward"; }

 protected:
  tensor_list recompute(const tensor_list& inputs) override {
    return keyed_compute(inputs, beta_, tile_rows_, block_columns_, should_compute_output(1)).second;
  }

 private:
  double beta_;
  int64_t tile_rows_, block_columns_;
};

at::Tensor keyed_loss(const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& candidates, double beta,
                      int64_t tile_rows, int64_t block_columns) {
  PHASE_SPAN(kCall);
  TORCH_CHECK(!(candidates.requires_grad() && at::GradMode::is_enabled()),
              "keyed_loss: the candidates get no gradient here; pass them detached");
  tensor_list inputs;
  {
    const at::NoGradGuard no_grad;  // a dtype conversion here is data for the kernel, not a step of the graph
    inputs = prepare_inputs({queries, keys, candidates});
  }
  TORCH_CHECK(inputs[0].size(0) == inputs[1].size(0), "keyed_loss: queries and keys differ in rows");
  auto [loss, gradients] = keyed_compute(inputs, beta, tile_rows, block_columns, keys.requires_grad());
  return loss_tensor(loss, inputs[0].options(), queries, keys, [&] {
    return c10::make_intrusive<KeyedLossBackward>(inputs, std::move(gradients), tensor_list{queries, keys}, beta,
                                                  tile_rows, block_columns);
  });
}

// For tests and benchmarks: the row kernels this CPU supports, a choice among them for every later call (the
// previous choice is returned), and the exp and scaling passes alone on every row of a float32 matrix (in place).
std::vector<std::string> row_kernel_names() {
  std::vector<std::string> names;
  for (const RowKernels& kernels : supported_row_kernels()) names.emplace_back(kernels.isa);
  return names;
}

// The threads' speeds the next call's first balanced phase splits by (rows per microsecond, 0: not measured, even
// split); returns those kept before. Tests force uneven splits with it.
std::vector<double> keep_thread_rates(const std::vector<double>& rates) {
  std::vector<double> previous;
  Rates kept{};
  for (int64_t t = 0; t < kMaxBalanced; ++t) {
    previous.push_back(last_rates[t].load(std::memory_order_relaxed));
    if (t < static_cast<int64_t>(rates.size())) kept[t] = static_cast<float>(rates[t]);
  }
  keep_rates(kept);
  return previous;
}

std::string use_row_kernels(const std::string& name) {
  const std::string previous = row_kernels().isa;
  for (const RowKernels& kernels : supported_row_kernels()) {
    if (name == kernels.isa) {
      chosen_row_kernels.store(&kernels, std::memory_order_release);
      return previous;
    }
  }
  TORCH_CHECK(false, "row kernels '", name, "' are not supported on this CPU");
}

at::Tensor exp_sum_rows(at::Tensor logits, double beta) {
  TORCH_CHECK(logits.scalar_type() == at::kFloat && logits.dim() == 2 && logits.is_contiguous(),
              "exp_sum_rows: expected a contiguous float32 matrix");
  at::Tensor sums = at::empty({logits.size(0)}, logits.options());
  for (int64_t r = 0; r < logits.size(0); ++r) {
    sums.data_ptr<float>()[r] =
        exp_sum(logits.data_ptr<float>() + r * logits.size(1), logits.size(1), static_cast<float>(beta));
  }
  return sums;
}

void scale_symmetric_rows(at::Tensor e, const at::Tensor& f) {
  TORCH_CHECK(e.scalar_type() == at::kFloat && f.scalar_type() == at::kFloat && e.dim() == 2 && e.is_contiguous() &&
                  f.is_contiguous() && f.numel() == e.size(1) && e.size(0) == e.size(1),
              "scale_symmetric_rows: expected a contiguous square float32 matrix and its float32 factors");
  const float* factors = f.const_data_ptr<float>();
  for (int64_t r = 0; r < e.size(0); ++r) {
    scale_symmetric_row(e.data_ptr<float>() + r * e.size(1), factors, factors[r], e.size(1));
  }
}

#ifdef CONTRASTIVE_STUDY_PHASE_TIMERS
// The phase timers' means per kernel call since the last call of this, microseconds: one row per thread (of the
// first kTimedThreads), one column per PhaseSlot, and the number of calls. Then they restart from zero.
std::pair<at::Tensor, int64_t> phase_times() {
  at::Tensor means = at::empty({kTimedThreads, kSlots}, at::kDouble);
  double* out = means.data_ptr<double>();
  const double calls = static_cast<double>(std::max<int64_t>(timed_calls, 1));
  for (int t = 0; t < kTimedThreads; ++t) {
    for (int slot = 0; slot < kSlots; ++slot) out[t * kSlots + slot] = phase_microseconds[t][slot] / calls;
  }
  const int64_t counted = timed_calls;
  std::memset(phase_microseconds, 0, sizeof phase_microseconds);
  timed_calls = 0;
  return {means, counted};
}
#endif

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#ifdef CONTRASTIVE_STUDY_PHASE_TIMERS
  m.def("phase_times", &phase_times, "Mean microseconds per call by thread and phase since the last call; calls");
#endif
  m.def("simclr_loss", &simclr_loss, "One process's SimCLR loss of views z1, z2 (n, D) at inverse temperature beta");
  m.def("keyed_loss", &keyed_loss, "MoCo's InfoNCE of queries and keys (n, D) against unit candidates (K, D)");
  m.def("row_kernel_names", &row_kernel_names, "The float32 row kernels this CPU supports, best (the one used) first");
  m.def("use_row_kernels", &use_row_kernels, "Use these row kernels from now on (tests); returns the previous");
  m.def("keep_thread_rates", &keep_thread_rates, "The threads' speeds the next call splits its rows by (tests)");
  m.def("exp_sum_rows", &exp_sum_rows, "In place exp(beta * x) of each row; the row sums");
  m.def("scale_symmetric_rows", &scale_symmetric_rows, "In place e[r, c] *= f[r] + f[c]");
}
