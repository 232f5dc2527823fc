// GRU's passes on CPU tensors: one call per pass over every tensor of a group, threaded
// over fixed chunks of elements ("pieces"). Each thread walks its pieces a few at a time in
// lockstep (block by block, interleaved): one core then reads several memory streams at
// once, which its hardware prefetchers need to come near the memory bandwidth (one read
// stream per core reached about a quarter of it on the two-core VM this was tuned on).
//
// The same contract as the Triton kernels (gru_optim/kernels/_triton.py): sums accumulate in
// float64, per chunk and then per tensor in chunk order, so a result does not depend on the
// number of threads; elementwise passes compute in float32 (float64 when a tensor is
// float64) and round once into the stored dtype.
//
// Built on first use by gru_optim/kernels/_native.py with the system C++ compiler (GCC or Clang:
// vector extensions, _Float16) and loaded with ctypes: C++17, no Python or torch headers.
// Dtype codes: 0 float32, 1 float64, 2 bfloat16, 3 float16.

#include <cmath>
#if defined(__AVX512F__) && defined(__F16C__)
#include <immintrin.h>
#endif
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

namespace {

constexpr int64_t kChunk = int64_t(1) << 15;  // elements per unit of work
constexpr int64_t kSerial = int64_t(1) << 16;  // below this many elements: no threads

struct bf16 {
  uint16_t x;
};

inline float bf16_to_float(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {
  // Round to nearest even, as torch's c10::BFloat16 does (NaN becomes a quiet NaN).
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

template <class S>
struct IO;

template <>
struct IO<float> {
  template <class C>
  static inline C ld(const float* p) { return C(*p); }
  template <class C>
  static inline void st(float* p, C v) { *p = float(v); }
};

template <>
struct IO<double> {
  template <class C>
  static inline C ld(const double* p) { return C(*p); }
  template <class C>
  static inline void st(double* p, C v) { *p = double(v); }
};

template <>
struct IO<bf16> {
  template <class C>
  static inline C ld(const bf16* p) { return C(bf16_to_float(p->x)); }
  template <class C>
  static inline void st(bf16* p, C v) { p->x = float_to_bf16(float(v)); }
};

template <>
struct IO<_Float16> {
  template <class C>
  static inline C ld(const _Float16* p) { return C(float(*p)); }
  template <class C>
  static inline void st(_Float16* p, C v) { *p = _Float16(float(v)); }
};

template <class C>
inline C fmadd(C a, C b, C c) {
#ifdef __FMA__
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

struct Piece {
  int64_t tensor, start, len;
};

std::vector<Piece> pieces(int64_t n, const int64_t* sizes) {
  std::vector<Piece> out;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t s = 0; s < sizes[i]; s += kChunk)
      out.push_back({i, s, sizes[i] - s < kChunk ? sizes[i] - s : kChunk});
  return out;
}

constexpr int64_t kBlock = 64;  // elements of one piece visited before the next piece's turn
                                // (a multiple of the sums' 32-element steps)

// Runs fn(k0, cnt) over every piece, in groups of up to G consecutive pieces (k0 .. k0+cnt-1),
// the pieces split into contiguous ranges over `threads` threads.
template <int G, class F>
void parallel(const std::vector<Piece>& ps, int threads, const F& fn) {
  int64_t total = 0;
  for (const Piece& p : ps) total += p.len;
  int64_t np = int64_t(ps.size());
  int t = threads < 1 ? 1 : threads;
  if (t > np) t = int(np);
  if (total < kSerial) t = 1;
  auto range = [&](int r) {
    int64_t lo = np * r / t, hi = np * (r + 1) / t;
    for (int64_t k = lo; k < hi; k += G) fn(k, int(hi - k < G ? hi - k : G));
  };
  if (t <= 1) {
    range(0);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(t - 1);
  for (int r = 1; r < t; ++r) pool.emplace_back(range, r);
  range(0);
  for (std::thread& th : pool) th.join();
}

// Visits the pieces ps[k0 .. k0+cnt) in lockstep: block(j, off, n) for consecutive blocks of
// kBlock elements (n = kBlock, or what is left at the end of a piece), piece after piece
// within each block offset. Every piece sees its blocks in order, so a per-piece sum does
// not depend on the grouping.
template <class B>
void lockstep(const Piece* ps, int cnt, const B& block) {
  int64_t longest = 0;
  for (int j = 0; j < cnt; ++j) longest = ps[j].len > longest ? ps[j].len : longest;
  for (int64_t off = 0; off < longest; off += kBlock)
    for (int j = 0; j < cnt; ++j)
      if (off < ps[j].len) block(j, off, ps[j].len - off < kBlock ? ps[j].len - off : kBlock);
}

// Per tensor: the sum of its pieces' partials (ncol columns), in piece order.
void reduce(const std::vector<Piece>& ps, const std::vector<double>& part, int ncol, int64_t n,
            double* out) {
  for (int64_t i = 0; i < n * ncol; ++i) out[i] = 0.0;
  for (size_t k = 0; k < ps.size(); ++k)
    for (int c = 0; c < ncol; ++c) out[ps[k].tensor * ncol + c] += part[k * ncol + c];
}

// The sums: float64 accumulators in 8-lane vectors (GCC/Clang vector extensions), several
// independent ones per sum so that the additions' latency does not bound the loop; each
// element is widened to float64 exactly before it is multiplied (load8, built on the
// 4-lane loads below). The order is fixed: results are deterministic.
typedef double v4d __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));
typedef uint32_t v4u __attribute__((vector_size(16)));
typedef uint16_t v4s __attribute__((vector_size(8)));
typedef _Float16 v4h __attribute__((vector_size(8)));

template <class X>
inline v4d load4(const X* p);

template <>
inline v4d load4<float>(const float* p) {
  v4f v;
  std::memcpy(&v, p, sizeof v);
  return __builtin_convertvector(v, v4d);
}

template <>
inline v4d load4<double>(const double* p) {
  v4d v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <>
inline v4d load4<bf16>(const bf16* p) {
  v4s h;
  std::memcpy(&h, p, sizeof h);
  v4u u = __builtin_convertvector(h, v4u) << 16;
  v4f f;
  std::memcpy(&f, &u, sizeof f);
  return __builtin_convertvector(f, v4d);
}

template <>
inline v4d load4<_Float16>(const _Float16* p) {
  v4h h;
  std::memcpy(&h, p, sizeof h);
  return __builtin_convertvector(__builtin_convertvector(h, v4f), v4d);
}

// Eight elements widened to float64: one AVX-512 conversion where the CPU has it (twice the
// conversions per cycle of AVX2, which bound the sums when the data is in cache), two
// halves otherwise.
typedef double v8d __attribute__((vector_size(64)));

template <class X>
inline v8d load8(const X* p) {
  return __builtin_shufflevector(load4(p), load4(p + 4), 0, 1, 2, 3, 4, 5, 6, 7);
}

#if defined(__AVX512F__) && defined(__F16C__)
template <>
inline v8d load8<float>(const float* p) {
  return (v8d)_mm512_cvtps_pd(_mm256_loadu_ps(p));
}

template <>
inline v8d load8<double>(const double* p) {
  return (v8d)_mm512_loadu_pd(p);
}

template <>
inline v8d load8<bf16>(const bf16* p) {
  __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return (v8d)_mm512_cvtps_pd(_mm256_castsi256_ps(_mm256_slli_epi32(h, 16)));
}

template <>
inline v8d load8<_Float16>(const _Float16* p) {
  return (v8d)_mm512_cvtps_pd(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
#endif

inline double hsum(v8d v) { return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7])); }

// One piece's sum of squares, fed in blocks (each a multiple of 32 elements but the last).
template <class X>
struct SumSq {
  v8d a0 = {}, a1 = a0, a2 = a0, a3 = a0;
  double t = 0.0;
  void add(const X* x, int64_t len) {
    int64_t i = 0;
    for (; i + 32 <= len; i += 32) {
      v8d x0 = load8(x + i), x1 = load8(x + i + 8), x2 = load8(x + i + 16), x3 = load8(x + i + 24);
      a0 += x0 * x0;
      a1 += x1 * x1;
      a2 += x2 * x2;
      a3 += x3 * x3;
    }
    for (; i < len; ++i) {
      double v = IO<X>::template ld<double>(x + i);
      t += v * v;
    }
  }
  void result(double* out) const { out[0] = (hsum(a0) + hsum(a1)) + (hsum(a2) + hsum(a3)) + t; }
};

// One piece's <g, m>, |g|^2 and |m|^2, fed in blocks (multiples of 16 elements but the last).
template <class G, class M>
struct Stats {
  v8d d0 = {}, d1 = d0, gg0 = d0, gg1 = d0, mm0 = d0, mm1 = d0;
  double a = 0.0, b = 0.0, c = 0.0;
  void add(const G* g, const M* m, int64_t len) {
    int64_t i = 0;
    for (; i + 16 <= len; i += 16) {
      v8d x0 = load8(g + i), x1 = load8(g + i + 8);
      v8d y0 = load8(m + i), y1 = load8(m + i + 8);
      d0 += x0 * y0;
      d1 += x1 * y1;
      gg0 += x0 * x0;
      gg1 += x1 * x1;
      mm0 += y0 * y0;
      mm1 += y1 * y1;
    }
    for (; i < len; ++i) {
      double x = IO<G>::template ld<double>(g + i);
      double y = IO<M>::template ld<double>(m + i);
      a += x * y;
      b += x * x;
      c += y * y;
    }
  }
  void result(double* out) const {
    out[0] = hsum(d0) + hsum(d1) + a;
    out[1] = hsum(gg0) + hsum(gg1) + b;
    out[2] = hsum(mm0) + hsum(mm1) + c;
  }
};

constexpr int kSumGroup = 8;    // pieces in lockstep: the sum of squares reads one stream each
constexpr int kStatsGroup = 4;  // the statistics read two
constexpr int kElemGroup = 4;   // the elementwise passes read two and write one

template <class G, class M, class C>
void fold_piece(const G* g, M* m, int64_t len, C w) {
  if (w == C(1)) {  // a copy, as on the foreach path (g - m may overflow)
    for (int64_t i = 0; i < len; ++i) IO<M>::st(m + i, IO<G>::template ld<C>(g + i));
  } else if (w < C(0.5)) {  // torch.lerp's formula, so that the paths round alike
    for (int64_t i = 0; i < len; ++i) {
      C x = IO<G>::template ld<C>(g + i), y = IO<M>::template ld<C>(m + i);
      IO<M>::st(m + i, fmadd(w, x - y, y));
    }
  } else {
    C omw = C(1) - w;
    for (int64_t i = 0; i < len; ++i) {
      C x = IO<G>::template ld<C>(g + i), y = IO<M>::template ld<C>(m + i);
      IO<M>::st(m + i, fmadd(-omw, x - y, x));
    }
  }
}

template <class G, class M, class C>
void project_piece(G* g, const M* m, int64_t len, C c) {
  for (int64_t i = 0; i < len; ++i) {
    C x = IO<G>::template ld<C>(g + i), y = IO<M>::template ld<C>(m + i);
    IO<G>::st(g + i, fmadd(-c, y, x));
  }
}

// Calls f.template operator()<G>() with the type of dtype code `code`.
template <class F>
bool with_type(int code, F&& f) {
  switch (code) {
    case 0: f(float{}); return true;
    case 1: f(double{}); return true;
    case 2: f(bf16{}); return true;
    case 3: f(_Float16{}); return true;
    default: return false;
  }
}

}  // namespace

extern "C" {

int gru_cpu_abi() { return 3; }

int gru_cpu_sumsq(int64_t n, void* const* x, const int64_t* sizes, int xt, double* out,
                  int threads) {
  std::vector<Piece> ps = pieces(n, sizes);
  std::vector<double> part(ps.size());
  bool ok = with_type(xt, [&](auto tx) {
    using X = decltype(tx);
    parallel<kSumGroup>(ps, threads, [&](int64_t k0, int cnt) {
      SumSq<X> acc[kSumGroup];
      const Piece* p = &ps[k0];
      lockstep(p, cnt, [&](int j, int64_t off, int64_t len) {
        acc[j].add(static_cast<const X*>(x[p[j].tensor]) + p[j].start + off, len);
      });
      for (int j = 0; j < cnt; ++j) acc[j].result(&part[k0 + j]);
    });
  });
  if (!ok) return 1;
  reduce(ps, part, 1, n, out);
  return 0;
}

int gru_cpu_stats(int64_t n, void* const* g, void* const* m, const int64_t* sizes, int gt, int mt,
                  double* out, int threads) {
  std::vector<Piece> ps = pieces(n, sizes);
  std::vector<double> part(ps.size() * 3);
  bool ok = false;
  with_type(gt, [&](auto tg) {
    ok = with_type(mt, [&](auto tm) {
      using G = decltype(tg);
      using M = decltype(tm);
      parallel<kStatsGroup>(ps, threads, [&](int64_t k0, int cnt) {
        Stats<G, M> acc[kStatsGroup];
        const Piece* p = &ps[k0];
        lockstep(p, cnt, [&](int j, int64_t off, int64_t len) {
          int64_t at = p[j].start + off;
          acc[j].add(static_cast<const G*>(g[p[j].tensor]) + at,
                     static_cast<const M*>(m[p[j].tensor]) + at, len);
        });
        for (int j = 0; j < cnt; ++j) acc[j].result(&part[3 * (k0 + j)]);
      });
    });
  });
  if (!ok) return 1;
  reduce(ps, part, 3, n, out);
  return 0;
}

// sq (nullable): also |g|^2 per tensor, as gru_cpu_sumsq computes it, from the same read of
// the gradient (whether or not the gate lets the fold happen).
int gru_cpu_fold(int64_t n, void* const* g, void* const* m, const int64_t* sizes, int gt, int mt,
                 const double* gammas, const int32_t* gate, double* sq, int threads) {
  bool fold = *gate != 0;
  if (!fold && sq == nullptr) return 0;
  std::vector<Piece> ps = pieces(n, sizes);
  std::vector<double> part(sq != nullptr ? ps.size() : 0);
  bool wide = gt == 1 || mt == 1, ok = false;
  with_type(gt, [&](auto tg) {
    ok = with_type(mt, [&](auto tm) {
      using G = decltype(tg);
      using M = decltype(tm);
      parallel<kElemGroup>(ps, threads, [&](int64_t k0, int cnt) {
        SumSq<G> acc[kElemGroup];
        const Piece* p = &ps[k0];
        lockstep(p, cnt, [&](int j, int64_t off, int64_t len) {
          const G* gp = static_cast<const G*>(g[p[j].tensor]) + p[j].start + off;
          M* mp = static_cast<M*>(m[p[j].tensor]) + p[j].start + off;
          if (sq != nullptr) acc[j].add(gp, len);  // the block is in L1 for the fold
          if (!fold)
            return;
          if (wide)
            fold_piece<G, M, double>(gp, mp, len, gammas[p[j].tensor]);
          else
            fold_piece<G, M, float>(gp, mp, len, float(gammas[p[j].tensor]));
        });
        if (sq != nullptr)
          for (int j = 0; j < cnt; ++j) acc[j].result(&part[k0 + j]);
      });
    });
  });
  if (!ok) return 1;
  if (sq != nullptr) reduce(ps, part, 1, n, sq);
  return 0;
}

int gru_cpu_project(int64_t n, void* const* g, void* const* m, const int64_t* sizes, int gt,
                    int mt, const double* coefs, const int32_t* skip, int threads) {
  if (*skip != 0) return 0;
  std::vector<Piece> all = pieces(n, sizes), ps;
  bool wide = gt == 1 || mt == 1, ok = false;
  for (const Piece& p : all) {
    double c = wide ? coefs[p.tensor] : double(float(coefs[p.tensor]));
    if (c != 0.0) ps.push_back(p);
  }
  with_type(gt, [&](auto tg) {
    ok = with_type(mt, [&](auto tm) {
      using G = decltype(tg);
      using M = decltype(tm);
      parallel<kElemGroup>(ps, threads, [&](int64_t k0, int cnt) {
        const Piece* p = &ps[k0];
        lockstep(p, cnt, [&](int j, int64_t off, int64_t len) {
          G* gp = static_cast<G*>(g[p[j].tensor]) + p[j].start + off;
          const M* mp = static_cast<const M*>(m[p[j].tensor]) + p[j].start + off;
          if (wide)
            project_piece<G, M, double>(gp, mp, len, coefs[p[j].tensor]);
          else
            project_piece<G, M, float>(gp, mp, len, float(coefs[p[j].tensor]));
        });
      });
    });
  });
  return ok ? 0 : 1;
}

}  // extern "C"
