"""Hidden-state geometry of a group of models: pure numpy/scipy, no torch, no I/O.

Notation (DESIGN.md "The math"): probes X, model i, pooled hidden state h_i(x) in R^d. Model i is
the point p_i = concat_x h_i(x) / sqrt(|X|), so ||p_i - p_j||^2 = drms(i, j)^2 =: D_ij. For any
affine weights b (sum 1), ||sum_j b_j p_j - p_i||^2 = (D b)_i - 1/2 b^T D b: every distortion below
needs only D.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mergekit_collapse.errors import BadInputError

# relative tolerance under which two distances count as equal (HiddenSim undefined)
_EQUAL_RTOL = 1e-9
# relative tolerance (of max D) for asymmetry, a non-zero diagonal and negative entries of a given D
_MATRIX_RTOL = 1e-9


def check_distances(sq: np.ndarray) -> np.ndarray:
    """A squared-distance matrix D as float64, checked: square, finite, non-negative, symmetric and
    zero on the diagonal (up to a rounding-level tolerance, then made exact).

    Raises:
        BadInputError: one line saying what is wrong.
    """
    try:
        d = np.array(sq, dtype=np.float64)
    except (TypeError, ValueError):
        raise BadInputError("the distance matrix is not numeric") from None
    if d.ndim != 2 or d.shape[0] != d.shape[1] or d.shape[0] == 0:
        raise BadInputError("the distance matrix must be square and non-empty, "
                            f"got shape {d.shape}")
    if not np.isfinite(d).all():
        raise BadInputError("the distance matrix contains NaN or inf")
    tol = _MATRIX_RTOL * float(np.abs(d).max())
    if d.min() < -tol:
        raise BadInputError(f"the distance matrix has a negative entry ({d.min():.3g})")
    if np.abs(d - d.T).max() > tol:
        i, j = np.unravel_index(np.argmax(np.abs(d - d.T)), d.shape)
        raise BadInputError(f"the distance matrix is not symmetric: D[{i},{j}] = {d[i, j]:.6g} but "
                            f"D[{j},{i}] = {d[j, i]:.6g}")
    if np.abs(np.diag(d)).max() > tol:
        raise BadInputError("the distance matrix has a non-zero diagonal (a model's distance "
                            "to itself)")
    d = np.maximum((d + d.T) / 2, 0.0)
    np.fill_diagonal(d, 0.0)
    return d


@dataclass(frozen=True)
class Distances:
    """Pairwise distances between models over a probe set."""

    mean: np.ndarray  # dmean(i,j) = mean_x ||h_i(x) - h_j(x)||   (feeds HiddenSim, Eq. 2)
    rms: np.ndarray  # drms(i,j) = sqrt(mean_x ||h_i(x) - h_j(x)||^2)   (Theorem 1's d(i,j))

    @property
    def sq(self) -> np.ndarray:
        """D_ij = drms(i,j)^2, the squared distance between the points p_i."""
        return self.rms**2


def pairwise_distances(hidden: np.ndarray) -> Distances:
    """dmean and drms for every pair of models.

    Args:
        hidden: array (N models, P probes, d) of pooled hidden states.

    Returns:
        Distances with two symmetric N x N matrices, zero diagonal.

    Raises:
        BadInputError: wrong shape, no probes, or non-finite values.
    """
    h = np.asarray(hidden, dtype=np.float64)
    if h.ndim != 3 or h.shape[1] == 0:
        raise BadInputError(f"hidden states must be (models, probes>0, dim), got {h.shape}")
    if not np.isfinite(h).all():
        raise BadInputError("hidden states contain NaN or inf")
    n = h.shape[0]
    dmean = np.zeros((n, n))
    drms = np.zeros((n, n))
    for i in range(n - 1):
        # direct differences, not Gram identities: no cancellation when models sit close together
        norms = np.linalg.norm(h[i + 1 :] - h[i], axis=2)  # (N-i-1, P)
        dmean[i, i + 1 :] = dmean[i + 1 :, i] = norms.mean(axis=1)
        drms[i, i + 1 :] = drms[i + 1 :, i] = np.sqrt((norms**2).mean(axis=1))
    return Distances(mean=dmean, rms=drms)


def hidden_sim(dmean: np.ndarray) -> tuple[np.ndarray | None, str | None]:
    """Hidden-state Distance Similarity (paper Eq. 2).

    HiddenSim(i,i) = 1; off the diagonal (max D - dmean(i,j)) / (max D - min D), D the
    off-diagonal dmean values. Relative to the group: it names the outlier, not whether the
    group collapses.

    Returns:
        (matrix, None), or (None, reason) when undefined: fewer than two pairs, or all equal.
    """
    n = dmean.shape[0]
    if n < 3:
        return None, f"undefined for {n} model(s): Eq. 2 needs at least two distinct pairs"
    off = dmean[np.triu_indices(n, 1)]
    lo, hi = off.min(), off.max()
    if hi - lo <= _EQUAL_RTOL * max(hi, 1e-300):
        return None, "undefined: all pairwise distances are equal (max D = min D)"
    sim = (hi - dmean) / (hi - lo)
    np.fill_diagonal(sim, 1.0)
    return np.clip(sim, 0.0, 1.0), None


def mds(sim: np.ndarray) -> np.ndarray:
    """Merging Difficulty Score (paper Eq. 3): MDS_i = 1 / mean_{j != i} HiddenSim(i,j);
    >= 1, inf at 0."""
    n = sim.shape[0]
    mean_sim = (sim.sum(axis=1) - np.diag(sim)) / (n - 1)
    with np.errstate(divide="ignore"):
        return np.where(mean_sim > 0, 1.0 / np.where(mean_sim > 0, mean_sim, 1.0), np.inf)


def mean_hidden_sim(sim: np.ndarray) -> np.ndarray:
    """mean_{j != i} HiddenSim(i,j) for each model."""
    n = sim.shape[0]
    return (sim.sum(axis=1) - np.diag(sim)) / (n - 1)


def jung_bound(diameter: float, n: int) -> float:
    """Theorem 1 (i): some convex merge has worst-case distortion <= n/(2(n+1)) * diameter^2.

    The paper's Lemma bounds the radius by sqrt(n/(2(n+1)))*diameter; the distortion is its square.
    """
    return n / (2.0 * (n + 1)) * diameter**2 if n > 0 else 0.0


def jung_dimension(n_models: int, ambient_dim: int, hidden_size: int, mode: str = "affine") -> int:
    """n for the Jung bound.

    affine: n = min(P*d, N-1), the dimension of the affine hull of the points p_i (valid, and
    sharper than the paper; equals min(d, N-1) whenever d >= N-1, as for every LLM). hidden: the
    paper's n = d.
    """
    if mode == "hidden":
        return hidden_size
    if mode == "affine":
        return max(0, min(ambient_dim, n_models - 1))
    raise BadInputError(f"jung_dim must be 'affine' or 'hidden', got {mode!r}")


def distortions(sq: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """||sum_j w_j p_j - p_i||^2 for every i, for affine weights w (sum 1):
    (D w)_i - 1/2 w^T D w."""
    w = np.asarray(weights, dtype=np.float64)
    dw = sq @ w
    return np.maximum(dw - 0.5 * w @ dw, 0.0)


def edm_min_eigenvalue(sq: np.ndarray) -> float:
    """Smallest eigenvalue of -1/2 J D J (>= 0 iff D is a Euclidean distance matrix),
    scaled by max D."""
    n = sq.shape[0]
    if n < 2 or sq.max() == 0:
        return 0.0
    j = np.eye(n) - 1.0 / n
    gram = -0.5 * j @ sq @ j
    return float(np.linalg.eigvalsh((gram + gram.T) / 2).min() / sq.max())


@dataclass(frozen=True)
class EnclosingBall:
    """Minimum enclosing ball of the points p_i, from their squared distances alone."""

    radius_sq: float  # r*^2: the best convex merge's worst-case distortion (under LMC)
    weights: np.ndarray  # alpha*: the distortion-optimal convex merge weights
    kkt_residual: float  # max violation of the optimality conditions, relative to max D


def enclosing_ball(sq: np.ndarray) -> EnclosingBall:
    """Exact r*^2 = max over the simplex of 1/2 a^T D a (a concave QP when D is an EDM).

    Solved with scipy's SLSQP, then polished on the support set by solving the KKT system
    [D_SS 1; 1^T 0][a_S; -mu] = [0; 1] exactly, and verified: (D a)_i <= mu off the support.

    Args:
        sq: N x N squared-distance matrix D (symmetric, zero diagonal).

    Returns:
        The ball: radius_sq, the optimal weights, and the KKT residual.

    Raises:
        BadInputError: D is not square, finite, non-negative, symmetric with zero diagonal.
    """
    from scipy.optimize import minimize

    d = check_distances(sq)
    n = d.shape[0]
    if n == 1 or d.max() == 0:
        return EnclosingBall(0.0, np.full(n, 1.0 / n), 0.0)
    scale = d.max()
    ds = d / scale  # well-conditioned
    res = minimize(
        lambda a: -0.5 * a @ ds @ a,
        np.full(n, 1.0 / n),
        jac=lambda a: -(ds @ a),
        bounds=[(0.0, 1.0)] * n,
        constraints=[{"type": "eq", "fun": lambda a: a.sum() - 1.0, "jac": lambda a: np.ones(n)}],
        method="SLSQP",
        options={"ftol": 1e-15, "maxiter": 1000},
    )
    alpha = _project_simplex(res.x)
    polished = _polish(ds, alpha)
    if polished is not None and _kkt(ds, polished) <= _kkt(ds, alpha):
        alpha = polished
    return EnclosingBall(float(0.5 * alpha @ d @ alpha), alpha, _kkt(ds, alpha))


def _project_simplex(a: np.ndarray) -> np.ndarray:
    a = np.clip(a, 0.0, None)
    return a / a.sum()


def _polish(ds: np.ndarray, alpha: np.ndarray) -> np.ndarray | None:
    support = np.flatnonzero(alpha > 1e-8)
    k = support.size
    m = np.zeros((k + 1, k + 1))
    m[:k, :k] = ds[np.ix_(support, support)]
    m[:k, k] = m[k, :k] = 1.0
    rhs = np.zeros(k + 1)
    rhs[k] = 1.0
    try:
        sol = np.linalg.solve(m, rhs)
    except np.linalg.LinAlgError:
        return None
    if (sol[:k] < 0).any():
        return None
    out = np.zeros_like(alpha)
    out[support] = sol[:k]
    return out


def _kkt(ds: np.ndarray, alpha: np.ndarray) -> float:
    """Worst violation of: all (D a)_i <= mu = a^T D a, with equality on the support."""
    g = ds @ alpha
    mu = alpha @ g
    support = alpha > 1e-8
    off = np.max(g[~support] - mu, initial=0.0)
    on = np.max(np.abs(g[support] - mu), initial=0.0)
    return float(max(off, on))


def probe_spread(hidden: np.ndarray) -> float:
    """Budget scale: mean_x ||h(x) - mean_x h||^2 of one model's probe vectors (its own spread)."""
    h = np.asarray(hidden, dtype=np.float64)
    return float(((h - h.mean(axis=0)) ** 2).sum(axis=1).mean())


@dataclass(frozen=True)
class BaseAnchored:
    """Per-task absolute predictors with the base model as p_0 (DESIGN.md "Beyond the paper")."""

    shift: np.ndarray  # ||p_i - p_0||^2
    retention: np.ndarray  # <p_m - p_0, p_i - p_0> / ||p_i - p_0||^2
    distortion: np.ndarray  # ||p_m - p_i||^2
    relative_distortion: np.ndarray  # ||p_m - p_i||^2 / ||p_i - p_0||^2


def base_anchored(sq_with_base: np.ndarray, task_weights: np.ndarray) -> BaseAnchored:
    """Retention and distortion of each model under the planned merge
    p_m = p_0 + sum_j w_j (p_j - p_0).

    Args:
        sq_with_base: (N+1) x (N+1) squared distances, index 0 the base model.
        task_weights: the merge's own weights w_1..w_N (any real values: task arithmetic is affine).

    Returns:
        BaseAnchored arrays of length N (inf/NaN-free: a model identical to the base gets 0 shift,
        retention 1 and relative distortion inf only if it is distorted).
    """
    d = np.asarray(sq_with_base, dtype=np.float64)
    w = np.asarray(task_weights, dtype=np.float64)
    # Gram of the shifts v_i = p_i - p_0, from distances alone
    k = 0.5 * (d[0, 1:][:, None] + d[0, 1:][None, :] - d[1:, 1:])
    shift = np.diag(k).copy()
    kw = k @ w
    dist = np.maximum(w @ kw - 2 * kw + shift, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        retention = np.where(shift > 0, kw / np.where(shift > 0, shift, 1.0), 1.0)
        rel = np.where(shift > 0, dist / np.where(shift > 0, shift, 1.0),
                       np.where(dist > 0, np.inf, 0.0))
    return BaseAnchored(shift=shift, retention=retention, distortion=dist, relative_distortion=rel)


def observed_retention(base: np.ndarray, merged: np.ndarray, models: np.ndarray) -> np.ndarray:
    """Retention measured with the merged model's real hidden states (no linearisation).

    Args:
        base: (P, d) base hidden states; merged: (P, d); models: (N, P, d).
    """
    b = np.asarray(base, dtype=np.float64)
    vm = (np.asarray(merged, dtype=np.float64) - b).ravel()
    vs = (np.asarray(models, dtype=np.float64) - b).reshape(len(models), -1)
    shift = (vs**2).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(shift > 0, vs @ vm / np.where(shift > 0, shift, 1.0), 1.0)


@dataclass
class Geometry:
    """Everything the decision needs, for N models (and optionally the base)."""

    distances: Distances
    hidden_sim: np.ndarray | None
    hidden_sim_note: str | None
    mds: np.ndarray | None
    mean_hidden_sim: np.ndarray | None
    diameter: float
    converse: float
    jung: float
    jung_n: int
    ball: EnclosingBall
    uniform: np.ndarray  # per-model distortion of the uniform average
    optimal: np.ndarray  # per-model distortion under alpha*
    edm_min_eig: float
    notes: list[str] = field(default_factory=list)

    @property
    def exact(self) -> float:
        return self.ball.radius_sq


def analyse(hidden: np.ndarray, *, hidden_size: int | None = None,
            jung_dim: str = "affine") -> Geometry:
    """Compute the group geometry of DESIGN.md from pooled hidden states (N, P, d).

    Raises:
        BadInputError: no models, wrong shape, or non-finite values.
    """
    h = np.asarray(hidden, dtype=np.float64)
    if h.ndim != 3 or h.shape[0] == 0:
        raise BadInputError("need hidden states of at least one model, shaped (models, "
                            "probes, dim)")
    n, _, d = h.shape
    dist = pairwise_distances(h)
    sq = dist.sq
    sim, note = hidden_sim(dist.mean)
    diameter = float(dist.rms.max())
    jn = jung_dimension(n, h.shape[1] * d, hidden_size or d, jung_dim)
    ball = enclosing_ball(sq)
    uniform = distortions(sq, np.full(n, 1.0 / n))
    notes = []
    if n == 1:
        notes.append("a single model: nothing to merge, every distortion is 0")
    min_eig = edm_min_eigenvalue(sq)
    if min_eig < -1e-8:
        notes.append(f"distance matrix is not Euclidean (min eigenvalue {min_eig:.2e}); "
                     "r*² approximate")
    return Geometry(
        distances=dist,
        hidden_sim=sim,
        hidden_sim_note=note,
        mds=mds(sim) if sim is not None else None,
        mean_hidden_sim=mean_hidden_sim(sim) if sim is not None else None,
        diameter=diameter,
        converse=diameter**2 / 4.0,
        jung=jung_bound(diameter, jn),
        jung_n=jn,
        ball=ball,
        uniform=uniform,
        optimal=distortions(sq, ball.weights),
        edm_min_eig=min_eig,
        notes=notes,
    )
