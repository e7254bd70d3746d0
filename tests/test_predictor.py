"""The accuracy predictor: encodings, fitting a non-additive target, persistence, numpy export."""
import itertools

import numpy as np
import pytest
import torch

from eta.accuracy_predictor import MLPPredictor, index_encode, one_hot_encode, spearman, train_predictor

SIZES = [3, 4, 2, 5, 3, 4]


def random_choices(n, seed, sizes=SIZES):
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(0, k, n) for k in sizes], axis=1)


def synthetic_accuracy(C, seed=0):
    """Additive terms plus pairwise interactions and a saturating non-linearity."""
    rng = np.random.default_rng(seed)
    main = [rng.normal(0, 1, k) for k in SIZES]
    inter = rng.normal(0, 1, (SIZES[0], SIZES[3]))
    s = sum(main[i][C[:, i]] for i in range(len(SIZES))) + 1.5 * inter[C[:, 0], C[:, 3]]
    return 0.6 + 0.2 * np.tanh(s / 3)


def test_one_hot_and_index_encodings():
    C = [(0, 3, 1, 4, 2, 0), (2, 0, 0, 1, 1, 3)]
    X = one_hot_encode(C, SIZES)
    assert X.dtype == np.float32 and X.shape == (2, sum(SIZES))
    assert np.all(X.sum(1) == len(SIZES))
    offsets = np.cumsum([0] + SIZES[:-1])
    for row, c in zip(X, C):
        assert set(np.flatnonzero(row)) == {o + v for o, v in zip(offsets, c)}
    Xi = index_encode(C, SIZES)
    np.testing.assert_allclose(Xi[0], [0, 1, 1, 1, 1, 0])
    np.testing.assert_allclose(Xi[1], [1, 0, 0, 0.25, 0.5, 1])


def test_predictor_ranks_held_out_architectures():
    C = random_choices(600, seed=1)
    X, y = one_hot_encode(C, SIZES), synthetic_accuracy(C)
    model = train_predictor(X[:450], y[:450], epochs=200, seed=0)
    rho = spearman(model.predict(X[450:]), y[450:])
    assert rho > 0.9
    # the output is the accuracy itself (scaling folded in), not a standardised score
    assert np.mean(np.abs(model.predict(X[450:]) - y[450:])) < 0.03


def test_one_hot_beats_chance_and_the_index_encoding():
    """A shuffled-target control ranks at chance; index encoding imposes an order the target lacks."""
    C = random_choices(600, seed=1)
    y = synthetic_accuracy(C)
    X = one_hot_encode(C, SIZES)
    one_hot = spearman(train_predictor(X[:450], y[:450], epochs=100).predict(X[450:]), y[450:])
    shuffled = y[:450][np.random.default_rng(0).permutation(450)]
    control = spearman(train_predictor(X[:450], shuffled, epochs=100).predict(X[450:]), y[450:])
    Xi = index_encode(C, SIZES)
    index = spearman(train_predictor(Xi[:450], y[:450], epochs=100).predict(Xi[450:]), y[450:])
    assert abs(control) < 0.3
    assert one_hot > 0.9 and one_hot > index + 0.2


def test_training_is_deterministic_for_a_seed_and_leaves_global_rng_alone():
    C = random_choices(80, seed=2)
    X, y = one_hot_encode(C, SIZES), synthetic_accuracy(C)
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = train_predictor(X, y, epochs=20, seed=3).predict(X)
    assert torch.equal(torch.rand(1), expected_next)
    b = train_predictor(X, y, epochs=20, seed=3).predict(X)
    c = train_predictor(X, y, epochs=20, seed=4).predict(X)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


@pytest.mark.parametrize("activation,layers,optimizer,output", [("tanh", 2, "adam", "linear"), ("relu", 3, "sgd", "linear"),
                                                                 ("tanh", 1, "adam", "linear"), ("tanh", 2, "adam", "sigmoid")])
def test_numpy_layers_reproduce_predict(activation, layers, optimizer, output):
    C = random_choices(60, seed=5)
    X, y = one_hot_encode(C, SIZES), synthetic_accuracy(C)
    model = train_predictor(X, y, hidden=16, layers=layers, activation=activation, optimizer=optimizer, output=output, epochs=10)
    h = X.astype(np.float64)
    ws = model.numpy_layers()
    assert len(ws) == layers
    for k, (W, b) in enumerate(ws):
        h = h @ W.T + b
        if k < len(ws) - 1:
            h = np.tanh(h) if activation == "tanh" else np.maximum(h, 0)
    out = h[:, 0] if output == "linear" else 1 / (1 + np.exp(-h[:, 0]))  # the solver applies the sigmoid itself
    np.testing.assert_allclose(out, model.predict(X), rtol=1e-5, atol=1e-6)


def test_save_load_round_trip(tmp_path):
    C = random_choices(60, seed=6)
    X, y = one_hot_encode(C, SIZES), synthetic_accuracy(C)
    model = train_predictor(X, y, hidden=8, activation="relu", epochs=10)
    model.save(tmp_path / "p.pt")
    back = MLPPredictor.load(tmp_path / "p.pt")
    assert back.config == model.config
    np.testing.assert_array_equal(back.predict(X), model.predict(X))


def test_sigmoid_output_stays_below_one_where_a_linear_output_promises_more():
    """Accuracy that saturates near 1 (as on an easy dataset): a linear output, extrapolating the
    additive trend to the best combination no sample contains, predicts past 1.0; the sigmoid
    output, fit on logit accuracy, stays below 1 everywhere and ranks held-out students as well."""
    rng = np.random.default_rng(8)
    main = [rng.normal(0, 1, k) for k in SIZES]
    every = np.array(list(itertools.product(*[range(k) for k in SIZES])))
    score = lambda C: sum(main[i][C[:, i]] for i in range(len(SIZES)))  # noqa: E731
    accuracy = lambda C: 1 - 0.04 * np.exp(-score(C) / 2)  # noqa: E731  (0.96 at score 0, → 1 from below)
    C = random_choices(400, seed=9)
    C = C[score(C) < np.quantile(score(every), 0.9)]  # the best tenth of the space is never sampled
    X, y = one_hot_encode(C, SIZES), accuracy(C)
    linear = train_predictor(X[:250], y[:250], epochs=200, seed=0)
    sigmoid = train_predictor(X[:250], y[:250], epochs=200, seed=0, output="sigmoid")
    Xa = one_hot_encode(every, SIZES)
    assert linear.predict(Xa).max() > 1.0
    assert sigmoid.predict(Xa).max() < 1.0
    assert spearman(sigmoid.predict(X[250:]), y[250:]) >= spearman(linear.predict(X[250:]), y[250:]) - 0.02 > 0.85


def test_sigmoid_output_rejects_targets_outside_zero_one():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        train_predictor(np.eye(3, dtype=np.float32), [0.5, 1.2, 0.7], output="sigmoid", epochs=1)


def test_spearman_handles_constant_input():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1, 1], [1, 2, 3, 4]) == 0.0
