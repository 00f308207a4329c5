"""ZipIt! and MuDSC (`mergejax.align.zipping`) against NumPy references written here from the
papers' definitions: ZipIt!'s greedy within/across-model matching (alpha: repeated
matching, beta: same-model budget), a zip of cross-model matches as "permute, then
average", zipping a planted permutation back to the original function (MLP, ResNet with
LayerNorm, ViT), partial zipping through each returned model, MuDSC's dual-space
similarity at balance 0 and 1, the registry entries, and clear errors for bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

from mergejax import registry
from mergejax.align.features import feature_correlations, linen_features
from mergejax.align.spec import PermutationSpec, mlp_spec, resnet_spec, vit_spec
from mergejax.align.zipping import apply_zip, mudsc, weight_similarity, zip_features, zipit
from mergejax.suite import model as model_lib
from mergejax.tree import MergeError, path_str

IMAGES = np.random.default_rng(0).uniform(size=(64, 6, 6)).astype(np.float32)
BATCHES = [IMAGES[i * 16:(i + 1) * 16] for i in range(4)]


# --- NumPy references --------------------------------------------------------------------


def reference_groups(corr: np.ndarray, k: int, alpha: float, beta: float) -> list[list[int]]:
    """ZipIt!'s greedy loop with explicit groups: repeatedly merge the most similar pair
    (first in (smaller index, larger index) order on ties); a merged group's similarity to
    another is alpha * min of its parts' (alpha = 0: no decay, but -inf to groups sharing
    a model); each model may merge two of its own pure groups int(((k-1) n // k) beta)
    times, after which its pure groups are never matched with each other."""
    size = len(corr)
    n = size // k
    groups = {i: [i] for i in range(size)}
    sim = {(i, j): float(corr[i, j]) for i in range(size) for j in range(size) if i != j}
    pure = {i: i // n for i in range(size)}
    budget = [int(((k - 1) * n // k) * beta + 1e-4)] * k

    def close(model):
        own = [g for g in groups if pure[g] == model]
        for g in own:
            for h in own:
                if g != h:
                    sim[g, h] = -np.inf

    for model in range(k):
        if budget[model] <= 0:
            close(model)
    for _ in range((k - 1) * n):
        best = None
        for g in sorted(groups):
            for h in sorted(groups):
                if g < h and (best is None or sim[g, h] > sim[best]):
                    best = (g, h)
        g, h = best
        within = pure[g] is not None and pure[g] == pure[h]
        groups[g] = groups[g] + groups.pop(h)
        models_g = {i // n for i in groups[g]}
        for x in groups:
            if x != g:
                value = min(sim[g, x], sim[h, x])
                if alpha > 0:
                    value *= alpha
                elif models_g & {i // n for i in groups[x]}:
                    value = -np.inf
                sim[g, x] = sim[x, g] = value
        if within:
            budget[pure[g]] -= 1
            if budget[pure[g]] <= 0:
                close(pure[g])
        else:
            pure[g] = None
    return [sorted(groups[g]) for g in sorted(groups)]


def groups_of(unmerge) -> list[list[int]]:
    """The members (flat indices k*n + i) of each merged feature, in merged order."""
    u = np.asarray(unmerge)
    k, n, _ = u.shape
    return [sorted(m * n + i for m in range(k) for i in np.flatnonzero(u[m, :, j]))
            for j in range(n)]


def np_take_average(spec: PermutationSpec, models, perms_per_model) -> dict:
    """Each model permuted by its own permutations (np.take along every named axis), then
    every leaf (unpermuted ones too) averaged."""
    out = {}
    for path in flat(models[0]):
        layer, name = path.split("/")
        moved = []
        for params, perms in zip(models, perms_per_model):
            x = np.asarray(params[layer][name], np.float64)
            for axis, p in enumerate(spec.axes_of(path)):
                if p is not None:
                    x = np.take(x, perms[p], axis=axis)
            moved.append(x)
        out[path] = np.mean(moved, axis=0)
    return out


def np_zip_mlp(models, mats, num_layers: int, zipped) -> list[dict]:
    """MLP layers zipped by hand: kernel i reads P_{i-1} through U_k and writes P_i through
    K M_k (bias i too); a leaf all of whose spaces are zipped is the models' mean, every
    other leaf stays per model. Returns per model {path: array}."""
    k_models = len(models)
    out = [{} for _ in models]
    for i in range(num_layers):
        p_in = f"P_{i - 1}" if i > 0 else None
        p_out = f"P_{i}" if i < num_layers - 1 else None
        for name in ("kernel", "bias"):
            spaces = [p for p in ((p_in, p_out) if name == "kernel" else (p_out,)) if p]
            moved = []
            for k, params in enumerate(models):
                x = np.asarray(params[f"Dense_{i}"][name], np.float64)
                if name == "kernel" and p_in in zipped:
                    x = np.asarray(mats[p_in][1][k]).T @ x
                if p_out in zipped:
                    m = k_models * np.asarray(mats[p_out][0][k])
                    x = x @ m.T if name == "kernel" else m @ x
                moved.append(x)
            shared = (len(zipped) == num_layers - 1
                      or (spaces and all(p in zipped for p in spaces)))
            for k in range(k_models):
                out[k][f"Dense_{i}/{name}"] = np.mean(moved, axis=0) if shared else moved[k]
    return out


def np_mlp(params: dict, images: np.ndarray, num_layers: int) -> np.ndarray:
    x = (np.asarray(images, np.float64) * 2 - 1).reshape(len(images), -1)
    for i in range(num_layers):
        x = x @ params[f"Dense_{i}/kernel"] + params[f"Dense_{i}/bias"]
        if i < num_layers - 1:
            x = np.maximum(x, 0)
    return x


def planted(spec: PermutationSpec, params, seed: int):
    """``params`` with random permutations of every feature space applied by np.take."""
    rng = np.random.default_rng(seed)
    perms = {p: rng.permutation(n) for p, n in spec.sizes(params).items()}

    def move(key_path, x):
        x = np.asarray(x)
        for axis, p in enumerate(spec.axes_of(path_str(key_path))):
            if p is not None:
                x = np.take(x, perms[p], axis=axis)
        return jnp.asarray(x)

    return jax.tree_util.tree_map_with_path(move, params)


def flat(params) -> dict:
    return {f"{layer}/{name}": np.asarray(v, np.float64)
            for layer, leaves in params.items() for name, v in leaves.items()}


# --- model set-ups -----------------------------------------------------------------------


def random_params(module, images, seed: int = 0):
    """Parameters of ``module`` drawn from N(0, 0.3^2) leaf by leaf in NumPy (shapes from
    `jax.eval_shape`: no compilation; norm scales are not all ones)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(module.init, jax.random.key(0), images[:1])["params"]
    return jax.tree.map(lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), s.dtype),
                        shapes)


def mlp_setup(hidden=(16, 12), seeds=(0, 5)):
    """(module, spec, features_fn (pre-activations), models) of a small MLP."""
    module = model_lib.MLP(hidden, num_classes=5)
    spec = mlp_spec([f"Dense_{i}" for i in range(len(hidden) + 1)])
    features_fn = linen_features(module, {f"P_{i}": f"Dense_{i}" for i in range(len(hidden))})
    return module, spec, features_fn, [random_params(module, IMAGES, s) for s in seeds]


def planted_setup(name: str):
    """(apply, spec, features_fn, params_a, batches) of each architecture."""
    rng = np.random.default_rng(1)
    if name == "mlp":
        module, spec, features_fn, (a, _) = mlp_setup()
        return lambda p, x: module.apply({"params": p}, x), spec, features_fn, a, BATCHES
    if name == "resnet_layernorm":
        module = model_lib.ResNet(8, 1, norm="layer")
        images = rng.uniform(size=(48, 8, 8, 3)).astype(np.float32)
        sources = {"P_res0": ["stem_norm", "stage0_block0/norm2"]}
        for s in range(3):
            sources[f"P_s{s}b0"] = f"stage{s}_block0/norm1"
        for s in (1, 2):
            sources[f"P_res{s}"] = [f"stage{s}_block0/norm2", f"stage{s}_block0/shortcut_norm"]
        spec = resnet_spec(8)
    else:
        module = model_lib.VisionTransformer(model_lib.ViTConfig(
            image_size=14, patch_size=7, width=16, depth=1, heads=2, mlp_ratio=2,
            embed_dim=8))
        images = rng.uniform(size=(48, 14, 14)).astype(np.float32)
        attn = "resblocks_0/attn"
        sources = {  # other permuted axes reduced away: samples align across models
            "P_res": ["ln_pre", "resblocks_0"], "P_mlp0": "resblocks_0/mlp_fc",
            "P_heads0": (f"{attn}/query", lambda q: jnp.linalg.norm(q, axis=-1)),
            "P_qk0": (f"{attn}/query", lambda q: q.sum(-2)),
            "P_v0": (f"{attn}/value", lambda v: v.sum(-2))}
        spec = vit_spec(1)
    a = random_params(module, images)
    batches = [images[i * 16:(i + 1) * 16] for i in range(3)]
    return (jax.jit(lambda p, x: module.apply({"params": p}, x)), spec,
            linen_features(module, sources), a, batches)


# --- the greedy matching -----------------------------------------------------------------

# a0 a1 a2 | b0 b1 b2: a0~b1 0.9, a1~a2 0.8 (within A), b0~b2 0.7 (within B), a2~b2 0.3,
# a1~b2 0.25, a1~b0 0.2, the rest 0.1 or less.
HAND = np.full((6, 6), 0.1)
for (i, j), v in {(0, 4): 0.9, (1, 2): 0.8, (3, 5): 0.7, (2, 5): 0.3, (1, 5): 0.25,
                  (1, 3): 0.2, (2, 3): 0.05}.items():
    HAND[i, j] = HAND[j, i] = v
np.fill_diagonal(HAND, 1.0)


@pytest.mark.parametrize("beta, expected", [
    (1.0, [[0, 4], [1, 2], [3, 5]]),  # budget 1 per model: one within merge in A and in B
    (0.0, [[0, 4], [1, 3], [2, 5]]),  # no budget: greedy bipartite a0-b1, a2-b2, a1-b0
])
def test_greedy_matching_on_a_hand_made_correlation(beta, expected):
    merge, unmerge = zip_features(HAND, 2, alpha=0.3, beta=beta)
    assert groups_of(unmerge) == expected == reference_groups(HAND, 2, 0.3, beta)
    m, u = np.asarray(merge), np.asarray(unmerge)
    np.testing.assert_allclose(sum(m[k] @ u[k] for k in range(2)), np.eye(3), atol=1e-15)
    if beta == 1.0:  # merge averages each group: a1, a2 half each into merged 1
        np.testing.assert_allclose(m[0], [[0.5, 0, 0], [0, 0.5, 0.5], [0, 0, 0]])
        np.testing.assert_allclose(m[1], [[0, 0.5, 0], [0, 0, 0], [0.5, 0, 0.5]])


@pytest.mark.parametrize("k, n, alpha, beta", [
    (2, 8, 0.3, 0.125), (2, 8, 0.0, 1.0), (2, 9, 1.0, 0.5), (2, 8, 0.5, 0.0),
    (3, 6, 0.5, 1.0), (3, 6, 0.0, 1.0), (4, 4, 0.2, 0.5)])
def test_greedy_matching_matches_the_reference_loop(k, n, alpha, beta):
    rng = np.random.default_rng(k * 100 + n)
    latent = rng.normal(size=(200, n))  # drawn with replacement: within-model twins too
    feats = np.concatenate([latent[:, rng.integers(0, n, n)] + rng.normal(size=(200, n))
                            for _ in range(k)], axis=1)
    corr = np.corrcoef(feats.T)
    merge, unmerge = zip_features(corr, k, alpha=alpha, beta=beta)
    expected = reference_groups(corr, k, alpha, beta)
    assert groups_of(unmerge) == expected
    assert beta > 0 or all(len({i // n for i in g}) == len(g) for g in expected)
    for j, g in enumerate(expected):
        for i in g:
            assert np.asarray(merge)[i // n, j, i % n] == pytest.approx(1 / len(g))


# --- cross-model matches are "permute, then average" -------------------------------------


def test_zip_of_cross_model_matches_is_permute_then_average():
    module, spec, _, (a, b) = mlp_setup()
    rng = np.random.default_rng(3)
    sizes = spec.sizes(a)
    perms = {p: rng.permutation(n) for p, n in sizes.items()}
    merges, unmerges = {}, {}
    for p, n in sizes.items():  # b's unit perms[p][j] is a noisy copy of a's unit j
        xa = rng.normal(size=(300, n))
        xb = np.empty_like(xa)
        xb[:, perms[p]] = xa + 0.3 * rng.normal(size=xa.shape)
        merges[p], unmerges[p] = zip_features(np.corrcoef(np.hstack([xa, xb]).T), 2)
        assert groups_of(unmerges[p]) == [[j, n + perms[p][j]] for j in range(n)]
    merged = apply_zip(spec, [a, b], merges, unmerges)
    identity = {p: np.arange(n) for p, n in sizes.items()}
    expected = np_take_average(spec, [a, b], [identity, perms])
    for path, value in flat(merged).items():
        np.testing.assert_allclose(value, expected[path], rtol=1e-6, atol=1e-7, err_msg=path)


def test_zipit_without_budget_is_greedy_bipartite_alignment_then_average():
    module, spec, features_fn, (a, c) = mlp_setup()
    merged = zipit(spec, [a, c], features_fn, iter(BATCHES), num_batches=4, alpha=0.3,
                   beta=0.0)
    stats = feature_correlations(features_fn, [a, c], iter(BATCHES), num_batches=4)
    perms = {}
    for p, n in spec.sizes(a).items():  # NumPy greedy on the cross block, both leave
        cross = np.asarray(stats[p].block(0, 1), np.float64).copy()
        perms[p] = np.zeros(n, int)
        for _ in range(n):
            i, j = np.unravel_index(np.argmax(cross), cross.shape)
            perms[p][i] = j
            cross[i, :] = cross[:, j] = -np.inf
    identity = {p: np.arange(len(v)) for p, v in perms.items()}
    expected = np_take_average(spec, [a, c], [identity, perms])
    for path, value in flat(merged).items():
        np.testing.assert_allclose(value, expected[path], rtol=1e-6, atol=1e-7, err_msg=path)


# --- a planted permutation zips back to the original ------------------------------------


@pytest.mark.parametrize("name", ["mlp", "resnet_layernorm", "vit"])
def test_zipping_a_planted_permutation_gives_back_the_function(name):
    apply, spec, features_fn, a, batches = planted_setup(name)
    b = planted(spec, a, 2)
    merged = zipit(spec, [a, b], features_fn, iter(batches), num_batches=len(batches))
    for x, y in zip(jax.tree.leaves(merged), jax.tree.leaves(a)):
        np.testing.assert_array_equal(x, y)  # merged in a's unit order, exactly
    np.testing.assert_array_equal(apply(merged, batches[0]), apply(a, batches[0]))


def test_three_planted_copies_zip_into_groups_of_three():
    module, spec, features_fn, (a, _) = mlp_setup()
    copies = [a, planted(spec, a, 7), planted(spec, a, 8)]
    merged = zipit(spec, copies, features_fn, iter(BATCHES), num_batches=4, alpha=0.0)
    np.testing.assert_allclose(module.apply({"params": merged}, IMAGES),
                               module.apply({"params": a}, IMAGES), rtol=1e-5, atol=1e-6)


# --- partial zipping ---------------------------------------------------------------------


def test_partial_zip_of_a_planted_permutation_keeps_the_function_per_model():
    module, spec, features_fn, (a, _) = mlp_setup()
    b = planted(spec, a, 4)
    first, second = zipit(spec, [a, b], features_fn, iter(BATCHES), num_batches=4,
                          zip_perms=["P_0"])
    assert first["Dense_0"]["kernel"] is second["Dense_0"]["kernel"]
    assert first["Dense_0"]["bias"] is second["Dense_0"]["bias"]
    assert first["Dense_1"]["kernel"] is not second["Dense_1"]["kernel"]
    for params in (first, second):
        np.testing.assert_allclose(module.apply({"params": params}, IMAGES),
                                   module.apply({"params": a}, IMAGES), rtol=1e-5, atol=1e-6)


def test_partial_zip_outputs_match_numpy_per_model():
    module, spec, features_fn, models = mlp_setup(hidden=(16, 12, 10))
    stats = feature_correlations(features_fn, models, iter(BATCHES), num_batches=4)
    zipped = ["P_0", "P_1"]
    mats = {p: zip_features(stats[p].correlation(), 2, alpha=0.5, beta=1.0) for p in zipped}
    assert any(len({i // 16 for i in g}) == 1 for g in groups_of(mats["P_0"][1]))
    returned = apply_zip(spec, models, {p: mats[p][0] for p in zipped},
                         {p: mats[p][1] for p in zipped}, zip_perms=zipped)
    expected = np_zip_mlp(models, mats, 4, zipped)
    for k, params in enumerate(returned):
        np.testing.assert_allclose(module.apply({"params": params}, IMAGES),
                                   np_mlp(expected[k], IMAGES, 4), rtol=1e-5, atol=1e-5)
    same = zipit(spec, models, features_fn, iter(BATCHES), num_batches=4, alpha=0.5,
                 beta=1.0, zip_perms=zipped)
    for x, y in zip(jax.tree.leaves(same), jax.tree.leaves(returned)):
        np.testing.assert_array_equal(x, y)


# --- MuDSC -------------------------------------------------------------------------------


def weight_vectors_np(models, mats, perm: str) -> np.ndarray:
    """MuDSC's unit vectors for a two-hidden-layer MLP: the slices along ``perm`` of every
    leaf naming it, other zipped axes through K M_k (consuming) or U_k (producing)."""
    rows = []
    for k, params in enumerate(models):
        p = {key: np.asarray(v, np.float64) for key, v in flat(params).items()}
        if perm == "P_0":
            w1 = p["Dense_1/kernel"] @ np.asarray(mats["P_1"][1][k])  # producing: U_k
            parts = [p["Dense_0/kernel"].T, p["Dense_0/bias"][:, None], w1]
        else:
            w1 = 2 * np.asarray(mats["P_0"][0][k]) @ p["Dense_1/kernel"]  # consuming: K M_k
            parts = [w1.T, p["Dense_1/bias"][:, None], p["Dense_2/kernel"]]
        rows.append(np.concatenate(parts, axis=1))
    return np.concatenate(rows)


def test_weight_similarity_matches_numpy():
    _, spec, features_fn, models = mlp_setup()
    stats = feature_correlations(features_fn, models, iter(BATCHES), num_batches=4)
    mats = {p: zip_features(stats[p].correlation(), 2, alpha=0.5, beta=1.0)
            for p in ("P_0", "P_1")}
    assert any(len(g) != 2 for p in mats for g in groups_of(mats[p][1]))  # not permutations
    for perm, other in (("P_0", "P_1"), ("P_1", "P_0")):
        got = weight_similarity(spec, models, perm, {other: mats[other][0]},
                                {other: mats[other][1]})
        expected = np.corrcoef(weight_vectors_np(models, mats, perm))
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6, err_msg=perm)


def test_mudsc_with_balance_zero_is_zipit():
    _, spec, features_fn, models = mlp_setup()
    got = mudsc(spec, models, features_fn, iter(BATCHES), num_batches=4, balance=0.0,
                alpha=0.3, beta=0.5)
    expected = zipit(spec, models, features_fn, iter(BATCHES), num_batches=4, alpha=0.3,
                     beta=0.5)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("mode", ["permute", "zip"])
def test_mudsc_with_balance_one_matches_on_weights_only(mode):
    # one hidden layer: the weight vectors do not depend on the other matchings
    module, spec, features_fn, models = mlp_setup(hidden=(12,))
    got = mudsc(spec, models, features_fn, iter(BATCHES), num_batches=4, balance=1.0,
                mode=mode, alpha=0.5, beta=1.0)
    vectors = np.concatenate([np.concatenate(
        [p["Dense_0/kernel"].T, p["Dense_0/bias"][:, None], p["Dense_1/kernel"]], axis=1)
        for p in map(flat, models)])
    corr = np.corrcoef(vectors)
    if mode == "permute":
        _, cols = optimize.linear_sum_assignment(corr[:12, 12:], maximize=True)
        groups = [[j, 12 + c] for j, c in enumerate(cols)]
    else:
        groups = reference_groups(corr, 2, 0.5, 1.0)
    mats = {"P_0": [np.zeros((2, 12, 12)), np.zeros((2, 12, 12))]}
    for j, g in enumerate(groups):
        for i in g:
            mats["P_0"][0][i // 12, j, i % 12] = 1 / len(g)
            mats["P_0"][1][i // 12, i % 12, j] = 1
    expected = np_zip_mlp(models, mats, 2, ["P_0"])[0]
    for path, value in flat(got).items():
        np.testing.assert_allclose(value, expected[path], rtol=1e-5, atol=1e-6, err_msg=path)


@pytest.mark.parametrize("mode", ["permute", "zip"])
def test_mudsc_zips_a_planted_permutation_back(mode):
    module, spec, features_fn, (a, _) = mlp_setup()
    b = planted(spec, a, 6)
    merged = mudsc(spec, [a, b], features_fn, iter(BATCHES), num_batches=4, mode=mode)
    for x, y in zip(jax.tree.leaves(merged), jax.tree.leaves(a)):
        np.testing.assert_array_equal(x, y)


# --- registry ----------------------------------------------------------------------------


def test_registry_entries_take_the_merge_convention_and_ignore_base():
    _, spec, features_fn, models = mlp_setup()
    for name, fn in (("zipit", zipit), ("mudsc", mudsc)):
        method = registry.get_method(name)
        assert method.family == "alignment" and not method.needs_base
        assert method.hparams["spec"] is registry.REQUIRED
        assert method.hparams["num_batches"] == 16
        got = registry.merge(name, None, models, spec=spec, features_fn=features_fn,
                             inputs=iter(BATCHES), num_batches=4)
        expected = fn(spec, models, features_fn, iter(BATCHES), num_batches=4)
        for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
            np.testing.assert_array_equal(x, y)
    assert registry.get_method("zipit").hparams["alpha"] == 0.3
    assert registry.get_method("mudsc").hparams["balance"] == 0.5
    with pytest.raises(MergeError, match="needs hyperparameter"):
        registry.merge("zipit", None, models, spec=spec)


# --- bad input ---------------------------------------------------------------------------


def _bad_cases():
    _, spec, features_fn, models = mlp_setup()
    other = random_params(model_lib.MLP((16, 10), num_classes=5), IMAGES)
    only_first = linen_features(model_lib.MLP((16, 12), num_classes=5), {"P_0": "Dense_0"})

    def run(fn=zipit, spec=spec, models=models, features=features_fn,
            batches=BATCHES, **kwargs):
        kwargs.setdefault("num_batches", 4)
        return lambda: fn(spec, models, features, iter(batches), **kwargs)

    m, u = zip_features(np.eye(24), 2)
    stuck = np.full((6, 6), 0.1)  # K=3, alpha=0: {a1,b1}, {a2,c1}, {b2,c2} share models
    for i, j, v in ((0, 2, 0.9), (1, 4, 0.8), (3, 5, 0.7)):
        stuck[i, j] = stuck[j, i] = v
    return [
        ("no consumers", run(spec=PermutationSpec(spec.axes_to_perm)), "consume"),
        ("not a prefix", run(zip_perms=["P_1"]), "Dense_1/kernel produces the zipped"),
        ("unknown space", run(zip_perms=["P_9"]), "does not have: \\['P_9'\\]"),
        ("string zip_perms", run(zip_perms="P_0"), "collection"),
        ("mismatched models", run(models=[models[0], other]), "shape mismatch at"),
        ("one model", run(models=models[:1]), "at least 2 models"),
        ("dry batches", run(num_batches=8), "ran dry after 4 of 8"),
        ("bad num_batches", run(num_batches=0), "num_batches"),
        ("alpha", run(alpha=1.5), "alpha must be in \\[0, 1\\]"),
        ("beta", run(beta=-0.1), "beta must be in"),
        ("balance", run(mudsc, balance=2.0), "balance must be in"),
        ("mode", run(mudsc, mode="lap"), "mode must be"),
        ("sweeps", run(mudsc, max_sweeps=0), "max_sweeps"),
        ("missing features", run(features=only_first), "no features for .*'P_1'"),
        ("not square", lambda: zip_features(np.eye(5), 2), "square"),
        ("nan", lambda: zip_features(np.full((4, 4), np.nan), 2), "non-finite"),
        ("matrix shape", lambda: apply_zip(spec, models, {"P_0": m}, {"P_0": u},
                                           zip_perms=["P_0"]),
         "merges\\['P_0'\\] has shape \\(2, 12, 12\\)"),
        ("matrix missing", lambda: apply_zip(spec, models, {}, {}), "missing"),
        ("weight perm", lambda: weight_similarity(spec, models, "P_7"), "P_7"),
        ("stuck", lambda: zip_features(stuck, 3, alpha=0.0, beta=1.0), "stuck"),
    ]


BAD_CASES = _bad_cases()


@pytest.mark.parametrize("name, call, match", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_input_is_a_clear_error(name, call, match):
    with pytest.raises(MergeError, match=match):
        call()
