"""Reproducible, resumable sampler over a weighted mixture of tasks.

Every random draw is a pure function of the seed and small counters: the task
choices of batch k come from `default_rng([seed, 0, k])` and the order of epoch
e of task t from `default_rng([seed, 1, t, e])` (the 0/1 keeps the two streams
apart). So the state is a few integers plus the weights, and a sampler restored
from it continues the exact stream an uninterrupted run would have drawn.

Length grouping (`next_batch(..., group=g)`) draws g batches of that stream at
once, sorts their examples by length and cuts them into g batches of similar
length, handed out in the order `default_rng([seed, 2, pool])` shuffles them to.
The examples, and so the mixture, are the stream's; only which step trains
which of them changes. The batches not yet handed out are part of the state.
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
    def __init__(self, sizes: dict[str, int], weights: dict[str, float], seed: int,
                 lengths: dict[str, list[int]] | None = None):
        for task, n in sizes.items():
            if n < 0:
                raise ValueError(f"task {task!r} has negative size {n}")
        self.tasks = sorted(sizes)  # task index t is stable whatever the dict order
        self.sizes = {t: sizes[t] for t in self.tasks}
        self.seed = seed
        self.batch = 0  # batches drawn so far
        self.drawn = {t: 0 for t in self.tasks}  # examples drawn so far per task, across epochs
        self._perms: dict[str, tuple[int, np.ndarray]] = {}  # cache: task -> (epoch, permutation)
        self.lengths = lengths  # task -> length of each example, for length grouping
        self.pools = 0  # length-grouped pools drawn so far
        self.pending: list[list[tuple[str, int]]] = []  # batches of the current pool not handed out yet
        self.weights: dict[str, float] = {}
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
        new = {t: float(weights.get(t, 0.0)) for t in self.tasks}
        if new != self.weights:
            self.pending = []  # drawn under the old mixture; a caller sizes its pools so none are left
        self.weights = new

    def next_batch(self, batch_size: int, group: int = 0) -> list[tuple[str, int]]:
        """(task, index into that task's train list) for each example of the next batch.

        `group` > 0: the next batch comes from a pool of `group` batches grouped by length (drawn
        when the last pool is used up; the caller keeps `group` within the steps the current
        weights hold for, so no drawn example is left over when they change).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if self.pending:
            if len(self.pending[0]) != batch_size:
                raise ValueError(f"batch_size {batch_size} differs from the pending pool's {len(self.pending[0])}")
            return self.pending.pop(0)
        if group < 1:
            return self._draw(batch_size)
        if self.lengths is None:
            raise ValueError("length grouping needs the examples' lengths (MixtureSampler(..., lengths=...))")
        picks = sorted((pick for _ in range(group) for pick in self._draw(batch_size)), key=lambda p: self.lengths[p[0]][p[1]])
        batches = [picks[i * batch_size : (i + 1) * batch_size] for i in range(group)]
        order = np.random.default_rng([self.seed, 2, self.pools]).permutation(group)
        self.pools += 1
        self.pending = [batches[i] for i in order]
        return self.pending.pop(0)

    def _draw(self, batch_size: int) -> list[tuple[str, int]]:
        """The stream's next batch."""
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
            "pools": self.pools,
            "pending": [[[task, i] for task, i in batch] for batch in self.pending],
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
        self.pools = state.get("pools", 0)  # absent from checkpoints written before length grouping
        self.pending = [[(task, int(i)) for task, i in batch] for batch in state.get("pending", [])]
