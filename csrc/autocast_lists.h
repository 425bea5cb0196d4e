#pragma once
// Internal: torch's AutocastCPU list (aten/src/ATen/autocast_mode.cpp; the installed headers do not
// carry it) as a macro list in the style of ATen's AT_FORALL_* lists: `_(policy, op)` or
// `_(policy, op, overload)`. The default CPU table (cast_policy.cpp) and the unboxed kernels
// (autocast_unboxed.cpp) are both made from it.
//
// Written from torch 2.13's list; every supported torch release (see the README) defines the
// operators it names (the unboxed kernels name their at::_ops types). A running torch's default
// table keeps the entries that torch registers an AutocastCPU kernel for, so a release that
// autocasts fewer ops gets its own, shorter table; an aten op that it autocasts and this list lacks
// is reported (a warning) when the table is built, and the tests, which compare the tables with
// the running torch's AutocastCPU kernels, fail until the op is added here with its policy.

#define AMPKIT_FORALL_CPU_DEFAULTS(_)                 \
  _(lower_precision_fp, conv1d)                       \
  _(lower_precision_fp, conv1d, padding)              \
  _(lower_precision_fp, conv2d)                       \
  _(lower_precision_fp, conv2d, padding)              \
  _(lower_precision_fp, conv3d)                       \
  _(lower_precision_fp, conv3d, padding)              \
  _(lower_precision_fp, bmm)                          \
  _(lower_precision_fp, mm)                           \
  _(lower_precision_fp, linalg_vecdot)                \
  _(lower_precision_fp, baddbmm)                      \
  _(lower_precision_fp, addmm)                        \
  _(lower_precision_fp, _addmm_activation)            \
  _(lower_precision_fp, addbmm)                       \
  _(lower_precision_fp, linear)                       \
  _(lower_precision_fp, _convolution, deprecated)     \
  _(lower_precision_fp, matmul)                       \
  _(lower_precision_fp, conv_tbc)                     \
  _(lower_precision_fp, mkldnn_rnn_layer)             \
  _(lower_precision_fp, conv_transpose1d)             \
  _(lower_precision_fp, conv_transpose2d, input)      \
  _(lower_precision_fp, conv_transpose3d, input)      \
  _(lower_precision_fp, prelu)                        \
  _(lower_precision_fp, scaled_dot_product_attention) \
  _(lower_precision_fp, _native_multi_head_attention) \
  _(fp32, avg_pool3d)                                 \
  _(fp32, binary_cross_entropy)                       \
  _(fp32, grid_sampler)                               \
  _(fp32, polar)                                      \
  _(fp32, prod)                                       \
  _(fp32, prod, dim_int)                              \
  _(fp32, quantile)                                   \
  _(fp32, quantile, scalar)                           \
  _(fp32, nanquantile)                                \
  _(fp32, nanquantile, scalar)                        \
  _(fp32, stft)                                       \
  _(fp32, stft, center)                               \
  _(fp32, cdist)                                      \
  _(fp32, grid_sampler_2d)                            \
  _(fp32, _grid_sampler_2d_cpu_fallback)              \
  _(fp32, grid_sampler_3d)                            \
  _(fp32, trace)                                      \
  _(fp32, view_as_complex)                            \
  _(fp32, cholesky)                                   \
  _(fp32, cholesky_inverse)                           \
  _(fp32, cholesky_solve)                             \
  _(fp32, inverse)                                    \
  _(fp32, lu_solve)                                   \
  _(fp32, orgqr)                                      \
  _(fp32, ormqr)                                      \
  _(fp32, pinverse)                                   \
  _(fp32, max_pool3d)                                 \
  _(fp32, max_unpool2d)                               \
  _(fp32, max_unpool3d)                               \
  _(fp32, adaptive_avg_pool3d)                        \
  _(fp32, reflection_pad1d)                           \
  _(fp32, reflection_pad2d)                           \
  _(fp32, replication_pad1d)                          \
  _(fp32, replication_pad2d)                          \
  _(fp32, replication_pad3d)                          \
  _(fp32, mse_loss)                                   \
  _(fp32, cosine_embedding_loss)                      \
  _(fp32, nll_loss)                                   \
  _(fp32, nll_loss2d)                                 \
  _(fp32, hinge_embedding_loss)                       \
  _(fp32, poisson_nll_loss)                           \
  _(fp32, smooth_l1_loss)                             \
  _(fp32, cross_entropy_loss)                         \
  _(fp32, l1_loss)                                    \
  _(fp32, huber_loss)                                 \
  _(fp32, margin_ranking_loss)                        \
  _(fp32, soft_margin_loss)                           \
  _(fp32, triplet_margin_loss)                        \
  _(fp32, multi_margin_loss)                          \
  _(fp32, ctc_loss, IntList)                          \
  _(fp32, ctc_loss, Tensor)                           \
  _(fp32, kl_div)                                     \
  _(fp32, multilabel_margin_loss)                     \
  _(fp32, binary_cross_entropy_with_logits)           \
  _(fp32, fft_fft)                                    \
  _(fp32, fft_ifft)                                   \
  _(fp32, fft_fft2)                                   \
  _(fp32, fft_ifft2)                                  \
  _(fp32, fft_fftn)                                   \
  _(fp32, fft_ifftn)                                  \
  _(fp32, fft_rfft)                                   \
  _(fp32, fft_irfft)                                  \
  _(fp32, fft_rfft2)                                  \
  _(fp32, fft_irfft2)                                 \
  _(fp32, fft_rfftn)                                  \
  _(fp32, fft_irfftn)                                 \
  _(fp32, fft_hfft)                                   \
  _(fp32, fft_ihfft)                                  \
  _(fp32, linalg_cond)                                \
  _(fp32, linalg_cond, p_str)                         \
  _(fp32, linalg_matrix_rank)                         \
  _(fp32, linalg_matrix_rank, tol_tensor)             \
  _(fp32, linalg_matrix_rank, atol_rtol_tensor)       \
  _(fp32, linalg_matrix_rank, atol_rtol_float)        \
  _(fp32, linalg_solve)                               \
  _(fp32, linalg_cholesky)                            \
  _(fp32, linalg_svdvals)                             \
  _(fp32, linalg_eigvals)                             \
  _(fp32, linalg_eigvalsh)                            \
  _(fp32, linalg_inv)                                 \
  _(fp32, linalg_householder_product)                 \
  _(fp32, linalg_tensorinv)                           \
  _(fp32, linalg_tensorsolve)                         \
  _(fp32, fake_quantize_per_tensor_affine)            \
  _(fp32, geqrf)                                      \
  _(fp32, _lu_with_info)                              \
  _(fp32, qr)                                         \
  _(fp32, svd)                                        \
  _(fp32, triangular_solve)                           \
  _(fp32, fractional_max_pool2d)                      \
  _(fp32, fractional_max_pool3d)                      \
  _(fp32, adaptive_max_pool3d)                        \
  _(fp32, multilabel_margin_loss_forward)             \
  _(fp32, linalg_qr)                                  \
  _(fp32, linalg_cholesky_ex)                         \
  _(fp32, linalg_svd)                                 \
  _(fp32, linalg_eig)                                 \
  _(fp32, linalg_eigh)                                \
  _(fp32, linalg_lstsq)                               \
  _(fp32, linalg_inv_ex)                              \
  _(promote, stack)                                   \
  _(promote, cat)                                     \
  _(promote, index_copy)

// Entries of older supported releases that 2.13 lacks: torch 2.11 (the lent GPU machine's) also
// autocasts these Dimname overloads on CPU, which 2.13 no longer defines. The default CPU table
// takes them (a torch without them filters them out); the unboxed kernels do not, since they name
// at::_ops types that 2.13's headers lack: the boxed kernel serves them.
#define AMPKIT_FORALL_CPU_DEFAULTS_BOXED_ONLY(_) \
  _(fp32, prod, dim_Dimname)                     \
  _(promote, index_copy, dimname)

// Operators torch's AutocastCUDA key serves with kernels of their own rather than with a cast
// policy: _cudnn_rnn (CUDA builds, aten/src/ATen/native/cudnn/RNN.cpp) casts the weights and
// re-flattens them into cuDNN's one buffer, which no policy expresses. ampkit's table leaves them
// out, and so they stay torch's: ampkit's key falls through for an op its table lacks, and torch's
// AutocastCUDA kernel handles it in an ampkit region as under torch.autocast.
#define AMPKIT_TORCH_OWN_CUDA_KERNELS {"aten::_cudnn_rnn"}
