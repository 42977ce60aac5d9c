// Fused CPU forward and backward of the contrastive cross-entropy's two common cases, as autograd functions.
// trainers/streamed_ce.py has the maths and the general path; trainers/fused_ce.py builds this file on first use
// and falls back to that path where it cannot be built.
//
// Why: at small sizes (SimCLR at N = 256, MoCo at K = 4096) the matrix products take well under a millisecond, and
// the general path's ~35 small eager ops, each a Python call through the dispatcher, plus a Python autograd
// Function, cost as much again. Here every (rows, D) step is one parallel loop over rows that does all of that
// row's work in one go, and the only ATen calls left are the matrix products, exp and the row sums of E.
//
//   simclr_loss(z1, z2, beta, tile_rows): one process's SimCLR. Rows are [z1; z2], row r's positive is the other
//     view of its image, column (r + n) mod 2n, and an anchor is not its own negative. With unit rows a, the
//     exponentiated logits E = exp(beta a a^T) (diagonal zeroed) are symmetric, so the backward's row side
//     W E a and column side E W a (W = diag(1 / row sums)) are one product (W E + E W) @ a.
//   keyed_loss(queries, keys, candidates, beta, tile_rows, block_columns): MoCo. Each query's positive is its own
//     key (an extra logit); the candidates (the queue) are unit vectors already and get no gradient.
//
// Both assume unshifted logits: beta small enough that exp(+-beta) times the number of columns is a normal float,
// so exp needs no max subtracted (the Python side checks, see streamed_ce._SAFE_UNSHIFTED). Inputs are CPU matrices
// of any floating dtype; the loss is computed in the first input's dtype promoted to at least float32.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

constexpr double kNormEps = 1e-12;  // as F.normalize
constexpr int64_t kGrain = 16;      // rows per parallel chunk: a row is a few hundred flops

// x . y, vectorised: the simd reduction lets the compiler add in vector lanes (a plain loop, without -ffast-math,
// is one serial chain of dependent adds).
template <typename T>
inline T dot(const T* x, const T* y, int64_t dim) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t d = 0; d < dim; ++d) sum += x[d] * y[d];
  return sum;
}

template <typename T>
inline T inverse_norm(const T* x, int64_t dim) {
  return T(1) / std::max<T>(std::sqrt(dot(x, x, dim)), T(kNormEps));
}

// In place: g <- (g - u (u . g)) * inv_norm, the gradient through x / max(|x|, eps) for one row (no projection
// where the clamp was active, as autograd through F.normalize gives).
template <typename T>
inline void unit_backward_row(const T* u, T inv_norm, int64_t dim, T* g) {
  const T along = inv_norm < T(1 / kNormEps) ? dot(u, g, dim) : T(0);
  for (int64_t d = 0; d < dim; ++d) g[d] = (g[d] - u[d] * along) * inv_norm;
}

// In place: e[c] *= (f_r + f[c]), one row of E W + W E (a pragma cannot sit inside AT_DISPATCH's macro argument).
template <typename T>
inline void scale_symmetric_row(T* e, const T* f, T f_r, int64_t columns) {
#pragma omp simd
  for (int64_t c = 0; c < columns; ++c) e[c] *= f_r + f[c];
}

// E = exp(beta * rows @ columns^T), one tile at a time so that each tile is exponentiated while it is in cache;
// with zero_diagonal, E[r, r] = 0 (exp(-inf): the anchor is not its own negative). Writes each row's sum.
// Tiles are tile_rows x block_columns: MoCo's few queries against a long queue are cut into column blocks, because
// a tile of whole rows would have too few rows for the product to run at full speed (at K = 65536 on an AMD EPYC,
// tiles of 64 rows x 65536 columns took 1.7x the time of 256 x 4096 blocks). SimCLR's tiles are whole rows (one
// block): 4096-column blocks were 4% slower there at N = 4096.
at::Tensor exp_logits(const at::Tensor& rows, const at::Tensor& columns, double beta, bool zero_diagonal,
                      int64_t tile_rows, int64_t block_columns, at::Tensor& sums) {
  const int64_t num_rows = rows.size(0), num_columns = columns.size(0);
  at::Tensor exp_logits = at::empty({num_rows, num_columns}, rows.options());
  // the first block writes the row sums, later ones add theirs (through this buffer, made only if there are any)
  at::Tensor block_sums = block_columns < num_columns ? at::empty({num_rows}, rows.options()) : at::Tensor();
  for (int64_t c0 = 0; c0 < num_columns; c0 += block_columns) {
    const int64_t c1 = std::min(c0 + block_columns, num_columns);
    const at::Tensor block_columns_t = columns.narrow(0, c0, c1 - c0).t();
    for (int64_t r0 = 0; r0 < num_rows; r0 += tile_rows) {
      const int64_t r1 = std::min(r0 + tile_rows, num_rows);
      at::Tensor tile = exp_logits.narrow(0, r0, r1 - r0).narrow(1, c0, c1 - c0);  // rows of stride num_columns
      // beta rides on the product (BLAS's alpha; beta = 0 ignores the tile's old contents)
      at::addmm_out(tile, tile, rows.narrow(0, r0, r1 - r0), block_columns_t, /*beta=*/0, /*alpha=*/beta);
      tile.exp_();
      if (zero_diagonal) {
        AT_DISPATCH_FLOATING_TYPES(tile.scalar_type(), "zero_diagonal", [&] {
          scalar_t* e = exp_logits.data_ptr<scalar_t>();
          for (int64_t r = std::max(r0, c0); r < std::min(r1, c1); ++r) e[r * num_columns + r] = 0;
        });
      }
      at::Tensor tile_sums = sums.narrow(0, r0, r1 - r0);
      if (c0 == 0) {
        at::sum_out(tile_sums, tile, {1});
      } else {
        at::Tensor later = block_sums.narrow(0, r0, r1 - r0);
        tile_sums.add_(at::sum_out(later, tile, {1}));
      }
    }
  }
  return exp_logits;
}

// mean_r (log Z_r - positive_r), summed in double; writes log Z.
template <typename T>
double mean_loss(const T* partition, const T* positive, int64_t rows, T* log_partition) {
  double total = 0;
  for (int64_t r = 0; r < rows; ++r) {
    log_partition[r] = std::log(partition[r]);
    total += static_cast<double>(log_partition[r]) - static_cast<double>(positive[r]);
  }
  return total / static_cast<double>(rows);
}

// The backward is written by hand on raw memory: it makes no graph, so a second derivative would be silently wrong.
// (Grad mode is on inside a backward only under create_graph=True.)
void refuse_double_backward() {
  TORCH_CHECK(!at::GradMode::is_enabled(), "the fused contrastive loss has no second derivative (create_graph=True); "
              "set CONTRASTIVE_STUDY_FUSED_LOSS=0 to use the eager path, which refuses it only when it is used");
}

// The inputs as contiguous matrices of the dtype the loss is computed in: the first input's, promoted to at least
// float32 (bf16/fp16 embeddings are computed in float32, as on the eager path).
std::vector<at::Tensor> prepare_inputs(const std::vector<at::Tensor>& tensors) {
  const at::ScalarType dtype = at::promote_types(tensors[0].scalar_type(), at::kFloat);
  std::vector<at::Tensor> prepared;
  for (const at::Tensor& t : tensors) {
    TORCH_CHECK(t.device().is_cpu() && t.dim() == 2 && t.size(1) == tensors[0].size(1),
                "fused contrastive loss: expected CPU matrices with ", tensors[0].size(1), " columns");
    prepared.push_back(t.to(dtype).contiguous());
  }
  return prepared;
}

// -------------------------------------------------------------------------------------------------- SimCLR

struct SimclrLoss : public torch::autograd::Function<SimclrLoss> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& view1, const at::Tensor& view2, double beta,
                            int64_t tile_rows) {
    const std::vector<at::Tensor> inputs = prepare_inputs({view1, view2});
    const at::Tensor &z1 = inputs[0], &z2 = inputs[1];
    TORCH_CHECK(z1.size(0) == z2.size(0), "simclr_loss: z1 and z2 differ in rows");
    const int64_t n = z1.size(0), rows = 2 * n, dim = z1.size(1);
    at::Tensor unit = at::empty({rows, dim}, z1.options());  // a = [z1; z2] with unit rows
    at::Tensor inv_norm = at::empty({rows}, z1.options());
    at::Tensor positive = at::empty({rows}, z1.options());
    AT_DISPATCH_FLOATING_TYPES(z1.scalar_type(), "simclr_forward", [&] {
      const scalar_t* x1 = z1.const_data_ptr<scalar_t>();
      const scalar_t* x2 = z2.const_data_ptr<scalar_t>();
      scalar_t* u = unit.data_ptr<scalar_t>();
      scalar_t* inv = inv_norm.data_ptr<scalar_t>();
      scalar_t* pos = positive.data_ptr<scalar_t>();
      // Image i's two views, rows i and n + i, are each other's positive: one pass over the pair.
      at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const scalar_t *v1 = x1 + i * dim, *v2 = x2 + i * dim;
          const scalar_t inv1 = inverse_norm(v1, dim), inv2 = inverse_norm(v2, dim);
          scalar_t *a1 = u + i * dim, *a2 = u + (n + i) * dim;
          for (int64_t d = 0; d < dim; ++d) {
            a1[d] = v1[d] * inv1;
            a2[d] = v2[d] * inv2;
          }
          inv[i] = inv1;
          inv[n + i] = inv2;
          pos[i] = pos[n + i] = static_cast<scalar_t>(beta) * dot(v1, v2, dim) * inv1 * inv2;
        }
      });
    });
    at::Tensor partition = at::empty({rows}, z1.options());
    at::Tensor exp_logits_ = exp_logits(unit, unit, beta, /*zero_diagonal=*/true, tile_rows, rows, partition);
    at::Tensor log_partition = at::empty({rows}, z1.options());
    double loss = 0;
    AT_DISPATCH_FLOATING_TYPES(z1.scalar_type(), "simclr_loss", [&] {
      loss = mean_loss(partition.const_data_ptr<scalar_t>(), positive.const_data_ptr<scalar_t>(), rows,
                       log_partition.data_ptr<scalar_t>());
    });
    // The backward turns E into its gradient weights in place, so E is not a saved variable (whose version
    // autograd checks): the backward takes it out of ctx (a retained graph does not keep the used buffer alive),
    // and a second backward finds none and recomputes it from the unit rows.
    ctx->saved_data["exp_logits"] = exp_logits_;
    ctx->saved_data["beta"] = beta;
    ctx->saved_data["tile_rows"] = tile_rows;
    ctx->saved_data["dtypes"] = std::vector<int64_t>{static_cast<int64_t>(view1.scalar_type()),
                                                     static_cast<int64_t>(view2.scalar_type())};
    ctx->save_for_backward({unit, inv_norm, log_partition});
    return at::scalar_tensor(loss, z1.options());
  }

  // With P = W E the softmax (W = diag(w), w = 1/Z) and logits beta a a^T, the gradient of the partition terms
  // is beta (P + P^T) a = beta (W E + E W) a: E scaled in place by (w_r + w_c), then one (R x R) @ (R x D) product.
  // That is half the flops of E @ [a | w a] (the two sides as one product of 2D columns), for one pass over E that
  // runs tile by tile, just before each tile's product reads it from cache.
  static tensor_list backward(AutogradContext* ctx, tensor_list grad_outputs) {
    refuse_double_backward();
    const tensor_list saved = ctx->get_saved_variables();
    const at::Tensor &unit = saved[0], &inv_norm = saved[1], &log_partition = saved[2];
    const double beta = ctx->saved_data["beta"].toDouble();
    const int64_t tile_rows = ctx->saved_data["tile_rows"].toInt();
    const int64_t rows = unit.size(0), n = rows / 2, dim = unit.size(1);
    at::Tensor weights;
    if (ctx->saved_data.count("exp_logits") > 0) {
      weights = ctx->saved_data["exp_logits"].toTensor();
      ctx->saved_data.erase("exp_logits");
    } else {
      at::Tensor partition = at::empty({rows}, unit.options());
      weights = exp_logits(unit, unit, beta, /*zero_diagonal=*/true, tile_rows, rows, partition);
    }
    const double scale = grad_outputs[0].item<double>() / static_cast<double>(rows);
    at::Tensor row_factor = at::empty({rows}, unit.options());
    at::Tensor grad = at::empty({rows, dim}, unit.options());
    AT_DISPATCH_FLOATING_TYPES(unit.scalar_type(), "simclr_backward", [&] {
      scalar_t* f = row_factor.data_ptr<scalar_t>();
      const scalar_t* lz = log_partition.const_data_ptr<scalar_t>();
      // w_r with the loss gradient's 1/R and beta from the logits
      for (int64_t r = 0; r < rows; ++r) {
        f[r] = static_cast<scalar_t>(std::exp(-static_cast<double>(lz[r])) * scale * beta);
      }
      scalar_t* e = weights.data_ptr<scalar_t>();
      for (int64_t r0 = 0; r0 < rows; r0 += tile_rows) {
        const int64_t r1 = std::min(r0 + tile_rows, rows);
        at::parallel_for(r0, r1, kGrain, [&](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r) scale_symmetric_row(e + r * rows, f, f[r], rows);
        });
        at::Tensor grad_tile = grad.narrow(0, r0, r1 - r0);
        at::mm_out(grad_tile, weights.narrow(0, r0, r1 - r0), unit);
      }
      const scalar_t* u = unit.const_data_ptr<scalar_t>();
      const scalar_t* inv = inv_norm.const_data_ptr<scalar_t>();
      scalar_t* g = grad.data_ptr<scalar_t>();
      // Minus one at the positive, once for row r (a[p(r)]) and once for column r, which is the positive of row
      // p(r) (p(p(r)) = r), so a[p(r)] again: -2 * scale * beta * a[p(r)].
      const scalar_t minus = static_cast<scalar_t>(-2 * scale * beta);
      at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const scalar_t* a_positive = u + ((r + n) % rows) * dim;
          scalar_t* gr = g + r * dim;
          for (int64_t d = 0; d < dim; ++d) gr[d] += minus * a_positive[d];
          unit_backward_row(u + r * dim, inv[r], dim, gr);
        }
      });
    });
    const std::vector<int64_t> dtypes = ctx->saved_data["dtypes"].toIntVector();
    return {grad.narrow(0, 0, n).to(static_cast<at::ScalarType>(dtypes[0])),
            grad.narrow(0, n, n).to(static_cast<at::ScalarType>(dtypes[1])), at::Tensor(), at::Tensor()};
  }
};

// ---------------------------------------------------------------------------------------------------- MoCo

struct KeyedLoss : public torch::autograd::Function<KeyedLoss> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& query_input, const at::Tensor& key_input,
                            const at::Tensor& candidate_input, double beta, int64_t tile_rows,
                            int64_t block_columns) {
    const std::vector<at::Tensor> inputs = prepare_inputs({query_input, key_input, candidate_input});
    const at::Tensor &queries = inputs[0], &keys = inputs[1], &candidates = inputs[2];
    TORCH_CHECK(queries.size(0) == keys.size(0), "keyed_loss: queries and keys differ in rows");
    const int64_t rows = queries.size(0), dim = queries.size(1);
    at::Tensor a = at::empty({rows, dim}, queries.options()), inv_norm = at::empty({rows}, queries.options());
    at::Tensor k = at::empty({rows, dim}, queries.options()), k_inv = at::empty({rows}, queries.options());
    at::Tensor positive = at::empty({rows}, queries.options());
    AT_DISPATCH_FLOATING_TYPES(queries.scalar_type(), "keyed_forward", [&] {
      const scalar_t* xq = queries.const_data_ptr<scalar_t>();
      const scalar_t* xk = keys.const_data_ptr<scalar_t>();
      scalar_t *ap = a.data_ptr<scalar_t>(), *kp = k.data_ptr<scalar_t>();
      scalar_t *inv = inv_norm.data_ptr<scalar_t>(), *kinv = k_inv.data_ptr<scalar_t>();
      scalar_t* pos = positive.data_ptr<scalar_t>();
      at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const scalar_t *q = xq + r * dim, *key = xk + r * dim;
          const scalar_t inv_q = inverse_norm(q, dim), inv_k = inverse_norm(key, dim);
          for (int64_t d = 0; d < dim; ++d) {
            ap[r * dim + d] = q[d] * inv_q;
            kp[r * dim + d] = key[d] * inv_k;
          }
          inv[r] = inv_q;
          kinv[r] = inv_k;
          pos[r] = static_cast<scalar_t>(beta) * dot(q, key, dim) * inv_q * inv_k;
        }
      });
    });
    at::Tensor partition = at::empty({rows}, queries.options());
    at::Tensor exp_logits_ =
        exp_logits(a, candidates, beta, /*zero_diagonal=*/false, tile_rows, block_columns, partition);
    at::Tensor log_partition = at::empty({rows}, queries.options());
    double loss = 0;
    AT_DISPATCH_FLOATING_TYPES(queries.scalar_type(), "keyed_loss", [&] {
      scalar_t* z = partition.data_ptr<scalar_t>();
      const scalar_t* pos = positive.const_data_ptr<scalar_t>();
      for (int64_t r = 0; r < rows; ++r) z[r] += std::exp(pos[r]);  // the positive key's term of the sum
      loss = mean_loss(z, pos, rows, log_partition.data_ptr<scalar_t>());
    });
    ctx->saved_data["beta"] = beta;
    ctx->saved_data["dtypes"] = std::vector<int64_t>{static_cast<int64_t>(query_input.scalar_type()),
                                                     static_cast<int64_t>(key_input.scalar_type())};
    ctx->save_for_backward({a, inv_norm, k, k_inv, positive, exp_logits_, log_partition, candidates});
    return at::scalar_tensor(loss, queries.options());
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grad_outputs) {
    refuse_double_backward();
    const tensor_list saved = ctx->get_saved_variables();
    const at::Tensor &a = saved[0], &inv_norm = saved[1], &k = saved[2], &k_inv = saved[3];
    const at::Tensor &positive = saved[4], &exp_logits_ = saved[5], &log_partition = saved[6];
    const at::Tensor& candidates = saved[7];
    const double beta = ctx->saved_data["beta"].toDouble();
    const bool need_keys = ctx->needs_input_grad(1);
    const int64_t rows = a.size(0), dim = a.size(1);
    const double scale = grad_outputs[0].item<double>() / static_cast<double>(rows);
    at::Tensor grad = at::mm(exp_logits_, candidates);  // E @ B, each row weighted below
    at::Tensor grad_keys = need_keys ? at::empty({rows, dim}, a.options()) : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "keyed_backward", [&] {
      const scalar_t *ap = a.const_data_ptr<scalar_t>(), *kp = k.const_data_ptr<scalar_t>();
      const scalar_t *inv = inv_norm.const_data_ptr<scalar_t>(), *kinv = k_inv.const_data_ptr<scalar_t>();
      const scalar_t* pos = positive.const_data_ptr<scalar_t>();
      const scalar_t* lz = log_partition.const_data_ptr<scalar_t>();
      scalar_t* g = grad.data_ptr<scalar_t>();
      scalar_t* gk = need_keys ? grad_keys.data_ptr<scalar_t>() : nullptr;
      at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const double log_z = lz[r];
          const scalar_t weight = static_cast<scalar_t>(std::exp(-log_z) * scale * beta);
          // the positive key's softmax weight minus one, with beta and the loss gradient's 1/R
          const scalar_t key_factor = static_cast<scalar_t>((std::exp(pos[r] - log_z) - 1) * scale * beta);
          const scalar_t *ar = ap + r * dim, *kr = kp + r * dim;
          scalar_t* gr = g + r * dim;
          for (int64_t d = 0; d < dim; ++d) gr[d] = gr[d] * weight + kr[d] * key_factor;
          unit_backward_row(ar, inv[r], dim, gr);
          if (gk != nullptr) {
            scalar_t* gkr = gk + r * dim;
            for (int64_t d = 0; d < dim; ++d) gkr[d] = ar[d] * key_factor;
            unit_backward_row(kr, kinv[r], dim, gkr);
          }
        }
      });
    });
    const std::vector<int64_t> dtypes = ctx->saved_data["dtypes"].toIntVector();
    return {grad.to(static_cast<at::ScalarType>(dtypes[0])),
            need_keys ? grad_keys.to(static_cast<at::ScalarType>(dtypes[1])) : at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor simclr_loss(const at::Tensor& z1, const at::Tensor& z2, double beta, int64_t tile_rows) {
  return SimclrLoss::apply(z1, z2, beta, tile_rows);
}

at::Tensor keyed_loss(const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& candidates, double beta,
                      int64_t tile_rows, int64_t block_columns) {
  return KeyedLoss::apply(queries, keys, candidates, beta, tile_rows, block_columns);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("simclr_loss", &simclr_loss, "One process's SimCLR loss of views z1, z2 (n, D) at inverse temperature beta");
  m.def("keyed_loss", &keyed_loss, "MoCo's InfoNCE of queries and keys (n, D) against unit candidates (K, D)");
}
