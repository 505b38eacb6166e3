"""MCTS-Explore seed selection for ICE: the reference code's rule (``PaperMCTSExplore``, the default) and
lmdistill's earlier variant (``MCTSExplore``).

``PaperMCTSExplore`` transcribes what the paper's code runs (Aegis1863/LLMs-Distillation-Quantification,
``easyjailbreak/selector/MCTSExploreSelectPolicy.py`` and ``easyjailbreak/attacker/Gptfuzzer_Identity.py``):

- select (``MCTSExploreSelectPolicy.py:44-75``): a global step counter is increased; the best of the *seed*
  templates is taken by ``reward / (visits + 1) + ratio * sqrt(2 ln(step) / (visits + 0.01))``; then, while
  the current node has children, with probability ``alpha`` the walk stops, otherwise it moves to the best
  child by the same score; every node on the walked path gets one visit. Ties go to the first node in
  insertion order (Python's ``max``), so the random generator is used only for the ``alpha`` draws.
- tree (``Gptfuzzer_Identity.py:101-108, 131``): *every* mutant becomes a child of the node it was mutated
  from, hit or not, one level deeper (seeds are level 0).
- update (``MCTSExploreSelectPolicy.py:84-91``): ``reward = hits / (questions * evaluated)`` is added to every
  node on the path, times ``max(beta, 1 - 0.1 * level of the selected node)``. The reference calls it with
  one evaluated instance per question (``Gptfuzzer_Identity.py:110-134``), so ``evaluated = questions`` and
  the reward of a mutant is ``hits / questions**2`` (``paper_reward``).

``MCTSExplore`` (``--mode lmdistill``) hangs the seeds under a root and walks down from it, at each level
taking the child with the best UCT score ``mean reward + ratio * sqrt(2 ln(N_parent + 1) / (n + 1))`` (ties
broken by the seeded random generator), and stops early at a non-leaf with probability ``alpha``.
``update`` adds the reward (there ``hits / questions``) to every node on the walked path, scaled by
``max(beta, 1 - 0.1 * depth)`` of the selected node; only a mutant that scored a hit becomes a child.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field


@dataclass
class Node:
    id: int
    template: str
    depth: int
    parent: "Node | None" = None
    children: list["Node"] = field(default_factory=list)
    visits: int = 0
    reward: float = 0.0


class _Search:
    """What both searches share: the exploration ratio, the early-stop probability alpha, the depth floor beta of
    the reward scale ``max(beta, 1 - 0.1 depth)``, the generator, and ``add`` (a mutant becomes a child node)."""

    def __init__(self, seeds: list[str], *, ratio: float = 0.5, alpha: float = 0.1, beta: float = 0.2,
                 rng: random.Random | None = None):
        if not seeds:
            raise ValueError("MCTS-Explore needs at least one seed template")
        self.ratio, self.alpha, self.beta = ratio, alpha, beta
        self.rng = rng or random.Random(0)
        self.nodes: list[Node] = []

    def _new(self, template: str, parent: Node | None) -> Node:
        node = Node(len(self.nodes), template, 0 if parent is None else parent.depth + 1, parent)
        if parent is not None:
            parent.children.append(node)
        self.nodes.append(node)
        return node

    def reward_scale(self, path: list[Node]) -> float:
        return max(self.beta, 1 - 0.1 * path[-1].depth)

    def add(self, parent: Node, template: str) -> Node:
        return self._new(template, parent)


class MCTSExplore(_Search):
    def __init__(self, seeds: list[str], **kw):
        super().__init__(seeds, **kw)
        self.root = Node(-1, "", -1)
        for s in seeds:
            self._new(s, self.root)

    def _uct(self, child: Node, parent: Node) -> float:
        return (child.reward / (child.visits + 1)
                + self.ratio * math.sqrt(2 * math.log(parent.visits + 1) / (child.visits + 1)))

    def select(self) -> tuple[Node, list[Node]]:
        path: list[Node] = []
        current = self.root
        while current.children:
            scores = [self._uct(c, current) for c in current.children]
            best = max(scores)
            ties = [c for c, s in zip(current.children, scores) if s >= best - 1e-12]
            current = ties[self.rng.randrange(len(ties))]
            path.append(current)
            if current.children and self.rng.random() < self.alpha:
                break
        return current, path

    def update(self, path: list[Node], reward: float) -> None:
        if not path:
            return
        scale = self.reward_scale(path)
        self.root.visits += 1
        for node in path:
            node.visits += 1
            node.reward += reward * scale


def paper_reward(hits: int, n_questions: int, n_evaluated: int) -> float:
    """The reference's step reward, ``hits / (questions * evaluated)`` (``MCTSExploreSelectPolicy.py:89-90``)."""
    return hits / (n_questions * n_evaluated)


class PaperMCTSExplore(_Search):
    """MCTS-Explore as the reference code runs it (see the module docstring for file:line)."""

    def __init__(self, seeds: list[str], **kw):
        super().__init__(seeds, **kw)
        self.step = 0
        self.seeds = [self._new(s, None) for s in seeds]

    def score(self, node: Node) -> float:
        return node.reward / (node.visits + 1) + self.ratio * math.sqrt(2 * math.log(self.step) / (node.visits + 0.01))

    def select(self) -> tuple[Node, list[Node]]:
        self.step += 1
        current = max(self.seeds, key=self.score)
        path = [current]
        while current.children:
            if self.rng.random() < self.alpha:
                break
            current = max(current.children, key=self.score)
            path.append(current)
        for node in path:
            node.visits += 1
        return current, path

    def update(self, path: list[Node], reward: float) -> None:
        if not path:
            return
        scale = self.reward_scale(path)
        for node in path:
            node.reward += reward * scale
