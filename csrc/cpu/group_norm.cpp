// GroupNorm (+SiLU) (+residual) on the CPU, bound as flashstep._C.group_norm_cpu.
//
// x (B, C, S) stored NCHW-contiguous, or channels_last as (B, S, C); G groups of Cg = C/G channels.
// Per (b, g), over the Cg·S values of the group:
//   mean, var (biased), rstd = 1/sqrt(var + eps)            or the given (mean, rstd), each (B, G) float32
//   y = (x - mean)·rstd·weight[c] + bias[c];  y = y·sigmoid(y) when silu;  y += residual
// Pass 1 reads x once: moments of blocks of a few thousand values (two passes over a block while it is in
// cache, fp32), merged in double with Chan's formula. Pass 2 reads x (and the residual) once and writes y
// once. float16 and bfloat16 are converted to float on load and rounded to nearest-even on store.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <system_error>
#include <thread>
#include <vector>

#include "op_registration.h"
#include "tensor_args.h"

namespace py = pybind11;

// NOTE: the build targets baseline x86-64 (SSE2); the span kernels are also compiled for x86-64-v3 (AVX2, FMA)
// and picked at load time: twice the vector width, and the SiLU pass 25% faster again with FMA.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FLASHSTEP_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FLASHSTEP_CPU_CLONES
#endif

namespace flashstep {
namespace {

// Values per block of pass 1 (NCHW) and of pass 2: 8 KB of floats, well inside L1.
constexpr int64_t kBlock = 2048;
// Independent partial sums in the block reductions: lets the compiler vectorise without reassociating.
constexpr int kLanes = 16;

// Runs work(worker, begin, end) over `workers` contiguous ranges of [0, count), worker 0 on the calling thread;
// a range whose thread cannot be started runs on the calling thread too.
// NOTE: plain threads rather than OpenMP. With OpenMP (a second libgomp runtime beside torch's, its idle workers
// spinning against the working threads) the op took 84-88 ms at (1, 320, 64, 64) fp32 on the 2-core
// development machine, 8-12 ms with these threads; OMP_WAIT_POLICY=PASSIVE removed the difference. Starting
// a thread costs tens of microseconds, small against a pass.
template <typename Work>
void parallel_ranges(int workers, int64_t count, const Work& work) {
  const int64_t used = std::max<int64_t>(1, std::min<int64_t>(workers, count));
  auto run = [&work, used, count](int64_t w) { work(static_cast<int>(w), count * w / used, count * (w + 1) / used); };
  std::vector<std::thread> threads;
  threads.reserve(used - 1);
  int64_t started = 1;
  try {
    for (; started < used; ++started) threads.emplace_back(run, started);
  } catch (const std::system_error&) {
  }
  for (int64_t w = started; w < used; ++w) run(w);
  run(0);
  for (std::thread& thread : threads) thread.join();
}

// ---- element conversion ------------------------------------------------------------------------------

inline float bits_to_float(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

inline uint32_t float_to_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

// All ones when `condition` holds, else zero: selections as bit masks keep the conversion loops free of
// branches, so that they vectorise.
inline uint32_t mask_if(bool condition) { return 0u - static_cast<uint32_t>(condition); }

inline uint32_t select(uint32_t mask, uint32_t if_set, uint32_t otherwise) {
  return (if_set & mask) | (otherwise & ~mask);
}

// IEEE binary16 -> binary32, exact for every input (normals, subnormals, infinities, NaN).
inline float half_to_float(uint16_t h) {
  const uint32_t magnitude = static_cast<uint32_t>(h & 0x7fffu) << 13;
  const uint32_t exponent = magnitude & 0x0f800000u;
  const uint32_t normal = magnitude + 0x38000000u;   // rebias by 127 - 15
  const uint32_t special = normal + 0x38000000u;     // infinity, NaN: exponent 255
  // Subnormal: mantissa · 2^-24, as (2^-14 + mantissa · 2^-24) - 2^-14 in float.
  const uint32_t subnormal = float_to_bits(bits_to_float(normal + 0x00800000u) - bits_to_float(0x38800000u));
  const uint32_t value =
      select(mask_if(exponent == 0x0f800000u), special, select(mask_if(exponent == 0), subnormal, normal));
  return bits_to_float(value | (static_cast<uint32_t>(h & 0x8000u) << 16));
}

// binary32 -> binary16, round to nearest even; overflow gives infinity, NaN stays NaN.
inline uint16_t float_to_half(float input) {
  const uint32_t bits = float_to_bits(input);
  const uint32_t magnitude = bits & 0x7fffffffu;
  // >= 65520 rounds to infinity; above 0x7f800000 is NaN.
  const uint32_t overflow = 0x7c00u | (0x0200u & mask_if(magnitude > 0x7f800000u));
  // Normal half (>= 2^-14): rebias the exponent by -112 and round the 13 dropped bits to even.
  const uint32_t normal = (magnitude + 0xc8000fffu + ((magnitude >> 13) & 1u)) >> 13;
  // Subnormal half: adding 0.5 leaves value·2^24 rounded to nearest even in the float's mantissa.
  const uint32_t subnormal = float_to_bits(bits_to_float(magnitude) + 0.5f) - 0x3f000000u;
  const uint32_t value =
      select(mask_if(magnitude >= 0x477ff000u), overflow, select(mask_if(magnitude >= 0x38800000u), normal, subnormal));
  return static_cast<uint16_t>(value | ((bits >> 16) & 0x8000u));
}

inline float bfloat16_to_float(uint16_t b) { return bits_to_float(static_cast<uint32_t>(b) << 16); }

// Round to nearest even; NaN stays a (quiet) NaN.
inline uint16_t float_to_bfloat16(float value) {
  const uint32_t bits = float_to_bits(value);
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(select(mask_if((bits & 0x7fffffffu) > 0x7f800000u), (bits >> 16) | 0x40u, rounded));
}

FLASHSTEP_CPU_CLONES
void halves_to_floats(const uint16_t* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = half_to_float(src[i]);
}

FLASHSTEP_CPU_CLONES
void bfloat16s_to_floats(const uint16_t* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = bfloat16_to_float(src[i]);
}

FLASHSTEP_CPU_CLONES
void floats_to_halves(const float* src, int64_t n, uint16_t* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = float_to_half(src[i]);
}

FLASHSTEP_CPU_CLONES
void floats_to_bfloat16s(const float* src, int64_t n, uint16_t* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = float_to_bfloat16(src[i]);
}

// Values [offset, offset + n) of a tensor of dtype `dtype` as floats: a pointer into fp32 storage, else
// converted into `buffer`.
const float* load_floats(const void* data, DType dtype, int64_t offset, int64_t n, float* buffer) {
  if (dtype == DType::kFloat32) return static_cast<const float*>(data) + offset;
  const uint16_t* src = static_cast<const uint16_t*>(data) + offset;
  if (dtype == DType::kFloat16) {
    halves_to_floats(src, n, buffer);
  } else {
    bfloat16s_to_floats(src, n, buffer);
  }
  return buffer;
}

// Where pass 2 computes values [offset, offset + n) of the output: the output itself when fp32.
float* output_floats(void* data, DType dtype, int64_t offset, float* buffer) {
  return dtype == DType::kFloat32 ? static_cast<float*>(data) + offset : buffer;
}

void store_floats(void* data, DType dtype, int64_t offset, int64_t n, const float* values) {
  if (dtype == DType::kFloat32) return;  // computed in place
  uint16_t* dst = static_cast<uint16_t*>(data) + offset;
  if (dtype == DType::kFloat16) {
    floats_to_halves(values, n, dst);
  } else {
    floats_to_bfloat16s(values, n, dst);
  }
}

float load_one(const void* data, DType dtype, int64_t index) {
  float value;
  return *load_floats(data, dtype, index, 1, &value);
}

// ---- moments -------------------------------------------------------------------------------------------

// count, mean and m2 = Σ (x - mean)² of a set of values; merging is Chan et al.'s parallel formula.
struct Moments {
  double count = 0.0;
  double mean = 0.0;
  double m2 = 0.0;

  void merge(double other_count, double other_mean, double other_m2) {
    if (other_count == 0.0) return;
    const double total = count + other_count;
    const double delta = other_mean - mean;
    const double weight = other_count / total;
    mean += delta * weight;
    m2 += other_m2 + delta * delta * count * weight;
    count = total;
  }
};

// mean and m2 of v[0..n), two passes (n > 0).
FLASHSTEP_CPU_CLONES
void block_moments(const float* v, int64_t n, float* mean_out, float* m2_out) {
  float lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int k = 0; k < kLanes; ++k) lanes[k] += v[i + k];
  }
  for (; i < n; ++i) lanes[0] += v[i];
  float sum = 0.0f;
  for (int k = 0; k < kLanes; ++k) sum += lanes[k];
  const float mean = sum / static_cast<float>(n);

  float squares[kLanes] = {};
  i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int k = 0; k < kLanes; ++k) {
      const float d = v[i + k] - mean;
      squares[k] += d * d;
    }
  }
  for (; i < n; ++i) squares[0] += (v[i] - mean) * (v[i] - mean);
  float m2 = 0.0f;
  for (int k = 0; k < kLanes; ++k) m2 += squares[k];
  *mean_out = mean;
  *m2_out = m2;
}

// Column moments of a block of `rows` rows of `channels` values (rows > 0), merged into per-channel
// double accumulators that have seen `count` rows so far.
FLASHSTEP_CPU_CLONES
void merge_column_moments(const float* v, int64_t rows, int64_t channels, double count, float* column_sum,
                          float* column_m2, double* mean, double* m2) {
  for (int64_t c = 0; c < channels; ++c) column_sum[c] = 0.0f;
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = v + r * channels;
    for (int64_t c = 0; c < channels; ++c) column_sum[c] += row[c];
  }
  const float inv_rows = 1.0f / static_cast<float>(rows);
  for (int64_t c = 0; c < channels; ++c) {
    column_sum[c] *= inv_rows;  // now the column mean
    column_m2[c] = 0.0f;
  }
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = v + r * channels;
    for (int64_t c = 0; c < channels; ++c) {
      const float d = row[c] - column_sum[c];
      column_m2[c] += d * d;
    }
  }
  const double total = count + static_cast<double>(rows);
  const double weight = static_cast<double>(rows) / total;
  const double cross = count * weight;
  for (int64_t c = 0; c < channels; ++c) {
    const double delta = static_cast<double>(column_sum[c]) - mean[c];
    mean[c] += delta * weight;
    m2[c] += static_cast<double>(column_m2[c]) + delta * delta * cross;
  }
}

// ---- normalise -----------------------------------------------------------------------------------------

// e^x within about 1 ulp for x in [-87, 88] (0 or a subnormal approximation below), Cephes' expf written
// branch-free so that it vectorises. The caller clamps x to [-88, 88].
inline float exp_in_range(float x) {
  const float round_magic = 12582912.0f;  // 1.5 · 2^23: adding and subtracting rounds to an integer
  const float n = (x * 1.44269504088896341f + round_magic) - round_magic;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t exponent_bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &exponent_bits, sizeof(scale));
  return p * scale;
}

// out[i] = act((x[i] - mean[i]) · scale[i] + shift[i]) (+ residual[i]); `mean`, `scale`, `shift` are
// per-value arrays, or per-span scalars when their stride is 0.
struct Affine {
  const float* mean;
  const float* scale;
  const float* shift;
  int64_t stride;  // 1: per value, 0: one value for the whole span
};

// `scratch` holds n floats.
FLASHSTEP_CPU_CLONES
void normalise_span(const float* x, const float* residual, float* out, int64_t n, Affine affine, bool silu,
                    float* scratch) {
  if (affine.stride == 0) {
    const float mean = affine.mean[0], scale = affine.scale[0], shift = affine.shift[0];
    for (int64_t i = 0; i < n; ++i) out[i] = (x[i] - mean) * scale + shift;
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = (x[i] - affine.mean[i]) * affine.scale[i] + affine.shift[i];
  }
  if (silu) {
    // NOTE: the clamp has its own loop: fused with the polynomial, the compiler turns it into branches and
    // the loop stops vectorising (6x slower).
    for (int64_t i = 0; i < n; ++i) {
      const float v = -out[i];
      const float low = v < -88.0f ? -88.0f : v;
      scratch[i] = low > 88.0f ? 88.0f : low;
    }
    for (int64_t i = 0; i < n; ++i) out[i] = out[i] / (1.0f + exp_in_range(scratch[i]));
  }
  if (residual != nullptr) {
    for (int64_t i = 0; i < n; ++i) out[i] += residual[i];
  }
}

struct Problem {
  const void* x;
  void* y;
  const void* weight;
  const void* bias;
  const void* residual;
  int64_t batch, channels, spatial, groups;
  double eps;
  bool silu;
  bool channels_last;
  DType dtype;
  int threads;

  int64_t channels_per_group() const { return channels / groups; }
};

// ---- pass 1 ---------------------------------------------------------------------------------------------

// NCHW: group (b, g) is one contiguous run of Cg·S values.
void group_moments_nchw(const Problem& p, std::vector<Moments>& moments) {
  const int64_t group_size = p.channels_per_group() * p.spatial;
  std::vector<std::vector<float>> buffers(p.threads, std::vector<float>(kBlock));
  parallel_ranges(p.threads, p.batch * p.groups, [&](int worker, int64_t first, int64_t last) {
    float* buffer = buffers[worker].data();
    for (int64_t group = first; group < last; ++group) {
      Moments total;
      for (int64_t start = 0; start < group_size; start += kBlock) {
        const int64_t n = std::min(kBlock, group_size - start);
        const float* v = load_floats(p.x, p.dtype, group * group_size + start, n, buffer);
        float mean, m2;
        block_moments(v, n, &mean, &m2);
        total.merge(static_cast<double>(n), mean, m2);
      }
      moments[group] = total;
    }
  });
}

// channels_last: every worker takes a range of positions of one sample and keeps per-channel moments;
// the ranges are merged in a fixed order, then the Cg channels of each group.
void group_moments_channels_last(const Problem& p, std::vector<Moments>& moments) {
  const int64_t channels = p.channels;
  const int64_t ranges = std::max<int64_t>(1, std::min<int64_t>(p.threads, p.spatial));
  const int64_t tasks = p.batch * ranges;
  const int64_t rows_per_block = std::max<int64_t>(16, 4096 / channels);
  std::vector<double> range_mean(tasks * channels, 0.0), range_m2(tasks * channels, 0.0);
  std::vector<double> range_count(tasks, 0.0);
  struct Scratch {
    std::vector<float> buffer, column_sum, column_m2;
  };
  std::vector<Scratch> scratch(p.threads, Scratch{std::vector<float>(rows_per_block * channels),
                                                  std::vector<float>(channels), std::vector<float>(channels)});
  parallel_ranges(p.threads, tasks, [&](int worker, int64_t first, int64_t last) {
    Scratch& s = scratch[worker];
    for (int64_t task = first; task < last; ++task) {
      const int64_t b = task / ranges, range = task % ranges;
      const int64_t row_begin = p.spatial * range / ranges, row_end = p.spatial * (range + 1) / ranges;
      double count = 0.0;
      double* mean = range_mean.data() + task * channels;
      double* m2 = range_m2.data() + task * channels;
      for (int64_t row = row_begin; row < row_end; row += rows_per_block) {
        const int64_t rows = std::min(rows_per_block, row_end - row);
        const float* v = load_floats(p.x, p.dtype, (b * p.spatial + row) * channels, rows * channels, s.buffer.data());
        merge_column_moments(v, rows, channels, count, s.column_sum.data(), s.column_m2.data(), mean, m2);
        count += static_cast<double>(rows);
      }
      range_count[task] = count;
    }
  });
  const int64_t per_group = p.channels_per_group();
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t g = 0; g < p.groups; ++g) {
      Moments total;
      for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c) {
        Moments channel;
        for (int64_t range = 0; range < ranges; ++range) {
          const int64_t task = b * ranges + range;
          channel.merge(range_count[task], range_mean[task * channels + c], range_m2[task * channels + c]);
        }
        total.merge(channel.count, channel.mean, channel.m2);
      }
      moments[b * p.groups + g] = total;
    }
  }
}

// ---- pass 2 ---------------------------------------------------------------------------------------------

// Per (b, c): the group mean, scale = rstd·weight[c] and shift = bias[c].
struct ChannelAffine {
  std::vector<float> mean, scale, shift;
};

ChannelAffine channel_affine(const Problem& p, const float* group_mean, const float* group_rstd) {
  ChannelAffine a;
  const int64_t total = p.batch * p.channels;
  a.mean.resize(total);
  a.scale.resize(total);
  a.shift.resize(total);
  const int64_t per_group = p.channels_per_group();
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t c = 0; c < p.channels; ++c) {
      const int64_t group = b * p.groups + c / per_group;
      const float weight = p.weight != nullptr ? load_one(p.weight, p.dtype, c) : 1.0f;
      const float bias = p.bias != nullptr ? load_one(p.bias, p.dtype, c) : 0.0f;
      a.mean[b * p.channels + c] = group_mean[group];
      a.scale[b * p.channels + c] = group_rstd[group] * weight;
      a.shift[b * p.channels + c] = bias;
    }
  }
  return a;
}

// Per-worker buffers of pass 2.
struct SpanBuffers {
  std::vector<float> x, residual, out, scratch;
  explicit SpanBuffers(int64_t n) : x(n), residual(n), out(n), scratch(n) {}
};

// Pass 2 over `n` values at `offset`.
void normalise_at(const Problem& p, int64_t offset, int64_t n, const Affine& affine, SpanBuffers& buffers) {
  const float* x = load_floats(p.x, p.dtype, offset, n, buffers.x.data());
  const float* residual =
      p.residual != nullptr ? load_floats(p.residual, p.dtype, offset, n, buffers.residual.data()) : nullptr;
  float* out = output_floats(p.y, p.dtype, offset, buffers.out.data());
  normalise_span(x, residual, out, n, affine, p.silu, buffers.scratch.data());
  store_floats(p.y, p.dtype, offset, n, out);
}

// NCHW: row (b, c) is S contiguous values sharing one (mean, scale, shift).
void normalise_nchw(const Problem& p, const ChannelAffine& a) {
  std::vector<SpanBuffers> buffers(p.threads, SpanBuffers(kBlock));
  parallel_ranges(p.threads, p.batch * p.channels, [&](int worker, int64_t first, int64_t last) {
    for (int64_t row = first; row < last; ++row) {
      const Affine affine{&a.mean[row], &a.scale[row], &a.shift[row], 0};
      for (int64_t start = 0; start < p.spatial; start += kBlock) {
        normalise_at(p, row * p.spatial + start, std::min(kBlock, p.spatial - start), affine, buffers[worker]);
      }
    }
  });
}

// channels_last: row (b, s) is C contiguous values; the affine terms vary along the row.
void normalise_channels_last(const Problem& p, const ChannelAffine& a) {
  const int64_t channels = p.channels;
  std::vector<SpanBuffers> buffers(p.threads, SpanBuffers(channels));
  parallel_ranges(p.threads, p.batch * p.spatial, [&](int worker, int64_t first, int64_t last) {
    for (int64_t row = first; row < last; ++row) {
      const int64_t b = row / p.spatial;
      const Affine affine{&a.mean[b * channels], &a.scale[b * channels], &a.shift[b * channels], 1};
      normalise_at(p, row * channels, channels, affine, buffers[worker]);
    }
  });
}

// ---- entry point ----------------------------------------------------------------------------------------

void group_norm_cpu(std::uintptr_t x, std::uintptr_t y, std::uintptr_t weight, std::uintptr_t bias,
                    std::uintptr_t residual, std::uintptr_t mean, std::uintptr_t rstd, int64_t batch, int64_t channels,
                    int64_t spatial, int64_t groups, double eps, bool silu, bool channels_last, int dtype_code,
                    int threads) {
  require(x != 0 && y != 0, "group_norm_cpu: x and y must be given");
  require(batch > 0 && channels > 0 && spatial > 0, "group_norm_cpu: batch, channels and spatial size must be positive");
  require(groups > 0 && channels % groups == 0, "group_norm_cpu: groups must divide the channels");
  require((mean == 0) == (rstd == 0), "group_norm_cpu: give both mean and rstd, or neither");
  require(threads > 0, "group_norm_cpu: threads must be positive");
  const Problem p{as_ptr<const void>(x), as_ptr<void>(y), as_ptr<const void>(weight), as_ptr<const void>(bias),
                  as_ptr<const void>(residual), batch, channels, spatial, groups, eps, silu, channels_last,
                  to_dtype(dtype_code), threads};

  std::vector<float> group_mean(batch * groups), group_rstd(batch * groups);
  if (mean != 0) {
    std::memcpy(group_mean.data(), as_ptr<const float>(mean), group_mean.size() * sizeof(float));
    std::memcpy(group_rstd.data(), as_ptr<const float>(rstd), group_rstd.size() * sizeof(float));
  } else {
    std::vector<Moments> moments(batch * groups);
    if (channels_last) {
      group_moments_channels_last(p, moments);
    } else {
      group_moments_nchw(p, moments);
    }
    for (size_t i = 0; i < moments.size(); ++i) {
      group_mean[i] = static_cast<float>(moments[i].mean);
      group_rstd[i] = static_cast<float>(1.0 / std::sqrt(moments[i].m2 / moments[i].count + eps));
    }
  }
  const ChannelAffine affine = channel_affine(p, group_mean.data(), group_rstd.data());
  if (channels_last) {
    normalise_channels_last(p, affine);
  } else {
    normalise_nchw(p, affine);
  }
}

void bind(py::module_& m) {
  m.def("group_norm_cpu", &group_norm_cpu, py::arg("x"), py::arg("y"), py::arg("weight"), py::arg("bias"),
        py::arg("residual"), py::arg("mean"), py::arg("rstd"), py::arg("batch"), py::arg("channels"),
        py::arg("spatial"), py::arg("groups"), py::arg("eps"), py::arg("silu"), py::arg("channels_last"),
        py::arg("dtype"), py::arg("threads"), py::call_guard<py::gil_scoped_release>(),
        "GroupNorm(+SiLU)(+residual) of a contiguous NCHW or channels_last CPU tensor; pointers as integers, "
        "0 for an absent weight, bias, residual or (mean, rstd) pair");
}

OpRegistration registration(&bind);

}  // namespace
}  // namespace flashstep
