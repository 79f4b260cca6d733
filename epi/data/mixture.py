"""Reproducible, resumable sampler over a weighted mixture of tasks.

Every random draw is a pure function of the seed and small counters: the task
choices of batch k come from `default_rng([seed, 0, k])` and the order of epoch
e of task t from `default_rng([seed, 1, t, e])` (the 0/1 keeps the two streams
apart). So the state is a few integers plus the weights, and a sampler restored
from it continues the exact stream an uninterrupted run would have drawn.
"""

import numpy as np


def sampling_weights(sizes: dict[str, int], weights: dict[str, float], temperature: float | None) -> dict[str, float]:
    """Temperature sampling: P(task) ∝ weight · size^(1/T).

    T = 1 draws tasks in proportion to their training sets (a plain concatenation), a large T
    approaches uniform (small tasks up-sampled, large ones down-sampled), and None uses the
    weights alone, every task equally likely at weight 1 whatever its size.
    """
    if temperature is None:
        return dict(weights)
    return {task: w * sizes[task] ** (1.0 / temperature) for task, w in weights.items()}


class MixtureSampler:
    def __init__(self, sizes: dict[str, int], weights: dict[str, float], seed: int):
        for task, n in sizes.items():
            if n < 0:
                raise ValueError(f"task {task!r} has negative size {n}")
        self.tasks = sorted(sizes)  # task index t is stable whatever the dict order
        self.sizes = {t: sizes[t] for t in self.tasks}
        self.seed = seed
        self.batch = 0  # batches drawn so far
        self.drawn = {t: 0 for t in self.tasks}  # examples drawn so far per task, across epochs
        self._perms: dict[str, tuple[int, np.ndarray]] = {}  # cache: task -> (epoch, permutation)
        self.set_weights(weights)

    def set_weights(self, weights: dict[str, float]) -> None:
        """Change the mixture (e.g. at a stage boundary). Missing tasks or weight 0 = task off."""
        for task, w in weights.items():
            if task not in self.sizes:
                raise ValueError(f"weight for unknown task {task!r}; tasks: {', '.join(self.tasks)}")
            if not w >= 0:  # also rejects NaN
                raise ValueError(f"weight for task {task!r} must be >= 0, got {w}")
            if w > 0 and self.sizes[task] == 0:
                raise ValueError(f"task {task!r} has weight {w} but no training examples")
        if not any(w > 0 for w in weights.values()):
            raise ValueError(f"at least one task weight must be > 0, got {weights}")
        self.weights = {t: float(weights.get(t, 0.0)) for t in self.tasks}

    def next_batch(self, batch_size: int) -> list[tuple[str, int]]:
        """(task, index into that task's train list) for each example of the next batch."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        p = np.array([self.weights[t] for t in self.tasks])
        rng = np.random.default_rng([self.seed, 0, self.batch])
        choices = rng.choice(len(self.tasks), size=batch_size, p=p / p.sum())
        self.batch += 1
        return [(self.tasks[t], self._next_index(t)) for t in choices]

    def _next_index(self, t: int) -> int:
        """Next index of task t: without replacement within an epoch, reshuffled each epoch."""
        task = self.tasks[t]
        epoch, offset = divmod(self.drawn[task], self.sizes[task])
        if task not in self._perms or self._perms[task][0] != epoch:
            perm = np.random.default_rng([self.seed, 1, t, epoch]).permutation(self.sizes[task])
            self._perms[task] = (epoch, perm)
        self.drawn[task] += 1
        return int(self._perms[task][1][offset])

    def state_dict(self) -> dict:
        """Plain Python types only: safe for json.dump and torch.save(weights_only=True)."""
        return {
            "seed": self.seed,
            "sizes": dict(self.sizes),
            "weights": dict(self.weights),
            "batch": self.batch,
            "drawn": dict(self.drawn),
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume; the seed and task sizes must match, or the saved positions would mean other examples."""
        if state["seed"] != self.seed or state["sizes"] != self.sizes:
            raise ValueError(
                f"sampler state is for seed {state['seed']} and sizes {state['sizes']}, "
                f"this sampler has seed {self.seed} and sizes {self.sizes}"
            )
        self.set_weights(state["weights"])
        self.batch = state["batch"]
        self.drawn = dict(state["drawn"])
