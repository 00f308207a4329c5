"""Decomposition methods: merges that split each task vector into parts and weigh the parts.

* `widen` (WIDEN, arXiv 2408.03092): each weight matrix is disentangled into column
  magnitudes and unit column directions; how far each model moved them from the base, ranked
  within the model, sets per-column importance scores (a softmax over models, calibrated).
* `free_merging` (FR-Merging, arXiv 2411.16815): a 2-D FFT filter removes the low
  frequencies of every task matrix before the task vectors are summed.
* `free_merging_experts` (FREE-Merging): the FR-Merging backbone plus, per task, a
  lightweight expert (the task vector's top-magnitude entries, rescaled); returns a
  `FreeMergeExperts` that builds each task's model.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mergejax import registry
from mergejax import rules as rules_lib
from mergejax.method import LeafContext, leafwise, map_leaves
from mergejax.methods import matrices
from mergejax.rules import is_finite_number
from mergejax.tree import (
    MergeError,
    PyTree,
    check_compatible,
    flatten_with_paths,
    is_float,
)

__all__ = ["FreeMergeExperts", "free_merging", "free_merging_experts", "frequency_mask",
           "widen"]

Array = jax.Array

WIDEN_PAPER = ("Yu et al. 2024, Extend Model Merging from Fine-Tuned to Pre-Trained Large "
               "Language Models via Weight Disentanglement (arXiv 2408.03092)")
FREE_PAPER = ("Zheng & Wang 2024, FREE-Merging: Fourier Transform for Efficient Model "
              "Merging (arXiv 2411.16815)")




# ------------------------------------------------------------------------------ WIDEN


def _check_widen(paths: list[str], statics: list[dict]) -> None:
    for path, s in zip(paths, statics):
        if not (is_finite_number(s["temperature"]) and s["temperature"] > 0):
            raise MergeError(f"temperature must be a finite number > 0, got "
                             f"{s['temperature']!r} at '{path}'")
        for name in ("above_average_value_ratio", "score_calibration_value"):
            if not (is_finite_number(s[name]) and s[name] >= 0):
                raise MergeError(f"{name} must be a finite number >= 0, got {s[name]!r} at "
                                 f"'{path}'")
        matrices.check_layout(s["kernel_layout"], path)
    matrices.check_matrix_split(paths, statics)


def _widen_scores(significance: Array, mean: Array, temperature: float, ratio: float,
                  calibration: float) -> Array:
    """WIDEN's importance scores of ``significance`` (K, n): a softmax over the models
    (axis 0) at ``temperature``, set to ``calibration`` where a model's significance
    exceeds ``ratio`` times ``mean``, its mean over the n entries."""
    scores = jax.nn.softmax(significance / temperature, axis=0)
    return jnp.where(significance > ratio * mean, calibration, scores)


def _ranked_scores(diff: Array, temperature: float, ratio: float,
                   calibration: float) -> Array:
    """`_widen_scores` of each entry's ascending rank within its row of ``diff`` (K, n),
    divided by n (stable: ties rank by position, as ``torch.argsort(stable=True)``). The
    ranks' mean is exactly ``(n - 1) / (2 n)``; the comparison is done on the integer
    ranks, ``rank > ratio * (n - 1) / 2``, so no rounding decides a tie."""
    n = diff.shape[1]
    rank = jnp.argsort(jnp.argsort(diff, axis=1, stable=True), axis=1).astype(diff.dtype)
    scores = jax.nn.softmax(rank / n / temperature, axis=0)
    return jnp.where(rank > ratio * (n - 1) / 2, calibration, scores)


@leafwise("widen", family="decomposition", paper=WIDEN_PAPER, coefficients=("scale",),
          validate=_check_widen, batched=matrices.batch_key)
def widen(ctx: LeafContext, base: Array, models: tuple[Array, ...], *, scale=1.0,
          above_average_value_ratio: float = 1.0, score_calibration_value: float = 1.0,
          temperature: float = 1.0, kernel_layout: str = "in_out",
          matrix_split: Any = "auto") -> Array:
    """WIDEN: merge by weight disentanglement, ``theta_0 + scale * sum_k tau_k * S_k``.

    Matrix leaves (``matrix_split``, see `mergejax.methods.matrices`) are seen in PyTorch
    ``(out, in)`` orientation (`matrices.torch_view` of ``kernel_layout``), so a *column*
    is one input unit. Per model k and column j:

    * magnitude ``m_kj = ||W_k[:, j]||``, direction ``D_k[:, j] = W_k[:, j] / m_kj``
      (the same for the base ``W_0``);
    * divergences ``|m_kj - m_0j|`` and ``1 - cos(D_k[:, j], D_0[:, j])``;
    * each divergence ranked within the model, ascending (ties by position), divided by
      the number n of columns (``r`` in [0, 1)), then scored: ``softmax_k(r /
      temperature)``, replaced by ``score_calibration_value`` where ``r >
      above_average_value_ratio * mean_j r``. ``mean_j r`` is exactly ``(n - 1) / (2 n)``
      and the test is made on the integer ranks (the official float32 mean may round
      either way when ``ratio * (n - 1) / 2`` is a whole number);
    * ``S_k[j] = (magnitude score + direction score) / 2``, applied to every row of
      ``tau_k``'s column j.

    Other leaves (biases, norms, convolution kernels, scalars) take the official code's
    vector rule elementwise: the significance is ``|tau_k|`` itself (not ranked), scored the
    same way, and ``S_k`` is that score.

    Matches the official code (``yule-BUAA/MergeLLM``, ``widen_merging``) with
    ``scale=1`` and ``temperature=1`` (it has neither knob); its defaults are
    ``above_average_value_ratio=1``, ``score_calibration_value=1``. The official code
    transposes ``embed_tokens`` so that its columns are tokens: a Flax ``Embed`` table
    ``(vocab, features)`` under ``kernel_layout="in_out"`` is seen the same way. Zero
    columns get a zero direction (the official code divides by zero there).

    Example::

        merged = mergejax.widen(base, [ft_a, ft_b], above_average_value_ratio=1.0)
    """
    split = matrices.matrix_split(ctx.path, base.shape, matrix_split)
    taus = jnp.stack([x - base for x in models])
    if split is None:
        diff = jnp.abs(taus).reshape(len(models), -1)
        s = _widen_scores(diff, jnp.mean(diff, axis=1, keepdims=True), temperature,
                          above_average_value_ratio, score_calibration_value)
        s = s.reshape(taus.shape)
        return base + scale * jnp.sum(taus * s, axis=0)

    def view(x: Array) -> Array:  # (..., out, in)
        m = x.reshape(*x.shape[:-base.ndim], *matrices.as_matrix(base, split).shape)
        return m if kernel_layout == "out_in" else jnp.swapaxes(m, -1, -2)

    w0, ws, tv = view(base), view(jnp.stack(models)), view(taus)
    m0, mk = jnp.linalg.norm(w0, axis=-2), jnp.linalg.norm(ws, axis=-2)
    d0 = w0 / jnp.where(m0 > 0, m0, 1.0)
    dk = ws / jnp.where(mk > 0, mk, 1.0)[:, None, :]
    norms = jnp.linalg.norm(dk, axis=-2) * jnp.linalg.norm(d0, axis=-2)
    cosine = jnp.sum(dk * d0, axis=-2) / jnp.maximum(norms, 1e-8)
    args = (temperature, above_average_value_ratio, score_calibration_value)
    s = 0.5 * (_ranked_scores(jnp.abs(mk - m0), *args) + _ranked_scores(1.0 - cosine, *args))
    merged = jnp.sum(tv * s[:, None, :], axis=0)
    if kernel_layout == "in_out":
        merged = merged.T
    return base + scale * merged.reshape(base.shape)


# ----------------------------------------------------------------------- FREE-Merging


def frequency_mask(shape: tuple[int, int], filter_ratio: float | None = 0.7,
                   cutoff: float = 0.0) -> np.ndarray | None:
    """The FR-Merging filter of a ``(p, q)`` matrix: the weight of each entry of its
    unshifted 2-D spectrum (``fft2``), or None when nothing is filtered.

    * ``filter_ratio`` (the official code's ``filter_ratio``; None: off): with ``d`` the
      distance of frequency index ``(i, j)`` from ``(p // 2, q // 2)``, the centre of the
      *unshifted* spectrum (its highest frequencies), keep ``d <= filter_ratio * min(p, q)``
      and ``d <= min(p, q) // 10`` (weight 1), drop the rest: the lowest frequencies, far
      from that centre. Frequencies at exactly ``d == min(p, q) // 10`` get weight 2, as in
      the official code, which adds its inner disc and its ring, both closed.
    * ``cutoff`` (the paper's ideal high-pass, 0: off): keep the frequencies whose
      distance from DC, ``sqrt(f_i^2 + f_j^2)`` with signed integer frequencies, is
      ``>= cutoff * min(p, q)``.

    Both apply when both are on. The mask is symmetric under transposition, so filtering
    commutes with the kernel layout.

    Example::

        mask = frequency_mask((768, 3072), filter_ratio=0.7)
    """
    p, q = shape
    mask = np.ones((p, q))
    if filter_ratio is not None:
        i, j = np.meshgrid(np.arange(p), np.arange(q), indexing="ij")
        d = np.sqrt((j - q // 2) ** 2 + (i - p // 2) ** 2)
        inner, outer = min(p, q) // 10, min(p, q) * filter_ratio
        mask = (d <= inner).astype(float) + ((d >= inner) & (d <= outer))
    if cutoff > 0:
        fi, fj = np.fft.fftfreq(p) * p, np.fft.fftfreq(q) * q
        mask = mask * (np.hypot(fi[:, None], fj[None, :]) >= cutoff * min(p, q))
    return None if filter_ratio is None and cutoff <= 0 else mask.astype(np.float32)


def _check_free(paths: list[str], statics: list[dict]) -> None:
    for path, s in zip(paths, statics):
        ratio = s["filter_ratio"]
        if ratio is not None and not (is_finite_number(ratio) and ratio > 0):
            raise MergeError(f"filter_ratio must be None or a finite number > 0, got "
                             f"{ratio!r} at '{path}'")
        if not (is_finite_number(s["cutoff"]) and s["cutoff"] >= 0):
            raise MergeError(f"cutoff must be a finite number >= 0, got {s['cutoff']!r} "
                             f"at '{path}'")
        if not isinstance(s["align"], bool):
            raise MergeError(f"align must be True or False, got {s['align']!r} at '{path}'")
        if s["non_matrix"] not in ("sum", "base"):
            raise MergeError(f"non_matrix must be 'sum' or 'base', got {s['non_matrix']!r} "
                             f"at '{path}'")
    matrices.check_matrix_split(paths, statics)


def _filtered_task_vectors(base: Array, models: tuple[Array, ...], split: int | None,
                           filter_ratio: float | None, cutoff: float, align: bool) -> Array:
    """FR-Merging's per-task vectors of one leaf, stacked (K, *shape): ``tau_k`` with its
    spectrum filtered by `frequency_mask` on matrix leaves, then (``align``) each scaled
    to the largest mean ``|.|`` among the tasks."""
    taus = jnp.stack([x - base for x in models])
    mask = None if split is None else frequency_mask(
        matrices.as_matrix(base, split).shape, filter_ratio, cutoff)
    if mask is not None:
        m = taus.reshape(len(models), *mask.shape)
        m = jnp.real(jnp.fft.ifft2(jnp.fft.fft2(m) * mask))
        taus = m.reshape(taus.shape).astype(base.dtype)
    if align:
        a = jnp.mean(jnp.abs(taus.reshape(len(models), -1)), axis=1)
        ratio = jnp.where(a > 0, jnp.max(a) / jnp.where(a > 0, a, 1.0), 0.0)
        taus = taus * ratio.reshape((-1,) + (1,) * base.ndim)
    return taus


def _backbone_vector(base: Array, vs: Array, split: int | None, non_matrix: str,
                     weights: Array, scale: Array) -> Array:
    if split is None and non_matrix == "base":
        return jnp.zeros_like(base)
    return scale * jnp.tensordot(weights, vs, axes=1)


@leafwise("free_merging", family="decomposition", paper=FREE_PAPER,
          coefficients=("weights", "scale"), per_model=("weights",), validate=_check_free,
          batched=matrices.batch_key)
def free_merging(ctx: LeafContext, base: Array, models: tuple[Array, ...], *, weights=None,
                 scale=0.7, filter_ratio: float | None = 0.7, cutoff: float = 0.0,
                 align: bool = True, non_matrix: str = "sum",
                 matrix_split: Any = "auto") -> Array:
    """FR-Merging, FREE-Merging's backbone: ``theta_0 + scale * sum_k w_k v_k``.

    On matrix leaves (``matrix_split``), ``v_k`` is ``tau_k`` with the low frequencies of
    its 2-D spectrum removed: ``real(ifft2(fft2(tau_k) * H))`` with ``H`` the
    `frequency_mask` of ``filter_ratio`` (the official code's filter) and ``cutoff`` (the
    paper's ideal high-pass ``sqrt(f_i^2 + f_j^2) >= D_0``, ``D_0 = cutoff * min(p, q)``).
    With ``filter_ratio=None, cutoff=0`` nothing is filtered: task arithmetic. The filter
    commutes with transposition, so the kernel layout does not matter.

    Other leaves are not filtered: ``non_matrix="sum"`` merges them by the same sum
    (task arithmetic), ``"base"`` keeps the pretrained value, as the official code does
    for every parameter outside the attention and MLP weights. ``align=True`` scales each
    task's ``v_k`` so that its mean ``|.|`` over the leaf equals the largest among the
    tasks (the official ``with_align``).

    Defaults are the official ViT-B/32 8-task FR config (``filter_ratio=0.7``,
    ``with_align=True``, ``scaling_coef=0.7``); the official code sums with ``w_k = 1``.
    For the official parameter selection pass ``matrix_split`` rules that pick the
    attention and MLP weight matrices (and ``None`` elsewhere) with ``non_matrix="base"``;
    it also adds the *first* task's attention / MLP biases unfiltered, which is not
    reproduced.

    Example::

        merged = mergejax.free_merging(base, [ft_a, ft_b, ft_c], scale=0.7)
    """
    split = matrices.matrix_split(ctx.path, base.shape, matrix_split)
    vs = _filtered_task_vectors(base, models, split, filter_ratio, cutoff, align)
    return base + _backbone_vector(base, vs, split, non_matrix, weights, scale)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FreeMergeExperts:
    """The FR-Merging backbone and one sparse expert per task.

    Each floating leaf is seen as rows (`matrices.torch_view` of a matrix leaf, so a row
    is one output unit; the flattened leaf otherwise). Task t's model is the base plus the
    backbone vector, where task t's kept entries are replaced by (``combine="replace"``)
    or added to (``"add"``) ``rescalers[t] * tau_t``. A pytree, so it passes through
    `jax.jit`.

    Attributes:
      base: the pretrained params.
      vector: the backbone's task vector, float32, with the base's structure
        (non-floating leaves are the base's).
      indices: per floating leaf, int32 ``(K, rows, k)``: the kept column of each row.
      values: per floating leaf, float32 ``(K, rows, k)``: ``tau_t`` there.
      rescalers: ``(K,)`` float32.
      views: per leaf of the base, None (not floating) or ``(split, kernel_layout)``, the
        row view (split None: the flattened leaf).
      combine: "replace" or "add".
    """

    base: PyTree
    vector: PyTree
    indices: PyTree
    values: PyTree
    rescalers: Array
    views: tuple = dataclasses.field(metadata={"static": True})
    combine: str = dataclasses.field(metadata={"static": True})

    @property
    def num_tasks(self) -> int:
        return int(self.rescalers.shape[0])

    def backbone(self) -> PyTree:
        """The merged backbone ``base + vector``, in the base's dtypes."""
        return _free_backbone(self.base, self.vector)

    def task_model(self, t: int) -> PyTree:
        """Task t's model: the backbone with task t's expert, in the base's dtypes.

        Example::

            result = mergejax.free_merging_experts(base, [ft_a, ft_b])
            model_b = result.task_model(1)
        """
        if not 0 <= t < self.num_tasks:
            raise MergeError(f"task index {t} out of range for {self.num_tasks} tasks")
        return _free_task_model(self.base, self.vector, self.indices, self.values,
                                self.rescalers, self.views, self.combine, jnp.int32(t))

    def task_models(self) -> list[PyTree]:
        """Every task's model, in order."""
        return [self.task_model(t) for t in range(self.num_tasks)]


def _rows(x: Array, view: tuple[int | None, str]) -> Array:
    split, layout = view
    if split is None:
        return x.reshape(1, -1)
    return matrices.torch_view(matrices.as_matrix(x, split), layout)


def _unrows(m: Array, view: tuple[int | None, str], shape: tuple[int, ...]) -> Array:
    split, layout = view
    return (m if split is None else matrices.from_torch_view(m, layout)).reshape(shape)


@jax.jit
def _free_backbone(base, vector):
    return jax.tree.map(lambda b, v: (b.astype(jnp.float32) + v).astype(b.dtype)
                        if is_float(b) else b, base, vector)


@functools.partial(jax.jit, static_argnums=(5, 6))
def _free_task_model(base, vector, indices, values, rescalers, views, combine, t):
    treedef = jax.tree.structure(base)
    out = []
    for b, v, idx, val, view in zip(treedef.flatten_up_to(base),
                                    treedef.flatten_up_to(vector),
                                    treedef.flatten_up_to(indices),
                                    treedef.flatten_up_to(values), views):
        if view is None:
            out.append(b)
            continue
        rows = _rows(v, view)
        expert = rescalers[t] * val[t]
        at = rows.at[jnp.arange(rows.shape[0])[:, None], idx[t]]
        rows = at.set(expert) if combine == "replace" else at.add(expert)
        out.append((b.astype(jnp.float32) + _unrows(rows, view, b.shape)).astype(b.dtype))
    return treedef.unflatten(out)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _free_expert_leaf(leaf_plan, density: float, b, xs, weights, scale):
    """One floating leaf's backbone vector, expert indices and values, and the per-task
    means that `_free_rescalers` averages over leaves."""
    split, layout, ratio, cutoff, align, non_matrix = leaf_plan
    cdt = jnp.promote_types(b.dtype, jnp.float32)
    b = b.astype(cdt)
    xs = tuple(x.astype(cdt) for x in xs)
    vs = _filtered_task_vectors(b, xs, split, ratio, cutoff, align)
    vector = _backbone_vector(b, vs, split, non_matrix, weights.astype(cdt),
                              scale.astype(cdt)).astype(jnp.float32)
    mean_v = jnp.mean(jnp.abs(vs.reshape(len(xs), -1)), axis=1)
    rows = jnp.stack([_rows(x - b, (split, layout)) for x in xs])
    k = rows.shape[-1] if b.ndim == 0 else int(rows.shape[-1] * density)
    _, idx = jax.lax.top_k(jnp.abs(rows), k)
    val = jnp.take_along_axis(rows, idx, axis=-1)
    mean_expert = jnp.sum(jnp.abs(val), axis=(1, 2)) / (b.size * density)
    return vector, idx.astype(jnp.int32), val.astype(jnp.float32), mean_v, mean_expert


@functools.partial(jax.jit, static_argnums=(0, 1))
def _free_rescalers(density: float, rescale: bool, mean_v, mean_expert, expert_scale):
    """``expert_scale * mu`` from the leaves' per-task means (`free_merging_experts`)."""
    e_v = functools.reduce(jnp.add, mean_v) / len(mean_v)
    e_m = functools.reduce(jnp.add, mean_expert) / len(mean_expert)
    mu = -e_m * np.log10(density) / jnp.where(e_v > 0, e_v, 1.0)
    mu = jnp.where(e_v > 0, mu, 0.0) if rescale else jnp.ones_like(e_v)
    return (expert_scale * mu).astype(jnp.float32)


def free_merging_experts(base: PyTree, models: Sequence[PyTree], *, weights=None,
                         scale=0.25, filter_ratio: Any = 0.7, cutoff: Any = 0.0,
                         align: Any = False, non_matrix: Any = "sum",
                         matrix_split: Any = "auto", kernel_layout: Any = "in_out",
                         density: float = 0.01, rescale: bool = True,
                         expert_scale=0.5, combine: str = "replace") -> FreeMergeExperts:
    """FREE-Merging (Zheng & Wang 2024, arXiv 2411.16815): the `free_merging` backbone
    plus a lightweight expert per task, as a `FreeMergeExperts`.

    * Backbone vector: ``scale * sum_k w_k v_k`` exactly as `free_merging` (same
      ``weights``, ``filter_ratio``, ``cutoff``, ``align``, ``non_matrix``,
      ``matrix_split``, each of these also as path rules).
    * Expert t: in every row of every floating leaf (a row of the PyTorch ``(out, in)``
      view of a matrix leaf, by ``kernel_layout``; the whole flattened leaf otherwise),
      the ``int(row_length * density)`` entries of ``tau_t`` largest in magnitude
      (``torch.topk`` per row, as the official ``TaskVectorMiddleKeep``; 0-d leaves are
      kept whole).
    * Rescaler (``rescale=True``, the official ``cal_rescaling``):
      ``mu_t = -E(M_t) * log10(density) / E(v_t)``, where ``E(v_t)`` is the mean over
      floating leaves of the mean ``|v_t|`` (filtered, aligned; ``tau_t`` on non-matrix
      leaves) and ``E(M_t)`` the mean over leaves of ``sum |expert entries| /
      (size * density)``. ``rescale=False`` gives ``mu_t = 1``. ``rescalers =
      expert_scale * mu``.
    * Task t's model: ``theta_0 + backbone vector`` with task t's kept entries replaced by
      ``rescalers[t] * tau_t`` (``combine="replace"``, the official ``sum_two``) or with
      that added (``"add"``, the paper's ``theta_m + e_t``).

    The defaults reproduce the official ViT-B/32 8-task FREE config (``filter_ratio=0.7``,
    ``top_k_keep=0.01``, no align, ``scaling_coef=0.5``), whose code scales the backbone
    by ``scaling_coef`` twice (``scale=0.25``) and the expert once (``expert_scale=0.5``).
    The official code rescales and applies experts only on attention / MLP weights; here
    every floating leaf has an expert. ``density=1, rescale=False, expert_scale=1`` with
    "replace" gives back each fine-tuned model. The router that picks the task at
    inference is not part of the merge: call `FreeMergeExperts.task_model`.

    Example::

        result = mergejax.free_merging_experts(base, [ft_a, ft_b, ft_c])
        params_b = result.task_model(1)
    """
    models = list(models)
    if not models:
        raise MergeError("free_merging_experts: models is empty; give at least one model")
    if base is None:
        raise MergeError("free_merging_experts needs a base (pretrained) model; got base=None")
    check_compatible(base, models)
    if not (is_finite_number(density) and 0.0 < density <= 1.0):
        raise MergeError(f"density must be in (0, 1], got {density!r}")
    if not isinstance(rescale, bool):
        raise MergeError(f"rescale must be True or False, got {rescale!r}")
    if combine not in ("replace", "add"):
        raise MergeError(f"combine must be 'replace' or 'add', got {combine!r}")
    paths, base_leaves, _ = flatten_with_paths(base)
    model_leaves = [jax.tree.leaves(m) for m in models]
    floating = [i for i, leaf in enumerate(base_leaves) if is_float(leaf)]
    fpaths = [paths[i] for i in floating]
    frefs = [base_leaves[i] for i in floating]
    given = {"filter_ratio": filter_ratio, "cutoff": cutoff, "align": align,
             "non_matrix": non_matrix, "matrix_split": matrix_split,
             "kernel_layout": kernel_layout}
    resolved = {n: rules_lib.resolve_per_leaf(v, fpaths, frefs, name=n)
                for n, v in given.items()}
    statics = [{n: resolved[n][j] for n in given} for j in range(len(fpaths))]
    _check_free(fpaths, statics)
    for path, s in zip(fpaths, statics):
        matrices.check_layout(s["kernel_layout"], path)
    plan = tuple(
        (matrices.matrix_split(p, r.shape, s["matrix_split"]), s["kernel_layout"],
         s["filter_ratio"], s["cutoff"], s["align"], s["non_matrix"])
        for p, r, s in zip(fpaths, frefs, statics))
    k = len(models)
    w = np.ones(k) if weights is None else weights
    if np.shape(w) != (k,):
        raise MergeError(f"free_merging_experts: weights must have one value per model "
                         f"({k}), got shape {np.shape(w)}")
    if np.shape(scale) != () or np.shape(expert_scale) != ():
        raise MergeError("free_merging_experts: scale and expert_scale must be scalars")
    if not floating:
        raise MergeError("free_merging_experts: the params have no floating-point leaf")
    # Leaf by leaf (one compile per leaf plan and shape): only the per-task means cross
    # leaves, and one program over every leaf compiles for a long time.
    weights, scale = jnp.asarray(w, jnp.float32), jnp.asarray(scale, jnp.float32)
    vectors, idx, vals, mean_v, mean_expert = zip(*map_leaves(_free_expert_leaf, [
        (leaf_plan, float(density), base_leaves[i], tuple(ml[i] for ml in model_leaves),
         weights, scale) for leaf_plan, i in zip(plan, floating)]))
    rescalers = _free_rescalers(float(density), rescale, mean_v, mean_expert,
                                jnp.asarray(expert_scale, jnp.float32))
    vector_leaves, index_leaves, value_leaves = list(base_leaves), [None] * len(paths), \
        [None] * len(paths)
    views: list[Any] = [None] * len(paths)
    for j, i in enumerate(floating):
        vector_leaves[i], index_leaves[i], value_leaves[i] = vectors[j], idx[j], vals[j]
        views[i] = plan[j][:2]
    treedef = jax.tree.structure(base)
    return FreeMergeExperts(base, treedef.unflatten(vector_leaves),
                            treedef.unflatten(index_leaves), treedef.unflatten(value_leaves),
                            rescalers, tuple(views), combine)


free_merging_experts.name = "free_merging_experts"
free_merging_experts.family = "decomposition"
free_merging_experts.paper = FREE_PAPER
free_merging_experts.hparams = {
    "weights": None, "scale": 0.25, "filter_ratio": 0.7, "cutoff": 0.0, "align": False,
    "non_matrix": "sum", "matrix_split": "auto", "kernel_layout": "in_out",
    "density": 0.01, "rescale": True, "expert_scale": 0.5, "combine": "replace"}
free_merging_experts.needs_base = True
free_merging_experts.keeps = ("one backbone task vector + per task its top-density entries "
                              "(values and indices) and a scalar")
registry.register(free_merging_experts)
